"""The compiled multi-tensor updates (anml_fast::sgd_update, anml_fast::adam_update_) against their
plain-PyTorch twins and torch.optim.Adam."""
import importlib
import inspect
import os

import pytest
import torch

from anml_fast.ops import _ext, reference
from conftest import assert_close

# No clash here (the package's functions are sgd_update and adam_update_, not multi_tensor), but
# importlib keeps the import the same as the other compiled-op tests.
mt = importlib.import_module("anml_fast.ops.multi_tensor")

if _ext.load() is None:
    if os.environ.get("CI") and os.environ.get("ANML_FAST_NO_EXT") != "1":
        pytest.fail(f"anml_fast._C did not load: {_ext.error()}", pytrace=False)
    pytest.skip(f"anml_fast._C not built: {_ext.error()}", allow_module_level=True)

gpu = pytest.mark.gpu
DEVICES = ["cpu", pytest.param("cuda", marks=gpu)]

# The PLN of the protocol (the inner loop's 14 tensors), and odd sizes: sizes that are not a
# multiple of the 16-byte pack, a 0-d tensor, an empty one, and one larger than a CUDA chunk.
PLN = [(256, 3, 3, 3), (256,), (256,), (256,), (256, 256, 3, 3), (256,), (256,), (256,),
       (256, 256, 3, 3), (256,), (256,), (256,), (1000, 2304), (1000,)]
ODD = [(5, 3), (7,), (), (0,), (3, 1, 5), (4099,), (2, 3, 4)]

# (atol, rtol) against the twin in the same dtype. sgd: one rounding (an FMA on the GPU may save
# it); below float32 both compute in float32 and round once to storage. Adam: a few roundings per
# step (sqrt, division), compounding over steps on values O(1).
SGD_TOL = {torch.float64: (1e-14, 1e-14), torch.float32: (1e-6, 1e-6),
           torch.bfloat16: (1e-2, 1e-2), torch.float16: (1e-3, 1e-3)}
ADAM_TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-5)}
# Adam below float32, flash-attention's rule: the error against the twin in float64 within 2x of
# the twin's own in that dtype. Not elementwise against the twin: the twin rounds m and v to
# storage after each of its ATen ops (v after mul_ and again after addcmul_), we once per step, so
# the two drift apart by several units in the last place (seen: 3 ulp of float16 on an H100).
LOW = [torch.bfloat16, torch.float16]


def make_lists(shapes, device="cpu", dtype=torch.float32, count=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]
            for _ in range(count)]


def adam_lists(shapes, device="cpu", dtype=torch.float32):
    p, g, m, v = make_lists(shapes, device, dtype)
    return [p, g, m, [t.abs() for t in v]]  # exp_avg_sq is non-negative


