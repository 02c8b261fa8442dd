"""The batch-1 Triton convolutions (conv_valid, its backward, its fused SGD step) against their twins.

On a GPU the kernels run compiled on CUDA; without one, in Triton's interpreter on CPU tensors
(conftest.py turns it on before anything imports anml_fast.ops).
"""
import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from anml_fast import ops  # noqa: E402
from anml_fast.ops import reference  # noqa: E402
from conftest import assert_close  # noqa: E402

cv = importlib.import_module("anml_fast.ops.conv_valid")
if not callable(ops.conv_valid):  # see test_ops_gated_head.py: a submodule import rebinds the name
    ops.conv_valid = reference.conv_valid

pytest.importorskip("triton")
kernels = cv._kernels()
arrivals = sys.modules[kernels.counters.__module__]  # the split launches' counters (kernels/_counters.py)
CUDA = torch.cuda.is_available()
if not CUDA and not cv._CHECK.interpreted():
    raise RuntimeError("the conv kernels were defined for a GPU, but there is none: set TRITON_INTERPRET=1 "
                       "before anything imports anml_fast.ops (tests/conftest.py should, when CUDA is absent)")
DEVICE = torch.device("cuda" if CUDA else "cpu")
gpu = pytest.mark.gpu

# (N, C_in, H, W, C_out, kh, kw): odd sizes hit every mask; then the inner loop's three layers.
ODD = [(1, 2, 7, 9, 3, 3, 3), (2, 5, 9, 7, 6, 3, 3), (3, 4, 6, 5, 5, 2, 3), (1, 17, 5, 5, 19, 3, 3),
       (2, 3, 4, 4, 2, 1, 1), (1, 3, 3, 3, 33, 3, 3)]
PROTOCOL = [(1, 3, 28, 28, 256, 3, 3), (1, 256, 13, 13, 256, 3, 3), (1, 256, 5, 5, 256, 3, 3)]
# float64: only the summation order differs. float32: "tf32x3" products (float32 accuracy) summed
# in another order than cuDNN's; ~1e-6 relative per value, so 1e-4 with K up to 2304 terms.
TOL = {torch.float64: (1e-11, 1e-10), torch.float32: (1e-4, 1e-4)}


def make(shape, dtype=torch.float32, seed=0):
    n, c_in, h, w, c_out, kh, kw = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, kh, kw, generator=g, dtype=torch.float64) / (c_in * kh * kw) ** 0.5
    gy = torch.randn(n, c_out, h - kh + 1, w - kw + 1, generator=g, dtype=torch.float64)
    return [t.to(DEVICE, dtype) for t in (x, weight, gy)]


def _scaled(atol, ref):
    return atol * max(1.0, ref.abs().max().item())


