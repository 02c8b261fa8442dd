"""Eager calls of the package's Triton ops without torch's custom-op dispatch.

A call through a `torch.library.triton_op` hops from Python into the dispatcher, back into Python
for the registered autograd, into the dispatcher again and back into Python for the
implementation. At batch 1 that is most of an eager call: on an H200 machine (2026-11-29,
torch 2.11) the logits op spent 101 us in `torch.ops` against 58 us in its implementation.

`EagerOp(op, setup, backward)` calls such an op. A plain eager call (every tensor a plain,
non-meta torch.Tensor; no torch.compile, functorch transform, or torch-function / dispatch mode
active) runs the op's implementation directly, under a `torch.autograd.Function` built from the
op's own setup_context and backward where a grad is wanted. Everything else (tracing, fake and
functional tensors, opcheck, vmap) goes through the registered op. The registered op stays what
torch.compile, CUDA graphs of compiled code and opcheck see; the values are the same either way.
ANML_FAST_EAGER_DIRECT=0 in the environment (read at import) sends every call through the
registered op.

A direct call is served by its plan where C++ holds one (kernels/_plan.py): the implementation's
allocations and launches replayed without its Python. An op given `plan_backward` (every argument
a tensor, a backward that is one call of another EagerOp) is recorded, where a grad is wanted, by
a C++ autograd node whose backward runs the backward op's plan on the engine's thread without
calling Python: a Python backward there cost conv2's forward + backward about
100 us of host time on an H200 machine (2026-11-29, bench/autograd_hop.py).
"""
from __future__ import annotations

import os

import torch
from torch.library import triton_op as _torch_triton_op

from . import _plan

ENABLED = [os.environ.get("ANML_FAST_EAGER_DIRECT", "1") != "0"]


def triton_op(name: str, *, mutates_args):
    """torch.library.triton_op, keeping the undecorated implementation as `op.implementation`.

    torch registers the implementation inside a switch that turns wrap_triton's tracing off
    (a context manager, about 1 us a call on the CPU machine); the direct path does not need it:
    its launches are plain eager ones (kernels/_launch.py takes wrap_triton only for traced
    calls, or with a profiler's launch hook, where it still works, through torch's HOP)."""
    def register(fn):
        op = _torch_triton_op(name, mutates_args=mutates_args)(fn)
        op.implementation = fn
        return op
    return register


def _plain(args) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) is not torch.Tensor or a.is_meta):
            return False
    return True


def _direct(args) -> bool:
    return (ENABLED[0] and not torch.compiler.is_compiling() and not torch._C._len_torch_function_stack()
            and not torch._C._len_torch_dispatch_stack() and not torch._C._are_functorch_transforms_active()
            and _plain(args))


def _function(name: str, run, setup, backward) -> type:
    """An autograd.Function running `run` (the implementation) with the op's registered
    setup_context and backward."""
    def forward(ctx, *args):
        out = run(args)
        setup(ctx, args, out)
        return out

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                    "backward": staticmethod(backward)})


class _Context:
    """What a registered backward reads of its ctx, for the C++ node's Python fallback."""
    __slots__ = ("saved_tensors", "needs_input_grad")

    def __init__(self, saved, needs):
        self.saved_tensors, self.needs_input_grad = saved, needs


class EagerOp:
    """Calls `op` (a torch.library.triton_op): directly when the call is plain eager, else through
    the dispatcher. `setup` and `backward` are what the op was given in register_autograd (None
    for an op without autograd, which then needs no grad to take the direct path)."""
    __slots__ = ("op", "impl", "function", "unplanned", "plan_id", "grad_spec", "_backward")

    def __init__(self, op, setup=None, backward=None):
        self.op = op
        # the undecorated implementation (triton_op above), else the one torch registered
        self.impl = getattr(op, "implementation", None) or getattr(op, "_init_fn", None)
        self.function = None if backward is None or self.impl is None else \
            _function(f"{op._name}_eager", self._run, setup, backward)
        # the same for a call C++ has already refused a plan: _run would ask it again
        self.unplanned = None if self.function is None else \
            _function(f"{op._name}_eager_unplanned", lambda args: self.impl(*args), setup, backward)
        self.plan_id = _plan.new_id()
        # [backward_op, args, grad_of, its id in C++ (None until registered), saved_outputs, nondiff]
        self.grad_spec = None
        self._backward = backward

    def plan_backward(self, backward_op: "EagerOp", args: tuple, grad_of: tuple,
                      saved_outputs: tuple = (), nondiff: tuple = ()) -> None:
        """Lets C++ run this op's backward as one call of `backward_op` (see csrc/triton_plan.cpp,
        GradSpec): `args` per argument of it, (0, k) output k's grad, (1, i) saved tensor i (the
        forward's inputs, then its `saved_outputs`), (2, mask) whether any input in the bit mask
        needs its grad; `grad_of` per forward input, the backward op's output that is its grad
        (-1: none); `nondiff`, the outputs that are not differentiable. The registered setup and
        backward must save and compute exactly that (ctx.saved_tensors: the inputs, then
        saved_outputs); the backward still runs where the plan cannot (and for second-order graphs).
        The grads of `nondiff` outputs may not be read (whatever the outputs): the backward gets
        None for them from the C++ node where one output alone is differentiable, else zeros."""
        if any(code == 0 and k in nondiff for code, k in args):
            raise ValueError(f"{self.op._name}: plan_backward args name the grad of a non-differentiable output")
        self.grad_spec = [backward_op, tuple(args), tuple(grad_of), None, tuple(saved_outputs), tuple(nondiff)]

    def _spec_id(self, e):
        spec = self.grad_spec
        if spec[3] is None:
            backward = self._backward
            spec[3] = e.plan_grad_spec(spec[0].plan_id, spec[1], spec[2], spec[4], spec[5],
                                       lambda saved, needs, grads: backward(_Context(saved, needs), *grads))
        return spec[3]

    def _run(self, args):
        e = _plan.ext()
        if e is None:
            return self.impl(*args)
        out = e.plan_run(self.plan_id, args)
        if type(out) is not int:
            return out
        if out == 0:
            return _plan.record(e, self.plan_id, self.impl, args)
        return self.impl(*args)

    def __call__(self, *args):
        if self.impl is None or not _direct(args):
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            if self.function is None:
                return self.op(*args)  # the dispatcher says what a grad through it means
            if self.grad_spec is not None:
                e = _plan.ext()
                if e is not None:
                    out = e.plan_autograd(self.plan_id, args, self._spec_id(e))
                    if type(out) is not int:
                        return out
                    if out == -1:  # no plan will serve this call
                        return self.unplanned.apply(*args)
            return self.function.apply(*args)
        return self._run(args)
