"""The inner loop's batch-1 convolutions on Triton (`anml_fast.kernels.conv_valid`), and their twins.

  conv_valid(x, weight) -> y                           stride 1, no padding, no bias (conv_block's conv)
  conv_valid_backward(grad_y, x, weight, input_grad, weight_grad) -> (grad_x, grad_weight)
  conv_valid_sgd(grad_y, x, weight, lr) -> weight - lr * grad_weight   (a new tensor; dW never written)

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

__all__ = ["conv_valid", "conv_valid_backward", "conv_valid_sgd", "available", "unavailable_reason"]

# At import, not on first use (torch.compile cannot trace an import inside the ops).
_KERNELS, _IMPORT_ERROR = _triton.import_kernels("conv_valid")


def _kernels():
    return _triton.require(_KERNELS, _IMPORT_ERROR, "convolution ops are")


def conv_valid(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _kernels().conv_valid(x, weight)


def conv_valid_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool,
                        weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return _kernels().conv_valid_backward(grad_y, x, weight, bool(input_grad), bool(weight_grad))


def conv_valid_sgd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lr: float) -> torch.Tensor:
    """Like an optimizer step, outside autograd."""
    with torch.no_grad():
        return _kernels().conv_valid_sgd(grad_y, x, weight, float(lr))


def _self_test(device: torch.device) -> str | None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 7, generator=g).to(device)  # odd sizes: every mask is exercised
    w = (torch.randn(6, 5, 3, 3, generator=g) * 0.2).to(device)
    gy = torch.randn(2, 6, 7, 5, generator=g).to(device)
    with ieee_convolutions():
        got = (conv_valid(x, w), *conv_valid_backward(gy, x, w, True, True), conv_valid_sgd(gy, x, w, 0.1))
        want = (reference.conv_valid(x, w), *reference.conv_valid_backward(gy, x, w, True, True),
                reference.conv_valid_sgd(gy, x, w, 0.1))
    return first_mismatch(zip(("y", "grad x", "grad weight", "sgd weight"), got, want), device,
                          atol=1e-4, rtol=1e-4)


_CHECK = _triton.TritonSelfTest(_KERNELS, _IMPORT_ERROR, _self_test)
available = _CHECK.available
unavailable_reason = _CHECK.unavailable_reason