def _check_all(shape, dtype):
    x, w, gy = make(shape, dtype)
    got = (cv.conv_valid(x, w), *cv.conv_valid_backward(gy, x, w, True, True), cv.conv_valid_sgd(gy, x, w, 0.1))
    # the twins in float64: the reference for both dtypes
    x64, w64, gy64 = (t.double() for t in (x, w, gy))
    want = (reference.conv_valid(x64, w64), *reference.conv_valid_backward(gy64, x64, w64, True, True),
            reference.conv_valid_sgd(gy64, x64, w64, 0.1))
    atol, rtol = TOL[dtype]
    for name, a, b in zip(("y", "grad_x", "grad_weight", "sgd weight"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert_close(a.double(), b, _scaled(atol, b), rtol, f"{name} {shape} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", ODD)
def test_matches_twin(shape, dtype):
    _check_all(shape, dtype)


@pytest.mark.parametrize("shape", [PROTOCOL[0], PROTOCOL[2], pytest.param(PROTOCOL[1], marks=gpu)])
def test_protocol_shapes(shape):
    # conv2 (the 13 x 13 layer) alone takes minutes in the interpreter: GPU only
    _check_all(shape, torch.float32)


def test_float32_error_within_2x_of_pytorch():
    """Against float64, the kernels' float32 error is at most twice the twin's in float32."""
    x, w, gy = make((1, 64, 9, 9, 48, 3, 3))
    x64, w64, gy64 = (t.double() for t in (x, w, gy))
    ours = (cv.conv_valid(x, w), *cv.conv_valid_backward(gy, x, w, True, True))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        theirs = (reference.conv_valid(x, w), *reference.conv_valid_backward(gy, x, w, True, True))
    exact = (reference.conv_valid(x64, w64), *reference.conv_valid_backward(gy64, x64, w64, True, True))
    for name, a, b, e in zip(("y", "grad_x", "grad_weight"), ours, theirs, exact):
        err, ref_err = (a.double() - e).norm() / e.norm(), (b.double() - e).norm() / e.norm()
        assert err <= 2 * ref_err + 1e-7, f"{name}: {err:.2e} against PyTorch's {ref_err:.2e}"


@pytest.mark.parametrize("allow_tf32, want", [(True, "tf32"), (False, "tf32x3")])
def test_float32_dots_follow_pytorchs_convolution_precision(allow_tf32, want):
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=allow_tf32):
        assert kernels.dot_precision(torch.float32, 256 * 9) == want
        assert kernels.dot_precision(torch.float32, 3 * 9) == "tf32x3"  # the image's layer: always float32
        assert kernels.dot_precision(torch.float64, 256 * 9) == "ieee"


@pytest.mark.parametrize("conv, rnn, want", [("ieee", "tf32", "tf32x3"), ("tf32", "ieee", "tf32")])
def test_float32_dots_follow_the_conv_setting_when_conv_and_rnn_are_set_apart(conv, rnn, want):
    """torch.backends.cudnn.allow_tf32 raises once the fp32_precision API sets cuDNN's conv and
    RNN apart; the kernels then follow the conv setting, and the self-tests' IEEE block puts
    that state back as it was."""
    from anml_fast.ops._compare import ieee_convolutions

    cudnn = torch.backends.cudnn
    was = cudnn.allow_tf32
    try:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = conv, rnn
        with pytest.raises(RuntimeError):
            cudnn.allow_tf32
        assert kernels.dot_precision(torch.float32, 256 * 9) == want
        with ieee_convolutions():
            assert kernels.dot_precision(torch.float32, 256 * 9) == "tf32x3"
        assert (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision) == (conv, rnn)
    finally:
        cudnn.allow_tf32 = was


@gpu
def test_tf32_mode_at_the_protocol_shape():
    """With TF32 allowed (PyTorch's default), conv2's products are single TF32 products: within
    TF32's error of the float64 twin (relative ~1e-3 per product), yet above 1e-5, where the
    3xTF32 products land (else the flag did not reach the kernel)."""
    x, w, gy = make(PROTOCOL[1])
    x64, w64, gy64 = (t.double() for t in (x, w, gy))
    exact = (reference.conv_valid(x64, w64), *reference.conv_valid_backward(gy64, x64, w64, True, True))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        ours = (cv.conv_valid(x, w), *cv.conv_valid_backward(gy, x, w, True, True))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        fp32 = cv.conv_valid(x, w)
    for name, a, e in zip(("y", "grad_x", "grad_weight"), ours, exact):
        err = ((a.double() - e).norm() / e.norm()).item()
        assert 1e-5 < err < 5e-3, f"{name}: relative error {err:.2e} is not TF32's"
    assert ((fp32.double() - exact[0]).norm() / exact[0].norm()).item() < 1e-5


@gpu
def test_first_layer_keeps_float32_accuracy_under_tf32():
    """conv1 (3 input channels) stays 3xTF32 with TF32 allowed: within 1e-5 of float64."""
    x, w, gy = make(PROTOCOL[0])
    x64, w64, gy64 = (t.double() for t in (x, w, gy))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        got = (cv.conv_valid(x, w), cv.conv_valid_backward(gy, x, w, False, True)[1])
    exact = (reference.conv_valid(x64, w64), reference.conv_valid_backward(gy64, x64, w64, False, True)[1])
    for name, a, e in zip(("y", "grad_weight"), got, exact):
        assert ((a.double() - e).norm() / e.norm()).item() < 1e-5, name


def test_only_the_needed_grads():
    x, w, gy = make(ODD[1])
    gx, gw = cv.conv_valid_backward(gy, x, w, True, False)
    assert gx.shape == x.shape and gw.numel() == 0
    gx, gw = cv.conv_valid_backward(gy, x, w, False, True)
    assert gx.numel() == 0 and gw.shape == w.shape


def test_non_contiguous_inputs_and_deterministic():
    x, w, gy = make(ODD[1])
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not xt.is_contiguous()
    assert torch.equal(cv.conv_valid(xt, w), cv.conv_valid(x, w))
    assert torch.equal(cv.conv_valid_sgd(gy, x, w, 0.1), cv.conv_valid_sgd(gy, x, w, 0.1))


def test_sgd_leaves_the_weight_alone():
    x, w, gy = make(ODD[0])
    before = w.clone()
    new = cv.conv_valid_sgd(gy, x, w, 0.5)
    assert torch.equal(w, before) and new.data_ptr() != w.data_ptr()


def test_input_errors():
    x, w, gy = make(ODD[1])
    with pytest.raises(ValueError, match="same C_in"):
        cv.conv_valid(x, w[:, :2])
    with pytest.raises(ValueError, match="smaller than the kernel"):
        cv.conv_valid(x[:, :, :2], w)
    with pytest.raises(TypeError, match="float32 or float64"):
        cv.conv_valid(x.half(), w.half())
    with pytest.raises(ValueError, match="grad_y must be"):
        cv.conv_valid_sgd(gy[:, :, 1:], x, w, 0.1)
    with pytest.raises(ValueError, match="at least 1 x 1"):
        cv.conv_valid(x, w[:, :, :0])


def test_gradcheck_float64():
    x, w, _ = make((2, 3, 6, 5, 4, 3, 3), torch.float64)
    x.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(cv.conv_valid, (x, w))


def test_second_order_through_the_twin():
    x, w, _ = make((1, 2, 5, 5, 3, 3, 3), torch.float64)
    x.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradgradcheck(cv.conv_valid, (x, w))


# See test_ops_gated_head.py: on CPU the interpreter cannot be captured by AOT dispatch.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor") + \
    (("test_aot_dispatch_dynamic",) if CUDA else ())


@pytest.mark.parametrize("case", ["conv_valid", "conv_valid_backward", "conv_valid_backward_weight",
                                  "conv_valid_sgd", "conv_valid_input_grad_norm_backward", "conv_valid_plane_norm",
                                  "conv_valid_plane_norm_direct"])
def test_opcheck(case):
    x, w, gy = make(ODD[1])
    args = {"conv_valid_input_grad_norm_backward": (kernels.conv_valid_input_grad_norm_backward,
                                                    make_norm_backward(ODD[1], True)),
            "conv_valid_plane_norm": (kernels.conv_valid_plane_norm,
                                      [t.requires_grad_() if isinstance(t, torch.Tensor) else t
                                       for t in make_plane_norm(ODD[1], True)]),
            # a filter of 18 taps: the direct kernel
            "conv_valid_plane_norm_direct": (kernels.conv_valid_plane_norm,
                                             [t.requires_grad_() if isinstance(t, torch.Tensor) else t
                                              for t in make_plane_norm(ODD[0], True)]),
            "conv_valid": (kernels.conv_valid, (x.requires_grad_(), w.requires_grad_())),
            "conv_valid_backward": (kernels.conv_valid_backward, (gy, x.detach(), w.detach(), True, True)),
            "conv_valid_backward_weight": (kernels.conv_valid_backward, (gy, x.detach(), w.detach(), False, True)),
            "conv_valid_sgd": (kernels.conv_valid_sgd, (gy, x.detach(), w.detach(), 0.1))}[case]
    torch.library.opcheck(*args, test_utils=OPCHECK_UTILS)


def _block(x, w, gw, gb):
    return ops.plane_norm(cv.conv_valid(x, w), gw, gb, True, backend="compiled").square().mean()


def test_compile_fullgraph():
    """A conv block built from the two ops (Triton conv, C++ plane_norm) under torch.compile."""
    if not ops._conv_block_ext.available(DEVICE):
        pytest.skip(f"the C++ plane_norm is not built: {ops._conv_block_ext.unavailable_reason(DEVICE)}")
    torch._dynamo.reset()
    x, w, _ = make(ODD[1])
    gw, gb = torch.rand(w.shape[0], device=DEVICE) + 0.5, torch.randn(w.shape[0], device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, w, gw, gb)]
    ops.available()  # self-tests outside the trace
    loss = torch.compile(_block, fullgraph=True, backend="inductor" if CUDA else "eager")(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, gw, gb)]
    ref = reference.plane_norm(F.conv2d(ref_leaves[0], ref_leaves[1]), *ref_leaves[2:], True).square().mean()
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    assert_close(loss, ref, 1e-5, 1e-4, "loss")
    for n, g, r in zip(("x", "weight", "norm_weight", "norm_bias"), grads, ref_grads):
        assert_close(g, r, _scaled(1e-4, r), 1e-3, n)


