"""The compiled gated conv block (anml_fast::conv_block, C++/CUDA) against its plain-PyTorch twin.

The CPU kernel walks each plane with the same per-plane code as the CUDA kernels
(csrc/conv_block_plane.h), so these CPU tests also check the GPU's arithmetic; the `gpu` tests
check the warp layout, the launch and cuDNN on a device.
"""
import importlib
import inspect
import os
import subprocess
import sys

import pytest
import torch

from anml_fast import ops
from anml_fast.ops import _ext, reference
from conftest import assert_close

# importlib, not `from anml_fast.ops import conv_block`: the package's `conv_block` is the op
# function the models call. Loading the submodule also rebinds `anml_fast.ops.conv_block` to it
# (Python binds a submodule on its parent package), which would break the models in later tests;
# once ops/__init__ imports this submodule before binding its own `conv_block`, this never triggers.
cb = importlib.import_module("anml_fast.ops.conv_block")
if not callable(ops.conv_block):
    ops.conv_block = reference.conv_block

if _ext.load() is None:
    if os.environ.get("CI") and os.environ.get("ANML_FAST_NO_EXT") != "1":
        pytest.fail(f"anml_fast._C did not load: {_ext.error()}", pytrace=False)
    pytest.skip(f"anml_fast._C not built: {_ext.error()}", allow_module_level=True)

gpu = pytest.mark.gpu
DEVICES = ["cpu", pytest.param("cuda", marks=gpu)]

