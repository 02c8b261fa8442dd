"""The inner-loop and meta-optimiser updates as compiled multi-tensor ops: every tensor in one launch.

    sgd_update:    out_i = p_i - lr * g_i  (new tensors; the inner loop keeps its starting weights).
                   Backward: dp_i = dout_i, dg_i = -lr * dout_i (so second-order meta-gradients
                   flow through it).
    adam_update_:  torch.optim.Adam's step in place, step counting from 1:
                   m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2;
                   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).  No autograd.

Kernels: csrc/multi_tensor.cpp (CPU, one fused pass per tensor) and csrc/cuda/multi_tensor.cu
(one launch over all tensors, the pointer table passed as a kernel argument).
"""
from __future__ import annotations


import torch

from . import _ext, reference
from ._compare import first_mismatch

_SGD_OP = "anml_fast::sgd_update"
_ADAM_OP = "anml_fast::adam_update_"
_LOADED = _ext.load() is not None


def _require() -> None:
    if not _LOADED:
        raise RuntimeError(f"anml_fast's compiled extension is not available ({_ext.error()}); "
                           "use backend='torch'")


def _check_lists(op: str, *lists) -> None:
    """The C++ op's argument checks (csrc/multi_tensor.cpp), returned as a message and raised here:
    the op is never called with arguments it would refuse, as its TORCH_CHECK messages crashed the
    process on the GPU machine's torch 2.11 image (csrc/multi_tensor.cpp). Traced by
    torch.compile, the same checks in Python (a C function would break the graph)."""
    if torch.compiler.is_compiling():
        _check_lists_traced(op, *lists)
        return
    problem = _ext.load().check_update_args(op, *lists)
    if problem is not None:
        raise RuntimeError(problem)


def _check_lists_traced(op: str, params, *others) -> None:
    names = ("grads", "exp_avgs", "exp_avg_sqs")
    others = [o for o in others if not isinstance(o, int)]  # adam's step is checked by its caller
    for what, lst in zip(names, others):
        if len(lst) != len(params):
            raise RuntimeError(f"{op}: {len(params)} params but {len(lst)} {what}")
    for i, p in enumerate(params):
        if not p.dtype.is_floating_point:
            raise RuntimeError(f"{op}: params[{i}] must be floating point, got {p.dtype}")
        if p.device != params[0].device:
            raise RuntimeError(f"{op}: params[{i}] is on {p.device} but params[0] is on {params[0].device}")
        for what, lst in zip(names, others):
            t = lst[i]
            if t.shape != p.shape:
                raise RuntimeError(f"{op}: {what}[{i}] has shape {tuple(t.shape)} but params[{i}] has {tuple(p.shape)}")
            if t.device != p.device:
                raise RuntimeError(f"{op}: {what}[{i}] is on {t.device} but params[{i}] is on {p.device}")
            if not t.dtype.is_floating_point:
                raise RuntimeError(f"{op}: {what}[{i}] must be floating point, got {t.dtype}")


def sgd_update(params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> list[torch.Tensor]:
    """New tensors w - lr * g, in one kernel launch on the GPU. Same values as the twin's.

    A plain eager call on the GPU carves the results from one allocation (csrc/cuda/multi_tensor.cu):
    each is a tensor of its own, but they share a storage, freed with the last of them; as with
    views, torch.save of one writes them all and growing one by resize_ runs into the next
    (clone() one to detach it). Traced calls allocate one per result."""
    _require()
    if not params:  # no tensor to pick a device from
        return []
    if not torch.compiler.is_compiling():
        # checks and the dispatcher call in one C function: torch.ops' Python would parse both
        # lists again (csrc/multi_tensor_autograd.cpp, sgd_update_eager)
        out = _ext.load().sgd_update_eager(params, grads, float(lr))
        if out is not None:
            return out
    _check_lists("sgd_update", params, grads)
    return torch.ops.anml_fast.sgd_update(params, grads, float(lr))


def adam_update_(params: list[torch.Tensor], grads: list[torch.Tensor],
                 exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], step: int,
                 lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
    """One Adam step in place, as torch.optim.Adam computes it, in one launch on the GPU."""
    _require()
    if not params:
        return
    if int(step) < 1:
        raise RuntimeError(f"adam_update_: step counts from 1, got {step}")
    _check_lists("adam_update_", params, grads, exp_avgs, exp_avg_sqs, int(step))
    torch.ops.anml_fast.adam_update_(params, grads, exp_avgs, exp_avg_sqs, int(step), float(lr),
                                     float(beta1), float(beta2), float(eps))


def _register() -> None:
    @torch.library.register_fake(_SGD_OP)
    def _sgd_update_fake(params, grads, lr):
        return [p.new_empty(p.shape) for p in params]

    @torch.library.register_fake(_ADAM_OP)
    def _adam_update_fake(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1=0.9, beta2=0.999,
                          eps=1e-8):
        return None

    # sgd_update's autograd is C++ (csrc/multi_tensor_autograd.cpp): dp_i = dout_i, dg_i = -lr dout_i.


if _LOADED:
    _register()


def _failure_on(device_type: str) -> str | None:
    """Runs both ops once on `device_type` against the twins; None if they work."""
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (2, 3, 4)]

    def lists():
        return [[torch.randn(s, generator=g).to(device_type) for s in shapes] for _ in range(4)]

    p, gr, _, _ = lists()
    failure = first_mismatch((("sgd_update", a, b) for a, b in zip(sgd_update(p, gr, 0.1),
                                                                    reference.sgd_update(p, gr, 0.1))),
                             device_type, atol=1e-6, rtol=1e-6)
    if failure:
        return failure
    ours = lists()
    ours[3] = [v.abs() for v in ours[3]]
    theirs = [[t.clone() for t in lst] for lst in ours]
    adam_update_(*ours, 3, 1e-2)
    reference.adam_update_(*theirs, 3, 1e-2)
    return first_mismatch((("adam_update_", a, b) for a, b in zip(ours[0] + ours[2] + ours[3],
                                                                   theirs[0] + theirs[2] + theirs[3])),
                          device_type, atol=1e-6, rtol=1e-5)


_self_test = _ext.DeviceSelfTest(_failure_on)
available = _self_test.available
unavailable_reason = _self_test.unavailable_reason
