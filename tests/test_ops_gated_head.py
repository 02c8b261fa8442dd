"""The fused gated-head ops (Triton) against their plain-PyTorch twins.

On a GPU the kernels run compiled on CUDA. Without one they run in Triton's interpreter on CPU
tensors: Triton decides that when a kernel is *defined* (when anml_fast.ops imports
anml_fast.kernels.gated_head), so TRITON_INTERPRET must be set before anything imports
anml_fast.ops: conftest.py's job, since it imports the models. This module sets it too, for runs
where nothing imported the ops before it, and stops with a clear error if it came too late.
"""
import importlib
import os
import re
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from anml_fast import ops  # noqa: E402
from conftest import assert_close  # noqa: E402

# importlib, not `from anml_fast.ops import gated_head`: the package's `gated_head` is the op
# function the models call, and `import anml_fast.ops.gated_head as m` would resolve to it too.
gh = importlib.import_module("anml_fast.ops.gated_head")
if not callable(ops.gated_head):
    # Loading the submodule rebinds `anml_fast.ops.gated_head` to it (Python binds a submodule on
    # its parent package), which would break the models in later tests. Once ops/__init__ imports
    # this submodule before binding its own `gated_head`, this never triggers.
    ops.gated_head = ops.reference.gated_head

pytest.importorskip("triton")
kernels = gh._kernels()

CUDA = torch.cuda.is_available()
if not CUDA and not gh._CHECK.interpreted():
    raise RuntimeError("the gated-head kernels were defined for a GPU, but there is none: set "
                       "TRITON_INTERPRET=1 before anything imports anml_fast.ops (tests/conftest.py "
                       "should, when CUDA is absent)")
DEVICE = torch.device("cuda" if CUDA else "cpu")
gpu = pytest.mark.gpu

# Per-dtype (atol, rtol) against the twin in the same dtype. float32: the kernels use IEEE FMA
# dots (no TF32), so only the summation order differs: F = 2304 terms of O(1) give ~1e-6 absolute
# on the logits and loss, far less on grads scaled by 1/B. float64: the same, at 1e-16 per term.
TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-12, 1e-12)}
DTYPES = [torch.float32, torch.float64]

ODD = [(1, 50, 37), (3, 50, 37), (20, 70, 37)]
# B = 84 uses the meta-loss launch configuration (3 row blocks of 32, tl.dot); small F and O keep
# it quick in the interpreter. The full protocol shapes follow (B = 84 only on GPU: ~20 s in the
# interpreter).
META_CONFIG = (84, 96, 130)
PROTOCOL_B1 = (1, 2304, 1000)
PROTOCOL_B84 = (84, 2304, 1000)


