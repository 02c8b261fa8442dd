"""Meta-test trajectories in plain PyTorch: learn N classes one image at a time, then score.

Two regimes:
- output layer only (the replicated protocol): every other layer is frozen, so each image's
  features are computed once (`FeatureBank`) and many trajectories run side by side as a batch of
  independent linear layers, each with its own weights, Adam state and learning rate;
- deeper fine-tuning (e.g. the whole PLN): one trajectory at a time through the functional model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..data.tasks import MetaTestSet, as_rgb
from .. import ops
from ..models import Network, Params, select
from ..ops.reference import step_inputs


class FeatureBank:
    """Frozen features (the output layer's input) of meta-test images, computed once per class."""

    def __init__(self, net: Network, params: Params, test_set: MetaTestSet, batch_size: int = 500):
        self.net, self.params, self.test_set, self.batch_size = net, params, test_set, batch_size
        images = torch.cat([test_set.train, test_set.test], 1)  # [C, 20, 1, 28, 28]
        self.images = images
        self.feats: torch.Tensor | None = None
        self.done = torch.zeros(images.shape[0], dtype=torch.bool)

    @torch.no_grad()
    def get(self, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(train [n, 15, F], test [n, 5, F]) for the given classes."""
        todo = [c for c in classes.cpu().unique().tolist() if not self.done[c]]
        for i in range(0, len(todo), max(1, self.batch_size // 20)):
            chunk = todo[i:i + max(1, self.batch_size // 20)]
            x = as_rgb(self.images[chunk].flatten(0, 1))
            f = self.net.features(self.params, x).view(len(chunk), 20, -1)
            if self.feats is None:
                self.feats = torch.empty(self.images.shape[0], 20, f.shape[-1], device=f.device, dtype=f.dtype)
            self.feats[chunk] = f
            self.done[chunk] = True
        ntrain = self.test_set.train.shape[1]
        sel = self.feats[classes]
        return sel[:, :ntrain], sel[:, ntrain:]


@dataclass
class Trajectory:
    """One continual-learning run: which classes (ascending), at which learning rate."""

    classes: torch.Tensor
    lr: float


def _class_order(n_classes: int, per_class: int, iid: bool, generator: torch.Generator, device) -> torch.Tensor:
    """Index of each step into the flattened [n_classes * per_class] images."""
    if iid:
        return torch.randperm(n_classes * per_class, generator=generator, device=device)
    return torch.arange(n_classes * per_class, device=device)


def _trajectory_starts(net: Network, params: Params, trajs: list[Trajectory], keep: list[bool],
                       generator: torch.Generator, per_class: int, iid: bool, device):
    """The random numbers every trajectory draws, in order: a fresh output layer (Kaiming-normal
    weight, zero bias), then the order of its images. Yields (index, fresh output-layer params,
    order) for the kept trajectories; the others' numbers are drawn too (so that each kept one
    gets exactly its own, whatever the share) and dropped."""
    names = [f"{net.output_layer}.weight", f"{net.output_layer}.bias"]
    for i, (tr, mine) in enumerate(zip(trajs, keep)):
        fresh = {k: torch.empty_like(params[k]) for k in names}
        net.reset_output(fresh, generator)
        order = _class_order(len(tr.classes), per_class, iid, generator, device)
        if mine:
            yield i, fresh, order


@torch.no_grad()
def run_output_layer(bank: FeatureBank, net: Network, trajs: list[Trajectory], optimizer: str,
                     iid: bool, generator: torch.Generator,
                     on_steps: Callable[[int], None] | None = None,
                     keep: list[bool] | None = None) -> list[tuple[float, float]]:
    """Train a fresh output layer per trajectory, all side by side; (train acc, test acc) each.

    All trajectories must have the same number of classes. Randomness, per trajectory in order:
    the Kaiming-normal output weight, then (with `iid`) the shuffled image order. `keep` (one
    process's share in a distributed run) runs only some trajectories, and returns only theirs;
    the others' random numbers are still drawn, so each kept one gets exactly its own.
    """
    w_ref = bank.params[f"{net.output_layer}.weight"]
    (O, Fdim), dev = w_ref.shape, w_ref.device
    keep = keep or [True] * len(trajs)
    T = sum(keep)
    W = torch.empty(T, O, Fdim, device=dev, dtype=w_ref.dtype)
    orders, kept = [], []
    for i, fresh, order in _trajectory_starts(net, bank.params, trajs, keep, generator,
                                              bank.test_set.train.shape[1], iid, dev):
        W[len(kept)] = fresh[f"{net.output_layer}.weight"]
        orders.append(order)
        kept.append(trajs[i])
    trajs = kept
    if not trajs:
        return []
    b = torch.zeros(T, O, device=dev, dtype=W.dtype)
    feats_tr, feats_te, y_tr, y_te = [], [], [], []
    for tr in trajs:
        ftr, fte = bank.get(tr.classes)
        feats_tr.append(ftr.flatten(0, 1))
        feats_te.append(fte.flatten(0, 1))
        y_tr.append(tr.classes.repeat_interleave(ftr.shape[1]))
        y_te.append(tr.classes.repeat_interleave(fte.shape[1]))
    Xtr, Xte, Ytr, Yte = map(torch.stack, (feats_tr, feats_te, y_tr, y_te))  # [T, S, F], [T, S]
    order = torch.stack(orders)
    Xseq = torch.gather(Xtr, 1, order[..., None].expand_as(Xtr))
    Yseq = torch.gather(Ytr, 1, order)
    lr = torch.tensor([tr.lr for tr in trajs], device=dev, dtype=W.dtype)
    step = torch.ones((), dtype=torch.int64, device=dev)  # on the device: see run_steps
    if optimizer == "adam":
        mW, vW, mb, vb = (torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(b))
        logits = ops.output_layer_logits(W, b, Xseq, step)  # carried from step to step by the op
    rows = torch.arange(T, device=dev)
    S = Xseq.shape[1]

    def one_step():
        if optimizer == "adam":
            ops.output_layer_adam_step_(W, b, mW, vW, mb, vb, logits, Xseq, Yseq, lr, step)
        else:
            f, y = step_inputs(Xseq, Yseq, step)  # [T, F], [T]
            z = torch.baddbmm(b.unsqueeze(2), W, f.unsqueeze(2)).squeeze(2)  # logits [T, O]
            d = torch.softmax(z, 1)
            d[rows, y] -= 1  # d(cross-entropy)/d(logits) at batch size 1
            W.sub_((d.unsqueeze(2) * f.unsqueeze(1)) * lr.view(-1, 1, 1))
            b.sub_(d * lr.view(-1, 1))
        step.add_(1)

    run_steps(one_step, S, dev, None if on_steps is None else (lambda k: on_steps(T * k)))
    acc_tr = _accuracy(Xtr, Ytr, W, b)
    acc_te = _accuracy(Xte, Yte, W, b)
    return list(zip(acc_tr, acc_te))


def run_steps(step_fn: Callable[[], None], n: int, device: torch.device,
              on_steps: Callable[[int], None] | None = None, chunk: int = 100) -> None:
    """Call `step_fn()` n times, reporting progress every `chunk` calls to `on_steps(calls)`.

    On CUDA the calls after the first are replayed from a CUDA graph of `chunk` calls. A meta-test
    step is two short kernels (~14 us of GPU work for one 600-class trajectory on an H200) that
    Python takes far longer to launch, so launching them one by one would bound a single
    trajectory. `step_fn` must keep all its state on the device, the step counter included, so
    that every replay moves on.
    """
    report = on_steps or (lambda k: None)
    if device.type != "cuda" or n <= chunk:
        for s in range(n):
            step_fn()
            if (s + 1) % chunk == 0 or s + 1 == n:
                report((s + 1) % chunk or chunk)
        return
    # The capture records on the current device's streams: make `device` current (cuda:1 in a
    # single process, say), or the steps would run eagerly and the graph stay empty.
    with torch.cuda.device(device):
        # The first step runs eagerly, on a side stream as capture wants: it compiles the Triton
        # kernels and sets up cuBLAS, which cannot happen during a capture; it is a real step.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step_fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(chunk):
                step_fn()
        replays, rest = divmod(n - 1, chunk)
        for r in range(replays):
            graph.replay()
            report(chunk + 1 if r == 0 else chunk)
        for _ in range(rest):
            step_fn()
        if rest:
            report(rest)
        del graph


def _accuracy(X: torch.Tensor, Y: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> list[float]:
    logits = torch.baddbmm(b.unsqueeze(1), X, W.transpose(1, 2))
    return (logits.argmax(2) == Y).float().mean(1).tolist()


def run_finetune(net: Network, params: Params, test_set: MetaTestSet, trajs: list[Trajectory],
                 train_prefixes: list[str], optimizer: str, iid: bool, generator: torch.Generator,
                 on_steps: Callable[[int], None] | None = None,
                 keep: list[bool] | None = None) -> list[tuple[float, float]]:
    """Fine-tune the named layers (output layer reset, as in the protocol), one trajectory at a
    time; `keep` as in `run_output_layer`."""
    names = select(list(params), train_prefixes)
    reuse_gate = not select(names, net.gate_params())
    out = []
    keep = keep or [True] * len(trajs)
    per = test_set.train.shape[1]
    for i, fresh, order in _trajectory_starts(net, params, trajs, keep, generator, per, iid, test_set.device):
        tr = trajs[i]
        p = {k: v.detach().clone() for k, v in params.items()}
        p.update(fresh)
        xtr = as_rgb(test_set.train[tr.classes].flatten(0, 1))
        ytr = tr.classes.repeat_interleave(per)
        xte = as_rgb(test_set.test[tr.classes].flatten(0, 1))
        yte = tr.classes.repeat_interleave(test_set.test.shape[1])
        with torch.no_grad():
            gate_tr = net.gate(p, xtr) if reuse_gate else None
            gate_te = net.gate(p, xte) if reuse_gate else None
        trained = {k: p[k].requires_grad_() for k in names}
        if optimizer == "adam":
            from ..training.adam import Adam
            opt = Adam(trained, lr=tr.lr)
        for s, i in enumerate(order.tolist()):
            logits = net.forward(p, xtr[i:i + 1], None if gate_tr is None else gate_tr[i:i + 1])
            grads = torch.autograd.grad(F.cross_entropy(logits, ytr[i:i + 1]), list(trained.values()))
            if optimizer == "adam":
                opt.step(dict(zip(trained, grads)))
            else:
                with torch.no_grad():
                    torch._foreach_sub_(list(trained.values()), list(grads), alpha=tr.lr)
            if on_steps is not None and ((s + 1) % 100 == 0 or s + 1 == len(order)):
                on_steps((s + 1) % 100 or 100)
        with torch.no_grad():
            acc = [(_batched_logits(net, p, x, g).argmax(1) == y).float().mean().item()
                   for x, y, g in ((xtr, ytr, gate_tr), (xte, yte, gate_te))]
        out.append((acc[0], acc[1]))
    return out


def _batched_logits(net: Network, p: Params, x: torch.Tensor, gate, batch: int = 500) -> torch.Tensor:
    return torch.cat([net.forward(p, x[i:i + batch], None if gate is None else gate[i:i + batch])
                      for i in range(0, x.shape[0], batch)])
