"""One ANML/OML meta-training step in plain PyTorch (the protocol's steps 1-4).

First-order (the reference code's behaviour): the inner gradients are constants, so the fast
weights are `w0 - lr * sum(g_k)` and the meta-gradient reaching `w0` is the meta-loss gradient at
the fast weights. Second-order: the inner updates stay in the autograd graph (`create_graph`), so
the meta-gradient also flows through every inner gradient, as the paper describes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..data.tasks import MetaTrainBatch
from ..models import Network, Params, select
from .inner_step import fused_available, pln_sgd_step_fused


@dataclass
class StepResult:
    loss: torch.Tensor  # mean meta-loss over tasks (detached, on device)
    correct: torch.Tensor  # correct meta-batch predictions, summed over tasks (on device)
    count: int


def inner_loop(net: Network, params: Params, inner_names: list[str], x: torch.Tensor, y: torch.Tensor,
               lr: float, second_order: bool = False) -> Params:
    """SGD at batch size 1 over the trajectory x [L, 3, 28, 28]; returns the fast weights.

    Parameters outside `inner_names` stay fixed; when none of them feed the model's gate (the NM
    of ANML), the gate is computed once for the whole trajectory.
    """
    reuse_gate = not select(inner_names, net.gate_params())
    gate = net.gate(params, x) if reuse_gate else None
    if second_order:
        # Under create_graph the compiled ops' backward differentiates their twins: exact, but
        # slower than running the twins outright (44 vs 32 ms per meta-step on an H200), so
        # "auto" runs this loop on the twins; "compiled" still forces the ops.
        with ops.use_backend("torch") if ops.get_backend() == "auto" else contextlib.nullcontext():
            fast = {n: params[n] for n in inner_names}
            for k in range(x.shape[0]):
                loss = net.loss({**params, **fast}, x[k:k + 1], y[k:k + 1], None if gate is None else gate[k:k + 1])
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = dict(zip(fast, ops.sgd_update(list(fast.values()), list(grads), lr)))
        return fast
    # First order: run the trajectory on detached leaves, then attach the summed step to w0.
    fixed = {n: p.detach() for n, p in params.items()}
    gate = None if gate is None else gate.detach()
    if gate is not None and fused_available(net, inner_names, x.device):
        # no autograd at all in the inner loop: fused forward, backward and update per image
        fast = {n: fixed[n] for n in inner_names}
        for k in range(x.shape[0]):
            # after the first step the fast head weights are this loop's own: update them in place
            _, fast = pln_sgd_step_fused(net, fixed, fast, x[k:k + 1], y[k:k + 1], gate[k:k + 1], lr,
                                         donate=k > 0)
        return {n: fast[n] + (params[n] - fixed[n]) for n in inner_names}
    leaves = {n: fixed[n].clone().requires_grad_() for n in inner_names}
    for k in range(x.shape[0]):
        loss = net.loss({**fixed, **leaves}, x[k:k + 1], y[k:k + 1], None if gate is None else gate[k:k + 1])
        grads = torch.autograd.grad(loss, list(leaves.values()))
        with torch.no_grad():
            new = ops.sgd_update(list(leaves.values()), list(grads), lr)
        leaves = {n: t.requires_grad_() for n, t in zip(leaves, new)}
    # value: the final fast weight exactly; gradient: identity into w0 (p - p.detach() is zero)
    return {n: leaves[n].detach() + (params[n] - fixed[n]) for n in inner_names}


def meta_loss_and_grads(net: Network, params: Params, batch: MetaTrainBatch, inner_names: list[str],
                        inner_lr: float, second_order: bool = False) -> tuple[dict[str, torch.Tensor], StepResult]:
    """Steps 2-3 for every task, and the meta-gradient of their mean meta-loss w.r.t. `params`.

    Tasks are backpropagated one at a time (accumulating) so that memory does not grow with them.
    """
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    tasks = batch.traj_x.shape[0]
    total_loss = torch.zeros((), device=batch.traj_x.device, dtype=batch.meta_x.dtype)
    correct = torch.zeros((), device=batch.traj_x.device, dtype=torch.int64)
    for t in range(tasks):
        fast = inner_loop(net, leaves, inner_names, batch.traj_x[t], batch.traj_y[t], inner_lr, second_order)
        logits = net.forward({**leaves, **fast}, batch.meta_x[t])
        loss = F.cross_entropy(logits, batch.meta_y[t])
        g = torch.autograd.grad(loss / tasks, list(leaves.values()), allow_unused=True)
        for n, gi in zip(leaves, g):
            if gi is not None:
                grads[n] += gi
        total_loss += loss.detach() / tasks
        correct += (logits.detach().argmax(1) == batch.meta_y[t]).sum()
    return grads, StepResult(total_loss, correct, tasks * batch.meta_y.shape[1])
