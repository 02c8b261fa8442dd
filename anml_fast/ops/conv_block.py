"""The gated conv block as one compiled op: conv3x3 -> per-plane norm with affine -> ReLU -> max-pool.

Forward, per (sample n, channel c) plane of y = conv(x, W):
    xhat = (y - mean) * rstd,  rstd = 1 / sqrt(var + 1e-5) (biased),  a = relu(gamma * xhat + beta),
    out = maxpool2x2(a) if pool else a.  The conv bias b cancels in y - mean, so it is not added.
Backward: gz = dout routed to each pool window's argmax, times [z > 0];  dgamma = sum gz * xhat,
    dbeta = sum gz;  dy = gamma * rstd * (gz - mean(gz) - xhat * mean(gz * xhat));  dx, dW from
    ATen's convolution backward;  db = 0 exactly.

The op `anml_fast::conv_block` returns (out, conv_out, mean, rstd): the backward recomputes xhat, z
and the argmax from those instead of the forward storing activations. Kernels: csrc/conv_block.cpp
(CPU), csrc/cuda/conv_block.cu (CUDA), sharing csrc/conv_block_plane.h. The fused backward is not
itself differentiable: when a second-order gradient is asked for (create_graph=True), the backward
is computed instead by differentiating the plain-PyTorch twin, which autograd can differentiate
again. The forward's values, and first-order gradients, stay the fused kernels'.
"""
from __future__ import annotations


import torch

from . import _ext, reference
from ._compare import first_mismatch

_OP = "anml_fast::conv_block"
_BWD_OP = "anml_fast::conv_block_backward"
_NORM_OP = "anml_fast::plane_norm"
_NORM_BWD_OP = "anml_fast::plane_norm_backward"
_LOADED = _ext.load() is not None


def conv_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               norm_weight: torch.Tensor, norm_bias: torch.Tensor, pool: bool) -> torch.Tensor:
    """relu(norm(conv3x3(x) + bias)) then an optional 2x2 max-pool, by the compiled kernels.

    Same signature and result as `anml_fast.ops.reference.conv_block`.
    """
    return conv_block_forward(x, weight, bias, norm_weight, norm_bias, pool)[0]


