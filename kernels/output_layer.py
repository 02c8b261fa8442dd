"""One meta-test step of T independent output layers, each a softmax classifier trained by Adam.

Step s (read from `step`, a one-element int64 tensor on the device) learns image s - 1 of every
trajectory's sequence: with f = X[t, s - 1], y = Y[t, s - 1] (batch size 1),
logits = W[t] f + b[t];  d = softmax(logits) - onehot(y);  gW = d f^T, gb = d;  then
torch.optim.Adam's step s (betas 0.9, 0.999, eps 1e-8, learning rate lr[t]) on W[t], b[t] and their
moments, in place. No backward: this is the optimizer step itself, outside autograd.

`logits` [T, O] carries the logits from one step to the next: on entry it must hold
W[t] X[t, s - 1] + b[t] for the current W, b (the caller primes it once, before step 1, with
`ops.reference.output_layer_logits`); on exit it holds the logits of image s under the updated W, b,
i.e. the next step's. The Adam kernel forms them from the new W tile while it is still in
registers, so W is read once per step instead of twice (24 B per weight, not 28: the protocol is
memory-bound).

The step number lives on the device, not in a launch argument, so that a CUDA graph of many steps
(each followed by `step += 1`) replays a whole trajectory, and so that torch.compile sees a tensor
rather than a symbolic int. Image indices are clamped into 0..S-1 (a device value cannot be
checked without a sync); callers keep 1 <= step <= S (after the last step `logits` then holds the
last image's logits again).

Shapes: W, mW, vW [T, O, F]; b, mb, vb, logits [T, O]; X [T, S, F]; Y int64 [T, S]; lr [T];
step int64 [1] or []. ANML: O = 1000, F = 2304. float32 and float64 (computed in the state's dtype).

Op (namespace `anml_fast`, a `torch.library.triton_op` with an explicit fake):
  output_layer_adam_step_(W!, b!, mW!, vW!, mb!, vb!, logits!, X, Y, lr, step) -> ()

Kernels (two launches per step):
  _output_layer_grad_kernel  per trajectory: d = softmax(logits) - onehot(y) into a [T, O] buffer,
                             and Adam on the row's b, mb, vb
  _output_layer_adam_kernel  per (BLOCK_O rows of W[t]): over the feature axis in BLOCK_F
                             chunks, Adam on W/mW/vW with gW = d f^T formed in registers, and
                             the next logits W_new f_next + b_new accumulated on the way

gW is never written: per weight a step moves 24 bytes (read and write W, mW, vW) in float32,
against ~100 for the plain-PyTorch loop's dozen elementwise passes.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._launch import launch
from ._pdl import launch_args as pdl_args
from ._pdl import pdl_enter
from ._scalars import cdiv, join_double, next_pow2, split_double

SUPPORTED_DTYPES = (torch.float32, torch.float64)
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _image_index(step, n_steps):
    """0-based index (int64) of the image step `step` learns, clamped into the sequence."""
    return tl.minimum(tl.maximum(step - 1, 0), n_steps - 1).to(tl.int64)


@triton.jit
def _adam_update(P_ptr, M_ptr, V_ptr, offs, mask, g, one_minus_beta1, beta2, one_minus_beta2,
                 bc2_sqrt, eps, step_size):
    """torch.optim.Adam's update of one tile, in the order `_adam_batched_` computes it; returns
    the updated parameters."""
    p = tl.load(P_ptr + offs, mask=mask, other=0.0)
    m = tl.load(M_ptr + offs, mask=mask, other=0.0)
    v = tl.load(V_ptr + offs, mask=mask, other=0.0)
    m = m + one_minus_beta1 * (g - m)  # torch.lerp's formula for weight < 0.5
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - m / denom * step_size
    tl.store(P_ptr + offs, p, mask=mask)
    tl.store(M_ptr + offs, m, mask=mask)
    tl.store(V_ptr + offs, v, mask=mask)
    return p


def adam_scalar_args(beta1: float, beta2: float, eps: float) -> list[float]:
    """The host side of `_adam_scalars`: its 12 float arguments after lr_stride, in its order (1 - beta1,
    beta2, 1 - beta2, eps, log(beta1), log(beta2), each as split_double's two float32 halves)."""
    return [x for v in (1 - beta1, beta2, 1 - beta2, eps, math.log(beta1), math.log(beta2))
            for x in split_double(v)]


@triton.jit
def _adam_scalars(step, t, LR_ptr, lr_stride, omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo,
                  eps_hi, eps_lo, lb1_hi, lb1_lo, lb2_hi, lb2_lo, dt: tl.constexpr):
    """(1 - beta1, beta2, 1 - beta2, eps, sqrt(1 - beta2**step), lr[t] / (1 - beta1**step)) in dt."""
    # 1 - beta comes from the host, not 1.0 - beta here: float32(1 - 0.9) is what PyTorch uses,
    # and 1.0f - float32(0.9) differs from it by 2e-7.
    one_minus_beta1 = join_double(omb1_hi, omb1_lo, dt)
    beta2 = join_double(b2_hi, b2_lo, dt)
    one_minus_beta2 = join_double(omb2_hi, omb2_lo, dt)
    eps = join_double(eps_hi, eps_lo, dt)
    # Bias corrections 1 - beta**step from the step number, in float64 whatever dt is (as the host
    # computes them for torch.optim.Adam): beta**step = exp(step * log(beta)), log(beta) exact to
    # float64 from its two float32 halves. Computed here, since the step is only known here.
    s64 = step.to(tl.float64)
    bc1 = 1.0 - tl.exp(s64 * join_double(lb1_hi, lb1_lo, tl.float64))
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(s64 * join_double(lb2_hi, lb2_lo, tl.float64))).to(dt)
    step_size = tl.load(LR_ptr + t * lr_stride) / bc1.to(dt)
    return one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, step_size


