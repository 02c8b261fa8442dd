"""One batch-1 SGD step of ANML's PLN (forward, backward, update), the inner loop's unit of work.

Two implementations with one signature:
- `pln_sgd_step_autograd`: the model's forward, `torch.autograd.grad`, then `ops.sgd_update`
  (whatever backend `ops` picks: on the twins it is the plain-PyTorch inner step);
- `pln_sgd_step_fused`: no autograd at all. Forward through the compiled conv blocks, keeping
  only what their backward reads (input, conv output, mean, rstd); the head's fused
  cross-entropy SGD step (its dW applied where it is computed, never written); the conv blocks'
  fused backward; one multi-tensor SGD launch for the trunk.
Both return the step's loss (a 0-d tensor, never read back here) and the updated PLN weights; the
weights passed in are left as they were (unless the fused step is told it may update the head's in
place: `donate`).
"""
from __future__ import annotations

import torch

from .. import ops
from ..models import ANML, Params

_TRUNK = [f"pln.{kind}{i}.{p}" for i in (1, 2, 3) for kind in ("conv", "norm") for p in ("weight", "bias")]
PLN_NAMES = tuple(_TRUNK + ["pln.fc.weight", "pln.fc.bias"])


def fused_available(net, inner_names, device: torch.device) -> bool:
    """Whether the inner loop may run `pln_sgd_step_fused`: ANML adapting exactly its PLN, and the
    dispatcher picking the compiled conv block, head step and SGD update on this device."""
    if not isinstance(net, ANML) or tuple(inner_names) != PLN_NAMES:
        return False
    return all(ops.choose(op, device) is not getattr(ops.reference, op)
               for op in ("conv_block", "gated_head_ce_sgd_", "sgd_update"))


def pln_sgd_step_autograd(net: ANML, fixed: Params, pln: Params, x: torch.Tensor, y: torch.Tensor,
                          gate: torch.Tensor, lr: float) -> tuple[torch.Tensor, Params]:
    leaves = {n: pln[n].detach().requires_grad_() for n in PLN_NAMES}
    with torch.enable_grad():
        loss = net.loss({**fixed, **leaves}, x, y, gate)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    with torch.no_grad():
        new = ops.sgd_update(list(leaves.values()), list(grads), lr)
    return loss.detach(), dict(zip(PLN_NAMES, new))


@torch.no_grad()
def pln_sgd_step_fused(net: ANML, fixed: Params, pln: Params, x: torch.Tensor, y: torch.Tensor,
                       gate: torch.Tensor, lr: float, donate: bool = False) -> tuple[torch.Tensor, Params]:
    """`donate=True`: the caller gives up the passed head weights, which are then updated in place
    (the inner loop's steps after the first: saves copying the 9 MB head every step)."""
    saved, a = [], x
    for i in (1, 2, 3):
        w, b = pln[f"pln.conv{i}.weight"], pln[f"pln.conv{i}.bias"]
        gw, gb = pln[f"pln.norm{i}.weight"], pln[f"pln.norm{i}.bias"]
        out, conv_out, mean, rstd = torch.ops.anml_fast.conv_block(a, w, b, gw, gb, i < 3)
        saved.append((a, conv_out, mean, rstd))
        a = out
    fc_w, fc_b = pln["pln.fc.weight"], pln["pln.fc.bias"]
    if not donate:
        fc_w, fc_b = fc_w.clone(), fc_b.clone()
    loss, dh, _ = ops.gated_head_ce_sgd_(a.flatten(1), gate, fc_w, fc_b, y, lr, backend="compiled")
    grad, grads = dh.view_as(a), {}
    for i in (3, 2, 1):
        inp, conv_out, mean, rstd = saved[i - 1]
        gx, gw, gb, gnw, gnb = torch.ops.anml_fast.conv_block_backward(
            grad, inp, pln[f"pln.conv{i}.weight"], conv_out, mean, rstd, pln[f"pln.norm{i}.weight"],
            pln[f"pln.norm{i}.bias"], i < 3, [i > 1, True, True])
        grads.update({f"pln.conv{i}.weight": gw, f"pln.conv{i}.bias": gb,
                      f"pln.norm{i}.weight": gnw, f"pln.norm{i}.bias": gnb})
        grad = gx
    new = ops.sgd_update([pln[n] for n in _TRUNK], [grads[n] for n in _TRUNK], lr, backend="compiled")
    out = dict(zip(_TRUNK, new))
    out["pln.fc.weight"], out["pln.fc.bias"] = fc_w, fc_b
    return loss, out
