"""The meta-test output-layer step on its fused Triton op (`anml_fast.kernels.output_layer`), and its twin.

  output_layer_adam_step_(W, b, mW, vW, mb, vb, logits, X, Y, lr, step) -> None
      For T independent trajectories, step s (`step`: a one-element int64 tensor on the device)
      learns image s - 1 of each sequence X [T, S, F], Y [T, S]: logits = W[t] f + b[t],
      d = softmax(logits) - onehot(y), gW = d f^T, gb = d, then torch.optim.Adam's step s (betas
      0.9, 0.999, eps 1e-8) with learning rate lr[t], in place on W, b and the moments mW, vW, mb, vb.
      `logits` [T, O] carries the logits between steps: it holds image s - 1's on entry (prime it
      once with `output_layer_logits(W, b, X, step)` before step 1) and image s's, from the
      updated layer, on exit, so that W is read once per step.
      The caller advances `step` (step += 1): a CUDA graph of many steps then replays a trajectory.

The twin `output_layer_adam_step_reference_` (`ops.reference.output_layer_adam_step_`) has the same
signature; it is the Adam step of `anml_fast.evaluation.trajectories.run_output_layer`.
The Triton version takes float32 or float64 on CUDA (or on CPU when the kernels were defined under
TRITON_INTERPRET=1); it never materialises gW. `available()` runs it once against the twin.
"""
from __future__ import annotations

import torch

from . import _triton
from ._compare import first_mismatch

__all__ = ["output_layer_adam_step_", "output_layer_adam_step_reference_", "output_layer_logits",
           "available", "unavailable_reason"]

# the plain-PyTorch twin (ops/reference.py), under the name the tests use, and the logits primer
# both share
from .reference import output_layer_adam_step_ as output_layer_adam_step_reference_  # noqa: E402
from .reference import output_layer_logits  # noqa: E402


# ---------------------------------------------------------------- Triton

# At import, not on first use (torch.compile cannot trace an import inside the ops); a failure is
# kept for available() and for the error the ops then raise.
_KERNELS, _IMPORT_ERROR = _triton.import_kernels("output_layer")


def _kernels():
    return _triton.require(_KERNELS, _IMPORT_ERROR, "output-layer op is", "output_layer_adam_step_reference_")


def output_layer_adam_step_(W: torch.Tensor, b: torch.Tensor, mW: torch.Tensor, vW: torch.Tensor,
                            mb: torch.Tensor, vb: torch.Tensor, logits: torch.Tensor, X: torch.Tensor,
                            Y: torch.Tensor, lr: torch.Tensor, step: torch.Tensor) -> None:
    """One fused Adam step of T output layers, in place (see the module docstring).

    Like an optimizer step, it runs outside autograd. The state tensors (logits included) must be
    contiguous; X, Y and lr may be strided views.
    """
    if not isinstance(step, torch.Tensor):  # before the schema's own, less helpful, cast error
        raise TypeError("output_layer_adam_step_: step must be a one-element int64 tensor on the "
                        f"state's device (the step number, from 1), got {step!r}")
    with torch.no_grad():
        _kernels().output_layer_adam_step_(W, b, mW, vW, mb, vb, logits, X, Y, lr, step)


# ---------------------------------------------------------------- availability

def _self_test(device: torch.device) -> str | None:
    g = torch.Generator().manual_seed(0)
    T, O, F_ = 3, 37, 50  # odd sizes: every mask is exercised
    W = torch.randn(T, O, F_, generator=g) * 0.2
    b = torch.randn(T, O, generator=g) * 0.1
    X = torch.randn(T, 2, F_, generator=g).relu()
    Y = torch.randint(0, O, (T, 2), generator=g)
    lr = torch.tensor([1e-3, 3e-4, 1e-2])
    state = [t.to(device) for t in (W, b, torch.zeros_like(W), torch.zeros_like(W),
                                    torch.zeros_like(b), torch.zeros_like(b))]
    X, Y, lr = X.to(device), Y.to(device), lr.to(device)
    state.append(output_layer_logits(state[0], state[1], X, torch.tensor(1, device=device)))
    ref = [t.clone() for t in state]
    for s in (1, 2):
        step = torch.tensor(s, device=device)
        output_layer_adam_step_(*state, X, Y, lr, step)
        output_layer_adam_step_reference_(*ref, X, Y, lr, step)
    return first_mismatch(zip(("W", "b", "mW", "vW", "mb", "vb", "logits"), state, ref), device,
                          atol=1e-5, rtol=1e-4)


_CHECK = _triton.TritonSelfTest(_KERNELS, _IMPORT_ERROR, _self_test)
available = _CHECK.available
unavailable_reason = _CHECK.unavailable_reason