def make_inputs(B, F, O, dtype=torch.float32, requires_grad=False, seed=0):
    """h, gate_logits like the model's (ReLU features, gate logits around 0), Kaiming-scaled W."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, F, generator=g, dtype=torch.float64).relu()
    z = torch.randn(B, F, generator=g, dtype=torch.float64) * 2
    w = torch.randn(O, F, generator=g, dtype=torch.float64) * (2 / F) ** 0.5
    b = torch.randn(O, generator=g, dtype=torch.float64) * 0.1
    y = torch.randint(0, O, (B,), generator=g)
    ts = [t.to(DEVICE, dtype).requires_grad_(requires_grad) for t in (h, z, w, b)]
    return (*ts, y.to(DEVICE))


def grads_of(fn, args, target=None, grad_out=None):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    out = fn(*leaves) if target is None else fn(*leaves, target)
    grad_out = torch.ones_like(out) if grad_out is None else grad_out
    return out.detach(), torch.autograd.grad(out, leaves, grad_out)


NAMES = ("h", "gate_logits", "weight", "bias")

# From GEMM_MIN_ROWS rows up the ops run their products on cuBLAS (torch.mm) around the Triton
# kernels; below, the fused Triton kernels do it all. Tests that take `path` run every shape both
# ways, whatever its row count.
PATHS = {"triton": 10 ** 6, "cublas": 2}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    monkeypatch.setattr(kernels, "GEMM_MIN_ROWS", PATHS[request.param])
    return request.param


# At B = 1 the SGD step runs as its forward and backward launches, or (kernels/gated_head.py's
# ONE_LAUNCH_STEP) as one launch with grid barriers (kernels/gated_head_step.py; in the
# interpreter as three launches of the same kernel). Tests that take `head_step` run both.
# The one-launch step's launches in the current test (what kernels/gated_head_step.launch
# returned: True where it ran), so a test can check that the form it meant to test ran.
HEAD_STEP_RUNS: list = []


@pytest.fixture(params=["one_launch", "two_launches"])
def head_step(request, monkeypatch):
    monkeypatch.setattr(kernels, "ONE_LAUNCH_STEP", request.param == "one_launch")
    step, launch = kernels.gated_head_step, kernels.gated_head_step.launch
    HEAD_STEP_RUNS.clear()

    def recorded(*args, **kwargs):
        HEAD_STEP_RUNS.append(launch(*args, **kwargs))
        return HEAD_STEP_RUNS[-1]
    monkeypatch.setattr(step, "launch", recorded)
    return request.param


# ------------------------------------------------------------------ equality with the twins

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD + [META_CONFIG])
def test_gated_head_matches_twin(shape, dtype, path):
    h, z, w, b, _ = make_inputs(*shape, dtype=dtype)
    grad_out = torch.randn(shape[0], shape[2], dtype=dtype, device=DEVICE)
    out, grads = grads_of(gh.gated_head, (h, z, w, b), grad_out=grad_out)
    ref, ref_grads = grads_of(gh.gated_head_reference, (h, z, w, b), grad_out=grad_out)
    atol, rtol = TOL[dtype]
    assert_close(out, ref, atol, rtol, "logits")
    for n, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, atol, rtol, f"d{n}")


@pytest.mark.parametrize("way", ["da-partials", "da-kernel", "cublas"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD + [META_CONFIG])
def test_cross_entropy_matches_twin(shape, dtype, way, monkeypatch):
    # The three ways of getting da (fused into the weight kernel, its own kernel, cuBLAS) at every
    # shape.
    monkeypatch.setattr(kernels, "FUSE_INPUT_GRAD_MAX_ROWS", 10 ** 6 if way == "da-partials" else 0)
    monkeypatch.setattr(kernels, "GEMM_MIN_ROWS", PATHS["cublas" if way == "cublas" else "triton"])
    h, z, w, b, y = make_inputs(*shape, dtype=dtype)
    grad_out = torch.tensor(1.7, dtype=dtype, device=DEVICE)  # a non-unit upstream grad
    loss, grads = grads_of(gh.gated_head_cross_entropy, (h, z, w, b), y, grad_out)
    ref, ref_grads = grads_of(gh.gated_head_cross_entropy_reference, (h, z, w, b), y, grad_out)
    atol, rtol = TOL[dtype]
    assert loss.shape == ()
    assert_close(loss, ref, atol, rtol, "loss")
    for n, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, atol, rtol, f"d{n}")


@pytest.mark.parametrize("shape", [PROTOCOL_B1, pytest.param(PROTOCOL_B84, marks=gpu)], ids=["B1", "B84"])
def test_cross_entropy_protocol_shapes(shape):
    h, z, w, b, y = make_inputs(*shape)
    loss, grads = grads_of(gh.gated_head_cross_entropy, (h, z, w, b), y)
    ref, ref_grads = grads_of(gh.gated_head_cross_entropy_reference, (h, z, w, b), y)
    atol, rtol = TOL[torch.float32]
    assert_close(loss, ref, atol, rtol, "loss")
    for n, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, atol, rtol, f"d{n}")


@gpu
@pytest.mark.parametrize("shape", [PROTOCOL_B1, PROTOCOL_B84], ids=["B1", "B84"])
def test_gated_head_protocol_shapes(shape):
    h, z, w, b, _ = make_inputs(*shape)
    out, grads = grads_of(gh.gated_head, (h, z, w, b))
    ref, ref_grads = grads_of(gh.gated_head_reference, (h, z, w, b))
    atol, rtol = TOL[torch.float32]
    assert_close(out, ref, atol, rtol, "logits")
    for n, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, atol, rtol, f"d{n}")


@pytest.mark.parametrize("op", ["gated_head", "cross_entropy"])
@pytest.mark.parametrize("shape", [(1, 50, 37), pytest.param(PROTOCOL_B1, marks=gpu), pytest.param(PROTOCOL_B84, marks=gpu)],
                         ids=["odd", "B1", "B84"])
def test_float32_error_within_2x_of_pytorch(shape, op):
    """float32 against a float64 reference: at most 2x plain PyTorch's float32 error, plus a few
    ulps of the output's scale (an exact PyTorch result would otherwise demand exactness)."""
    fused = gh.gated_head if op == "gated_head" else gh.gated_head_cross_entropy
    twin = gh.gated_head_reference if op == "gated_head" else gh.gated_head_cross_entropy_reference
    h, z, w, b, y = make_inputs(*shape, dtype=torch.float32)
    tgt = None if op == "gated_head" else y
    exact, exact_grads = grads_of(twin, [t.double() for t in (h, z, w, b)], tgt)
    ours, our_grads = grads_of(fused, (h, z, w, b), tgt)
    torch_, torch_grads = grads_of(twin, (h, z, w, b), tgt)
    eps = torch.finfo(torch.float32).eps
    for n, o, t, e in zip(("out",) + NAMES, (ours,) + our_grads, (torch_,) + torch_grads, (exact,) + exact_grads):
        ours_err = (o.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        floor = 4 * eps * e.abs().max().item()
        assert ours_err <= 2 * torch_err + floor, f"{op} {n}: error {ours_err:.3g} vs PyTorch's {torch_err:.3g}"


def test_only_the_needed_grads(path):
    """The meta-test trains only the head (no dh, dz) and a frozen head passes grads through
    (no dW, db): each path skips the other's kernels and must still be right."""
    h, z, w, b, y = make_inputs(3, 50, 37)
    for wanted in ([False, False, True, True], [True, True, False, False], [False, True, False, False]):
        leaves = [t.clone().requires_grad_(r) for t, r in zip((h, z, w, b), wanted)]
        ref_leaves = [t.clone().requires_grad_(r) for t, r in zip((h, z, w, b), wanted)]
        for fused, twin, args in ((gh.gated_head_cross_entropy, gh.gated_head_cross_entropy_reference, (y,)),
                                  (gh.gated_head, gh.gated_head_reference, ())):
            got = torch.autograd.grad(fused(*leaves, *args).sum(), [t for t in leaves if t.requires_grad])
            want = torch.autograd.grad(twin(*ref_leaves, *args).sum(), [t for t in ref_leaves if t.requires_grad])
            for g, r in zip(got, want):
                assert_close(g, r, *TOL[torch.float32], f"{fused.__name__} {wanted}")


def test_leading_dims_and_non_contiguous_inputs():
    h, z, w, b, y = make_inputs(6, 50, 37)
    h3, z3 = h.reshape(2, 3, 50), z.reshape(2, 3, 50)
    assert_close(gh.gated_head(h3, z3, w, b), gh.gated_head_reference(h3, z3, w, b), *TOL[torch.float32], "3-d")
    wt = w.t().contiguous().t()  # same values, column-major
    ht = h.t().contiguous().t()
    assert not wt.is_contiguous() and not ht.is_contiguous()
    assert_close(gh.gated_head_cross_entropy(ht, z, wt, b, y), gh.gated_head_cross_entropy_reference(h, z, w, b, y),
                 *TOL[torch.float32], "non-contiguous")


def test_deterministic():
    """No atomics: two runs agree bit for bit."""
    h, z, w, b, y = make_inputs(20, 70, 37)
    first = grads_of(gh.gated_head_cross_entropy, (h, z, w, b), y)
    second = grads_of(gh.gated_head_cross_entropy, (h, z, w, b), y)
    for a, c in zip((first[0],) + first[1], (second[0],) + second[1]):
        assert torch.equal(a, c)


def test_input_errors():
    h, z, w, b, y = make_inputs(3, 50, 37)
    with pytest.raises(TypeError, match="float32 or float64"):
        gh.gated_head(h.half(), z.half(), w.half(), b.half())
    with pytest.raises(ValueError, match="weight must be"):
        gh.gated_head(h, z, w[:, :49], b)
    with pytest.raises(ValueError, match="target must be int64"):
        gh.gated_head_cross_entropy(h, z, w, b, y.int())
    with pytest.raises(ValueError, match="contiguous"):
        gh.gated_head_ce_sgd_(h, z, w.t().contiguous().t(), b, y, 0.1)


# ------------------------------------------------------------------ the fused SGD step

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD + [META_CONFIG, PROTOCOL_B1], ids=lambda s: "x".join(map(str, s)))
def test_sgd_step_matches_twin_plus_update(shape, dtype, path, head_step):
    if shape[0] > 1 and head_step == "one_launch":
        pytest.skip("the one-launch step is batch 1's")
    if shape == PROTOCOL_B1 and (dtype == torch.float64 or path == "cublas"):
        pytest.skip("one protocol-shape run (float32, the fused kernels') is enough")
    h, z, w, b, y = make_inputs(*shape, dtype=dtype)
    lr = 0.1
    w_fused, b_fused = w.clone(), b.clone()
    loss, dh, dz = gh.gated_head_ce_sgd_(h, z, w_fused, b_fused, y, lr)
    assert HEAD_STEP_RUNS == ([True] if head_step == "one_launch" else [])
    # The twin, spelled out: grads at the old weights, then the explicit update.
    ref_loss, (ref_dh, ref_dz, ref_dw, ref_db) = grads_of(gh.gated_head_cross_entropy_reference, (h, z, w, b), y)
    atol, rtol = TOL[dtype]
    assert_close(loss, ref_loss, atol, rtol, "loss")
    assert_close(dh, ref_dh, atol, rtol, "dh (old weight)")
    assert_close(dz, ref_dz, atol, rtol, "dgate_logits (old weight)")
    assert_close(w_fused, w - lr * ref_dw, atol, rtol, "weight after the step")
    assert_close(b_fused, b - lr * ref_db, atol, rtol, "bias after the step")
    # ... and the packaged twin does the same.
    w_twin, b_twin = w.clone(), b.clone()
    twin = gh.gated_head_ce_sgd_reference_(h, z, w_twin, b_twin, y, lr)
    for n, got, want in zip(("loss", "dh", "dz", "weight", "bias"), (loss, dh, dz, w_fused, b_fused),
                            twin + (w_twin, b_twin)):
        assert_close(got, want, atol, rtol, f"twin {n}")


