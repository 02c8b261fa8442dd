"""The gated head of ANML on its fused Triton ops (`anml_fast.kernels.gated_head`), and their twins.

  gated_head(h, gate_logits, weight, bias) -> logits          = (h * sigmoid(gate_logits)) @ W^T + b
  gated_head_cross_entropy(h, gate_logits, weight, bias, target) -> mean cross-entropy of those logits
  gated_head_ce_sgd_(h, gate_logits, weight, bias, target, lr) -> (loss, dh, dgate_logits), with
      weight -= lr * dW and bias -= lr * db in place: one batch-1 SGD step of the head, the inner
      loop's, outside autograd; dh and dgate_logits (computed with the weight before the update)
      continue the backward into the trunks.

Each has a plain-PyTorch twin with the same signature (`*_reference`). The Triton versions take
float32 or float64 on CUDA (or on CPU when the kernels were defined under TRITON_INTERPRET=1).
First-order grads come from the kernels; under create_graph (second order) the backward
differentiates the twin instead, which autograd can differentiate again.
A machine without Triton can still import this module; `available()` says whether the ops work
here (it runs them), `unavailable_reason()` why not. Without CUDA they work only when the kernels
were defined under TRITON_INTERPRET=1, i.e. when it was set before this module was imported.
"""
from __future__ import annotations

import torch

from . import _triton
from ._compare import first_mismatch

__all__ = [
    "gated_head", "gated_head_cross_entropy", "gated_head_ce_sgd_",
    "gated_head_reference", "gated_head_cross_entropy_reference", "gated_head_ce_sgd_reference_",
    "available", "unavailable_reason",
]


# the plain-PyTorch twins (ops/reference.py), under the names the tests and benchmarks use
from .reference import gated_head as gated_head_reference  # noqa: E402  (the twins)
from .reference import gated_head_ce_sgd_ as gated_head_ce_sgd_reference_  # noqa: E402
from .reference import gated_head_cross_entropy as gated_head_cross_entropy_reference  # noqa: E402


# ---------------------------------------------------------------- Triton

# At import, not on first use (torch.compile cannot trace an import inside the ops); a failure is
# kept for available() and for the error the ops then raise.
_KERNELS, _IMPORT_ERROR = _triton.import_kernels("gated_head")


def _kernels():
    return _triton.require(_KERNELS, _IMPORT_ERROR, "gated-head ops are")


def gated_head(h: torch.Tensor, gate_logits: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
    """logits = (h * sigmoid(gate_logits)) @ weight^T + bias, for h of shape [..., F]."""
    if h.dim() == 2 and gate_logits.dim() == 2:  # as the models call it: no reshapes (host time at batch 1)
        return _kernels().direct.gated_head_fwd(h, gate_logits, weight, bias)
    lead = h.shape[:-1]
    logits = _kernels().direct.gated_head_fwd(h.reshape(-1, h.shape[-1]),
                                              gate_logits.reshape(-1, gate_logits.shape[-1]), weight, bias)
    return logits.reshape(*lead, weight.shape[0])


def gated_head_cross_entropy(h: torch.Tensor, gate_logits: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of cross_entropy(gated_head(h, gate_logits, weight, bias), target), fused:
    the [B, O] logits are kept for the backward, dlogits never exists in memory."""
    loss, _, _ = _kernels().direct.gated_head_ce_fwd(h, gate_logits, weight, bias, target)
    return loss


def gated_head_ce_sgd_(h: torch.Tensor, gate_logits: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, target: torch.Tensor, lr: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dh, dgate_logits) of the mean cross-entropy; weight and bias take one SGD step in place.

    dW is applied inside the kernel that computes it and never written. Runs outside autograd
    (like an optimizer step): nothing here is recorded, whatever requires grad.
    """
    with torch.no_grad():
        return _kernels().gated_head_ce_sgd_(h, gate_logits, weight, bias, target, float(lr))


# ---------------------------------------------------------------- availability

def _self_test(device: torch.device) -> str | None:
    g = torch.Generator().manual_seed(0)
    B, F_, O = 3, 40, 37  # odd sizes: exercise every mask
    h, z = torch.randn(B, F_, generator=g), torch.randn(B, F_, generator=g)
    w, b = torch.randn(O, F_, generator=g) * 0.2, torch.randn(O, generator=g)
    y = torch.randint(0, O, (B,), generator=g)
    h, z, w, b, y = (t.to(device) for t in (h, z, w, b, y))

    leaves = [t.clone().requires_grad_() for t in (h, z, w, b)]
    loss = gated_head_cross_entropy(*leaves, y)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (h, z, w, b)]
    ref_loss = gated_head_cross_entropy_reference(*ref_leaves, y)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    logits = gated_head(h, z, w, b)
    w1, b1 = w.clone(), b.clone()
    sgd = gated_head_ce_sgd_(h, z, w1, b1, y, 0.1)
    w2, b2 = w.clone(), b.clone()
    ref_sgd = gated_head_ce_sgd_reference_(h, z, w2, b2, y, 0.1)

    checks = {"logits": (logits, gated_head_reference(h, z, w, b)), "loss": (loss, ref_loss),
              "sgd weight": (w1, w2), "sgd bias": (b1, b2)}
    checks.update({f"grad {n}": p for n, p in zip(("h", "gate_logits", "weight", "bias"), zip(grads, ref_grads))})
    checks.update({f"sgd {n}": p for n, p in zip(("loss", "dh", "dgate_logits"), zip(sgd, ref_sgd))})
    return first_mismatch(((name, got, want) for name, (got, want) in checks.items()), device,
                          atol=1e-4, rtol=1e-4)


_CHECK = _triton.TritonSelfTest(_KERNELS, _IMPORT_ERROR, _self_test)
available = _CHECK.available
unavailable_reason = _CHECK.unavailable_reason
