"""torch.optim.Adam's step for a stack of T independent tensors, one learning rate each, in one launch.

The whole-PLN meta-test fine-tunes 150 trajectories side by side, each PLN tensor stacked over
the trajectories ([T, ...]). Its plain-PyTorch twin (`ops.reference.adam_update_batched_`) is
about ten elementwise passes per tensor: 140 launches an update for the PLN's 14 tensors, 11.4 ms
moving its 14.7 GB at 1.3 TB/s of an H200's 4.8 (bench/profile_meta_step.py --finetune,
2026-11-27). Here each tensor is one launch that reads p, g, m, v and writes p, m, v once
(28 bytes a parameter in float32), with the arithmetic, order and float64 bias corrections of
the output-layer Adam kernel (kernels/output_layer.py, whose jit helpers it shares).

Op (namespace `anml_fast`, a `torch.library.triton_op` with an explicit fake):
  adam_update_batched_(p!, g, m!, v!, step, lr, beta1, beta2, eps) -> ()
p, g, m, v [T, ...] alike, contiguous; lr [T]; step a Python int or a one-element int64 tensor on
p's device (the step number, from 1; read on the device, so a CUDA graph of the step stays right
as it advances). float32 or float64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._launch import launch
from ._pdl import launch_args as pdl_args
from ._pdl import pdl_enter
from ._scalars import cdiv
from .output_layer import _adam_scalars, _adam_update, adam_scalar_args

SUPPORTED_DTYPES = (torch.float32, torch.float64)
BLOCK = 1024


# The step as an argument is not specialised: Triton would compile step 1 (and multiples of 16)
# apart, and step 1 as a constant has no dtype to convert.
@triton.jit(do_not_specialize=["step_arg"])
def _adam_batched_kernel(P_ptr, G_ptr, M_ptr, V_ptr, LR_ptr, Step_ptr, step_arg, n, lr_stride,
                         omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo, eps_hi, eps_lo,
                         lb1_hi, lb1_lo, lb2_hi, lb2_lo, STEP_IN_MEMORY: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    """Adam on BLOCK elements of stacked tensor t = program_id(1) (n elements each)."""
    pdl_enter(PDL)
    t = tl.program_id(1).to(tl.int64)  # T * n passes 2**31 at ~930 ANML-sized heads
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    offs = t * n + i
    if STEP_IN_MEMORY:
        step = tl.load(Step_ptr)
    else:
        step = step_arg
    omb1, b2, omb2, eps, bc2_sqrt, step_size = _adam_scalars(
        step, t, LR_ptr, lr_stride, omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo, eps_hi, eps_lo,
        lb1_hi, lb1_lo, lb2_hi, lb2_lo, P_ptr.dtype.element_ty)
    g = tl.load(G_ptr + offs, mask=mask, other=0.0)
    _adam_update(P_ptr, M_ptr, V_ptr, offs, mask, g, omb1, b2, omb2, bc2_sqrt, eps, step_size)


def _check(p, g, m, v, step, lr):
    if p.dim() < 1 or g.shape != p.shape or m.shape != p.shape or v.shape != p.shape:
        raise ValueError(f"adam_update_batched_: p, g, m and v must be one [T, ...] shape, got "
                         f"{tuple(p.shape)}, {tuple(g.shape)}, {tuple(m.shape)}, {tuple(v.shape)}")
    if lr.shape != (p.shape[0],):
        raise ValueError(f"adam_update_batched_: lr must be [T={p.shape[0]}], got {tuple(lr.shape)}")
    if p.dtype not in SUPPORTED_DTYPES or any(t.dtype != p.dtype for t in (g, m, v, lr)):
        raise TypeError(f"adam_update_batched_: the Triton op takes float32 or float64, all alike, got "
                        f"{[str(t.dtype) for t in (p, g, m, v, lr)]} (use the plain-PyTorch twin)")
    if len({t.device for t in (p, g, m, v, lr)}) != 1:
        raise ValueError("adam_update_batched_: p, g, m, v and lr must be on one device")
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int64 or step.numel() != 1 or step.device != p.device:
            raise TypeError(f"adam_update_batched_: a tensor step must be one int64 element on {p.device}, got "
                            f"{step.dtype} {list(step.shape)} on {step.device}")
    elif isinstance(step, torch.SymInt):  # traced by torch.compile with a dynamic step
        torch._check(step >= 1, lambda: "adam_update_batched_: step must be >= 1")
    elif not isinstance(step, int) or step < 1:
        raise ValueError(f"adam_update_batched_: step must be an int >= 1 or a tensor, got {step!r}")
    if p.shape[0] > 65535 or (p.numel() // max(p.shape[0], 1)) >= 2 ** 31 - BLOCK:
        raise ValueError(f"adam_update_batched_: {tuple(p.shape)} is past the kernel's grid (T <= 65535, "
                         "fewer than 2**31 elements a tensor); split the stack, or use the twin")


def _run(p, g, m, v, step, lr, beta1, beta2, eps):
    T = p.shape[0]
    n = p.numel() // T if T else 0
    if n == 0:
        return
    if not all(t.is_contiguous() for t in (p, m, v)):
        raise ValueError("adam_update_batched_: p, m and v are updated in place and must be contiguous")
    in_memory = isinstance(step, torch.Tensor)
    scalars = adam_scalar_args(beta1, beta2, eps)
    launch(_adam_batched_kernel, (cdiv(n, BLOCK), T),
        p, g.contiguous(), m, v, lr, step if in_memory else p, 0 if in_memory else step, n, lr.stride(0),
        *scalars, STEP_IN_MEMORY=in_memory, BLOCK=BLOCK, num_warps=4, **pdl_args(m))


# Two registrations, as the schema cannot say "int or tensor": the wrapper picks by the step's type.
@triton_op("anml_fast::adam_update_batched_", mutates_args=("p", "m", "v"))
def adam_update_batched_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int,
                         lr: torch.Tensor, beta1: float, beta2: float, eps: float) -> None:
    _check(p, g, m, v, step, lr)
    _run(p, g, m, v, step, lr, beta1, beta2, eps)


@triton_op("anml_fast::adam_update_batched_device_step_", mutates_args=("p", "m", "v"))
def adam_update_batched_device_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                                     step: torch.Tensor, lr: torch.Tensor, beta1: float, beta2: float,
                                     eps: float) -> None:
    _check(p, g, m, v, step, lr)
    _run(p, g, m, v, step, lr, beta1, beta2, eps)


# Explicit fakes: triton_op would trace the implementation, which needs wrap_triton's graph capture,
# and Triton's CPU interpreter bypasses that (see kernels/gated_head.py).
@adam_update_batched_.register_fake
def _(p, g, m, v, step, lr, beta1, beta2, eps):
    _check(p, g, m, v, step, lr)


@adam_update_batched_device_step_.register_fake
def _(p, g, m, v, step, lr, beta1, beta2, eps):
    _check(p, g, m, v, step, lr)


def interpreted() -> bool:
    """Whether these kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return type(_adam_batched_kernel).__name__ == "InterpretedFunction"