def test_sgd_step_on_leaves_that_require_grad():
    """The inner loop's fast weights may require grad; the step is an optimizer-style update."""
    h, z, w, b, y = make_inputs(1, 50, 37, requires_grad=True)
    w0 = w.detach().clone()
    loss, dh, dz = gh.gated_head_ce_sgd_(h, z, w, b, y, 0.5)
    assert not (loss.requires_grad or dh.requires_grad or dz.requires_grad)
    assert not torch.equal(w.detach(), w0)


def test_sgd_trajectory_matches_twin(head_step):
    """20 sequential steps at batch 1, as the inner loop runs them: errors must not compound."""
    h, z, w, b, y = make_inputs(20, 50, 37)
    w_f, b_f, w_t, b_t = w.clone(), b.clone(), w.clone(), b.clone()
    for i in range(20):
        args = (h[i:i + 1], z[i:i + 1])
        gh.gated_head_ce_sgd_(*args, w_f, b_f, y[i:i + 1], 0.1)
        gh.gated_head_ce_sgd_reference_(*args, w_t, b_t, y[i:i + 1], 0.1)
    assert HEAD_STEP_RUNS == ([True] * 20 if head_step == "one_launch" else [])
    assert_close(w_f, w_t, *TOL[torch.float32], "weight after 20 steps")
    assert_close(b_f, b_t, *TOL[torch.float32], "bias after 20 steps")


