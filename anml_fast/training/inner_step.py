"""One batch-1 SGD step of ANML's PLN (forward, backward, update), the inner loop's unit of work.

Two implementations with one signature:
- `pln_sgd_step_autograd`: the model's forward, `torch.autograd.grad`, then `ops.sgd_update`
  (whatever backend `ops` picks: on the twins it is the plain-PyTorch inner step);
- `pln_sgd_step_fused`: no autograd at all. Per conv block, the batch-1 Triton convolution
  (kernels/conv_valid.py) and the fused norm/ReLU/pool kernel, or for the blocks named in
  FUSED_NORM_BLOCKS (conv1) both in one launch (`conv_valid_plane_norm`), keeping only
  what the backward reads (input, conv output, mean, rstd); the head's fused cross-entropy SGD step (one
  cooperative launch at ANML's sizes, kernels/gated_head_step.py: dW never written, the weight
  read once and written once); the last norm's fused backward; per block the Triton
  weight grad with the SGD step applied in the same kernel (dW never written) and, for conv3 and
  conv2, the Triton input grad with the previous block's norm backward in the same launch
  (`conv_valid_input_grad_norm_backward`: the input grad is never written out); one multi-tensor
  SGD launch for the norms' affine weights. 13 launches, each with programmatic dependent launch on
  Hopper cards (kernels/_pdl.py): placed while the one before finishes.
Both return the step's loss (a 0-d tensor, never read back here) and the updated PLN weights; the
weights passed in are left as they were (unless the fused step is told it may update the head's in
place: `donate`).

The fused step keeps every launch on the caller's stream. Branching conv3's and conv2's weight
grads onto a side stream (in a CUDA graph they would run beside the chain of input grads) was
timed on an H200 (2026-11-29, 20 chained steps a replay): no gain with TF32 convolutions (102 us a
step either way) and 16 us a step lost in float32 (119 -> 135): the branch takes SMs the chain needs.
"""
from __future__ import annotations

import torch

from .. import ops
from ..models import ANML, Params

_TRUNK = [f"pln.{kind}{i}.{p}" for i in (1, 2, 3) for kind in ("conv", "norm") for p in ("weight", "bias")]
# The blocks whose norm runs in the convolution's launch (conv_valid_plane_norm), saving a launch
# each: conv1, whose 3 x 3 x 3 filter takes the direct kernel (each program convolves and
# normalises its own whole planes). H200, 2026-11-29, bench/inner_step_ab.py (20 steps a graph
# replay, the variants interleaved over 5 rounds, one run, results/inner-step-ab-nvidia-h200.md):
# TF32 81.3 us a step with conv1, 81.6 with conv1 and conv3, 86.0 with none (float32 90.0, 89.7,
# 96.8); conv3 alone in an earlier such run: 87.1 against 86.0 (float32 even). Not conv2: the
# GEMM's last program of each channel block then normalises 32 planes of 11 x 11 alone, a serial
# tail that costs more than the launch it saves (92.8 against 90.5 us in the sequential benchmark).
FUSED_NORM_BLOCKS: tuple[int, ...] = (1,)
_NORMS = [n for n in _TRUNK if ".norm" in n]
PLN_NAMES = tuple(_TRUNK + ["pln.fc.weight", "pln.fc.bias"])


def fused_available(net, inner_names, device: torch.device) -> bool:
    """Whether the inner loop may run `pln_sgd_step_fused`: ANML adapting exactly its PLN, and the
    dispatcher picking the compiled conv block, head step and SGD update on this device."""
    if not isinstance(net, ANML) or tuple(inner_names) != PLN_NAMES:
        return False
    return all(ops.choose(op, device) is not getattr(ops.reference, op)
               for op in ("conv_valid", "conv_valid_plane_norm", "conv_valid_input_grad_norm_backward",
                          "conv_valid_sgd", "plane_norm", "gated_head_ce_sgd_", "sgd_update"))


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
                       gate: torch.Tensor, lr: float, donate: bool = False,
                       fused_norm_blocks: tuple[int, ...] | None = None) -> tuple[torch.Tensor, Params]:
    """`donate=True`: the caller gives up the passed head weights, which are then updated in place
    (the inner loop's steps after the first: saves copying the 9 MB head every step).
    `fused_norm_blocks`: overrides FUSED_NORM_BLOCKS (the same step either way, to float rounding)."""
    fused_norm = FUSED_NORM_BLOCKS if fused_norm_blocks is None else fused_norm_blocks
    conv = ops._conv_valid_triton.kernels().direct  # the Triton ops without the custom-op dispatch when eager
    saved, a = [], x
    for i in (1, 2, 3):
        w, gamma, beta = pln[f"pln.conv{i}.weight"], pln[f"pln.norm{i}.weight"], pln[f"pln.norm{i}.bias"]
        if i in fused_norm:
            out, conv_out, mean, rstd = conv.conv_valid_plane_norm(a, w, gamma, beta, i < 3)
        else:
            conv_out = conv.conv_valid(a, w)
            out, mean, rstd = torch.ops.anml_fast.plane_norm(conv_out, gamma, beta, i < 3)
        saved.append((a, conv_out, mean, rstd))
        a = out
    fc_w, fc_b = pln["pln.fc.weight"], pln["pln.fc.bias"]
    if not donate:
        fc_w, fc_b = fc_w.clone(), fc_b.clone()
    loss, dh, _ = ops.gated_head_ce_sgd_(a.flatten(1), gate, fc_w, fc_b, y, lr, backend="compiled")
    new, norm_grads = {}, []
    _, conv_out, mean, rstd = saved[2]
    gy, gnw, gnb = torch.ops.anml_fast.plane_norm_backward(
        dh.view_as(a), conv_out, mean, rstd, pln["pln.norm3.weight"], pln["pln.norm3.bias"], False)
    for i in (3, 2, 1):
        w, gy_i = pln[f"pln.conv{i}.weight"], gy
        norm_grads = [gnw, gnb] + norm_grads
        if i > 1:  # conv i's input grad carried on through norm i-1 in the same launch
            _, conv_out, mean, rstd = saved[i - 2]
            gy, gnw, gnb = conv.conv_valid_input_grad_norm_backward(
                gy_i, w, conv_out, mean, rstd, pln[f"pln.norm{i - 1}.weight"], pln[f"pln.norm{i - 1}.bias"], True)
        new[f"pln.conv{i}.weight"] = conv.conv_valid_sgd(gy_i, saved[i - 1][0], w, lr)
        # The conv bias's gradient is exactly zero (the norm subtracts each plane's mean, bias and
        # all), so its SGD step leaves it as it is.
        new[f"pln.conv{i}.bias"] = pln[f"pln.conv{i}.bias"]
    new.update(zip(_NORMS, ops.sgd_update([pln[n] for n in _NORMS], norm_grads, lr, backend="compiled")))
    new["pln.fc.weight"], new["pln.fc.bias"] = fc_w, fc_b
    return loss, {n: new[n] for n in PLN_NAMES}