@triton.jit
def _output_layer_grad_kernel(
    Logits_ptr, Y_ptr, Step_ptr, D_ptr, Bias_ptr, MB_ptr, VB_ptr, LR_ptr,
    n_outputs, n_steps, y_traj_stride, y_step_stride, lr_stride,
    omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo, eps_hi, eps_lo, lb1_hi, lb1_lo,
    lb2_hi, lb2_lo,
    BLOCK_ALL_O: tl.constexpr,
    PDL: tl.constexpr,
):
    """d[t] = softmax(logits[t]) - onehot(y[t]), and Adam on b[t]. Grid (T,).

    A launch of its own so that the softmax normaliser is formed once per trajectory rather than
    by every W tile, and so that the Adam kernel, which overwrites `logits`, reads only d.
    """
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    dt = Bias_ptr.dtype.element_ty
    step = tl.load(Step_ptr)
    i = _image_index(step, n_steps)
    outs = tl.arange(0, BLOCK_ALL_O)
    mask = outs < n_outputs
    row = tl.load(Logits_ptr + t * n_outputs + outs, mask=mask, other=float("-inf"))
    e = tl.exp(row - tl.max(row, axis=0))
    p = e / tl.sum(e, axis=0)
    y = tl.load(Y_ptr + t * y_traj_stride + i * y_step_stride)
    d = tl.where(outs == y, p - 1.0, p)
    d = tl.where(mask, d, 0.0)
    tl.store(D_ptr + t * n_outputs + outs, d, mask=mask)
    omb1, b2, omb2, eps, bc2_sqrt, step_size = _adam_scalars(
        step, t, LR_ptr, lr_stride, omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo, eps_hi, eps_lo,
        lb1_hi, lb1_lo, lb2_hi, lb2_lo, dt)
    _adam_update(Bias_ptr, MB_ptr, VB_ptr, t * n_outputs + outs, mask, d, omb1, b2, omb2, bc2_sqrt,
                 eps, step_size)