def test_arrival_counters_are_left_at_zero(path, head_step):
    """The loss and the fused input grads are finished by each launch's last program, counted in
    on counters that every launch must leave at zero for the next one on its stream."""
    arrivals = sys.modules[kernels.counters.__module__]  # kernels/_counters.py, however it was imported
    for shape in ((1, 50, 37), (3, 70, 37)):
        h, z, w, b, y = make_inputs(*shape)
        gh.gated_head_ce_sgd_(h, z, w, b, y, 0.1)
        grads_of(gh.gated_head_cross_entropy, (h, z, w, b), y)
        assert int(arrivals.counters(h, 1).abs().sum()) == 0


@gpu
def test_last_program_finishes_give_the_same_bits_every_run(head_step):
    """On the GPU any program may be the last to arrive; the sums they finish run in a fixed
    order, so the loss, dh and dz are the same bits on every run."""
    h, z, w, b, y = make_inputs(*PROTOCOL_B1)
    first = [t.clone() for t in gh.gated_head_ce_sgd_(h, z, w.clone(), b.clone(), y, 0.1)]
    for _ in range(50):
        again = gh.gated_head_ce_sgd_(h, z, w.clone(), b.clone(), y, 0.1)
        for name, a, c in zip(("loss", "dh", "dz"), again, first):
            assert torch.equal(a, c), name


