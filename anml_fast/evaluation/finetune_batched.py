"""Meta-test fine-tuning of deeper layers (e.g. the whole PLN) for many trajectories at once.

Every trajectory keeps its own copy of the trained layers (and of the reset output layer), its
own Adam state and learning rate. One step computes every trajectory's batch-1 gradient in one
vectorised pass, `torch.func.vmap` over the plain-PyTorch model (a convolution whose weights
differ per trajectory becomes one grouped convolution), then updates all of them with one batched
Adam (`ops.adam_update_batched_`: on CUDA one Triton launch a tensor). Per trajectory the
arithmetic is `trajectories.run_finetune`'s, which runs them one by one and is this function's
reference in the tests; the random numbers are drawn in the same order.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import ops
from ..data.tasks import MetaTestSet, as_rgb
from ..models import Network, Params, select
from .trajectories import Trajectory, _batched_logits, _trajectory_starts


def _gate_bank(net: Network, params: Params, images: torch.Tensor, classes: torch.Tensor, batch: int = 500):
    """The frozen NM's gate logits for the given classes' images: [len(classes), D, G]."""
    x = as_rgb(images[classes].flatten(0, 1))
    with torch.no_grad():
        g = torch.cat([net.gate(params, x[i:i + batch]) for i in range(0, x.shape[0], batch)])
    return g.view(len(classes), images.shape[1], -1)


def run_finetune_batched(net: Network, params: Params, test_set: MetaTestSet, trajs: list[Trajectory],
                         train_prefixes: list[str], optimizer: str, iid: bool, generator: torch.Generator,
                         on_steps: Callable[[int], None] | None = None,
                         keep: list[bool] | None = None) -> list[tuple[float, float]]:
    """`run_finetune` for all trajectories side by side; (train acc, test acc) of the kept ones."""
    from torch.func import grad, vmap

    names = select(list(params), train_prefixes)
    out_names = [f"{net.output_layer}.weight", f"{net.output_layer}.bias"]
    batched = names + [k for k in out_names if k not in names]  # the output layer is reset per trajectory
    # a gate (ANML's NM) that is not trained is computed once per image
    reuse_gate = bool(net.gate_params()) and not select(names, net.gate_params())
    keep = keep or [True] * len(trajs)
    per = test_set.train.shape[1]
    dev = test_set.device

    stacks: dict[str, list[torch.Tensor]] = {k: [] for k in batched}
    orders, kept = [], []
    for i, fresh, order in _trajectory_starts(net, params, trajs, keep, generator, per, iid, dev):
        for k in batched:
            stacks[k].append(fresh[k] if k in fresh else params[k].detach())
        orders.append(order)
        kept.append(trajs[i])
    if not kept:
        return []
    T, lr = len(kept), torch.tensor([tr.lr for tr in kept], device=dev, dtype=params[names[0]].dtype)
    P = {k: torch.stack(v) for k, v in stacks.items()}
    frozen = {k: v.detach() for k, v in params.items() if k not in P}
    if optimizer == "adam":
        M = {k: torch.zeros_like(P[k]) for k in names}
        V = {k: torch.zeros_like(P[k]) for k in names}

    # Step s of trajectory t learns drawing drw[t, s] of class cls[t, s].
    classes = torch.stack([tr.classes for tr in kept])  # [T, n]
    order = torch.stack(orders)  # [T, S]
    cls, drw = torch.gather(classes, 1, order // per), order % per
    used = classes.unique()
    row = torch.full((test_set.train.shape[0],), -1, dtype=torch.long, device=dev)
    row[used] = torch.arange(len(used), device=dev)
    gates_tr = _gate_bank(net, params, test_set.train, used) if reuse_gate else None

    def loss(trained, x, y, gate):
        logits = net.forward({**frozen, **trained}, x[None], None if gate is None else gate[None])
        return F.cross_entropy(logits, y[None])

    grads_of = vmap(grad(loss), in_dims=(0, 0, 0, 0 if reuse_gate else None))
    S = order.shape[1]
    # the Adam step outside vmap may run compiled (one launch a tensor); chosen before the twins' block
    adam = ops.choose("adam_update_batched_", torch.device(dev)) if optimizer == "adam" else None
    with ops.use_backend("torch"):  # vmap runs through the twins, not the compiled ops
        for s in range(S):
            x = as_rgb(test_set.train[cls[:, s], drw[:, s]])  # [T, 3, 28, 28]
            gate = gates_tr[row[cls[:, s]], drw[:, s]] if reuse_gate else None
            g = grads_of({k: P[k] for k in names}, x, cls[:, s], gate)
            with torch.no_grad():
                for k in names:
                    if optimizer == "adam":
                        adam(P[k], g[k], M[k], V[k], s + 1, lr)
                    else:
                        P[k].sub_(g[k] * lr.view(-1, *[1] * (P[k].dim() - 1)))
            if on_steps is not None and ((s + 1) % 100 == 0 or s + 1 == S):
                on_steps(T * ((s + 1) % 100 or 100))

    out = []
    with torch.no_grad():
        gates_te = _gate_bank(net, params, test_set.test, used) if reuse_gate else None
        for t, tr in enumerate(kept):
            p = {**frozen, **{k: P[k][t] for k in P}}
            accs = []
            for images, gates in ((test_set.train, gates_tr), (test_set.test, gates_te)):
                x = as_rgb(images[tr.classes].flatten(0, 1))
                y = tr.classes.repeat_interleave(images.shape[1])
                gate = None if gates is None else gates[row[tr.classes]].flatten(0, 1)
                accs.append((_batched_logits(net, p, x, gate).argmax(1) == y).float().mean().item())
            out.append((accs[0], accs[1]))
    return out
