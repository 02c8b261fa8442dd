"""One meta-test step of T independent output layers, each a softmax classifier trained by Adam.

Step s (read from `step`, a one-element int64 tensor on the device) learns image s - 1 of every
trajectory's sequence: with f = X[t, s - 1], y = Y[t, s - 1] (batch size 1),
logits = W[t] f + b[t];  d = softmax(logits) - onehot(y);  gW = d f^T, gb = d;  then
torch.optim.Adam's step s (betas 0.9, 0.999, eps 1e-8, learning rate lr[t]) on W[t], b[t] and their
moments, in place. No backward: this is the optimizer step itself, outside autograd.

The step number lives on the device, not in a launch argument, so that a CUDA graph of many steps
(each followed by `step += 1`) replays a whole trajectory, and so that torch.compile sees a tensor
rather than a symbolic int. The image index is clamped into 0..S-1 (a device value cannot be
checked without a sync); callers keep 1 <= step <= S.

Shapes: W, mW, vW [T, O, F]; b, mb, vb [T, O]; X [T, S, F]; Y int64 [T, S]; lr [T]; step int64 [1]
or []. ANML: O = 1000, F = 2304. float32 and float64 (the kernels compute in the state's dtype).

Op (namespace `anml_fast`, a `torch.library.triton_op` with an explicit fake):
  output_layer_adam_step_(W!, b!, mW!, vW!, mb!, vb!, X, Y, lr, step) -> ()

Kernels:
  _output_layer_logits_kernel  logits [T, O]: T independent GEMVs (each W[t] is read once)
  _output_layer_adam_kernel    per (W tile, t): the softmax normaliser of row t again from the
                               logits, d for the tile's outputs, and Adam on the W/mW/vW tile
                               with gW = d f^T formed in registers (and b/mb/vb once per row)

gW is never written: per parameter a step moves 4 bytes (logits: read W) + 24 (read and write
W, mW, vW) in float32, against ~100 for the plain-PyTorch loop's dozen elementwise passes.
"""
from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

SUPPORTED_DTYPES = (torch.float32, torch.float64)
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _scalar(hi, lo, dt: tl.constexpr):
    """A host double passed as two float32s (Triton float arguments are float32): exact in float64."""
    return tl.cast(hi, dt) + tl.cast(lo, dt)


@triton.jit
def _image_index(step, n_steps):
    """0-based index (int64) of the image step `step` learns, clamped into the sequence."""
    return tl.minimum(tl.maximum(step - 1, 0), n_steps - 1).to(tl.int64)