def test_one_launch_step_plan():
    """On a 132-SM H100/H200 (and in the interpreter, which plans for one) the inner loop's head
    step (B = 1, ANML's 1000 x 2304 head) fits the one-launch kernel: 250 programs of 4 rows,
    the features as 2048 + 256 with no padding, every output and feature covered; a batch of more
    than one row, float64, a head too big for the registers, or no features do not."""
    step = kernels.gated_head_step
    h, _, w, _, _ = make_inputs(*PROTOCOL_B1)
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count if CUDA else 132
    cfg = step.plan(h, w)
    if sms < 125:
        pytest.skip(f"{sms} SMs: ANML's head needs 8 rows a program here, more than the registers allow")
    assert cfg is not None, cfg
    assert (cfg["grid"], cfg["ROWS"], cfg["BLOCK_F"], cfg["BLOCK_T"]) == (250, 4, 2048, 256), cfg
    assert cfg["grid"] * cfg["ROWS"] >= 1000 and cfg["grid"] * cfg["BLOCK_C"] >= 2304
    assert step.plan(h.expand(2, -1), w) is None
    assert step.plan(h, w.new_empty((40000, 2304))) is None
    assert step.plan(h.double(), w.double()) is None  # twice the registers: the two launches
    assert step.plan(h[:, :0], w[:, :0]) is None
    # traced (opcheck's AOT dispatch runs the op on fake, functional tensors with symbolic shapes):
    # the two launches, which a tracer can capture
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as fake:
        assert step.plan(fake.from_tensor(h), fake.from_tensor(w)) is None


def test_refused_cooperative_grid_falls_back(monkeypatch):
    """Where the driver refuses the cooperative grid (its programs would not all be resident),
    the step reports that it did not run, and `plan` declines that shape from then on."""
    step = kernels.gated_head_step
    monkeypatch.setattr(step, "_REFUSED", set())
    h, z, w, b, y = make_inputs(1, 50, 37)
    cfg = step.plan(h, w)

    def refuse(kernel, grid, *args, **kwargs):
        assert kwargs.get("launch_cooperative_grid")
        raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")
    monkeypatch.setattr(step, "launch_kernel", refuse)
    monkeypatch.setattr(step, "_INTERPRETED", False)  # let one_launch=True reach the launcher
    out = (h.new_empty(()), h.new_empty((1,)), torch.empty_like(h), torch.empty_like(h))
    w_f, b_f = w.clone(), b.clone()
    assert step.launch(h, z, w_f, b_f, y, 0.1, *out, cfg, one_launch=True) is False
    assert torch.equal(w_f, w) and torch.equal(b_f, b)  # nothing written
    assert step.plan(h, w) is None
    monkeypatch.undo()
    # the op then takes its two launches without trying the one launch, and matches the twin
    monkeypatch.setattr(step, "_REFUSED", {step._refusal_key(h, cfg)})
    monkeypatch.setattr(step, "launch", lambda *a, **k: pytest.fail("the refused shape was launched again"))
    loss, dh, dz = gh.gated_head_ce_sgd_(h, z, w_f, b_f, y, 0.1)
    twin = gh.gated_head_ce_sgd_reference_(h, z, w.clone(), b.clone(), y, 0.1)
    assert_close(loss, twin[0], *TOL[torch.float32], "loss")
    assert_close(dh, twin[1], *TOL[torch.float32], "dh")


