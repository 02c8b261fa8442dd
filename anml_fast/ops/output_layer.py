"""The meta-test output-layer step on its fused Triton op (`anml_fast.kernels.output_layer`), and its twin.

  output_layer_adam_step_(W, b, mW, vW, mb, vb, f, y, lr, step) -> None
      For T independent trajectories: logits = W[t] f[t] + b[t], d = softmax(logits) - onehot(y[t]),
      gW = d f[t]^T, gb = d, then torch.optim.Adam's step s (betas 0.9, 0.999, eps 1e-8) with
      learning rate lr[t], applied in place to W, b and the moments mW, vW, mb, vb.

The twin `output_layer_adam_step_reference_` (`ops.reference.output_layer_adam_step_`) has the same
signature; it is the Adam step of `anml_fast.evaluation.trajectories.run_output_layer`.
The Triton version takes float32 or float64 on CUDA (or on CPU when the kernels were defined under
TRITON_INTERPRET=1); it never materialises gW. `available()` runs it once against the twin.
"""
from __future__ import annotations

import torch

from . import _triton
from ._compare import first_mismatch

__all__ = ["output_layer_adam_step_", "output_layer_adam_step_reference_", "available",
           "unavailable_reason"]

# the plain-PyTorch twin (ops/reference.py), under the name the tests use
from .reference import output_layer_adam_step_ as output_layer_adam_step_reference_  # noqa: E402


# ---------------------------------------------------------------- Triton

# At import, not on first use (torch.compile cannot trace an import inside the ops); a failure is
# kept for available() and for the error the ops then raise.
_KERNELS, _IMPORT_ERROR = _triton.import_kernels("output_layer")


def _kernels():
    if _KERNELS is None:
        raise RuntimeError(f"anml_fast's Triton output-layer op is not available ({_IMPORT_ERROR}); "
                           "use output_layer_adam_step_reference_")
    return _KERNELS


def output_layer_adam_step_(W: torch.Tensor, b: torch.Tensor, mW: torch.Tensor, vW: torch.Tensor,
                            mb: torch.Tensor, vb: torch.Tensor, f: torch.Tensor, y: torch.Tensor,
                            lr: torch.Tensor, step: int) -> None:
    """One fused Adam step of T output layers, in place (see the module docstring).

    Like an optimizer step, it runs outside autograd. The state tensors must be contiguous; f, y
    and lr may be strided views (f = Xseq[:, s] is one).
    """
    with torch.no_grad():
        _kernels().output_layer_adam_step_(W, b, mW, vW, mb, vb, f, y, lr, int(step))


# ---------------------------------------------------------------- availability

def _self_test(device: torch.device) -> str | None:
    g = torch.Generator().manual_seed(0)
    T, O, F_ = 3, 37, 50  # odd sizes: every mask is exercised
    W = torch.randn(T, O, F_, generator=g) * 0.2
    b = torch.randn(T, O, generator=g) * 0.1
    f = torch.randn(T, F_, generator=g).relu()
    y = torch.randint(0, O, (T,), generator=g)
    lr = torch.tensor([1e-3, 3e-4, 1e-2])
    state = [t.to(device) for t in (W, b, torch.zeros_like(W), torch.zeros_like(W),
                                    torch.zeros_like(b), torch.zeros_like(b))]
    ref = [t.clone() for t in state]
    f, y, lr = f.to(device), y.to(device), lr.to(device)
    for step in (1, 2):
        output_layer_adam_step_(*state, f, y, lr, step)
        output_layer_adam_step_reference_(*ref, f, y, lr, step)
    return first_mismatch(zip(("W", "b", "mW", "vW", "mb", "vb"), state, ref), device, atol=1e-5, rtol=1e-4)


_CHECK = _triton.TritonSelfTest(_KERNELS, _IMPORT_ERROR, _self_test)
available = _CHECK.available
unavailable_reason = _CHECK.unavailable_reason