# Every comparison is against the twin computed in float64 from the same values.
# Small (odd) shapes, element by element: (atol, rtol), atol relative to the largest reference
# magnitude of each tensor. float64: only summation order differs. float32: the conv (another
# algorithm, and no bias add) and the per-plane sums, ~1e-6 relative per value, dW summing more.
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (5e-5, 5e-5)}
# Protocol shapes (and every dtype below float32), by flash-attention's rule on the relative L2
# error: ours against float64 within 2x of the twin's in the same dtype, plus a floor. Elementwise
# tolerances cannot hold there: among millions of values a few sit within rounding of a ReLU kink
# or a pooling tie, where float32 and float64 decide differently and a gradient entry moves by
# O(1); the twin in float32 flips the same ones (measured: identical grad_x errors at batch 84).
# Low-precision cases are large enough that such flips average out (on a few thousand values
# their count alone makes the ratio swing from 0.03 to 4 between seeds).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-4, torch.float16: 1e-5}
# (batch, C_in, C_out, H_out, W_out, pool): the conv output is H_out x W_out.
PROTOCOL = [
    (1, 3, 256, 26, 26, True), (1, 256, 256, 11, 11, True), (1, 256, 256, 3, 3, False),
    (20, 3, 112, 26, 26, True), (20, 112, 112, 11, 11, True), (20, 112, 112, 3, 3, False),
    (84, 3, 256, 26, 26, True), (84, 256, 256, 11, 11, True), (84, 256, 256, 3, 3, False),
]
ODD = [
    (1, 2, 3, 7, 9, True), (1, 2, 3, 7, 9, False), (3, 4, 5, 9, 7, True), (3, 4, 5, 8, 5, True),
    (84, 3, 4, 5, 5, True), (2, 3, 4, 1, 2, False), (3, 3, 6, 2, 3, True), (2, 5, 3, 13, 2, False),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def make_inputs(B, c_in, c_out, h, w, device="cpu", dtype=torch.float32, seed=0, gamma_sign=False):
    """x and parameters like the model's: Kaiming weights, norm weight near 1 (or of random sign)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, c_in, h + 2, w + 2, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64) * (2 / (9 * c_in)) ** 0.5
    bias = torch.randn(c_out, generator=g, dtype=torch.float64) * 0.1
    nw = (torch.randn(c_out, generator=g, dtype=torch.float64) if gamma_sign
          else 1 + 0.1 * torch.randn(c_out, generator=g, dtype=torch.float64))
    nb = 0.1 * torch.randn(c_out, generator=g, dtype=torch.float64)
    return [t.to(device, dtype) for t in (x, weight, bias, nw, nb)]


def run(fn, args, pool, upstream):
    """Output and the gradients of <out, upstream> w.r.t. every argument."""
    args = [a.detach().requires_grad_() for a in args]
    out = fn(*args, pool=pool)
    grads = torch.autograd.grad(out, args, upstream)
    return [out.detach(), *grads]


NAMES = ["out", "grad_x", "grad_weight", "grad_bias", "grad_norm_weight", "grad_norm_bias"]


def rel_l2(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def compare(case, device, dtype, gamma_sign=False):
    B, c_in, c_out, h, w, pool = case
    args = make_inputs(B, c_in, c_out, h, w, device, dtype, gamma_sign=gamma_sign)
    out_shape = (B, c_out, h // 2, w // 2) if pool else (B, c_out, h, w)
    upstream = torch.randn(out_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = run(reference.conv_block, [a.double() for a in args], pool, upstream.to(device))
    ours = run(cb.conv_block, args, pool, upstream.to(device, dtype))
    elementwise = dtype in TOL and B * c_out * h * w <= 100_000
    twin = None if elementwise else run(reference.conv_block, args, pool, upstream.to(device, dtype))
    for i, (name, a, e) in enumerate(zip(NAMES, ours, exact)):
        what = f"{case} {dtype} {name}"
        if name == "grad_bias":
            # Exactly 0: the output does not depend on the bias (the twin gets rounding noise).
            assert torch.all(a == 0), what
        elif elementwise:
            atol, rtol = TOL[dtype]
            assert_close(a.double(), e, atol=atol * max(1.0, e.abs().max().item()), rtol=rtol, what=what)
        else:
            err, err_twin = rel_l2(a, e), rel_l2(twin[i], e)
            assert err <= 2 * err_twin + FLOOR[dtype], \
                f"{what}: relative L2 {err:.3g}, the twin's {err_twin:.3g}"


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("case", ODD, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_twin_odd_shapes(case, device, dtype):
    compare(case, device, dtype, gamma_sign=True)


@pytest.mark.parametrize("case", PROTOCOL, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_twin_protocol_shapes(case, device):
    compare(case, device, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=gpu)], ids=str)
@pytest.mark.parametrize("case", [PROTOCOL[0], PROTOCOL[4], PROTOCOL[8], (20, 16, 32, 11, 11, True)],
                         ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_within_twice_the_twins_error(case, device, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 convolutions are a GPU matter")
    compare(case, device, dtype)


@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 7), (1, 2, 3, 4, 4), (3, 2, 2, 3, 2)], ids=str)
def test_gradcheck(shape, pool):
    args = [a.requires_grad_() for a in make_inputs(*shape, dtype=torch.float64, gamma_sign=True)]
    assert torch.autograd.gradcheck(lambda *a: cb.conv_block(*a, pool=pool), args)


def test_gradcheck_without_input_grad():
    # The first layer's input (the image) needs no gradient: the backward skips cuDNN's dgrad.
    x, *params = make_inputs(2, 3, 4, 5, 7, dtype=torch.float64)
    params = [p.requires_grad_() for p in params]
    assert torch.autograd.gradcheck(lambda *p: cb.conv_block(x, *p, pool=True), params)


@pytest.mark.parametrize("pool", [True, False])
def test_gradgradcheck(pool):
    # Second order goes through the twin (the fused backward is not differentiable itself).
    args = [a.requires_grad_() for a in make_inputs(2, 2, 3, 4, 5, dtype=torch.float64, gamma_sign=True)]
    assert torch.autograd.gradgradcheck(lambda *a: cb.conv_block(*a, pool=pool), args)


def test_second_order_matches_twin():
    """The ANML second-order inner step: a gradient of a gradient, as the twin gives it."""
    args = make_inputs(3, 3, 4, 6, 6, dtype=torch.float64, gamma_sign=True)
    results = []
    for fn in (cb.conv_block, reference.conv_block):
        a = [t.clone().requires_grad_() for t in args]
        inner = fn(*a, pool=True).square().sum()
        g = torch.autograd.grad(inner, a[1:], create_graph=True)
        outer = sum((gi * gi).sum() for gi in g)
        results.append(torch.autograd.grad(outer, a, allow_unused=True))
    for name, ours, twin in zip(["x", "weight", "bias", "norm_weight", "norm_bias"], *results):
        assert_close(ours, twin, atol=1e-10, rtol=1e-9, what=name)


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_is_a_cpp_node_whose_errors_reach_python(device):
    """The ops' autograd is C++ (csrc/conv_block_autograd.cpp): no Python node in the graph, and an
    error in the second-order hook it calls comes back to Python as that error (in a subprocess:
    a C++ exception that crossed libraries badly would abort the process, not fail a test)."""
    code = f"""
import sys, torch, anml_fast.ops as o
cb = sys.modules["anml_fast.ops.conv_block"]
x, w = torch.randn(1, 3, 8, 8, device="{device}"), torch.randn(4, 3, 3, 3, device="{device}")
b, nw, nb = (torch.randn(4, device="{device}") for _ in range(3))
leaves = [t.requires_grad_() for t in (x, w, b, nw, nb)]
out = cb.conv_block(*leaves, True)
assert type(out.grad_fn).__name__ == "CppFunction", out.grad_fn
def broken(*args):
    raise ValueError("second-order hook failed")
cb._ext.load().set_second_order(broken)
try:
    torch.autograd.grad(out.sum(), [x], create_graph=True)
except ValueError as e:
    print("raised:", e)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "raised: second-order hook failed" in run.stdout, run.stdout + run.stderr


def test_bias_has_no_effect_and_no_gradient():
    x, w, b, nw, nb = make_inputs(2, 3, 4, 6, 6, dtype=torch.float64)
    b.requires_grad_()
    out = cb.conv_block(x, w, b, nw, nb, pool=True)
    (grad_b,) = torch.autograd.grad(out.sum(), b)
    assert torch.equal(grad_b, torch.zeros_like(b))
    assert torch.equal(out, cb.conv_block(x, w, b + 10, nw, nb, pool=True))


def test_pool_ties_route_to_the_first_maximum():
    """norm_weight 0 makes every window a four-way tie; max_pool2d's gradient goes to the first
    position in row-major order, and so must ours (dgamma sums gz * xhat, which tells)."""
    x, w, b, _, _ = make_inputs(2, 3, 4, 6, 8, dtype=torch.float64)
    nw = torch.zeros(4, dtype=torch.float64)
    nb = torch.tensor([0.5, -0.5, 0.0, 1.0], dtype=torch.float64)
    upstream = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    for name, a, e in zip(NAMES, run(cb.conv_block, [x, w, b, nw, nb], True, upstream),
                          run(reference.conv_block, [x, w, b, nw, nb], True, upstream)):
        if name != "grad_bias":
            assert_close(a, e, atol=1e-10, rtol=1e-9, what=name)


def test_strided_and_channels_last_inputs():
    x, w, b, nw, nb = make_inputs(3, 4, 5, 7, 9)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    x_view = torch.zeros(3, 4, 9, 22).index_copy_(3, torch.arange(0, 22, 2), x)[..., ::2]
    upstream = torch.randn(3, 5, 3, 4)
    want = run(reference.conv_block, [x, w, b, nw, nb], True, upstream)
    for variant in (x_cl, x_view):
        for name, a, e in zip(NAMES, run(cb.conv_block, [variant, w, b, nw, nb], True, upstream), want):
            assert_close(a, e, atol=5e-5, rtol=5e-5, what=name)


def test_rejects_bad_arguments():
    x, w, b, nw, nb = make_inputs(1, 3, 4, 5, 5)
    with pytest.raises(RuntimeError, match="C_in"):
        cb.conv_block(x[:, :2], w, b, nw, nb, True)
    with pytest.raises(RuntimeError, match="norm_weight"):
        cb.conv_block(x, w, b, nw[:3], nb, True)
    with pytest.raises(RuntimeError, match="must be"):
        cb.conv_block(x.double(), w, b, nw, nb, True)


@pytest.mark.parametrize("pool", [True, False])
def test_opcheck(pool):
    args = make_inputs(2, 3, 4, 5, 7)
    torch.library.opcheck(torch.ops.anml_fast.conv_block,
                          tuple(a.requires_grad_() for a in args) + (pool,))
    x, w, b, nw, nb = make_inputs(2, 3, 4, 5, 7)
    out, conv_out, mean, rstd = cb.conv_block_forward(x, w, b, nw, nb, pool)
    for mask in ([True, True, True], [False, True, False], [False, False, True]):
        torch.library.opcheck(torch.ops.anml_fast.conv_block_backward,
                              (torch.randn_like(out), x, w, conv_out, mean, rstd, nw, nb, pool, mask))


# plane_norm: the block's normalisation alone, the same kernels on a given conv output

def _norm_inputs(B, c, h, w, device="cpu", dtype=torch.float32):
    x, _, _, nw, nb = make_inputs(B, 1, c, h, w, device, dtype)
    y = torch.randn(B, c, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return y.to(device, dtype), nw, nb


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("case", [(1, 3, 7, 9, True), (3, 5, 8, 5, False), (1, 256, 11, 11, True)], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_plane_norm_matches_twin(case, device, dtype):
    B, c, h, w, pool = case
    args = _norm_inputs(B, c, h, w, device, dtype)
    upstream = torch.randn((B, c, h // 2, w // 2) if pool else (B, c, h, w), dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1)).to(device)
    exact = run(reference.plane_norm, [a.double() for a in args], pool, upstream)
    ours = run(cb.plane_norm, args, pool, upstream.to(dtype))
    atol, rtol = TOL[dtype]
    for name, a, e in zip(("out", "grad_y", "grad_norm_weight", "grad_norm_bias"), ours, exact):
        assert a.dtype == dtype
        assert_close(a.double(), e, atol=atol * max(1.0, e.abs().max().item()), rtol=rtol, what=f"{case} {name}")


def test_plane_norm_is_conv_block_after_its_conv():
    x, w, b, nw, nb = make_inputs(2, 3, 4, 5, 7)
    out, conv_out, mean, rstd = cb.conv_block_forward(x, w, b, nw, nb, True)
    n_out, n_mean, n_rstd = cb.plane_norm_forward(conv_out, nw, nb, True)
    assert torch.equal(out, n_out) and torch.equal(mean, n_mean) and torch.equal(rstd, n_rstd)


def test_plane_norm_gradcheck_and_second_order():
    y, nw, nb = (a.requires_grad_() for a in _norm_inputs(2, 3, 4, 6, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda *a: cb.plane_norm(*a, pool=True), (y, nw, nb))
    assert torch.autograd.gradgradcheck(lambda *a: cb.plane_norm(*a, pool=False), (y, nw, nb))


def test_plane_norm_opcheck_and_errors():
    y, nw, nb = _norm_inputs(2, 3, 5, 7)
    torch.library.opcheck(torch.ops.anml_fast.plane_norm, (y.requires_grad_(), nw.requires_grad_(), nb, True))
    out, mean, rstd = cb.plane_norm_forward(y.detach(), nw.detach(), nb, True)
    torch.library.opcheck(torch.ops.anml_fast.plane_norm_backward,
                          (torch.randn_like(out), y.detach(), mean, rstd, nw.detach(), nb, True))
    with pytest.raises(RuntimeError, match=r"norm_weight and norm_bias must be \[C\]"):
        cb.plane_norm(y, nw[:2], nb, True)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        cb.plane_norm_backward(out[:, :, :1], y, mean, rstd, nw, nb, True)
    with pytest.raises(RuntimeError, match=r"norm_weight and norm_bias must be \[C\]"):
        cb.plane_norm_backward(out, y, mean, rstd, nw[:2], nb, True)
    with pytest.raises(RuntimeError, match="mean must be"):
        cb.plane_norm_backward(out, y, mean[:1], rstd, nw, nb, True)


# The C++ op checks for itself too (a caller may go through torch.ops directly). Its error is a C++
# exception, which aborts the process where it cannot cross into Python (the GPU machine's torch
# image; see ops/conv_block.check_args), so it is raised in a child process.
_CXX_CHECK = """
import importlib, sys, torch
cb = importlib.import_module("anml_fast.ops.conv_block")
y, nw, nb = torch.randn(2, 3, 5, 7), torch.ones(3), torch.zeros(3)
out, mean, rstd = cb.plane_norm_forward(y, nw, nb, True)
try:
    torch.ops.anml_fast.plane_norm_backward(out, y, mean, rstd, nw[:2], nb, True)
except RuntimeError as e:
    sys.exit(0 if "norm_weight and norm_bias" in str(e) else 3)
sys.exit(4)
"""


def test_plane_norm_backward_checks_in_cpp():
    r = subprocess.run([sys.executable, "-c", _CXX_CHECK], capture_output=True, text=True, timeout=300)
    if r.returncode < 0 and torch.cuda.is_available():  # killed by a signal: the image's known abort
        pytest.skip(f"C++ exceptions abort this torch build (signal {-r.returncode}); the Python checks cover it")
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"


def test_same_signature_as_twin():
    for name in ("conv_block", "plane_norm"):
        assert inspect.signature(getattr(cb, name)).parameters.keys() == \
            inspect.signature(getattr(reference, name)).parameters.keys()


def test_available():
    assert cb.available("cpu"), cb.unavailable_reason("cpu")
    assert cb.unavailable_reason("cpu") is None


def test_available_when_first_asked_without_grad():
    """The self-test differentiates the op; asked first inside no_grad or inference_mode (as an
    evaluation may), it must still say yes (its answer is remembered for every later call)."""
    for mode in (torch.no_grad, torch.inference_mode):
        cb._self_test._check.cache_clear()
        with mode():
            assert cb.available("cpu"), cb.unavailable_reason("cpu")


# Which torch.compile backends work over conv_block + sgd_update: all three on CPU ("inductor"
# needs a C++ compiler, as any CPU inductor graph does).
@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")  # the recording backend
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(backend, device):
    """The meta-loss pattern: fast weights by sgd_update, a conv block at them, a linear head;
    compiled whole, with the gradient back to the starting weights by the fused backward."""
    import torch.nn.functional as F

    mt = importlib.import_module("anml_fast.ops.multi_tensor")
    x, w, b, nw, nb = make_inputs(3, 3, 4, 10, 10, device)
    fc_w = torch.randn(5, 4 * 5 * 5, device=device) * 0.1
    fc_b = torch.zeros(5, device=device)
    params = [t.requires_grad_() for t in (w, b, nw, nb, fc_w, fc_b)]
    inner_grads = [torch.randn_like(p) for p in params]
    y = torch.tensor([0, 1, 4], device=device)

    def meta_loss(conv_block, sgd_update, x, y, params, grads):
        w, b, nw, nb, fc_w, fc_b = sgd_update(params, grads, 0.1)
        h = conv_block(x, w, b, nw, nb, True)
        return F.cross_entropy(F.linear(h.flatten(1), fc_w, fc_b), y)

    want = meta_loss(reference.conv_block, reference.sgd_update, x, y, params, inner_grads)
    want_grads = torch.autograd.grad(want, params)
    torch._dynamo.reset()
    recorder = None
    if backend == "aot_eager":
        from torch._dynamo.testing import AotEagerAndRecordGraphs
        recorder = AotEagerAndRecordGraphs()
    compiled = torch.compile(lambda *a: meta_loss(cb.conv_block, mt.sgd_update, *a),
                             backend=recorder or backend, fullgraph=True)
    got = compiled(x, y, params, inner_grads)
    got_grads = torch.autograd.grad(got, params)
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="loss")
    for i, (a, e) in enumerate(zip(got_grads, want_grads)):
        assert_close(a, e, atol=1e-5, rtol=1e-4, what=f"grad {i}")
    if recorder is not None:
        assert "anml_fast.conv_block.default" in recorder.fw_graphs[0].code
        assert "anml_fast.conv_block_backward.default" in recorder.bw_graphs[0].code


@gpu
def test_cuda_matches_cpu_and_is_deterministic():
    # Our kernels use no atomics (dgamma/dbeta are per-plane partials summed by ATen); cuDNN's
    # backward is only deterministic when asked, as for any PyTorch convolution.
    case = (20, 112, 112, 11, 11, True)
    args = make_inputs(*case[:5])
    upstream = torch.randn(20, 112, 5, 5)
    cpu = run(cb.conv_block, args, True, upstream)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        cuda_a = run(cb.conv_block, [a.cuda() for a in args], True, upstream.cuda())
        cuda_b = run(cb.conv_block, [a.cuda() for a in args], True, upstream.cuda())
    for name, a, b, c in zip(NAMES, cuda_a, cuda_b, cpu):
        assert torch.equal(a, b), f"{name} differs between two identical CUDA runs"
        # grad_weight sums 20 x 11 x 11 products per entry with cancellation (entries ~30 next to
        # ~0): the two devices' summation orders differ by ~2e-5 of the largest entry
        scale = c.abs().max().item()
        assert_close(a.cpu(), c, atol=5e-5 * max(scale, 1.0), rtol=1e-4, what=name)


@gpu
def test_cuda_runs_on_the_current_stream_and_in_a_graph():
    args = make_inputs(1, 3, 256, 26, 26, "cuda")
    want = reference.conv_block(*args, pool=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cb.conv_block(*args, pool=True)
    torch.cuda.current_stream().wait_stream(side)
    assert_close(got, want, atol=1e-4, rtol=1e-4, what="side stream")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        cb.conv_block(*args, pool=True)  # warm-up outside capture (cuDNN picks its algorithm)
        side.synchronize()
        with torch.cuda.graph(graph, stream=side):
            captured = cb.conv_block(*args, pool=True)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(captured, want, atol=1e-4, rtol=1e-4, what="graph replay")


@gpu
def test_available_on_cuda():
    assert cb.available("cuda"), cb.unavailable_reason("cuda")