@gpu
def test_one_launch_step_equals_its_three_launches():
    """The cooperative launch (grid barriers) and the same kernel as three launches, one phase
    each (what the interpreter runs), agree eagerly and captured: to rounding (the compiler may
    lay the two forms' reductions out differently). The inputs change every round and the
    one-launch form runs first, so its scratch blocks (reused by the caching allocator, or the
    graph's own) hold the last round's values: a program running ahead of a barrier would read
    those stale logits or partials and be off by far more."""
    step = kernels.gated_head_step
    names = ("loss", "lse", "dh", "dz", "weight", "bias")
    h, z, w, b, y = make_inputs(*PROTOCOL_B1)
    cfg = step.plan(h, w)
    assert cfg is not None

    def run(one_launch, h, z, w, b, y):
        out = (h.new_empty(()), h.new_empty((1,)), torch.empty_like(h), torch.empty_like(h))
        assert step.launch(h, z, w, b, y, 0.1, *out, cfg, one_launch=one_launch) is True
        return out + (w, b)

    for seed in range(5):
        h, z, w, b, y = make_inputs(*PROTOCOL_B1, seed=seed)
        one = run(True, h, z, w.clone(), b.clone(), y)
        three = run(False, h, z, w.clone(), b.clone(), y)
        for n, a, c in zip(names, one, three):
            assert_close(a, c, 1e-6, 1e-6, f"seed {seed}: {n}")

    static = [t.clone() for t in make_inputs(*PROTOCOL_B1, seed=10)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(True, *static)
    for seed in (11, 12):
        fresh = make_inputs(*PROTOCOL_B1, seed=seed)
        for t, v in zip(static, fresh):
            t.copy_(v)
        graph.replay()
        three = run(False, fresh[0], fresh[1], fresh[2].clone(), fresh[3].clone(), fresh[4])
        torch.cuda.synchronize()
        for n, a, c in zip(names, captured, three):
            assert_close(a, c, 1e-6, 1e-6, f"captured, seed {seed}: {n}")


# ------------------------------------------------------------------ autograd, registration

@pytest.mark.parametrize("op", ["gated_head", "cross_entropy"])
@pytest.mark.parametrize("shape", [(1, 5, 4), (3, 6, 5), (6, 5, 4)], ids=["B1", "B3", "B6"])
def test_gradcheck_float64(shape, op, path):
    # The interpreter computes in numpy, float64 included. float64 takes the kernels' broadcast
    # multiply-and-sum path (B = 1: one row; 3, 6: one and two row blocks of 4); float32's tl.dot path is
    # checked against the twins above.
    h, z, w, b, y = make_inputs(*shape, dtype=torch.float64, requires_grad=True)
    fn = gh.gated_head if op == "gated_head" else (lambda *a: gh.gated_head_cross_entropy(*a, y))
    assert torch.autograd.gradcheck(fn, (h, z, w, b))


@pytest.mark.parametrize("op", ["gated_head", "cross_entropy"])
def test_second_order(op):
    """Under create_graph the backward differentiates the twin: double backward works (float64
    gradgradcheck), and the first-order grads it returns still equal the kernels'."""
    h, z, w, b, y = make_inputs(3, 6, 5, dtype=torch.float64, requires_grad=True)
    fn = gh.gated_head if op == "gated_head" else (lambda *a: gh.gated_head_cross_entropy(*a, y))
    assert torch.autograd.gradgradcheck(fn, (h, z, w, b))
    out = fn(h, z, w, b)
    with_graph = torch.autograd.grad(out, (h, z, w, b), torch.ones_like(out), create_graph=True)
    plain = torch.autograd.grad(fn(h, z, w, b), (h, z, w, b), torch.ones_like(out))
    for n, g, p in zip(NAMES, with_graph, plain):
        assert g.requires_grad or n == "bias"  # for gated_head, db = sum(ones): a constant
        assert_close(g, p, *TOL[torch.float64], f"d{n}")


# On CPU the kernels run in Triton's interpreter, which wrap_triton cannot capture into a graph:
# opcheck's AOT-dispatch tests and any AOTAutograd/Inductor compile then call the kernels with fake
# tensors. Those run on GPU only; the CPU keeps the schema, registration and fake-tensor checks.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic") if CUDA else ("test_schema", "test_autograd_registration", "test_faketensor")


def _opcheck_cases(sgd_rows=1):
    h, z, w, b, y = make_inputs(3, 50, 37, requires_grad=True)
    h1, z1, w1, b1, y1 = make_inputs(sgd_rows, 50, 37)
    gl = torch.randn(3, 37, device=DEVICE)
    with torch.no_grad():
        loss, logits, lse = kernels.gated_head_ce_fwd(h, z, w, b, y)
    d = lambda *ts: [t.detach() for t in ts]
    return {
        "gated_head_fwd": (kernels.gated_head_fwd, (h, z, w, b)),
        "gated_head_bwd": (kernels.gated_head_bwd, (gl, *d(h, z, w), True, True)),
        "gated_head_bwd_weight_only": (kernels.gated_head_bwd, (gl, *d(h, z, w), False, True)),
        "gated_head_ce_fwd": (kernels.gated_head_ce_fwd, (h, z, w, b, y)),
        "gated_head_ce_bwd": (kernels.gated_head_ce_bwd, (torch.ones((), device=DEVICE), *d(h, z, w, logits, lse), y, True, True)),
        "gated_head_ce_sgd_": (kernels.gated_head_ce_sgd_, (h1, z1, w1, b1, y1, 0.1)),
    }


@pytest.mark.parametrize("case", ["gated_head_fwd", "gated_head_bwd", "gated_head_bwd_weight_only",
                                  "gated_head_ce_fwd", "gated_head_ce_bwd", "gated_head_ce_sgd_"])
def test_opcheck(case, path):
    op, args = _opcheck_cases(sgd_rows=1 if path == "triton" else 3)[case]
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


def test_ops_are_registered():
    for name in ("gated_head_fwd", "gated_head_bwd", "gated_head_ce_fwd", "gated_head_ce_bwd", "gated_head_ce_sgd_"):
        assert hasattr(torch.ops.anml_fast, name), name
    schema = str(torch.ops.anml_fast.gated_head_ce_sgd_.default._schema)
    assert re.search(r"Tensor\(a\d*!\) weight", schema) and re.search(r"Tensor\(a\d*!\) bias", schema), schema


def _loss(h, z, w, b, y):
    return gh.gated_head_cross_entropy(h, z, w, b, y) + gh.gated_head(h, z, w, b).square().mean()


def test_compile_fullgraph(path):
    # CPU: Dynamo must capture the ops without a graph break (fullgraph) and the graph runs them
    # eagerly (backend "eager"; see OPCHECK_UTILS for why not AOTAutograd). GPU: Inductor, which
    # decomposes the triton_ops into their kernels.
    torch._dynamo.reset()
    h, z, w, b, y = make_inputs(3, 50, 37, requires_grad=True)
    compiled = torch.compile(_loss, fullgraph=True, backend="inductor" if CUDA else "eager")
    loss = compiled(h, z, w, b, y)
    grads = torch.autograd.grad(loss, (h, z, w, b))  # the compiled backward (AOTAutograd on GPU)
    ref_loss = _loss(h, z, w, b, y)
    ref_grads = torch.autograd.grad(ref_loss, (h, z, w, b))
    assert_close(loss, ref_loss, *TOL[torch.float32], "loss")
    for n, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, *TOL[torch.float32], f"d{n}")


