"""The batched Adam step (one learning rate per stacked tensor) on Triton against its twin.

On a GPU the kernel runs compiled on CUDA; without one, in Triton's interpreter on CPU tensors
(conftest.py turns it on before anything imports anml_fast.ops).
"""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from anml_fast import ops  # noqa: E402
from anml_fast.ops import reference  # noqa: E402
from conftest import assert_close  # noqa: E402

ab = importlib.import_module("anml_fast.ops.adam_batched")
pytest.importorskip("triton")
kernels = ab._kernels()
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# float64: the same arithmetic in another order (the bias corrections from exp(step log beta));
# float32: a few ulps over steps.
TOL = {torch.float64: (1e-13, 1e-12), torch.float32: (1e-6, 1e-5)}


def make(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]
    lr = torch.tensor([1e-3, 3e-4, 1e-2, 1e-1, 2e-2][:shape[0]], dtype=torch.float64)
    return p.to(DEVICE, dtype), [x.to(DEVICE, dtype) for x in grads], lr.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7), (5, 1025), (1, 3, 3, 3, 3), (2, 1)], ids=str)
def test_matches_twin(shape, dtype):
    p, grads, lr = make(shape, dtype)
    ours = [p.clone(), torch.zeros_like(p), torch.zeros_like(p)]
    ref = [p.clone(), torch.zeros_like(p), torch.zeros_like(p)]
    for step, g in enumerate(grads, 1):
        # an int step, then the step as a device tensor (as a CUDA graph would hold it)
        s = step if step % 2 else torch.tensor(step, device=DEVICE)
        ab.adam_update_batched_(ours[0], g, ours[1], ours[2], s, lr)
        reference.adam_update_batched_(ref[0], g, ref[1], ref[2], step, lr)
    atol, rtol = TOL[dtype]
    for name, a, b in zip(("p", "m", "v"), ours, ref):
        assert_close(a, b, atol, rtol, f"{name} {shape} {dtype}")


def test_each_trajectory_gets_its_own_rate():
    p, grads, lr = make((3, 10), torch.float64)
    lr = torch.tensor([0.0, 1e-3, 2e-3], dtype=torch.float64, device=DEVICE)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    before = p.clone()
    ab.adam_update_batched_(p, grads[0], m, v, 1, lr)
    assert torch.equal(p[0], before[0])  # lr 0: untouched
    # Adam's first step moves every weight by about lr (m/sqrt(v) = sign(g))
    assert_close((before[1:] - p[1:]).abs(), lr[1:, None].expand(2, 10), 1e-9, 1e-6, "step size")