def check_args(x, weight, bias, norm_weight, norm_bias) -> None:
    """The C++ op's argument checks, in Python. A C++ exception that crosses into Python aborts
    the whole process on some builds (seen on the GPU machine's torch image, where the extension
    and torch link different libstdc++ pieces), so the wrappers never let the op throw."""
    if x.dim() != 4:
        raise RuntimeError(f"conv_block: x must be [N, C_in, H, W], got {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise RuntimeError(f"conv_block: weight must be [C_out, C_in, kH, kW] with C_in = {x.shape[1]}, "
                           f"got {tuple(weight.shape)}")
    c_out = weight.shape[0]
    for t in (bias, norm_weight, norm_bias):
        if t.dim() != 1 or t.shape[0] != c_out:
            raise RuntimeError(f"conv_block: bias, norm_weight and norm_bias must be [C_out] = [{c_out}], "
                               f"got {tuple(t.shape)}")
    if x.shape[2] < weight.shape[2] or x.shape[3] < weight.shape[3]:
        raise RuntimeError(f"conv_block: input {tuple(x.shape)} is smaller than the kernel {tuple(weight.shape)}")
    if not x.dtype.is_floating_point:
        raise RuntimeError(f"conv_block: x must be floating point, got {x.dtype}")
    for t in (weight, bias, norm_weight, norm_bias):
        if t.dtype != x.dtype:
            raise RuntimeError(f"conv_block: all arguments must be {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise RuntimeError(f"conv_block: all arguments must be on {x.device}, got {t.device}")


def conv_block_forward(x, weight, bias, norm_weight, norm_bias, pool: bool):
    """The op itself: (out, conv_out, mean, rstd), the last three being what its backward reads."""
    if not _LOADED:
        raise RuntimeError(f"anml_fast's compiled extension is not available ({_ext.error()}); "
                           "use backend='torch'")
    check_args(x, weight, bias, norm_weight, norm_bias)
    return torch.ops.anml_fast.conv_block(x, weight, bias, norm_weight, norm_bias, bool(pool))


def conv_block_backward(grad_out, x, weight, conv_out, mean, rstd, norm_weight, norm_bias,
                        pool: bool, output_mask=(True, True, True)):
    """(grad_x, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias); a conv grad left out
    of output_mask comes back as an empty tensor."""
    return torch.ops.anml_fast.conv_block_backward(grad_out, x, weight, conv_out, mean, rstd,
                                                   norm_weight, norm_bias, bool(pool),
                                                   [bool(m) for m in output_mask])


def plane_norm(y: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, pool: bool) -> torch.Tensor:
    """conv_block after its convolution, by the same fused kernel: relu(norm(y)), optionally pooled.

    Same signature and result as `anml_fast.ops.reference.plane_norm`.
    """
    return plane_norm_forward(y, norm_weight, norm_bias, pool)[0]


def _check_norm_args(y, norm_weight, norm_bias) -> None:
    # in Python, for the reason check_args gives
    if y.dim() != 4:
        raise RuntimeError(f"plane_norm: y must be [N, C, H, W], got {tuple(y.shape)}")
    if not y.dtype.is_floating_point:
        raise RuntimeError(f"plane_norm: y must be floating point, got {y.dtype}")
    for t in (norm_weight, norm_bias):
        if t.dim() != 1 or t.shape[0] != y.shape[1]:
            raise RuntimeError(f"plane_norm: norm_weight and norm_bias must be [C] = [{y.shape[1]}], "
                               f"got {tuple(t.shape)}")
        if t.dtype != y.dtype or t.device != y.device:
            raise RuntimeError(f"plane_norm: norm_weight and norm_bias must be {y.dtype} on {y.device}, "
                               f"got {t.dtype} on {t.device}")


def plane_norm_forward(y, norm_weight, norm_bias, pool: bool):
    """The op itself: (out, mean, rstd), the last two being what its backward reads."""
    if not _LOADED:
        raise RuntimeError(f"anml_fast's compiled extension is not available ({_ext.error()}); "
                           "use backend='torch'")
    _check_norm_args(y, norm_weight, norm_bias)
    return torch.ops.anml_fast.plane_norm(y, norm_weight, norm_bias, bool(pool))


def plane_norm_backward(grad_out, y, mean, rstd, norm_weight, norm_bias, pool: bool):
    """(grad_y, grad_norm_weight, grad_norm_bias)."""
    _check_norm_args(y, norm_weight, norm_bias)
    want = (*y.shape[:2], y.shape[2] // 2, y.shape[3] // 2) if pool else tuple(y.shape)
    if tuple(grad_out.shape) != want or grad_out.dtype != y.dtype or grad_out.device != y.device:
        raise RuntimeError(f"plane_norm_backward: grad_out must be {y.dtype} {list(want)} on {y.device}, got "
                           f"{grad_out.dtype} {list(grad_out.shape)} on {grad_out.device}")
    stats = reference.stats_dtype(y.dtype)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.numel() != y.shape[0] * y.shape[1] or t.dtype != stats or t.device != y.device:
            raise RuntimeError(f"plane_norm_backward: {name} must be {stats} with N * C = "
                               f"{y.shape[0] * y.shape[1]} values on {y.device}, got {t.dtype} "
                               f"{list(t.shape)} on {t.device}")
    return torch.ops.anml_fast.plane_norm_backward(grad_out, y, mean, rstd, norm_weight, norm_bias,
                                                   bool(pool))


def _register() -> None:
    @torch.library.register_fake(_OP)
    def _conv_block_fake(x, weight, bias, norm_weight, norm_bias, pool):
        n, c = x.shape[0], weight.shape[0]
        h, w = x.shape[2] - weight.shape[2] + 1, x.shape[3] - weight.shape[3] + 1
        conv_out = x.new_empty((n, c, h, w))
        out = x.new_empty((n, c, h // 2, w // 2) if pool else (n, c, h, w))
        stats = x.new_empty((n, c), dtype=reference.stats_dtype(x.dtype))
        return out, conv_out, stats, torch.empty_like(stats)

    @torch.library.register_fake(_BWD_OP)
    def _conv_block_backward_fake(grad_out, x, weight, conv_out, mean, rstd, norm_weight,
                                  norm_bias, pool, output_mask):
        grad_x = torch.empty_like(x) if output_mask[0] else x.new_empty((0,))
        grad_weight = torch.empty_like(weight) if output_mask[1] else weight.new_empty((0,))
        grad_bias = weight.new_empty((weight.shape[0],) if output_mask[2] else (0,))
        return (grad_x, grad_weight, grad_bias, torch.empty_like(norm_weight),
                torch.empty_like(norm_bias))

    @torch.library.register_fake(_NORM_OP)
    def _plane_norm_fake(y, norm_weight, norm_bias, pool):
        n, c, h, w = y.shape
        out = y.new_empty((n, c, h // 2, w // 2) if pool else (n, c, h, w))
        stats = y.new_empty((n, c), dtype=reference.stats_dtype(y.dtype))
        return out, stats, torch.empty_like(stats)

    @torch.library.register_fake(_NORM_BWD_OP)
    def _plane_norm_backward_fake(grad_out, y, mean, rstd, norm_weight, norm_bias, pool):
        return (torch.empty_like(y, memory_format=torch.contiguous_format), torch.empty_like(norm_weight),
                torch.empty_like(norm_bias))

    # Autograd is C++ (csrc/conv_block_autograd.cpp: the engine calls no Python for a first-order
    # backward); its second-order grads come from the twins, here.
    _ext.load().set_second_order(_second_order)


def _second_order(op: str, inputs: tuple, needs: tuple, pool: bool, grad_out: torch.Tensor) -> tuple:
    """create_graph=True: the grads of conv_block or plane_norm taken through the twin, as a graph
    that autograd can differentiate again (None where an input needs none)."""
    if op == "conv_block":
        return _twin_backward(grad_out, inputs, needs, pool)[:5]
    wanted = [t for t, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(reference.plane_norm(*inputs, pool), wanted, grad_out, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def _twin_backward(grad_out, inputs, needs, pool):
    wanted = [t for t, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        out = reference.conv_block(*inputs, pool)
        grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True,
                                         allow_unused=True))
    return tuple(next(grads) if need else None for need in needs) + (None,)


if _LOADED:
    _register()


def _failure_on(device_type: str) -> str | None:
    """Runs the ops (conv_block and plane_norm) forward and backward once on `device_type` against
    the twins; None if they work."""
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=g).to(device_type).requires_grad_()
            for s in [(2, 3, 8, 7), (4, 3, 3, 3), (4,), (4,), (4,)]]
    results = []
    for fn in (conv_block, reference.conv_block):
        out = fn(*args, pool=True)
        results.append((out, *torch.autograd.grad(out.square().sum(), args)))
    names = ("out", "grad x", "grad weight", "grad bias", "grad norm_weight", "grad norm_bias")
    norm_args = [torch.randn(s, generator=g).to(device_type).requires_grad_() for s in [(2, 4, 5, 7), (4,), (4,)]]
    for i, fn in enumerate((plane_norm, reference.plane_norm)):
        out = fn(*norm_args, pool=True)
        results[i] += (out, *torch.autograd.grad(out.square().sum(), norm_args))
    names += ("plane_norm out", "plane_norm grad y", "plane_norm grad norm_weight", "plane_norm grad norm_bias")
    return first_mismatch(zip(names, *results), device_type, atol=1e-3, rtol=1e-3)


_self_test = _ext.DeviceSelfTest(_failure_on)
available = _self_test.available
unavailable_reason = _self_test.unavailable_reason