@pytest.mark.parametrize("dtype", list(SGD_TOL), ids=str)
@pytest.mark.parametrize("shapes", [PLN, ODD], ids=["pln", "odd"])
@pytest.mark.parametrize("device", DEVICES)
def test_sgd_matches_twin_and_is_out_of_place(shapes, device, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 is a GPU matter")
    p, g = make_lists(shapes, device, dtype, count=2)
    before = [t.clone() for t in p]
    new = mt.sgd_update(p, g, 0.1)
    want = reference.sgd_update(p, g, 0.1)
    atol, rtol = SGD_TOL[dtype]
    for i, (n, w, old, src) in enumerate(zip(new, want, before, p)):
        assert n.shape == w.shape and n.dtype == w.dtype and n.device == w.device
        assert_close(n, w, atol=atol, rtol=rtol, what=f"tensor {i}")
        assert torch.equal(src, old), "sgd_update changed its input"
        assert n.numel() == 0 or n.data_ptr() != src.data_ptr()


@pytest.mark.parametrize("dtype", list(ADAM_TOL) + LOW, ids=str)
@pytest.mark.parametrize("shapes", [PLN, ODD], ids=["pln", "odd"])
@pytest.mark.parametrize("device", DEVICES)
def test_adam_matches_twin(shapes, device, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 is a GPU matter")
    ours = adam_lists(shapes, device, dtype)
    theirs = [[t.clone() for t in lst] for lst in ours]
    exact = [[t.to(torch.float64, copy=True) for t in lst] for lst in ours]
    for step in range(1, 4):
        mt.adam_update_(*ours, step, 1e-3, 0.9, 0.999, 1e-8)
        reference.adam_update_(*theirs, step, 1e-3, 0.9, 0.999, 1e-8)
        reference.adam_update_(*exact, step, 1e-3, 0.9, 0.999, 1e-8)
    for name, a_list, b_list, e_list in zip(["param", "grad", "exp_avg", "exp_avg_sq"], ours, theirs, exact):
        for i, (a, b, e) in enumerate(zip(a_list, b_list, e_list)):
            if dtype in ADAM_TOL:
                atol, rtol = ADAM_TOL[dtype]
                assert_close(a, b, atol=atol, rtol=rtol, what=f"{name} {i}")
            elif e.numel():
                err, err_twin = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
                floor = torch.finfo(dtype).eps * e.abs().max().item()
                assert err <= 2 * err_twin + floor, f"{name} {i}: {err:.3g} vs the twin's {err_twin:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_adam_equals_torch_optim_adam(device, dtype):
    shapes = [(5, 3), (7,), (2, 3, 4), (1000,)]
    p0 = make_lists(shapes, device, dtype, count=1)[0]
    theirs = [t.clone().requires_grad_() for t in p0]
    opt = torch.optim.Adam(theirs, lr=3e-3, betas=(0.8, 0.99), eps=1e-7, foreach=False)
    ours = [t.clone() for t in p0]
    m = [torch.zeros_like(t) for t in p0]
    v = [torch.zeros_like(t) for t in p0]
    for step in range(1, 7):
        grads = make_lists(shapes, device, dtype, count=1, seed=step)[0]
        for t, g in zip(theirs, grads):
            t.grad = g.clone()
        opt.step()
        mt.adam_update_(ours, grads, m, v, step, 3e-3, 0.8, 0.99, 1e-7)
    atol, rtol = ADAM_TOL[dtype]
    for i, (a, t) in enumerate(zip(ours, theirs)):
        assert_close(a, t.detach(), atol=atol, rtol=rtol, what=f"param {i}")
        assert_close(m[i], opt.state[t]["exp_avg"], atol=atol, rtol=rtol, what=f"exp_avg {i}")
        assert_close(v[i], opt.state[t]["exp_avg_sq"], atol=atol, rtol=rtol, what=f"exp_avg_sq {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_views_and_mixed_dtypes_take_the_aten_path(device):
    """Tensors a flat loop cannot walk (strided views, a dtype other than the first tensor's) are
    updated one by one through ATen, in the same call."""
    base = torch.randn(6, 8, device=device)
    p = [torch.randn(5, device=device), base[:, ::2], torch.randn(4, device=device, dtype=torch.float64)]
    g = [torch.randn_like(t) for t in p]
    for n, w in zip(mt.sgd_update(p, g, 0.5), reference.sgd_update(p, g, 0.5)):
        assert_close(n, w, atol=1e-6, rtol=1e-6)
    ours = [p, g, [torch.randn_like(t) for t in p], [torch.rand_like(t) for t in p]]
    theirs = [[t.clone() for t in lst] for lst in ours]
    between = base[:, 1::2].clone()
    mt.adam_update_(*ours, 2, 1e-2)
    reference.adam_update_(*theirs, 2, 1e-2)
    for a, b in zip(ours[0] + ours[2] + ours[3], theirs[0] + theirs[2] + theirs[3]):
        assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert torch.equal(base[:, 1::2], between), "the view's update leaked into its neighbours"


def test_empty_lists():
    assert mt.sgd_update([], [], 0.1) == []
    mt.adam_update_([], [], [], [], 1, 1e-3)


def test_rejects_bad_arguments():
    p, g = [torch.randn(3)], [torch.randn(4)]
    with pytest.raises(RuntimeError, match="shape"):
        mt.sgd_update(p, g, 0.1)
    with pytest.raises(RuntimeError, match="grads"):
        mt.sgd_update(p, g + g, 0.1)
    lists = adam_lists([(3,)])
    with pytest.raises(RuntimeError, match="step counts from 1"):
        mt.adam_update_(*lists, 0, 1e-3)


def test_sgd_gradcheck():
    """The backward (dp = dout, dg = -lr * dout) lets meta-gradients flow through inner steps."""
    p = [torch.randn(3, 2, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True)]
    g = [torch.randn(3, 2, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True)]
    fn = lambda p0, p1, g0, g1: tuple(mt.sgd_update([p0, p1], [g0, g1], 0.3))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*p, *g))
    assert torch.autograd.gradgradcheck(fn, (*p, *g))


def test_sgd_second_order_inner_step_matches_twin():
    """A second-order inner step: grads taken with create_graph, the fast weight's loss
    differentiated back to the starting weight through the gradient."""
    results = []
    for sgd in (mt.sgd_update, reference.sgd_update):
        w = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3).requires_grad_()
        x = torch.arange(3, dtype=torch.float64)
        (g,) = torch.autograd.grad(torch.tanh(w @ x).square().sum(), w, create_graph=True)
        (fast,) = sgd([w], [g], 0.5)
        results.append(torch.autograd.grad(torch.tanh(fast @ x).sum(), w)[0])
    assert_close(results[0], results[1], atol=1e-12, rtol=1e-12)