@pytest.mark.parametrize("shape", [ODD[0], ODD[1]], ids=["direct", "gemm"])
def test_plane_norm_compile_fullgraph(shape):
    """conv_valid_plane_norm (both of its kernels) in a model step under torch.compile, with its
    autograd: the loss and the grads equal the twin's."""
    torch._dynamo.reset()
    args = make_plane_norm(shape, True)
    leaves = [t.clone().requires_grad_() for t in args[:4]]

    def step(x, w, gw, gb):
        return torch.ops.anml_fast.conv_valid_plane_norm(x, w, gw, gb, True)[0].square().mean()
    ops.available()  # self-tests outside the trace
    loss = torch.compile(step, fullgraph=True, backend="inductor" if CUDA else "eager")(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in args[:4]]
    ref = reference.conv_valid_plane_norm(*ref_leaves, True)[0].square().mean()
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    assert_close(loss.double(), ref, 1e-5, 1e-4, "loss")
    for n, g, r in zip(("x", "weight", "norm_weight", "norm_bias"), grads, ref_grads):
        assert_close(g.double(), r, _scaled(1e-4, r), 1e-3, n)


def test_dispatch_and_available():
    assert cv.available(DEVICE)
    assert ops.choose("conv_valid_sgd", DEVICE, "compiled") is cv.conv_valid_sgd
    assert ops.choose("conv_valid_sgd", DEVICE, "torch") is reference.conv_valid_sgd