@triton.jit
def _output_layer_adam_kernel(
    W_ptr, Bias_ptr, MW_ptr, VW_ptr, X_ptr, LR_ptr, Step_ptr, D_ptr, Logits_ptr,
    n_outputs, n_features, n_steps, x_traj_stride, x_step_stride, lr_stride,
    omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo, eps_hi, eps_lo, lb1_hi, lb1_lo,
    lb2_hi, lb2_lo,
    BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr,
    PDL: tl.constexpr,
):
    """Adam on BLOCK_O whole rows of W[t], and those rows' next logits. Grid (out blocks, T).

    Each program reads and writes only its own rows, and the logits it overwrites were consumed
    into d by the previous launch, so the in-place update has no races. Whole rows per program
    keep the next logits' sum over features inside one program: no atomics, and the same bits on
    every run.
    """
    pdl_enter(PDL)
    pid_o = tl.program_id(0)
    # int64: T * O * F passes 2**31 at ~930 ANML-sized trajectories
    t = tl.program_id(1).to(tl.int64)
    dt = W_ptr.dtype.element_ty
    step = tl.load(Step_ptr)
    x_cur = X_ptr + t * x_traj_stride + _image_index(step, n_steps) * x_step_stride
    x_next = X_ptr + t * x_traj_stride + _image_index(step + 1, n_steps) * x_step_stride
    omb1, b2, omb2, eps, bc2_sqrt, step_size = _adam_scalars(
        step, t, LR_ptr, lr_stride, omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo, eps_hi, eps_lo,
        lb1_hi, lb1_lo, lb2_hi, lb2_lo, dt)

    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    out_mask = outs < n_outputs
    d = tl.load(D_ptr + t * n_outputs + outs, mask=out_mask, other=0.0)
    row_base = t * n_outputs * n_features + outs[:, None] * n_features
    # Per-lane partial sums, reduced once at the end: a running scalar sum over 2304 products
    # would lose accuracy against cuBLAS's blocked sum.
    acc = tl.zeros((BLOCK_O, BLOCK_F), dtype=dt)
    for f0 in range(0, n_features, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        col_mask = cols < n_features
        f = tl.load(x_cur + cols, mask=col_mask, other=0.0)
        f_next = tl.load(x_next + cols, mask=col_mask, other=0.0)
        w = _adam_update(W_ptr, MW_ptr, VW_ptr, row_base + cols[None, :],
                         out_mask[:, None] & col_mask[None, :], d[:, None] * f[None, :],
                         omb1, b2, omb2, bc2_sqrt, eps, step_size)
        acc += w * f_next[None, :]
    bias = tl.load(Bias_ptr + t * n_outputs + outs, mask=out_mask, other=0.0)  # updated by the grad kernel
    tl.store(Logits_ptr + t * n_outputs + outs, tl.sum(acc, axis=1) + bias, mask=out_mask)


# ----------------------------------------------------------------------------------------------
# Configs and launcher
# ----------------------------------------------------------------------------------------------

# Adam kernel tiles by stack size: {smallest T: config}; a launch of T trajectories takes the
# entry with the largest key <= T. Each program owns BLOCK_O whole rows (F = 2304 in BLOCK_F
# chunks), so the grid is O / BLOCK_O programs per trajectory. Per element the work is ~20 flops
# on 24 bytes: memory-bound. Thin programs win at every stack size: bench/tune_output_layer.py
# on an H200 (2026-11-27, 18 candidates, graph-replayed) put 2 rows x 1024 features at 8 warps
# first at T = 140 (1.88 ms a step, 4.11 TB/s; 8 x 256 at 4 warps: 2.46 ms) and T = 10
# (0.145 ms, 3.80 TB/s), and 2 x 512 at 4 warps, 2 stages first at T = 1 (13.4 us, 4.12 TB/s),
# 0.7% ahead of the former. 500 programs per trajectory fill the 132 SMs even at T = 1.
ADAM_CONFIGS = {
    1: dict(BLOCK_O=2, BLOCK_F=512, num_warps=4, num_stages=2),
    4: dict(BLOCK_O=2, BLOCK_F=1024, num_warps=8, num_stages=1),
}


def adam_config(T: int) -> dict:
    """The Adam kernel's tiles for a stack of T trajectories (see ADAM_CONFIGS)."""
    return ADAM_CONFIGS[max(k for k in ADAM_CONFIGS if k <= max(T, min(ADAM_CONFIGS)))]


def _check_inputs(W, b, mW, vW, mb, vb, logits, X, Y, lr, step):
    if W.dim() != 3:
        raise ValueError(f"output_layer_adam_step_: W must be [T, O, F], got {tuple(W.shape)}")
    T, O, F_ = W.shape
    if mW.shape != W.shape or vW.shape != W.shape:
        raise ValueError(f"output_layer_adam_step_: mW and vW must be {tuple(W.shape)}, got "
                         f"{tuple(mW.shape)} and {tuple(vW.shape)}")
    if any(t.shape != (T, O) for t in (b, mb, vb, logits)):
        raise ValueError(f"output_layer_adam_step_: b, mb, vb and logits must be [T={T}, O={O}], got "
                         f"{tuple(b.shape)}, {tuple(mb.shape)}, {tuple(vb.shape)}, {tuple(logits.shape)}")
    if X.dim() != 3 or X.shape[0] != T or X.shape[2] != F_ or X.shape[1] < 1:
        raise ValueError(f"output_layer_adam_step_: X must be [T={T}, S>=1, F={F_}], got {tuple(X.shape)}")
    if Y.shape != X.shape[:2] or lr.shape != (T,):
        raise ValueError(f"output_layer_adam_step_: Y must be [T, S]={tuple(X.shape[:2])} and lr "
                         f"[T={T}], got {tuple(Y.shape)} and {tuple(lr.shape)}")
    if W.dtype not in SUPPORTED_DTYPES or any(t.dtype != W.dtype for t in (b, mW, vW, mb, vb, logits, X, lr)):
        raise TypeError("output_layer_adam_step_: the Triton op takes float32 or float64, all alike "
                        "(use the plain-PyTorch twin for other dtypes)")
    if Y.dtype != torch.int64:
        raise TypeError(f"output_layer_adam_step_: Y must be int64, got {Y.dtype}")
    if not isinstance(step, torch.Tensor) or step.dtype != torch.int64 or step.numel() != 1:
        raise TypeError("output_layer_adam_step_: step must be a one-element int64 tensor on the "
                        f"state's device (the step number, from 1), got {step!r}")
    if len({t.device for t in (W, b, mW, vW, mb, vb, logits, X, Y, lr, step)}) != 1:
        raise ValueError("output_layer_adam_step_: all tensors must be on one device")


@triton_op("anml_fast::output_layer_adam_step_",
           mutates_args=("W", "b", "mW", "vW", "mb", "vb", "logits"))
def output_layer_adam_step_(W: torch.Tensor, b: torch.Tensor, mW: torch.Tensor, vW: torch.Tensor,
                            mb: torch.Tensor, vb: torch.Tensor, logits: torch.Tensor, X: torch.Tensor,
                            Y: torch.Tensor, lr: torch.Tensor, step: torch.Tensor) -> None:
    _check_inputs(W, b, mW, vW, mb, vb, logits, X, Y, lr, step)
    if not all(t.is_contiguous() for t in (W, b, mW, vW, mb, vb, logits)):
        raise ValueError("output_layer_adam_step_: the state (logits included) is updated in place "
                         "and must be contiguous")
    # X, Y, lr go in by stride (a gathered or sliced sequence needs no copy); only the feature
    # axis must be dense for the vector loads.
    if X.stride(2) != 1:
        X = X.contiguous()
    T, O, F_ = W.shape
    if T == 0 or O == 0:
        return
    S = X.shape[1]
    scalars = adam_scalar_args(BETA1, BETA2, EPS)
    d = torch.empty_like(logits)
    launch(_output_layer_grad_kernel, (T,),
        logits, Y, step, d, b, mb, vb, lr, O, S, Y.stride(0), Y.stride(1), lr.stride(0), *scalars,
        BLOCK_ALL_O=next_pow2(O), num_warps=4, **pdl_args(d))
    cfg = adam_config(T)
    launch(_output_layer_adam_kernel, (cdiv(O, cfg["BLOCK_O"]), T),
        W, b, mW, vW, X, lr, step, d, logits, O, F_, S, X.stride(0), X.stride(1), lr.stride(0),
        *scalars, **cfg, **pdl_args(d))


# Explicit fake: triton_op would trace the implementation, which needs wrap_triton's graph
# capture, and Triton's CPU interpreter bypasses that (see kernels/gated_head.py).
@output_layer_adam_step_.register_fake
def _(W, b, mW, vW, mb, vb, logits, X, Y, lr, step):
    _check_inputs(W, b, mW, vW, mb, vb, logits, X, Y, lr, step)
    return None


def interpreted() -> bool:
    """Whether these kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return type(_output_layer_adam_kernel).__name__ == "InterpretedFunction"
