"""The inner loop's batch-1 convolutions on Triton (`anml_fast.kernels.conv_valid`), and their twins.

  conv_valid(x, weight) -> y                           stride 1, no padding, no bias (conv_block's conv)
  conv_valid_backward(grad_y, x, weight, input_grad, weight_grad) -> (grad_x, grad_weight)
  conv_valid_sgd(grad_y, x, weight, lr) -> weight - lr * grad_weight   (a new tensor; dW never written)
  conv_valid_input_grad_norm_backward(grad_y, weight, y, mean, rstd, norm_weight, norm_bias, pool)
      -> (grad_y_prev, grad_norm_weight, grad_norm_bias)   the input grad carried on through the
      previous block's plane norm in the same launch (the input grad itself never written out)
  conv_valid_plane_norm(x, weight, norm_weight, norm_bias, pool) -> (out, y, mean, rstd)
      conv_valid, then anml_fast::plane_norm on its output, in one launch (the last program of each
      block of output channels normalises their whole planes)

Each is one implicit-GEMM launch (a split reduction is finished by the last program of each tile),
written for the inner loop's batch of one, where cuDNN's kernels
took two thirds of the fused PLN step (kernels/conv_valid.py says how). Each has a plain-PyTorch twin
of the same signature in `anml_fast.ops.reference`. float32 or float64, on CUDA (or on CPU when the
kernels were defined under TRITON_INTERPRET=1). float32 runs at the precision PyTorch gives its own
convolutions: TF32 products while `torch.backends.cudnn.allow_tf32` is on (its default), float32
accuracy (3xTF32) when it is off. conv_valid has registered autograd; under
create_graph its backward differentiates the twin, so double backward is exact.
"""
from __future__ import annotations

import torch

from . import _triton, reference
from ._compare import first_mismatch, ieee_convolutions

__all__ = ["conv_valid", "conv_valid_backward", "conv_valid_sgd", "conv_valid_input_grad_norm_backward",
           "conv_valid_plane_norm", "plane_stats", "available", "unavailable_reason"]

# At import, not on first use (torch.compile cannot trace an import inside the ops).
_KERNELS, _IMPORT_ERROR = _triton.import_kernels("conv_valid")


def _kernels():
    return _triton.require(_KERNELS, _IMPORT_ERROR, "convolution ops are")


kernels = _kernels  # for the fused inner step (anml_fast/training/inner_step.py), which calls them directly


def conv_valid(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _kernels().direct.conv_valid(x, weight)


def conv_valid_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool,
                        weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return _kernels().direct.conv_valid_backward(grad_y, x, weight, bool(input_grad), bool(weight_grad))


def conv_valid_input_grad_norm_backward(grad_y: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
                                        mean: torch.Tensor, rstd: torch.Tensor, norm_weight: torch.Tensor,
                                        norm_bias: torch.Tensor, pool: bool
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The input grad, then the previous block's plane-norm backward, in one launch (mean and rstd
    as anml_fast::plane_norm returned them)."""
    with torch.no_grad():
        return _kernels().direct.conv_valid_input_grad_norm_backward(grad_y, weight, y, mean, rstd, norm_weight,
                                                              norm_bias, bool(pool))


def conv_valid_plane_norm(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                          pool: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, y, mean, rstd): the convolution and the next block's plane norm in one launch. Its
    autograd differentiates the twin (the inner loop runs its own backward ops)."""
    return _kernels().direct.conv_valid_plane_norm(x, weight, norm_weight, norm_bias, bool(pool))


def conv_valid_sgd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lr: float) -> torch.Tensor:
    """Like an optimizer step, outside autograd."""
    with torch.no_grad():
        return _kernels().direct.conv_valid_sgd(grad_y, x, weight, float(lr))


def _self_test(device: torch.device) -> str | None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 7, generator=g).to(device)  # odd sizes: every mask is exercised
    w = (torch.randn(6, 5, 3, 3, generator=g) * 0.2).to(device)
    gy = torch.randn(2, 6, 7, 5, generator=g).to(device)
    # the fused op's previous block: a conv output y whose pooled plane norm is x's shape
    y = torch.randn(2, 5, 18, 15, generator=g).to(device)
    norm = (y, *plane_stats(y), (1 + torch.rand(5, generator=g)).to(device), torch.randn(5, generator=g).to(device),
            True)
    # the fused forward's norm on w's 6 output channels; a negative scale moves a window's max
    gamma = (torch.tensor([-1.0, 1, 1, 1, 1, 1]) * (1 + torch.rand(6, generator=g))).to(device)
    beta = torch.randn(6, generator=g).to(device)
    with ieee_convolutions():
        got = (conv_valid(x, w), *conv_valid_backward(gy, x, w, True, True), conv_valid_sgd(gy, x, w, 0.1),
               *conv_valid_input_grad_norm_backward(gy, w, *norm), *conv_valid_plane_norm(x, w, gamma, beta, True))
        want = (reference.conv_valid(x, w), *reference.conv_valid_backward(gy, x, w, True, True),
                reference.conv_valid_sgd(gy, x, w, 0.1), *reference.conv_valid_input_grad_norm_backward(gy, w, *norm),
                *reference.conv_valid_plane_norm(x, w, gamma, beta, True))
    names = ("y", "grad x", "grad weight", "sgd weight", "norm backward grad y", "norm backward grad norm_weight",
             "norm backward grad norm_bias", "conv + norm out", "conv + norm y", "conv + norm mean",
             "conv + norm rstd")
    return first_mismatch(zip(names, got, want), device, atol=1e-4, rtol=1e-4)


plane_stats = reference.plane_stats


_CHECK = _triton.TritonSelfTest(_KERNELS, _IMPORT_ERROR, _self_test)
available = _CHECK.available
unavailable_reason = _CHECK.unavailable_reason