@pytest.mark.parametrize("shape", [(1, 17, 5, 5, 19, 3, 3), (1, 3, 12, 12, 5, 3, 3)])
def test_split_reduction_equals_one_pass(shape, monkeypatch):
    """The reduction split over programs (partials summed by the tile's last program) gives the one-pass
    result up to summation order, and the same bits on every run. The first shape splits the
    forward's and the input grad's reductions, the second the weight grad's (with its SGD step):
    test_those_shapes_do_split checks that."""
    x, w, gy = make(shape)

    def run():
        return (cv.conv_valid(x, w), *cv.conv_valid_backward(gy, x, w, True, True), cv.conv_valid_sgd(gy, x, w, 0.1))
    split, again = run(), run()
    unsplit = {name: [(k, n, {**cfg, "PROGRAMS": 1}) for k, n, cfg in rows] for name, rows in kernels.CONFIGS.items()}
    monkeypatch.setattr(kernels, "CONFIGS", unsplit)
    whole = run()
    for name, a, b, c in zip(("y", "grad_x", "grad_weight", "sgd weight"), split, again, whole):
        assert torch.equal(a, b), name
        assert_close(a, c, 1e-5, 1e-5, name)


@pytest.mark.parametrize("taps_inner", [False, True])
@pytest.mark.parametrize("programs", [1, 8, 1056])
def test_input_grad_reduction_orders(taps_inner, programs, monkeypatch):
    """Both orders of the input grad's reduction (TAPS_INNER; the tuner picks per shape), whole
    and split, on odd shapes whose channels are not a multiple of BLOCK_K."""
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=2, num_stages=2, PROGRAMS=programs,
               TAPS_INNER=taps_inner)
    monkeypatch.setitem(kernels.CONFIGS, "dgrad", [(1 << 62, 1 << 62, cfg)])
    # (1, 17, 5, 5, 40, 3, 3): 3 iterations of 16 output channels over 4 tiles; 8 programs split
    # them 2 + 1 (a ragged last chunk)
    for shape in (ODD[1], ODD[2], ODD[3], (1, 17, 5, 5, 40, 3, 3)):
        x, w, gy = make(shape, torch.float64)
        want = reference.conv_valid_backward(gy, x, w, True, False)[0]
        assert_close(cv.conv_valid_backward(gy, x, w, True, False)[0], want, 1e-11, 1e-10, f"{shape}")


@pytest.mark.parametrize("dgrad", [False, True])
@pytest.mark.parametrize("rows, programs", [(16, 1), (32, 1000), (64, 3)])
def test_taps_gemm_kernel(dgrad, rows, programs, monkeypatch):
    """_conv_taps_kernel (the input grad's shipped kernel; offered for the forward too) as either
    product, whole and split over the reduction (the (.., 40, ..) shape: 3 iterations of 16
    channels), with rows for 1, 3 and 7 channels a program; equal to the float64 twin, and the
    same bits on a second run."""
    cfg = dict(TAPS_GEMM=True, BLOCK_R=rows, BLOCK_K=16, num_warps=4, num_stages=2, PROGRAMS=programs)
    name = "dgrad" if dgrad else "fwd"
    monkeypatch.setitem(kernels.CONFIGS, name, [(1 << 62, 1 << 62, cfg)] + kernels.CONFIGS[name])
    for shape in ODD + [(1, 17, 5, 5, 40, 3, 3), (2, 6, 5, 6, 4, 2, 2)]:
        x, w, gy = make(shape, torch.float64)
        if dgrad:
            got = cv.conv_valid_backward(gy, x, w, True, False)[0]
            want = reference.conv_valid_backward(gy, x, w, True, False)[0]
            again = cv.conv_valid_backward(gy, x, w, True, False)[0]
        else:
            got, want, again = cv.conv_valid(x, w), reference.conv_valid(x, w), cv.conv_valid(x, w)
        assert_close(got, want, 1e-11, 1e-10, f"{name} {shape}")
        assert torch.equal(got, again), f"{name} {shape}"