def test_opcheck():
    p, g = make_lists(ODD[:3], count=2)
    torch.library.opcheck(torch.ops.anml_fast.sgd_update, ([t.requires_grad_() for t in p], g, 0.1))
    torch.library.opcheck(torch.ops.anml_fast.adam_update_, (*adam_lists(ODD[:3]), 2, 1e-3, 0.9, 0.999, 1e-8))


def test_same_signatures_as_twins():
    for name in ("sgd_update", "adam_update_"):
        ours = inspect.signature(getattr(mt, name)).parameters
        theirs = inspect.signature(getattr(reference, name)).parameters
        assert [(k, v.default) for k, v in ours.items()] == [(k, v.default) for k, v in theirs.items()]


def test_available():
    assert mt.available("cpu"), mt.unavailable_reason("cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_adam_under_torch_compile(device):
    """The mutating op through torch.compile (functionalised, then written back)."""
    ours = adam_lists([(5, 3), (7,)], device)
    theirs = [[t.clone() for t in lst] for lst in ours]
    torch._dynamo.reset()
    step = torch.compile(lambda *lists: mt.adam_update_(*lists, 2, 1e-2), backend="aot_eager",
                         fullgraph=True)
    step(*ours)
    reference.adam_update_(*theirs, 2, 1e-2)
    for a, b in zip(ours[0] + ours[2] + ours[3], theirs[0] + theirs[2] + theirs[3]):
        assert_close(a, b, atol=1e-6, rtol=1e-5)


@gpu
def test_cuda_is_one_launch_for_the_pln():
    """The inner loop's 14 tensors, and the whole model's 28, in a single kernel each."""
    from torch.profiler import ProfilerActivity, profile

    p, g = make_lists(PLN, "cuda", count=2)
    lists = adam_lists(PLN + PLN, "cuda")
    mt.sgd_update(p, g, 0.1)
    mt.adam_update_(*lists, 1, 1e-3)
    torch.cuda.synchronize()
    for call in (lambda: mt.sgd_update(p, g, 0.1), lambda: mt.adam_update_(*lists, 2, 1e-3)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "multi_tensor" in e.name]
        assert len(kernels) == 1, kernels


@gpu
def test_cuda_more_tensors_than_one_table():
    """More than kMaxTensors (64) tensors: several launches, every tensor updated once."""
    shapes = [(i % 7 + 1, 33) for i in range(150)]
    ours = adam_lists(shapes, "cuda")
    theirs = [[t.clone() for t in lst] for lst in ours]
    mt.adam_update_(*ours, 1, 1e-2)
    reference.adam_update_(*theirs, 1, 1e-2)
    for a, b in zip(ours[0], theirs[0]):
        assert_close(a, b, atol=1e-6, rtol=1e-5)


@gpu
def test_cuda_unaligned_pointers():
    """Views starting one element in: the kernel must fall back from 16-byte packs."""
    big = make_lists([(4099,)], "cuda", count=4)
    ours = [[t[0][1:]] for t in big]
    ours[3] = [ours[3][0].abs()]
    theirs = [[t[0].clone()] for t in ours]
    mt.adam_update_(*ours, 1, 1e-2)
    reference.adam_update_(*theirs, 1, 1e-2)
    assert_close(ours[0][0], theirs[0][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(mt.sgd_update(ours[0], ours[1], 0.1), reference.sgd_update(ours[0], ours[1], 0.1)):
        assert_close(a, b, atol=1e-6, rtol=1e-6)


@gpu
def test_cuda_graph_capture():
    p, g = make_lists(PLN, "cuda", count=2)
    want = reference.sgd_update(p, g, 0.1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        mt.sgd_update(p, g, 0.1)
        side.synchronize()
        with torch.cuda.graph(graph, stream=side):
            new = mt.sgd_update(p, g, 0.1)
    assert len({t.untyped_storage().data_ptr() for t in new}) == 1  # the eager entry's one block
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(new, want):
        assert_close(a, b, atol=1e-6, rtol=1e-6)


@gpu
def test_cuda_results_share_one_block_yet_act_as_separate_tensors():
    """A plain eager sgd_update on the GPU carves its results from one allocation
    (csrc/cuda/multi_tensor.cu). Each must still act as a tensor of its own: aligned, not a view,
    written in place without touching the others, saved by safetensors. The registered op (what
    torch.compile and opcheck see) keeps one allocation per result, as its fake says."""
    from safetensors.torch import load, save

    p, g = make_lists(ODD + PLN, "cuda", count=2)
    new = mt.sgd_update(p, g, 0.1)
    kept = [t.clone() for t in new]
    assert len({t.untyped_storage().data_ptr() for t in new}) == 1
    for i, t in enumerate(new):
        assert t._base is None and t.is_contiguous() and t.data_ptr() % 16 == 0, i
    # a tensor the fused launch cannot walk (a transposed view) takes ATen's path: its own result
    mixed_p, mixed_g = [p[0].t()] + p[1:], [g[0].t()] + g[1:]
    mixed = mt.sgd_update(mixed_p, mixed_g, 0.1)
    for a, b in zip(mixed, reference.sgd_update(mixed_p, mixed_g, 0.1)):
        assert_close(a, b, atol=1e-6, rtol=1e-6)
    block = {t.untyped_storage().data_ptr() for t in mixed[1:]}
    assert len(block) == 1 and mixed[0].untyped_storage().data_ptr() not in block
    new[4].fill_(7.0)
    new[5].add_(1.0)
    for i, (a, b) in enumerate(zip(new, kept)):
        if i not in (4, 5):
            assert torch.equal(a, b), f"tensor {i} changed when another was written"
    loaded = load(save({f"t{i}": t for i, t in enumerate(new)}))
    for i, t in enumerate(new):
        assert torch.equal(loaded[f"t{i}"].cuda(), t), i
    dispatched = torch.ops.anml_fast.sgd_update(p, g, 0.1)
    assert len({t.untyped_storage().data_ptr() for t in dispatched}) == len(dispatched)
    torch.library.opcheck(torch.ops.anml_fast.sgd_update, ([t.requires_grad_() for t in p], g, 0.1))
    with torch.enable_grad():  # through the C++ autograd node: the shared block, and grads back
        leaves = [t.detach().requires_grad_() for t in p]
        out = mt.sgd_update(leaves, g, 0.1)
        assert len({t.untyped_storage().data_ptr() for t in out}) == 1
        grads = torch.autograd.grad(sum(t.sum() for t in out), leaves)
    assert all(torch.equal(d, torch.ones_like(d)) for d in grads)


@gpu
def test_cuda_results_under_cudagraph_trees():
    """torch.compile's reduce-overhead mode records the op into a CUDA graph over its own memory
    pool and rebuilds the outputs on each replay. Traced, the op is the registered one: one
    allocation per result, as its fake says."""
    p, g = make_lists(PLN, "cuda", count=2)
    torch._dynamo.reset()
    step = torch.compile(lambda p, g: mt.sgd_update(p, g, 0.1), mode="reduce-overhead", fullgraph=True)
    outs = []
    for k in range(3):
        grads = [t * (k + 1) for t in g]
        got = step(p, grads)
        assert len({t.untyped_storage().data_ptr() for t in got}) == len(got)
        outs.append(([t.clone() for t in got], reference.sgd_update(p, grads, 0.1)))
    for got, want in outs:
        for a, b in zip(got, want):
            assert_close(a, b, atol=1e-6, rtol=1e-6)


@gpu
def test_available_on_cuda():
    assert mt.available("cuda"), mt.unavailable_reason("cuda")


def test_forward_mode_tangents_are_refused_not_dropped():
    """The C++ autograd skips its node where no grad is wanted; a forward-mode tangent must still
    reach it (and its clear refusal: the node has no jvp), with or without grad mode."""
    import torch.autograd.forward_ad as fwAD
    p, g = [torch.randn(3)], [torch.randn(3)]
    with fwAD.dual_level():
        dual = fwAD.make_dual(p[0], torch.ones(3))
        with pytest.raises(RuntimeError, match="jvp"):
            mt.sgd_update([dual], g, 0.1)
        with torch.no_grad(), pytest.raises(RuntimeError, match="jvp"):
            mt.sgd_update([dual], g, 0.1)