def test_input_errors():
    p, grads, lr = make((3, 4), torch.float32)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    with pytest.raises(ValueError, match=r"lr must be \[T=3\]"):
        ab.adam_update_batched_(p, grads[0], m, v, 1, lr[:2])
    with pytest.raises(ValueError, match="one \\[T, ...\\] shape"):
        ab.adam_update_batched_(p, grads[0][:, :2], m, v, 1, lr)
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        ab.adam_update_batched_(p, grads[0], m, v, 0, lr)
    with pytest.raises(TypeError, match="one int64 element"):
        ab.adam_update_batched_(p, grads[0], m, v, torch.tensor(1.0, device=DEVICE), lr)
    with pytest.raises(TypeError, match="float32 or float64"):
        ab.adam_update_batched_(p, grads[0].double(), m, v, 1, lr)
    with pytest.raises(ValueError, match="past the kernel's grid"):
        big = torch.zeros(65536, 1, device=DEVICE)
        ab.adam_update_batched_(big, big, big, big, 1, torch.zeros(65536, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        q = torch.zeros(4, 3, device=DEVICE).t()
        ab.adam_update_batched_(q, torch.zeros_like(q), torch.zeros(3, 4, device=DEVICE),
                                torch.zeros(3, 4, device=DEVICE), 1, lr)


# As for the output-layer op: the interpreter's kernels cannot be captured by wrap_triton, so the
# AOT-dispatch check runs on the GPU only.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor") + \
    (("test_aot_dispatch_dynamic",) if CUDA else ())


def test_compile_with_a_dynamic_step():
    """torch.compile traces the op with a symbolic step (a Python int that changes each call)."""
    p, grads, lr = make((3, 5, 7), torch.float32)
    ours = [p.clone(), torch.zeros_like(p), torch.zeros_like(p)]
    ref = [p.clone(), torch.zeros_like(p), torch.zeros_like(p)]

    @torch.compile(backend="eager", dynamic=True, fullgraph=True)
    def step(q, g, m, v, s):
        torch.ops.anml_fast.adam_update_batched_(q, g, m, v, s, lr, 0.9, 0.999, 1e-8)

    for s, g in enumerate(grads, 1):
        step(ours[0], g, ours[1], ours[2], s)
        reference.adam_update_batched_(ref[0], g, ref[1], ref[2], s, lr)
    for name, a, b in zip(("p", "m", "v"), ours, ref):
        assert_close(a, b, *TOL[torch.float32], name)


def test_finetune_runs_the_op_and_matches_the_twin(synthetic_data):
    """run_finetune_batched's Adam through the Triton op (the interpreter on CPU, forced by
    "compiled") gives the twin's accuracies."""
    from anml_fast.data.tasks import MetaTestSet
    from anml_fast.evaluation.finetune_batched import run_finetune_batched
    from anml_fast.evaluation.trajectories import Trajectory
    from anml_fast.models import build
    from conftest import TINY

    from anml_fast.ops import _ext
    if _ext.load() is None:
        # "compiled" forces every op compiled, the C++ conv block of the gate's trunk included
        if os.environ.get("CI") and os.environ.get("ANML_FAST_NO_EXT") != "1":
            pytest.fail(f"anml_fast._C did not load: {_ext.error()}", pytrace=False)
        pytest.skip(f"anml_fast._C not built (ANML_FAST_NO_EXT=1): {_ext.error()}")
    net = build(TINY)
    params = net.init_params(torch.Generator(DEVICE).manual_seed(5), DEVICE, torch.float64)
    test_set = MetaTestSet(synthetic_data, DEVICE, dtype=torch.float64)
    g = torch.Generator(DEVICE).manual_seed(3)
    trajs = [Trajectory(test_set.draw_classes(g, 2), lr) for lr in (1e-3, 1e-2)]
    runs = {}
    for backend in ("compiled", "torch"):
        with ops.use_backend(backend):
            runs[backend] = run_finetune_batched(net, params, test_set, trajs, ["pln"], "adam", False,
                                                 torch.Generator(DEVICE).manual_seed(9))
    assert runs["compiled"] == pytest.approx(runs["torch"], abs=1e-9)


def test_opcheck():
    p, grads, lr = make((3, 5, 7), torch.float32)
    args = (p, grads[0], torch.zeros_like(p), torch.rand_like(p), 2, lr, 0.9, 0.999, 1e-8)
    torch.library.opcheck(torch.ops.anml_fast.adam_update_batched_.default, args, test_utils=OPCHECK_UTILS)
    args = (*args[:4], torch.tensor(2, device=DEVICE), *args[5:])
    torch.library.opcheck(torch.ops.anml_fast.adam_update_batched_device_step_.default, args,
                          test_utils=OPCHECK_UTILS)


def test_dispatch_and_available():
    assert ab.available(DEVICE), ab.unavailable_reason(DEVICE)
    assert ops.choose("adam_update_batched_", DEVICE, "compiled") is ab.adam_update_batched_
    assert ops.choose("adam_update_batched_", DEVICE, "torch") is reference.adam_update_batched_
    import inspect
    assert inspect.signature(ab.adam_update_batched_).parameters.keys() == \
        inspect.signature(reference.adam_update_batched_).parameters.keys()