def test_taps_gemm_only_where_it_fits(monkeypatch):
    """Input grads _conv_taps_kernel cannot hold (a 5 x 5 filter's 25 taps; an 18 x 18 grad_y,
    324 source positions, past TAPS_MAX_SOURCE) skip its config row for the next one, and are right."""
    assert not kernels._taps_fit(*make((1, 2, 9, 9, 3, 5, 5))[:2], True)
    assert not kernels._taps_fit(*make((1, 2, 20, 20, 3, 3, 3))[:2], False)
    assert kernels._taps_fit(*make(PROTOCOL[1])[:2], True)
    launched = []
    monkeypatch.setattr(kernels, "_launch_taps", lambda *a: launched.append(a))
    for shape in ((1, 2, 9, 9, 3, 5, 5), (1, 2, 20, 20, 3, 3, 3)):
        x, w, gy = make(shape, torch.float64)
        assert_close(cv.conv_valid_backward(gy, x, w, True, False)[0],
                     reference.conv_valid_backward(gy, x, w, True, False)[0], 1e-11, 1e-10, f"{shape}")
    assert launched == []


def make_norm_backward(shape, pool, dtype=torch.float32, seed=0):
    """Arguments of conv_valid_input_grad_norm_backward: the conv (N, C_in, H, W, C_out, kh, kw)
    whose input is the plane norm, pooled or not, of a conv output y."""
    n, c_in, h, w, c_out, kh, kw = shape
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, c_in, 2 * h + 1 if pool else h, 2 * w + 1 if pool else w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, kh, kw, generator=g, dtype=torch.float64) / (c_in * kh * kw) ** 0.5
    gy = torch.randn(n, c_out, h - kh + 1, w - kw + 1, generator=g, dtype=torch.float64)
    gamma = 0.5 + torch.rand(c_in, generator=g, dtype=torch.float64)
    beta = torch.randn(c_in, generator=g, dtype=torch.float64)
    gamma[0] = -gamma[0]  # a negative scale flips which position of a window is the max
    gy, weight, y, gamma, beta = (t.to(DEVICE, dtype) for t in (gy, weight, y, gamma, beta))
    return (gy, weight, y, *cv.plane_stats(y), gamma, beta, pool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("taps", [True, False])
def test_input_grad_norm_backward_matches_twin(dtype, pool, taps, monkeypatch):
    """The input grad carried on through the previous block's plane norm, in one launch
    (_conv_taps_kernel's epilogue) or, where that kernel cannot take the shape, two (the other
    input-grad kernel, then _plane_norm_bwd_kernel): equal to the twin (autograd through
    reference.plane_norm and the input grad). Pooled planes of odd height and width leave a row
    and a column no window covers; batch 2 sums the affine's grads over samples."""
    if not taps:
        monkeypatch.setitem(kernels.CONFIGS, "dgrad",
                            [r for r in kernels.CONFIGS["dgrad"] if not r[2].get("TAPS_GEMM")])
    for shape in (ODD[0], ODD[1], ODD[2], ODD[4], (1, 17, 5, 5, 40, 3, 3)):
        args = make_norm_backward(shape, pool, dtype)
        got = cv.conv_valid_input_grad_norm_backward(*args)
        x64 = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
        want = reference.conv_valid_input_grad_norm_backward(*x64)
        atol, rtol = TOL[dtype]
        for name, a, b in zip(("grad y", "grad norm_weight", "grad norm_bias"), got, want):
            assert a.dtype == dtype and a.shape == b.shape, name
            assert_close(a.double(), b, _scaled(atol, b), rtol, f"{name} {shape} pool={pool}")


def test_input_grad_norm_backward_protocol_shape():
    """conv3's input grad into norm2's backward, as the fused inner step runs it (11 x 11 planes
    pooled to 5 x 5), against the twin in float64."""
    args = make_norm_backward(PROTOCOL[2], True)
    assert args[2].shape == (1, 256, 11, 11)
    got = cv.conv_valid_input_grad_norm_backward(*args)
    want = reference.conv_valid_input_grad_norm_backward(*[a.double() if isinstance(a, torch.Tensor) else a
                                                           for a in args])
    for name, a, b in zip(("grad y", "grad norm_weight", "grad norm_bias"), got, want):
        assert_close(a.double(), b, _scaled(1e-4, b), 1e-4, name)


def test_input_grad_norm_backward_errors():
    gy, weight, y, mean, rstd, gamma, beta, pool = make_norm_backward(ODD[1], True)
    with pytest.raises(ValueError, match="mean must be torch.float32"):
        cv.conv_valid_input_grad_norm_backward(gy, weight, y, mean.double(), rstd, gamma, beta, pool)
    with pytest.raises(ValueError, match="grad_y must be"):
        cv.conv_valid_input_grad_norm_backward(gy, weight, y, mean, rstd, gamma, beta, False)
    with pytest.raises(ValueError, match="norm_bias must be"):
        cv.conv_valid_input_grad_norm_backward(gy, weight, y, mean, rstd, gamma, beta[:-1], pool)
    big = torch.zeros(1, 2, 70, 70, device=DEVICE)
    with pytest.raises(ValueError, match="exceed the 4096 positions"):
        cv.conv_valid_input_grad_norm_backward(torch.zeros(1, 3, 33, 33, device=DEVICE),
                                               torch.zeros(3, 2, 3, 3, device=DEVICE), big, *cv.plane_stats(big),
                                               torch.ones(2, device=DEVICE), torch.zeros(2, device=DEVICE), True)


def make_plane_norm(shape, pool, dtype=torch.float32, seed=0):
    """Arguments of conv_valid_plane_norm for a conv (N, C_in, H, W, C_out, kh, kw), with a negative
    norm scale (it moves a window's max)."""
    x, w, _ = make(shape, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    gamma = 0.5 + torch.rand(w.shape[0], generator=g, dtype=torch.float64)
    gamma[0] = -gamma[0]
    beta = torch.randn(w.shape[0], generator=g, dtype=torch.float64)
    return [x, w, gamma.to(DEVICE, dtype), beta.to(DEVICE, dtype), pool]


def _check_plane_norm_op(args, atol, rtol):
    got = cv.conv_valid_plane_norm(*args)
    want = reference.conv_valid_plane_norm(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    for name, a, b in zip(("out", "y", "mean", "rstd"), got, want):
        assert a.dtype == args[0].dtype and a.shape == b.shape, (name, a.dtype, a.shape, b.shape)
        assert_close(a.double(), b, _scaled(atol, b), rtol, f"{name} {[tuple(t.shape) for t in args[:2]]}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pool", [True, False])
def test_plane_norm_matches_twin(dtype, pool):
    """The convolution and the plane norm on its output in one launch: equal to the twin, for odd
    planes (a pooled odd plane leaves a row and a column out), batch 2 and 3, a 1 x 1 filter, a
    split reduction (17 input channels, 40 output channels: three channel blocks) and 26 x 26
    planes. Both kernels: the GEMM whose last program of each channel block normalises its planes
    (45 and 153 taps) and the direct kernel for short filters (the rest, 3 to 27 taps)."""
    for shape in (ODD[0], ODD[1], ODD[2], ODD[4], (1, 17, 5, 5, 40, 3, 3), (1, 3, 28, 28, 5, 3, 3)):
        _check_plane_norm_op(make_plane_norm(shape, pool, dtype), *TOL[dtype])


@pytest.mark.parametrize("shape", [PROTOCOL[0], PROTOCOL[2], pytest.param(PROTOCOL[1], marks=gpu)])
def test_plane_norm_protocol_shapes(shape):
    """conv1 -> norm1, conv3 -> norm3 and conv2 -> norm2, as the fused inner step can run them."""
    _check_plane_norm_op(make_plane_norm(shape, shape[2] > 5), 1e-4, 1e-4)


def test_plane_norm_nan_and_counters():
    """A NaN in a window is the pooled value (the CUDA kernel's rule), and the channel blocks'
    counters are left at zero for the next launch."""
    x, w, gamma, beta, _ = make_plane_norm((1, 17, 5, 5, 40, 3, 3), True)
    w = w.clone()
    w[3] = float("nan")
    out, y, mean, rstd = cv.conv_valid_plane_norm(x, w, gamma, beta, True)
    assert torch.isnan(out[0, 3]).all() and not torch.isnan(out[0, 4]).any()
    assert int(arrivals.counters(x, 1).abs().sum()) == 0


@pytest.mark.parametrize("shape, kernel", [((1, 3, 28, 28, 5, 3, 3), "_conv_direct_norm_kernel"),
                                           ((2, 5, 9, 7, 6, 3, 3), "_conv_fwd_kernel")])
def test_plane_norm_kernel_by_filter_length(shape, kernel, monkeypatch):
    """Filters of at most DIRECT_MAX_FILTER taps take the direct kernel, longer ones the GEMM; a
    NaN in the filter gives NaN planes in either."""
    launched = []
    real = kernels.launch

    def spy(k, grid, *args, **kwargs):
        launched.append(k.fn.__name__ if hasattr(k, "fn") else k.__name__)
        return real(k, grid, *args, **kwargs)
    monkeypatch.setattr(kernels, "launch", spy)
    x, w, gamma, beta, _ = make_plane_norm(shape, True)
    w = w.clone()
    w[1] = float("nan")
    out, y, mean, rstd = cv.conv_valid_plane_norm(x, w, gamma, beta, True)
    assert launched == [kernel]
    assert torch.isnan(out[:, 1]).all() and torch.isnan(y[:, 1]).all() and not torch.isnan(out[:, 0]).any()


def test_plane_norm_errors_and_grads(monkeypatch):
    x, w, gamma, beta, pool = make_plane_norm(ODD[1], True, torch.float64)
    with pytest.raises(ValueError, match="norm_weight must be"):
        cv.conv_valid_plane_norm(x, w, gamma[:-1], beta, pool)
    with pytest.raises(ValueError, match="norm_bias must be"):
        cv.conv_valid_plane_norm(x, w, gamma, beta.float(), pool)
    with pytest.raises(ValueError, match="exceed the 4096 positions"):
        cv.conv_valid_plane_norm(torch.zeros(1, 1, 70, 70, device=DEVICE), torch.zeros(2, 1, 3, 3, device=DEVICE),
                                 torch.ones(2, device=DEVICE), torch.zeros(2, device=DEVICE), True)
    # small: every numerical derivative runs the interpreted kernel in CI; the GEMM's, since the
    # direct kernel's unrolled taps take minutes there (both forwards are checked against the twin
    # in float64 above, and the backward is the same either way)
    monkeypatch.setattr(kernels, "DIRECT_MAX_FILTER", 0)
    leaves = [t.requires_grad_() for t in make_plane_norm((1, 2, 6, 6, 3, 3, 3), True, torch.float64)[:4]]
    assert torch.autograd.gradcheck(lambda *a: cv.conv_valid_plane_norm(*a, pool)[0], leaves)
    # second order differentiates the twin, whose F.conv2d backward on cuDNN is only deterministic
    # when asked (gradgradcheck's reentrancy check allows no difference)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        assert torch.autograd.gradgradcheck(lambda *a: cv.conv_valid_plane_norm(*a, pool)[0].square(), leaves)


def test_launches_pass_every_kernel_argument(monkeypatch):
    """wrap_triton's tracing (torch.compile, opcheck's AOT test) rejects a launch that leaves a
    kernel argument to its default, which eager launches accept: every launch of these ops names
    them all."""
    real, launched = kernels.launch, set()

    def checking(kernel, grid, *args, **kw):
        missing = set(kernel.arg_names) - set(kernel.arg_names[:len(args)]) - set(kw)
        assert not missing, f"{kernel.arg_names} launched without {sorted(missing)}"
        launched.add(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel))
        return real(kernel, grid, *args, **kw)
    monkeypatch.setattr(kernels, "launch", checking)
    x, w, gy = make(ODD[3])
    cv.conv_valid(x, w), cv.conv_valid_backward(gy, x, w, True, True), cv.conv_valid_sgd(gy, x, w, 0.1)
    cv.conv_valid_input_grad_norm_backward(*make_norm_backward(ODD[3], True))
    cv.conv_valid_plane_norm(*make_plane_norm(ODD[3], True))
    cv.conv_valid_plane_norm(*make_plane_norm(ODD[0], True))  # the direct kernel (18 taps)
    monkeypatch.setitem(kernels.CONFIGS, "dgrad", [r for r in kernels.CONFIGS["dgrad"] if not r[2].get("TAPS_GEMM")])
    cv.conv_valid_backward(gy, x, w, True, False)
    cv.conv_valid_input_grad_norm_backward(*make_norm_backward(ODD[3], True))
    assert {"_conv_taps_kernel", "_conv_dgrad_kernel", "_plane_norm_bwd_kernel", "_conv_fwd_kernel",
            "_conv_wgrad_kernel", "_conv_direct_norm_kernel"} <= launched


def test_split_counters_are_left_at_zero():
    """A split launch's last program per tile resets the tile's counter: the next launch (another
    shape, another split) starts from zero."""
    for shape in (ODD[3], (1, 3, 12, 12, 5, 3, 3)):
        x, w, gy = make(shape)
        cv.conv_valid(x, w), cv.conv_valid_backward(gy, x, w, True, True), cv.conv_valid_sgd(gy, x, w, 0.1)
        assert int(arrivals.counters(x, 1).abs().sum()) == 0


def test_captured_launches_take_counters_of_their_own(monkeypatch):
    """Under CUDA-graph capture (simulated here) each split launch takes fresh counters from the
    reserve zeroed before any capture, so graphs never share counters, and those counters are
    zero again after the launch; the results are those of the eager launches."""
    x, w, gy = make(ODD[3])
    want = (cv.conv_valid(x, w), cv.conv_valid_backward(gy, x, w, True, False)[0])  # makes the reserve
    reserve = arrivals._RESERVE[x.device]
    before = reserve[1]
    monkeypatch.setattr(arrivals, "capturing", lambda device: True)
    got = (cv.conv_valid(x, w), cv.conv_valid_backward(gy, x, w, True, False)[0])
    assert reserve[1] > before  # two launches, two fresh ranges
    first = arrivals.counters(x, 4)
    assert first.data_ptr() != arrivals.counters(x, 4).data_ptr()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert int(reserve[0][:reserve[1]].abs().sum()) == 0
    reserve[1] = reserve[0].numel()  # used up: a captured launch then zeroes its own (in the graph)
    assert torch.equal(cv.conv_valid(x, w), want[0])


@gpu
@pytest.mark.skipif(not CUDA, reason="programs race only on a GPU")
def test_split_is_deterministic_under_races():
    """On the GPU the split programs finish in any order; whichever sums, the bits are the same,
    eagerly and replayed from a CUDA graph (which reuses the counters of its capture)."""
    x, w, gy = make(PROTOCOL[1])
    x1, w1, gy1 = make(PROTOCOL[0])  # conv1's weight grad splits, with its SGD step in the last program

    def run():
        return torch.cat([cv.conv_valid(x, w).flatten(), cv.conv_valid_backward(gy, x, w, True, False)[0].flatten(),
                          cv.conv_valid_sgd(gy, x, w, 0.1).flatten(), cv.conv_valid_sgd(gy1, x1, w1, 0.1).flatten()])
    first = run()
    for _ in range(200):
        assert torch.equal(run(), first)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2):
        out2 = run()
    for _ in range(50):  # the later capture first, and the two interleaved: no shared counters
        graph2.replay()
        graph.replay()
        assert torch.equal(out, first) and torch.equal(out2, first)
    x64, w64, gy64 = (t.double() for t in (x, w, gy))
    want = torch.cat([reference.conv_valid(x64, w64).flatten(),
                      reference.conv_valid_backward(gy64, x64, w64, True, False)[0].flatten(),
                      reference.conv_valid_sgd(gy64, x64, w64, 0.1).flatten(),
                      reference.conv_valid_sgd(gy1.double(), x1.double(), w1.double(), 0.1).flatten()])
    assert_close(first.double(), want, 1e-4, 1e-4, "split result")


@pytest.mark.parametrize("shape, kernel", [((1, 17, 5, 5, 19, 3, 3), "fwd"), ((1, 17, 5, 5, 19, 3, 3), "dgrad"),
                                           ((1, 3, 12, 12, 5, 3, 3), "wgrad")])
def test_those_shapes_do_split(shape, kernel):
    """What the test above relies on: at these shapes the shipped configs split the reduction."""
    n, c_in, h, w, c_out, kh, kw = shape
    m, cols, red = {"fwd": (c_out, n * (h - kh + 1) * (w - kw + 1), c_in * kh * kw),
                    "dgrad": (c_in, n * h * w, c_out * kh * kw),
                    "wgrad": (c_out, c_in * kh * kw, n * (h - kh + 1) * (w - kw + 1))}[kernel]
    cfg = kernels.config(kernel, red, cols)
    tiles = -(-m // cfg["BLOCK_M"]) * -(-cols // cfg["BLOCK_N"])
    iters = -(-(red // (kh * kw)) // cfg["BLOCK_K"]) if cfg.get("TAPS_INNER") else -(-red // cfg["BLOCK_K"])
    assert min(iters, cfg.get("PROGRAMS", kernels.PROGRAMS) // tiles) > 1