def test_compile_fullgraph_sgd_step(head_step):
    torch._dynamo.reset()
    h, z, w, b, y = make_inputs(1, 50, 37)
    w_c, b_c, w_e, b_e = w.clone(), b.clone(), w.clone(), b.clone()
    step = torch.compile(gh.gated_head_ce_sgd_, fullgraph=True, backend="inductor" if CUDA else "eager")
    out = step(h, z, w_c, b_c, y, 0.1)
    ref = gh.gated_head_ce_sgd_(h, z, w_e, b_e, y, 0.1)
    for n, a, r in zip(("loss", "dh", "dz", "weight", "bias"), out + (w_c, b_c), ref + (w_e, b_e)):
        assert_close(a, r, *TOL[torch.float32], n)


@gpu
def test_cuda_graph_replays_the_sgd_step(head_step):
    """The inner loop's head step, captured once and replayed (what a CUDA-graphed loop does)."""
    h, z, w, b, y = make_inputs(1, 2304, 1000)
    w_g, b_g, w_e, b_e = w.clone(), b.clone(), w.clone(), b.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gh.gated_head_ce_sgd_(h, z, w_g.clone(), b_g.clone(), y, 0.1)  # warm-up: compile kernels
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gh.gated_head_ce_sgd_(h, z, w_g, b_g, y, 0.1)
    for _ in range(3):
        graph.replay()
        ref = gh.gated_head_ce_sgd_(h, z, w_e, b_e, y, 0.1)
    torch.cuda.synchronize()
    for n, a, r in zip(("loss", "dh", "dz", "weight", "bias"), out + (w_g, b_g), ref + (w_e, b_e)):
        assert_close(a, r, *TOL[torch.float32], n)


# ------------------------------------------------------------------ available()

def test_available_runs_the_ops():
    assert gh.available(), gh.unavailable_reason()
    assert gh.unavailable_reason() is None


def test_available_records_why_not(monkeypatch):
    def broken(device):
        raise ImportError("no triton here")

    monkeypatch.setattr(gh._CHECK, "state", {})
    monkeypatch.setattr(gh._CHECK, "self_test", broken)
    assert not gh.available()
    assert "no triton here" in gh.unavailable_reason()
