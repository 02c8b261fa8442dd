"""torch.optim.Adam's step for stacks of independent tensors on Triton (`anml_fast.kernels.adam_batched`).

  adam_update_batched_(p, g, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8) -> None
      p, g, m, v [T, ...]: T independent tensors stacked (the whole-PLN meta-test's trajectories),
      lr [T] one learning rate each; Adam's step `step` (an int, or a one-element int64 tensor on
      the device) in place on p, m, v. One launch a tensor, p/m/v read and written once.

The twin, with the same signature, is `ops.reference.adam_update_batched_` (about ten elementwise
launches a tensor). The Triton version takes float32 or float64 on CUDA (or on CPU when the
kernels were defined under TRITON_INTERPRET=1). `available()` runs it once against the twin.
"""
from __future__ import annotations

import torch

from . import _triton, reference
from ._compare import first_mismatch

__all__ = ["adam_update_batched_", "available", "unavailable_reason"]

# At import, not on first use (torch.compile cannot trace an import inside the ops).
_KERNELS, _IMPORT_ERROR = _triton.import_kernels("adam_batched")


def _kernels():
    return _triton.require(_KERNELS, _IMPORT_ERROR, "batched Adam is")


def adam_update_batched_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                         step: int | torch.Tensor, lr: torch.Tensor, beta1: float = 0.9,
                         beta2: float = 0.999, eps: float = 1e-8) -> None:
    """In place, outside autograd, like an optimizer step (see the module docstring)."""
    k = _kernels()
    with torch.no_grad():
        if isinstance(step, torch.Tensor):
            k.adam_update_batched_device_step_(p, g, m, v, step, lr, float(beta1), float(beta2), float(eps))
        else:
            k.adam_update_batched_(p, g, m, v, int(step), lr, float(beta1), float(beta2), float(eps))


def _self_test(device: torch.device) -> str | None:
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 5, 7, generator=gen)  # odd: masks
    lr = torch.tensor([1e-3, 3e-4, 1e-2])
    ours = [t.to(device) for t in (p, torch.zeros_like(p), torch.zeros_like(p))]
    ref = [t.clone() for t in ours]
    g, lr = g.to(device), lr.to(device)
    for s in (1, 2):
        adam_update_batched_(ours[0], g, ours[1], ours[2], s, lr)
        reference.adam_update_batched_(ref[0], g, ref[1], ref[2], s, lr)
    adam_update_batched_(ours[0], g, ours[1], ours[2], torch.tensor(3, device=device), lr)
    reference.adam_update_batched_(ref[0], g, ref[1], ref[2], 3, lr)
    return first_mismatch(zip(("p", "m", "v"), ours, ref), device, atol=1e-6, rtol=1e-5)


_CHECK = _triton.TritonSelfTest(_KERNELS, _IMPORT_ERROR, _self_test)
available = _CHECK.available
unavailable_reason = _CHECK.unavailable_reason