@triton.jit
def _output_layer_logits_kernel(
    W_ptr, Bias_ptr, X_ptr, Step_ptr, Logits_ptr,
    n_outputs, n_features, n_steps, x_traj_stride, x_step_stride,
    BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """logits[t, out block] = W[t, out block] @ f[t] + b[t, out block]. Grid (out blocks, T)."""
    pid_o = tl.program_id(0)
    # int64: T * O * F passes 2**31 at ~930 ANML-sized trajectories
    t = tl.program_id(1).to(tl.int64)
    dt = W_ptr.dtype.element_ty
    f_base = X_ptr + t * x_traj_stride + _image_index(tl.load(Step_ptr), n_steps) * x_step_stride
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    out_mask = outs < n_outputs
    w_base = W_ptr + t * n_outputs * n_features
    # Per-lane partial sums, reduced once at the end: a running scalar sum over 2304 products
    # would lose accuracy against cuBLAS's blocked sum.
    acc = tl.zeros((BLOCK_O, BLOCK_F), dtype=dt)
    for f0 in range(0, n_features, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        col_mask = cols < n_features
        f = tl.load(f_base + cols, mask=col_mask, other=0.0)
        w = tl.load(w_base + outs[:, None] * n_features + cols[None, :],
                    mask=out_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w * f[None, :]
    bias = tl.load(Bias_ptr + t * n_outputs + outs, mask=out_mask, other=0.0)
    tl.store(Logits_ptr + t * n_outputs + outs, tl.sum(acc, axis=1) + bias, mask=out_mask)


@triton.jit
def _adam_update(P_ptr, M_ptr, V_ptr, offs, mask, g, one_minus_beta1, beta2, one_minus_beta2,
                 bc2_sqrt, eps, step_size):
    """torch.optim.Adam's update of one tile, in the order `_adam_batched_` computes it."""
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


@triton.jit
def _output_layer_adam_kernel(
    W_ptr, Bias_ptr, MW_ptr, VW_ptr, MB_ptr, VB_ptr, X_ptr, Y_ptr, LR_ptr, Step_ptr, Logits_ptr,
    n_outputs, n_features, n_steps, x_traj_stride, x_step_stride, y_traj_stride, y_step_stride,
    lr_stride,
    omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo, eps_hi, eps_lo, lb1_hi, lb1_lo,
    lb2_hi, lb2_lo,
    BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_ALL_O: tl.constexpr,
):
    """Adam on one [BLOCK_O, BLOCK_F] tile of W[t] (grid: out blocks x feature blocks, T).

    Each program reads and writes only its own tiles and nothing in this launch reads W, so the
    in-place update has no races; the logits came from the old W in the previous launch.
    """
    pid_o = tl.program_id(0)
    pid_f = tl.program_id(1)
    t = tl.program_id(2).to(tl.int64)
    dt = W_ptr.dtype.element_ty
    step = tl.load(Step_ptr)
    i = _image_index(step, n_steps)

    # The row's normaliser, recomputed by every program: O logits from L2 (4 KB at O = 1000) cost
    # far less than a launch, or than a [T] buffer written by a third kernel.
    all_outs = tl.arange(0, BLOCK_ALL_O)
    row = tl.load(Logits_ptr + t * n_outputs + all_outs, mask=all_outs < n_outputs,
                  other=float("-inf"))
    row_max = tl.max(row, axis=0)
    row_sum = tl.sum(tl.exp(row - row_max), axis=0)

    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    out_mask = outs < n_outputs
    logits = tl.load(Logits_ptr + t * n_outputs + outs, mask=out_mask, other=0.0)
    y = tl.load(Y_ptr + t * y_traj_stride + i * y_step_stride)
    p = tl.exp(logits - row_max) / row_sum
    d = tl.where(outs == y, p - 1.0, p)
    d = tl.where(out_mask, d, 0.0)

    # 1 - beta comes from the host, not 1.0 - beta here: float32(1 - 0.9) is what PyTorch uses,
    # and 1.0f - float32(0.9) differs from it by 2e-7.
    one_minus_beta1 = _scalar(omb1_hi, omb1_lo, dt)
    beta2 = _scalar(b2_hi, b2_lo, dt)
    one_minus_beta2 = _scalar(omb2_hi, omb2_lo, dt)
    eps = _scalar(eps_hi, eps_lo, dt)
    # Bias corrections 1 - beta**step from the step number, in float64 whatever dt is (as the host
    # computes them for torch.optim.Adam): beta**step = exp(step * log(beta)), log(beta) exact to
    # float64 from its two float32 halves. Computed here, since the step is only known here.
    s64 = step.to(tl.float64)
    bc1 = 1.0 - tl.exp(s64 * _scalar(lb1_hi, lb1_lo, tl.float64))
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(s64 * _scalar(lb2_hi, lb2_lo, tl.float64))).to(dt)
    step_size = tl.load(LR_ptr + t * lr_stride) / bc1.to(dt)

    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    col_mask = cols < n_features
    f = tl.load(X_ptr + t * x_traj_stride + i * x_step_stride + cols, mask=col_mask, other=0.0)
    offs = t * n_outputs * n_features + outs[:, None] * n_features + cols[None, :]
    mask = out_mask[:, None] & col_mask[None, :]
    _adam_update(W_ptr, MW_ptr, VW_ptr, offs, mask, d[:, None] * f[None, :],
                 one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, step_size)

    if pid_f == 0:
        _adam_update(Bias_ptr, MB_ptr, VB_ptr, t * n_outputs + outs, out_mask, d,
                     one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, step_size)


# ----------------------------------------------------------------------------------------------
# Configs and launcher
# ----------------------------------------------------------------------------------------------

# GEMV: 4 outputs per program, W rows streamed in 1024-wide chunks (as gated_head's B = 1 forward):
# 250 programs per trajectory, 16 KB in flight per step, 32 floats per thread at 4 warps.
LOGITS_CONFIG = dict(BLOCK_O=4, BLOCK_F=1024, num_warps=4, num_stages=1)
# Adam: 16 x 256 tiles (1 KB contiguous per W row segment; F = 2304 is 9 blocks exactly, O = 1000
# wastes half of the last of 63 out blocks), 567 programs per trajectory. 4096 elements per
# program amortise the ~1000 exps of the normaliser (1/4 of an element's work each, while the
# tile itself is 96 KB of HBM traffic); 4 warps hold 3 x 32 state values per thread.
# Not tuned on a GPU yet.
ADAM_CONFIG = dict(BLOCK_O=16, BLOCK_F=256, num_warps=4, num_stages=1)


def _split(x: float) -> tuple[float, float]:
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


def _check_inputs(W, b, mW, vW, mb, vb, X, Y, lr, step):
    if W.dim() != 3:
        raise ValueError(f"output_layer_adam_step_: W must be [T, O, F], got {tuple(W.shape)}")
    T, O, F_ = W.shape
    if mW.shape != W.shape or vW.shape != W.shape:
        raise ValueError(f"output_layer_adam_step_: mW and vW must be {tuple(W.shape)}, got "
                         f"{tuple(mW.shape)} and {tuple(vW.shape)}")
    if any(t.shape != (T, O) for t in (b, mb, vb)):
        raise ValueError(f"output_layer_adam_step_: b, mb and vb must be [T={T}, O={O}], got "
                         f"{tuple(b.shape)}, {tuple(mb.shape)}, {tuple(vb.shape)}")
    if X.dim() != 3 or X.shape[0] != T or X.shape[2] != F_ or X.shape[1] < 1:
        raise ValueError(f"output_layer_adam_step_: X must be [T={T}, S>=1, F={F_}], got {tuple(X.shape)}")
    if Y.shape != X.shape[:2] or lr.shape != (T,):
        raise ValueError(f"output_layer_adam_step_: Y must be [T, S]={tuple(X.shape[:2])} and lr "
                         f"[T={T}], got {tuple(Y.shape)} and {tuple(lr.shape)}")
    if W.dtype not in SUPPORTED_DTYPES or any(t.dtype != W.dtype for t in (b, mW, vW, mb, vb, X, lr)):
        raise TypeError("output_layer_adam_step_: the Triton op takes float32 or float64, all alike "
                        "(use the plain-PyTorch twin for other dtypes)")
    if Y.dtype != torch.int64:
        raise TypeError(f"output_layer_adam_step_: Y must be int64, got {Y.dtype}")
    if not isinstance(step, torch.Tensor) or step.dtype != torch.int64 or step.numel() != 1:
        raise TypeError("output_layer_adam_step_: step must be a one-element int64 tensor on the "
                        f"state's device (the step number, from 1), got {step!r}")
    if len({t.device for t in (W, b, mW, vW, mb, vb, X, Y, lr, step)}) != 1:
        raise ValueError("output_layer_adam_step_: all tensors must be on one device")


@triton_op("anml_fast::output_layer_adam_step_", mutates_args=("W", "b", "mW", "vW", "mb", "vb"))
def output_layer_adam_step_(W: torch.Tensor, b: torch.Tensor, mW: torch.Tensor, vW: torch.Tensor,
                            mb: torch.Tensor, vb: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
                            lr: torch.Tensor, step: torch.Tensor) -> None:
    _check_inputs(W, b, mW, vW, mb, vb, X, Y, lr, step)
    if not all(t.is_contiguous() for t in (W, b, mW, vW, mb, vb)):
        raise ValueError("output_layer_adam_step_: the state is updated in place and must be contiguous")
    # X, Y, lr go in by stride (a gathered or sliced sequence needs no copy); only the feature
    # axis must be dense for the vector loads.
    if X.stride(2) != 1:
        X = X.contiguous()
    T, O, F_ = W.shape
    if T == 0 or O == 0:
        return
    S = X.shape[1]
    logits = W.new_empty((T, O))
    cfg = LOGITS_CONFIG
    wrap_triton(_output_layer_logits_kernel)[(triton.cdiv(O, cfg["BLOCK_O"]), T)](
        W, b, X, step, logits, O, F_, S, X.stride(0), X.stride(1), **cfg)
    scalars = [x for v in (1 - BETA1, BETA2, 1 - BETA2, EPS, math.log(BETA1), math.log(BETA2))
               for x in _split(v)]
    cfg = ADAM_CONFIG
    grid = (triton.cdiv(O, cfg["BLOCK_O"]), max(1, triton.cdiv(F_, cfg["BLOCK_F"])), T)
    wrap_triton(_output_layer_adam_kernel)[grid](
        W, b, mW, vW, mb, vb, X, Y, lr, step, logits, O, F_, S, X.stride(0), X.stride(1),
        Y.stride(0), Y.stride(1), lr.stride(0), *scalars, BLOCK_ALL_O=triton.next_power_of_2(O), **cfg)


# Explicit fake: triton_op would trace the implementation, which needs wrap_triton's graph
# capture, and Triton's CPU interpreter bypasses that (see kernels/gated_head.py).
@output_layer_adam_step_.register_fake
def _(W, b, mW, vW, mb, vb, X, Y, lr, step):
    _check_inputs(W, b, mW, vW, mb, vb, X, Y, lr, step)
    return None


def interpreted() -> bool:
    """Whether these kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return type(_output_layer_adam_kernel).__name__ == "InterpretedFunction"
