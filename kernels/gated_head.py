"""ANML's gated head as fused Triton ops: sigmoid gate, linear layer, and optionally mean cross-entropy.

Forward:  g = sigmoid(z); a = h * g; logits = a @ W^T + b; loss = mean_b (logsumexp(logits_b) - logits_b[y_b]).
Backward: dl = dlogits, or (softmax(logits) - onehot(y)) * dloss / B for the loss;
          dW = dl^T a; db = sum_b dl; da = dl W; dh = da * g; dz = da * h * g * (1 - g).

Shapes: h, z [B, F]; W [O, F]; b [O]; y int64 [B]. ANML: F = 2304, O = 1000, B = 1 (inner loop,
meta-test) or 84 (meta-loss). float32 and float64; every kernel computes in its input's dtype.

Ops (namespace `anml_fast`, all `torch.library.triton_op`, each with an explicit fake):
  gated_head_fwd(h, gate_logits, weight, bias) -> logits
  gated_head_bwd(grad_logits, h, gate_logits, weight, input_grad, weight_grad) -> (dh, dz, dW, db)
  gated_head_ce_fwd(h, gate_logits, weight, bias, target) -> (loss, logits, lse)
  gated_head_ce_bwd(grad_loss, h, gate_logits, weight, logits, lse, target, input_grad, weight_grad)
      -> (dh, dz, dW, db)
  gated_head_ce_sgd_(h, gate_logits, weight!, bias!, target, lr) -> (loss, dh, dz)
The first and third have autograd. Their kernels' backward is not differentiable again: under
create_graph (second order) the backward differentiates the plain-PyTorch twin instead, so double
backward works and only first-order grads come from the kernels. The `*_bwd` ops return empty
tensors for the grads they were told to skip.

Kernels, shared by the ops:
  _gated_head_fwd_kernel        logits tiles; for the loss also per-tile row max and sum of exps,
                                which the launch's last program turns into logsumexp and the loss
  _gated_head_bwd_weight_kernel dW and db (or W -= lr dW, b -= lr db in place), and optionally
                                da summed over its own block of outputs (W is already in registers),
                                which each feature block's last program adds up into dh and dz
  _gated_head_bwd_input_kernel  da = dl W, then dh and dz (where the weight kernel does not)
A loss step at B = 1 (the inner loop's gated_head_ce_sgd_) is one launch where the weight fits in
the grid's registers (ONE_LAUNCH_STEP, kernels/gated_head_step.py: the programs meet at grid
barriers, the weight is read once and written once), else two: forward, backward.

From GEMM_MIN_ROWS rows up (the meta-loss's 84) the three products go to cuBLAS (torch.addmm and
torch.mm inside the ops) and these kernels do the rest:
  _gate_kernel            a = h * sigmoid(z), the forward product's operand
  _ce_from_logits_kernel  lse and the mean loss from cuBLAS's logits (the forward kernel's epilogue)
  _dlogits_kernel         dl, and db or the bias's SGD step, one program per block of outputs
  _input_grads_kernel     dh and dz from cuBLAS's da, and the gated features for dW
The cross-entropy forward is then 3 launches and its backward 4 (the twin's: 5 and about 10);
the weight's SGD step is addmm_ with alpha = -lr, so dW is not written on this path either.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import gated_head_step
from ._counters import counters, last_to_arrive, reset
from ._eager import EagerOp, triton_op
from ._launch import launch
from ._pdl import launch_args as pdl_args
from ._pdl import pdl_enter
from ._scalars import cdiv, join_double, next_pow2, split_double

# tl.dot on float32 defaults to TF32 on NVIDIA tensor cores (10-bit mantissa: measured 5e-4 error
# on the logits at B = 84 against 1e-8 for PyTorch). PyTorch's own float32 matmul is IEEE unless
# the user opts into TF32, and ANML's inner loop compounds 20 updates, so the kernels hold to
# float32 accuracy: the error-vs-float64 test requires at most 2x PyTorch's. "ieee" (FMA) does
# that for the logits and dW on an H100. For da = dl @ W (K = 1000, B = 84) it gave 3.6x cuBLAS's
# error on dh, while "tf32x3" (three TF32 tensor-core products, float32 accumulation) gave 0.8-1.5x
# of cuBLAS's on dh and dz in a separate measurement, and was faster; so the input-grad kernel uses
# that. (At B = 1 no tl.dot runs at all: every kernel is a broadcast multiply-and-sum.)
DOT_PRECISION = "ieee"
INPUT_GRAD_DOT_PRECISION = "tf32x3"

# The loss-with-input-grad path: below this many rows, the weight-grad kernel (which holds a tile
# of W in registers anyway) also emits da summed over its block of outputs, and the last program
# of each feature block adds those partials up; W is then read once in the backward instead of
# twice. The partials cost n_out_blocks * B * F floats: 16 * 1 * 2304 at B = 1 (1.6% of W), but
# 134% of W at B = 84, where a separate dl @ W kernel is cheaper.
FUSE_INPUT_GRAD_MAX_ROWS = 16

# From this many rows up (the meta-loss's 84), the three products run on cuBLAS (torch.mm inside
# the ops) and the Triton kernels do everything around them: the gate, the loss and its gradient
# in one pass over the logits, db (or the bias's SGD step), and dh, dz. There each product is a
# real GEMM (84 x 1000 x 2304), where cuBLAS's float32 kernels beat tl.dot's; at fewer rows the
# products are GEMVs or thin GEMMs, bound by reading W, where the fused kernels above win by
# reading it once. The weight's SGD step is cuBLAS's addmm_ with alpha = -lr: dW is never written
# there either.
GEMM_MIN_ROWS = 17

# gated_head_ce_sgd_ at B = 1 (the inner loop's head step) runs as one launch with grid barriers
# where the weight fits in the programs' registers (kernels/gated_head_step.py) instead of the
# forward and backward launches below. On an H200 (2026-11-29, same run, 20 steps a graph replay)
# the whole PLN inner step took 91.8 us with it against 96.5 without (TF32 convolutions); the head
# step alone 13.7 against 14.6. Off: the two launches (tests run both; bench_inner_step's
# fused_donate_two_launch_head row times them).
ONE_LAUNCH_STEP = True

SUPPORTED_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_gate(H_ptr, Z_ptr, rows, cols, row_mask, col_mask, n_features):
    """h and g = sigmoid(z) for a [rows, cols] tile (zeros outside the masks)."""
    offs = rows[:, None] * n_features + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    h = tl.load(H_ptr + offs, mask=mask, other=0.0)
    z = tl.load(Z_ptr + offs, mask=mask, other=0.0)
    return h, tl.sigmoid(z)


@triton.jit
def _dloss_scale(GradLoss_ptr, n_rows, dt: tl.constexpr, GRAD_LOSS_IS_ONE: tl.constexpr):
    """dloss / B in the compute dtype (a Python 1.0 would be a float32 constant, too coarse for float64)."""
    if GRAD_LOSS_IS_ONE:
        grad = tl.full((1,), 1.0, dt)
    else:
        grad = tl.load(GradLoss_ptr + tl.arange(0, 1))
    return grad / n_rows


@triton.jit
def _dlogits_tile(DLogits_ptr, Logits_ptr, Lse_ptr, Target_ptr, scale, rows, outs, row_mask,
                  out_mask, n_outputs, FROM_CE: tl.constexpr):
    """The gradient w.r.t. a [rows, outs] tile of logits, zero outside the masks.

    From the loss it is rebuilt from the saved logits and logsumexp, so dlogits never exists in
    memory: (exp(logit - lse) - [out == y]) * scale, with scale = dloss / B.
    """
    offs = rows[:, None] * n_outputs + outs[None, :]
    mask = row_mask[:, None] & out_mask[None, :]
    if FROM_CE:
        logits = tl.load(Logits_ptr + offs, mask=mask, other=0.0)
        lse = tl.load(Lse_ptr + rows, mask=row_mask, other=0.0)
        y = tl.load(Target_ptr + rows, mask=row_mask, other=-1)
        p = tl.exp(logits - lse[:, None])
        dl = tl.where(outs[None, :] == y[:, None], p - 1.0, p) * scale
        dl = tl.where(mask, dl, 0.0)
    else:
        dl = tl.load(DLogits_ptr + offs, mask=mask, other=0.0)
    return dl


@triton.jit
def _gated_head_fwd_kernel(
    H_ptr, Z_ptr, W_ptr, Bias_ptr, Logits_ptr, PartMax_ptr, PartSum_ptr, Target_ptr, Lse_ptr,
    Loss_ptr, Count_ptr,
    n_rows, n_features, n_outputs,
    WITH_LSE: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_LOSS_B: tl.constexpr, BLOCK_P: tl.constexpr,
    PDL: tl.constexpr,
):
    """One [BLOCK_B rows, BLOCK_O outputs] tile of logits, reducing over all features.

    Grid (out blocks, row blocks). With WITH_LSE it also writes, per row, the max and the sum of
    exp(logit - max) over its outputs, and the last program of the launch to finish (an arrival
    counter, kernels/_counters.py) combines those into lse and the mean loss (`_ce_loss`): the
    logits are read back only at the target, and the loss costs no launch of its own.
    """
    pdl_enter(PDL)
    pid_o = tl.program_id(0)
    pid_b = tl.program_id(1)
    dt = H_ptr.dtype.element_ty
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    row_mask = rows < n_rows
    out_mask = outs < n_outputs

    acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=dt)
    for f0 in range(0, n_features, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        col_mask = cols < n_features
        # Every out block recomputes the gate for its rows: B x F sigmoids per block are far
        # cheaper than a launch, and h, z stay in L2 (84 x 2304 x 8 bytes).
        h, g = _load_gate(H_ptr, Z_ptr, rows, cols, row_mask, col_mask, n_features)
        a = h * g
        w = tl.load(W_ptr + outs[:, None] * n_features + cols[None, :],
                    mask=out_mask[:, None] & col_mask[None, :], other=0.0)
        if USE_DOT:
            # A fresh dot per chunk, then one add: blocked summation. Accumulating all 2304
            # products in one running sum loses ~2x accuracy against cuBLAS at B = 84.
            acc += tl.dot(a, tl.trans(w), input_precision=DOT_PRECISION, out_dtype=dt)
        else:
            # B = 1 (tl.dot needs >= 16 rows; this is a plain GEMV) and float64 (tl.dot on
            # float64 does not compile on every Triton this package supports).
            acc += tl.sum(a[:, None, :] * w[None, :, :], axis=2)
    bias = tl.load(Bias_ptr + outs, mask=out_mask, other=0.0)
    logits = acc + bias[None, :]
    tl.store(Logits_ptr + rows[:, None] * n_outputs + outs[None, :], logits,
             mask=row_mask[:, None] & out_mask[None, :])

    if WITH_LSE:
        masked = tl.where(out_mask[None, :], logits, float("-inf"))
        row_max = tl.max(masked, axis=1)
        row_sum = tl.sum(tl.exp(masked - row_max[:, None]), axis=1)
        n_out_blocks = tl.num_programs(0)
        tl.store(PartMax_ptr + rows * n_out_blocks + pid_o, row_max, mask=row_mask)
        tl.store(PartSum_ptr + rows * n_out_blocks + pid_o, row_sum, mask=row_mask)
        if last_to_arrive(Count_ptr, n_out_blocks * tl.num_programs(1)):
            _ce_loss(Logits_ptr, Target_ptr, PartMax_ptr, PartSum_ptr, Lse_ptr, Loss_ptr,
                     n_rows, n_outputs, n_out_blocks, dt, BLOCK_LOSS_B, BLOCK_P)
            reset(Count_ptr)


@triton.jit
def _ce_loss(Logits_ptr, Target_ptr, PartMax_ptr, PartSum_ptr, Lse_ptr, Loss_ptr,
             n_rows, n_outputs, n_out_blocks, dt: tl.constexpr,
             BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """lse per row from the forward's per-block partials, and the mean loss, run by one program.

    It sums the rows in a fixed order, so the loss is deterministic (no atomics). Its loads skip
    L1 (.cg): other programs of the launch wrote what they read.
    """
    parts = tl.arange(0, BLOCK_P)
    part_mask = parts < n_out_blocks
    total = tl.zeros((BLOCK_B,), dtype=dt)
    for b0 in range(0, n_rows, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < n_rows
        offs = rows[:, None] * n_out_blocks + parts[None, :]
        mask = row_mask[:, None] & part_mask[None, :]
        part_max = tl.load(PartMax_ptr + offs, mask=mask, other=float("-inf"), cache_modifier=".cg")
        part_sum = tl.load(PartSum_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        row_max = tl.max(part_max, axis=1)
        # Padding rows (all -inf, sum 0) would give nan and log(0); make them harmless, then drop them.
        row_max = tl.where(row_mask, row_max, 0.0)
        row_sum = tl.sum(part_sum * tl.exp(part_max - row_max[:, None]), axis=1)
        lse = row_max + tl.log(tl.where(row_mask, row_sum, 1.0))
        y = tl.load(Target_ptr + rows, mask=row_mask, other=0)
        target_logit = tl.load(Logits_ptr + rows * n_outputs + y, mask=row_mask, other=0.0,
                               cache_modifier=".cg")
        tl.store(Lse_ptr + rows, lse, mask=row_mask)
        total += tl.where(row_mask, lse - target_logit, 0.0)
    tl.store(Loss_ptr, tl.sum(total, axis=0) / n_rows)


@triton.jit
def _store_input_grads(da, H_ptr, Z_ptr, DH_ptr, DZ_ptr, rows, cols, row_mask, col_mask, n_features):
    """dh = da * g and dz = da * h * g * (1 - g) for a [rows, cols] tile, from da = dl @ W."""
    h, g = _load_gate(H_ptr, Z_ptr, rows, cols, row_mask, col_mask, n_features)
    dh = da * g
    offs = rows[:, None] * n_features + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(DH_ptr + offs, dh, mask=mask)
    tl.store(DZ_ptr + offs, dh * h * (1.0 - g), mask=mask)


@triton.jit
def _gated_head_bwd_weight_kernel(
    H_ptr, Z_ptr, W_ptr, Bias_ptr, DLogits_ptr, Logits_ptr, Lse_ptr, Target_ptr, GradLoss_ptr,
    DW_ptr, DB_ptr, DAPart_ptr, DH_ptr, DZ_ptr, Count_ptr, lr_hi, lr_lo,
    n_rows, n_features, n_outputs,
    FROM_CE: tl.constexpr, GRAD_LOSS_IS_ONE: tl.constexpr, SGD: tl.constexpr,
    WITH_DA_PARTIAL: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr,
    PDL: tl.constexpr,
):
    """One [BLOCK_O, BLOCK_F] tile of dW = dl^T a, reducing over all rows (grid: out x feature blocks).

    SGD: the tile is applied to W in place (W -= lr * dW, and b -= lr * db by the feature-block-0
    programs) and dW is never written. Each program reads and writes only its own tile of W, which
    it loads before any store, and nothing else in this launch reads W: no races, and the da
    partials below see the old W. If da comes from the separate input kernel instead, that kernel
    must run before this one (the launcher orders them so).
    WITH_DA_PARTIAL: also writes da_part[out block] = dl[:, out block] @ W[out block, feature block],
    and the last program of each feature block to finish (an arrival counter per feature block,
    kernels/_counters.py) adds up its partials over the out blocks in order (the same bits
    whichever program that is) into dh and dz: the input grads cost no launch of their own, and
    W is read once in the whole backward.
    """
    pdl_enter(PDL)
    pid_o = tl.program_id(0)
    pid_f = tl.program_id(1)
    dt = H_ptr.dtype.element_ty
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    out_mask = outs < n_outputs
    col_mask = cols < n_features
    w_offs = outs[:, None] * n_features + cols[None, :]
    w_mask = out_mask[:, None] & col_mask[None, :]
    if SGD or WITH_DA_PARTIAL:
        w = tl.load(W_ptr + w_offs, mask=w_mask, other=0.0)
    scale = _dloss_scale(GradLoss_ptr, n_rows, dt, GRAD_LOSS_IS_ONE)

    acc = tl.zeros((BLOCK_O, BLOCK_F), dtype=dt)
    db = tl.zeros((BLOCK_O,), dtype=dt)
    for b0 in range(0, n_rows, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < n_rows
        dl = _dlogits_tile(DLogits_ptr, Logits_ptr, Lse_ptr, Target_ptr, scale, rows, outs,
                           row_mask, out_mask, n_outputs, FROM_CE)
        h, g = _load_gate(H_ptr, Z_ptr, rows, cols, row_mask, col_mask, n_features)
        a = h * g
        if USE_DOT:
            # Only B / BLOCK_B (3) steps here: a running accumulator loses nothing.
            acc = tl.dot(tl.trans(dl), a, acc, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(dl[:, :, None] * a[:, None, :], axis=0)
        db += tl.sum(dl, axis=0)
        if WITH_DA_PARTIAL:
            if USE_DOT:
                da_part = tl.dot(dl, w, input_precision=DOT_PRECISION, out_dtype=dt)
            else:
                da_part = tl.sum(dl[:, :, None] * w[None, :, :], axis=1)
            part_offs = (pid_o * n_rows + rows[:, None]) * n_features + cols[None, :]
            tl.store(DAPart_ptr + part_offs, da_part, mask=row_mask[:, None] & col_mask[None, :])

    if SGD:
        # Triton passes Python floats as float32; lr = hi + lo keeps it exact for float64.
        lr = join_double(lr_hi, lr_lo, dt)
        tl.store(W_ptr + w_offs, w - lr * acc, mask=w_mask)
        if pid_f == 0:
            bias = tl.load(Bias_ptr + outs, mask=out_mask, other=0.0)
            tl.store(Bias_ptr + outs, bias - lr * db, mask=out_mask)
    else:
        tl.store(DW_ptr + w_offs, acc, mask=w_mask)
        if pid_f == 0:
            tl.store(DB_ptr + outs, db, mask=out_mask)

    if WITH_DA_PARTIAL:
        n_parts = tl.num_programs(0)
        if last_to_arrive(Count_ptr + pid_f, n_parts):
            for b0 in range(0, n_rows, BLOCK_B):
                rows = b0 + tl.arange(0, BLOCK_B)
                row_mask = rows < n_rows
                mask = row_mask[:, None] & col_mask[None, :]
                da = tl.zeros((BLOCK_B, BLOCK_F), dtype=dt)
                for p in range(0, n_parts):
                    da += tl.load(DAPart_ptr + (p * n_rows + rows[:, None]) * n_features + cols[None, :],
                                  mask=mask, other=0.0, cache_modifier=".cg")
                _store_input_grads(da, H_ptr, Z_ptr, DH_ptr, DZ_ptr, rows, cols, row_mask, col_mask,
                                   n_features)
            reset(Count_ptr + pid_f)


@triton.jit
def _gated_head_bwd_input_kernel(
    H_ptr, Z_ptr, W_ptr, DLogits_ptr, Logits_ptr, Lse_ptr, Target_ptr, GradLoss_ptr,
    DH_ptr, DZ_ptr,
    n_rows, n_features, n_outputs,
    FROM_CE: tl.constexpr, GRAD_LOSS_IS_ONE: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr,
    PDL: tl.constexpr,
):
    """One [BLOCK_B, BLOCK_F] tile of dh = da * g and dz = da * h * g * (1 - g) (grid: feature x row blocks).

    da = dl @ W reduced over all outputs here (the weight kernel forms it itself where it fuses the
    input grads).
    """
    pdl_enter(PDL)
    pid_f = tl.program_id(0)
    pid_b = tl.program_id(1)
    dt = H_ptr.dtype.element_ty
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    row_mask = rows < n_rows
    col_mask = cols < n_features

    da = tl.zeros((BLOCK_B, BLOCK_F), dtype=dt)
    scale = _dloss_scale(GradLoss_ptr, n_rows, dt, GRAD_LOSS_IS_ONE)
    for o0 in range(0, n_outputs, BLOCK_O):
        outs = o0 + tl.arange(0, BLOCK_O)
        out_mask = outs < n_outputs
        dl = _dlogits_tile(DLogits_ptr, Logits_ptr, Lse_ptr, Target_ptr, scale, rows, outs,
                           row_mask, out_mask, n_outputs, FROM_CE)
        w = tl.load(W_ptr + outs[:, None] * n_features + cols[None, :],
                    mask=out_mask[:, None] & col_mask[None, :], other=0.0)
        if USE_DOT:
            da += tl.dot(dl, w, input_precision=DOT_PRECISION, out_dtype=dt)  # blocked sum
        else:
            da += tl.sum(dl[:, :, None] * w[None, :, :], axis=1)
    _store_input_grads(da, H_ptr, Z_ptr, DH_ptr, DZ_ptr, rows, cols, row_mask, col_mask, n_features)


@triton.jit
def _gate_kernel(H_ptr, Z_ptr, A_ptr, n_rows, n_features, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
                 PDL: tl.constexpr):
    """a = h * sigmoid(z), the GEMMs' operand (grid: feature x row blocks)."""
    pdl_enter(PDL)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    row_mask = rows < n_rows
    col_mask = cols < n_features
    h, g = _load_gate(H_ptr, Z_ptr, rows, cols, row_mask, col_mask, n_features)
    tl.store(A_ptr + rows[:, None] * n_features + cols[None, :], h * g,
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _ce_from_logits_kernel(Logits_ptr, PartMax_ptr, PartSum_ptr, Target_ptr, Lse_ptr, Loss_ptr,
                           Count_ptr, n_rows, n_outputs,
                           BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr,
                           BLOCK_LOSS_B: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    """lse and the mean loss from cuBLAS's logits: the forward kernel's epilogue on its own
    (grid: out x row blocks; the last program to finish runs `_ce_loss`)."""
    pdl_enter(PDL)
    dt = Logits_ptr.dtype.element_ty
    pid_o = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    row_mask = rows < n_rows
    out_mask = outs < n_outputs
    logits = tl.load(Logits_ptr + rows[:, None] * n_outputs + outs[None, :],
                     mask=row_mask[:, None] & out_mask[None, :], other=float("-inf"))
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(row_mask, row_max, 0.0)  # padding rows: all -inf
    row_sum = tl.sum(tl.exp(logits - row_max[:, None]), axis=1)
    n_out_blocks = tl.num_programs(0)
    tl.store(PartMax_ptr + rows * n_out_blocks + pid_o, row_max, mask=row_mask)
    tl.store(PartSum_ptr + rows * n_out_blocks + pid_o, row_sum, mask=row_mask)
    if last_to_arrive(Count_ptr, n_out_blocks * tl.num_programs(1)):
        _ce_loss(Logits_ptr, Target_ptr, PartMax_ptr, PartSum_ptr, Lse_ptr, Loss_ptr,
                 n_rows, n_outputs, n_out_blocks, dt, BLOCK_LOSS_B, BLOCK_P)
        reset(Count_ptr)


@triton.jit
def _dlogits_kernel(DLogits_ptr, Logits_ptr, Lse_ptr, Target_ptr, GradLoss_ptr, DL_ptr, DB_ptr,
                    Bias_ptr, lr_hi, lr_lo, n_rows, n_outputs,
                    FROM_CE: tl.constexpr, GRAD_LOSS_IS_ONE: tl.constexpr, STORE_DL: tl.constexpr,
                    STORE_DB: tl.constexpr, SGD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr,
                    PDL: tl.constexpr):
    """dl for cuBLAS's products (from the loss: rebuilt from logits and lse, as in the fused
    kernels) and db = sum over rows, or b -= lr * db (grid: out blocks, each over all rows, so db
    needs no second pass and no atomics)."""
    pdl_enter(PDL)
    dt = Logits_ptr.dtype.element_ty
    outs = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    out_mask = outs < n_outputs
    scale = _dloss_scale(GradLoss_ptr, n_rows, dt, GRAD_LOSS_IS_ONE)
    db = tl.zeros((BLOCK_O,), dtype=dt)
    for b0 in range(0, n_rows, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < n_rows
        dl = _dlogits_tile(DLogits_ptr, Logits_ptr, Lse_ptr, Target_ptr, scale, rows, outs,
                           row_mask, out_mask, n_outputs, FROM_CE)
        if STORE_DL:
            tl.store(DL_ptr + rows[:, None] * n_outputs + outs[None, :], dl,
                     mask=row_mask[:, None] & out_mask[None, :])
        db += tl.sum(dl, axis=0)
    if SGD:
        bias = tl.load(Bias_ptr + outs, mask=out_mask, other=0.0)
        tl.store(Bias_ptr + outs, bias - join_double(lr_hi, lr_lo, dt) * db, mask=out_mask)
    if STORE_DB:
        tl.store(DB_ptr + outs, db, mask=out_mask)


@triton.jit
def _input_grads_kernel(DA_ptr, H_ptr, Z_ptr, DH_ptr, DZ_ptr, A_ptr, n_rows, n_features,
                        STORE_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, PDL: tl.constexpr):
    """dh and dz from cuBLAS's da = dl @ W (grid: feature x row blocks); with STORE_A also
    a = h * sigmoid(z) for the weight's product, from the same loads (a launch saved)."""
    pdl_enter(PDL)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    row_mask = rows < n_rows
    col_mask = cols < n_features
    offs = rows[:, None] * n_features + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    da = tl.load(DA_ptr + offs, mask=mask, other=0.0)
    h, g = _load_gate(H_ptr, Z_ptr, rows, cols, row_mask, col_mask, n_features)
    dh = da * g
    tl.store(DH_ptr + offs, dh, mask=mask)
    tl.store(DZ_ptr + offs, dh * h * (1.0 - g), mask=mask)
    if STORE_A:
        tl.store(A_ptr + offs, h * g, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configurations for the real shapes (O = 1000, F = 2304; B = 1 and 84) on Hopper
# ----------------------------------------------------------------------------------------------
#
# B = 1: every kernel is a GEMV or an outer product over W (9.2 MB in float32): bound by memory
# bandwidth, so the grids aim at >= 1 program per SM (132 on H100) with wide, contiguous loads.
# tl.dot needs >= 16 rows, so these use broadcast multiply-and-sum instead (dot = False).
# 1 < B < GEMM_MIN_ROWS, float32: tl.dot (IEEE FMA; 3xTF32 tensor cores for da) on row blocks of
# 16. num_stages = 2-3 lets Triton prefetch the next tiles while the FMAs run; at most
# 3 x (16 x 64 + 64 x 64) x 4 bytes = 60 KB of shared memory, of Hopper's 228 KB.
# The numbers below won a small sweep on an H100 (CUDA-graph replays at B = 84, when these kernels
# still ran the meta-loss; cuBLAS does since); their neighbours were within 10-20%.
# B > 1, float64 (gradcheck, references): broadcast multiply-and-sum on small tiles, whose
# [rows, outs, features] product must fit in registers. Correct, not fast.


def _use_dot(h: torch.Tensor) -> bool:
    return h.shape[0] > 1 and h.dtype == torch.float32


def _fwd_config(n_rows: int, dot: bool) -> dict:
    if n_rows == 1:
        # 4 outputs per program: 250 programs (~2 per SM), each loading its whole 4 x 2304 strip
        # of W at once (a 4096-wide block, 44% masked: one round trip to memory instead of three).
        # The winner of bench/tune_gated_head.py on an H200 (2026-11-29): the head step 18.6 us
        # against 19.9 with 1024-wide chunks at 4 warps; most tiles were within 0.7 us of it.
        return dict(BLOCK_B=1, BLOCK_O=4, BLOCK_F=4096, num_warps=8, num_stages=1)
    if not dot:
        return dict(BLOCK_B=4, BLOCK_O=16, BLOCK_F=32, num_warps=4, num_stages=1)
    # 16 x 64 tiles: 16 out blocks x 6 row blocks = 96 programs at B = 84; the row blocks re-read
    # W from L2 (50 MB), not HBM.
    return dict(BLOCK_B=16, BLOCK_O=64, BLOCK_F=64, num_warps=4, num_stages=3)


def _weight_config(n_rows: int, dot: bool) -> dict:
    # dW is 1000 x 2304 whatever B is. At B = 1, 128 x 32 tiles: 8 x 72 = 576 programs (>4 per
    # SM), each reading and writing a 16 KB tile, and only 8 da partials per feature for the last
    # program of each feature block to add up. The winner of bench/tune_gated_head.py on an H200
    # (2026-11-29): the head step 16.1 us against 19.9 with the 64 x 128 tiles it replaced.
    if n_rows == 1:
        return dict(BLOCK_B=1, BLOCK_O=128, BLOCK_F=32, num_warps=4, num_stages=1)
    if not dot:
        return dict(BLOCK_B=4, BLOCK_O=32, BLOCK_F=32, num_warps=8, num_stages=1)
    # B > 1: 64 x 64 tiles (16 x 36 = 576 programs), the K loop over rows in blocks of 32
    # (B = 84: 3 steps); smaller tiles than at B = 1 because each step is now a real GEMM tile.
    return dict(BLOCK_B=32, BLOCK_O=64, BLOCK_F=64, num_warps=4, num_stages=2)


def _input_config(n_rows: int, dot: bool) -> dict:
    if n_rows == 1:
        # da = dl @ W for one row: 64-wide feature strips give 36 programs reading 256-byte
        # segments of each W row; only used when W needs no grad (else the partials are cheaper).
        return dict(BLOCK_B=1, BLOCK_O=64, BLOCK_F=64, num_warps=4, num_stages=1)
    if not dot:
        return dict(BLOCK_B=4, BLOCK_O=32, BLOCK_F=32, num_warps=4, num_stages=1)
    # B = 84: 36 feature blocks x 6 row blocks = 216 programs, K loop of 16 over the outputs.
    return dict(BLOCK_B=16, BLOCK_O=64, BLOCK_F=64, num_warps=4, num_stages=3)


# ----------------------------------------------------------------------------------------------
# Launchers (plain functions over tensors; the ops below call them)
# ----------------------------------------------------------------------------------------------

def _check_inputs(h, gate_logits, weight, bias, target=None):
    if h.dim() != 2 or gate_logits.shape != h.shape:
        raise ValueError(f"gated head: h and gate_logits must both be [B, F], got "
                         f"{tuple(h.shape)} and {tuple(gate_logits.shape)}")
    if weight.dim() != 2 or weight.shape[1] != h.shape[1] or bias.shape != (weight.shape[0],):
        raise ValueError(f"gated head: weight must be [O, F={h.shape[1]}] and bias [O], got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    dtype = h.dtype
    if dtype not in SUPPORTED_DTYPES or not (gate_logits.dtype == dtype and weight.dtype == dtype
                                             and bias.dtype == dtype):
        raise TypeError(f"gated head: the Triton ops take float32 or float64, all alike; got "
                        f"{h.dtype}, {gate_logits.dtype}, {weight.dtype}, {bias.dtype} "
                        f"(use the plain-PyTorch backend for other dtypes)")
    if target is not None and (target.shape != (h.shape[0],) or target.dtype != torch.int64):
        raise ValueError(f"gated head: target must be int64 [B={h.shape[0]}], got "
                         f"{target.dtype} {tuple(target.shape)}")
    device = h.device
    if not (gate_logits.device == device and weight.device == device and bias.device == device
            and (target is None or target.device == device)):
        devices = {t.device for t in (h, gate_logits, weight, bias) + ((target,) if target is not None else ())}
        raise ValueError(f"gated head: all tensors must be on one device, got {sorted(map(str, devices))}")


def _use_gemm(h: torch.Tensor) -> bool:
    return h.shape[0] >= GEMM_MIN_ROWS


def _rows_grid(n_rows, n_features, cfg):
    return (cdiv(n_features, cfg["BLOCK_F"]), cdiv(n_rows, cfg["BLOCK_B"]))


# The GEMM path's elementwise kernels over [B, F]: 8 x 256 tiles (B = 84: 9 x 11 = 99 programs).
_ROWS_CFG = dict(BLOCK_B=8, BLOCK_F=256, num_warps=4)


def _gated(h, z):
    """a = h * sigmoid(z), one launch."""
    a = torch.empty_like(h)
    launch(_gate_kernel, _rows_grid(*h.shape, _ROWS_CFG), h, z, a, *h.shape, **_ROWS_CFG, **pdl_args(a))
    return a


def _ce_from_logits(logits, target, loss, lse):
    n_rows, n_outputs = logits.shape
    block_o = min(1024, next_pow2(n_outputs))
    cfg = dict(BLOCK_B=max(1, 4096 // block_o), BLOCK_O=block_o)
    grid = (cdiv(n_outputs, block_o), cdiv(n_rows, cfg["BLOCK_B"]))
    part_max = logits.new_empty((n_rows, grid[0]))
    part_sum = logits.new_empty((n_rows, grid[0]))
    launch(_ce_from_logits_kernel, grid,
        logits, part_max, part_sum, target, lse, loss, counters(logits, 1), n_rows, n_outputs,
        BLOCK_LOSS_B=min(32, next_pow2(n_rows)),
        BLOCK_P=next_pow2(grid[0]), **cfg, num_warps=4, **pdl_args(logits))


def _launch_fwd(h, z, weight, bias, logits, ce=None):
    """The logits; with `ce` = (target, loss, lse) also the loss and lse, finished in the same
    launch by its last program (or, on the GEMM path, by a kernel over cuBLAS's logits)."""
    if _use_gemm(h):
        torch.addmm(bias, _gated(h, z), weight.t(), out=logits)
        if ce is not None:
            _ce_from_logits(logits, *ce)
        return
    n_rows, n_features = h.shape
    n_outputs = weight.shape[0]
    dot = _use_dot(h)
    cfg = _fwd_config(n_rows, dot)
    grid = (cdiv(n_outputs, cfg["BLOCK_O"]), cdiv(n_rows, cfg["BLOCK_B"]))
    if ce is None:
        # pointer arguments this specialisation never reads
        target = loss = lse = part_max = part_sum = count = logits
        loss_cfg = dict(BLOCK_LOSS_B=1, BLOCK_P=1)
    else:
        target, loss, lse = ce
        part_max = h.new_empty((n_rows, grid[0]))
        part_sum = h.new_empty((n_rows, grid[0]))
        count = counters(h, 1)
        loss_cfg = dict(BLOCK_LOSS_B=min(32, next_pow2(n_rows)),
                        BLOCK_P=next_pow2(grid[0]))
    launch(_gated_head_fwd_kernel, grid,
        h, z, weight, bias, logits, part_max, part_sum, target, lse, loss, count,
        n_rows, n_features, n_outputs,
        WITH_LSE=ce is not None, USE_DOT=dot, DOT_PRECISION=DOT_PRECISION, **cfg, **loss_cfg, **pdl_args(logits))


def _launch_bwd(h, z, weight, bias, dlogits, logits, lse, target, grad_loss, dh, dz, dweight, dbias,
                *, from_ce, sgd, lr, input_grad, weight_grad, fuse_input_grad=None):
    """The backward kernels, in an order that is safe for the in-place SGD update.

    from_ce: dl comes from (logits, lse, target, grad_loss; grad_loss None means 1), else dlogits.
    sgd: apply W -= lr dW, b -= lr db in place instead of writing dweight, dbias.
    fuse_input_grad: None picks by B (FUSE_INPUT_GRAD_MAX_ROWS); tests force either path.
    """
    if _use_gemm(h):
        _launch_bwd_gemm(h, z, weight, bias, dlogits, logits, lse, target, grad_loss, dh, dz,
                         dweight, dbias, from_ce=from_ce, sgd=sgd, lr=lr, input_grad=input_grad,
                         weight_grad=weight_grad)
        return
    n_rows, n_features = h.shape
    n_outputs = weight.shape[0]
    use_dot = _use_dot(h)
    placeholder = h  # pointer arguments a specialisation never reads
    dlogits = placeholder if dlogits is None else dlogits
    logits = placeholder if logits is None else logits
    lse = placeholder if lse is None else lse
    target = placeholder if target is None else target
    grad_loss_is_one = grad_loss is None
    grad_loss = placeholder if grad_loss is None else grad_loss
    if fuse_input_grad is None:
        fuse_input_grad = n_rows <= FUSE_INPUT_GRAD_MAX_ROWS
    fuse = input_grad and weight_grad and fuse_input_grad

    wcfg = _weight_config(n_rows, use_dot)
    n_parts = cdiv(n_outputs, wcfg["BLOCK_O"])
    da_part = (torch.empty((n_parts, n_rows, n_features), device=h.device, dtype=h.dtype)
               if fuse else placeholder)

    if input_grad and not fuse:
        # Before the weight kernel: with sgd, that one overwrites W, and da needs the old W.
        icfg = _input_config(n_rows, use_dot)
        grid = (cdiv(n_features, icfg["BLOCK_F"]), cdiv(n_rows, icfg["BLOCK_B"]))
        launch(_gated_head_bwd_input_kernel, grid,
            h, z, weight, dlogits, logits, lse, target, grad_loss, dh, dz,
            n_rows, n_features, n_outputs,
            FROM_CE=from_ce, GRAD_LOSS_IS_ONE=grad_loss_is_one,
            USE_DOT=use_dot, DOT_PRECISION=INPUT_GRAD_DOT_PRECISION, **icfg, **pdl_args(dh))
    if weight_grad or sgd:
        lr_hi, lr_lo = split_double(lr)
        grid = (n_parts, cdiv(n_features, wcfg["BLOCK_F"]))
        count = counters(h, grid[1]) if fuse else placeholder
        launch(_gated_head_bwd_weight_kernel, grid,
            h, z, weight, bias, dlogits, logits, lse, target, grad_loss,
            dweight, dbias, da_part, dh, dz, count, lr_hi, lr_lo, n_rows, n_features, n_outputs,
            FROM_CE=from_ce, GRAD_LOSS_IS_ONE=grad_loss_is_one, SGD=sgd, WITH_DA_PARTIAL=fuse,
            USE_DOT=use_dot, DOT_PRECISION=DOT_PRECISION, **wcfg, **pdl_args(dh))


def _launch_bwd_gemm(h, z, weight, bias, dlogits, logits, lse, target, grad_loss, dh, dz, dweight,
                     dbias, *, from_ce, sgd, lr, input_grad, weight_grad):
    """_launch_bwd from GEMM_MIN_ROWS rows up: dl (and db, or the bias's step) in one launch, the
    products on cuBLAS, dh and dz (and the gated features for dW) in one more."""
    n_rows, n_outputs = h.shape[0], weight.shape[0]
    placeholder = h  # pointer arguments a specialisation never reads
    store_dl = from_ce and (input_grad or weight_grad or sgd)
    store_db = weight_grad and not sgd
    dl = torch.empty((n_rows, n_outputs), device=h.device, dtype=h.dtype) if store_dl else dlogits
    if store_dl or store_db or sgd:
        lr_hi, lr_lo = split_double(lr)
        cfg = dict(BLOCK_B=16, BLOCK_O=32)
        launch(_dlogits_kernel, (cdiv(n_outputs, cfg["BLOCK_O"]),),
            placeholder if dlogits is None else dlogits, placeholder if logits is None else logits,
            placeholder if lse is None else lse, placeholder if target is None else target,
            placeholder if grad_loss is None else grad_loss, dl if store_dl else placeholder,
            dbias if store_db else placeholder, bias, lr_hi, lr_lo, n_rows, n_outputs,
            FROM_CE=from_ce, GRAD_LOSS_IS_ONE=grad_loss is None, STORE_DL=store_dl,
            STORE_DB=store_db, SGD=sgd, **cfg, num_warps=4, **pdl_args(dl))
    a = None
    if input_grad:
        # before the weight's step, which overwrites W
        da = torch.mm(dl, weight)
        store_a = weight_grad or sgd
        a = torch.empty_like(h) if store_a else placeholder
        launch(_input_grads_kernel, _rows_grid(*h.shape, _ROWS_CFG),
            da, h, z, dh, dz, a, *h.shape, STORE_A=store_a, **_ROWS_CFG, **pdl_args(da))
    if weight_grad or sgd:
        a = _gated(h, z) if a is None else a
        if sgd:
            weight.addmm_(dl.t(), a, alpha=-lr)
        else:
            torch.mm(dl.t(), a, out=dweight)


def _grad_buffers(h, weight, input_grad, weight_grad):
    empty = lambda: h.new_empty((0,))
    dh = torch.empty_like(h) if input_grad else empty()
    dz = torch.empty_like(h) if input_grad else empty()
    dw = torch.empty_like(weight) if weight_grad else empty()
    db = weight.new_empty((weight.shape[0],)) if weight_grad else empty()
    return dh, dz, dw, db


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------

@triton_op("anml_fast::gated_head_fwd", mutates_args=())
def gated_head_fwd(h: torch.Tensor, gate_logits: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
    _check_inputs(h, gate_logits, weight, bias)
    h, gate_logits, weight, bias = (t.contiguous() for t in (h, gate_logits, weight, bias))
    logits = h.new_empty((h.shape[0], weight.shape[0]))
    if h.shape[0] > 0:
        _launch_fwd(h, gate_logits, weight, bias, logits)
    return logits


@triton_op("anml_fast::gated_head_bwd", mutates_args=())
def gated_head_bwd(grad_logits: torch.Tensor, h: torch.Tensor, gate_logits: torch.Tensor,
                   weight: torch.Tensor, input_grad: bool, weight_grad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_logits, h, gate_logits, weight = (t.contiguous() for t in (grad_logits, h, gate_logits, weight))
    dh, dz, dw, db = _grad_buffers(h, weight, input_grad, weight_grad)
    if h.shape[0] == 0:
        # No rows: the grads are zero (the kernels would launch an empty grid).
        return dh.zero_(), dz.zero_(), dw.zero_(), db.zero_()
    _launch_bwd(h, gate_logits, weight, weight, grad_logits, None, None, None, None, dh, dz, dw, db,
                from_ce=False, sgd=False, lr=0.0, input_grad=input_grad, weight_grad=weight_grad)
    return dh, dz, dw, db


@triton_op("anml_fast::gated_head_ce_fwd", mutates_args=())
def gated_head_ce_fwd(h: torch.Tensor, gate_logits: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor, target: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_inputs(h, gate_logits, weight, bias, target)
    if h.shape[0] == 0:
        raise ValueError("gated_head_cross_entropy: empty batch (the mean over no rows is undefined)")
    h, gate_logits, weight, bias, target = (t.contiguous() for t in (h, gate_logits, weight, bias, target))
    loss = h.new_empty(())
    logits = h.new_empty((h.shape[0], weight.shape[0]))
    lse = h.new_empty((h.shape[0],))
    _launch_fwd(h, gate_logits, weight, bias, logits, ce=(target, loss, lse))
    return loss, logits, lse


@triton_op("anml_fast::gated_head_ce_bwd", mutates_args=())
def gated_head_ce_bwd(grad_loss: torch.Tensor, h: torch.Tensor, gate_logits: torch.Tensor,
                      weight: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor,
                      target: torch.Tensor, input_grad: bool, weight_grad: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_loss, h, gate_logits, weight, target = (
        t.contiguous() for t in (grad_loss, h, gate_logits, weight, target))
    dh, dz, dw, db = _grad_buffers(h, weight, input_grad, weight_grad)
    _launch_bwd(h, gate_logits, weight, weight, None, logits, lse, target, grad_loss, dh, dz, dw, db,
                from_ce=True, sgd=False, lr=0.0, input_grad=input_grad, weight_grad=weight_grad)
    return dh, dz, dw, db


@triton_op("anml_fast::gated_head_ce_sgd_", mutates_args=("weight", "bias"))
def gated_head_ce_sgd_(h: torch.Tensor, gate_logits: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, target: torch.Tensor, lr: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_inputs(h, gate_logits, weight, bias, target)
    if h.shape[0] == 0:
        raise ValueError("gated_head_ce_sgd_: empty batch")
    if not (weight.is_contiguous() and bias.is_contiguous()):
        raise ValueError("gated_head_ce_sgd_: weight and bias are updated in place and must be contiguous")
    h, gate_logits, target = (t.contiguous() for t in (h, gate_logits, target))
    loss = h.new_empty(())
    lse = h.new_empty((h.shape[0],))
    dh, dz = torch.empty_like(h), torch.empty_like(h)
    step = gated_head_step.plan(h, weight) if ONE_LAUNCH_STEP else None
    if step is not None and gated_head_step.launch(h, gate_logits, weight, bias, target, lr, loss, lse,
                                                   dh, dz, step):
        return loss, dh, dz
    logits = h.new_empty((h.shape[0], weight.shape[0]))
    _launch_fwd(h, gate_logits, weight, bias, logits, ce=(target, loss, lse))
    _launch_bwd(h, gate_logits, weight, bias, None, logits, lse, target, None, dh, dz, h, h,
                from_ce=True, sgd=True, lr=lr, input_grad=True, weight_grad=True)
    return loss, dh, dz


# Explicit fakes (shapes only). triton_op would trace the implementation itself, but that needs
# wrap_triton's graph capture, which Triton's CPU interpreter bypasses; explicit fakes keep
# FakeTensor tracing (torch.compile's Dynamo, opcheck's fake test) working in both settings.

@gated_head_fwd.register_fake
def _(h, gate_logits, weight, bias):
    _check_inputs(h, gate_logits, weight, bias)
    return h.new_empty((h.shape[0], weight.shape[0]))


@gated_head_bwd.register_fake
def _(grad_logits, h, gate_logits, weight, input_grad, weight_grad):
    return _grad_buffers(h, weight, input_grad, weight_grad)


@gated_head_ce_fwd.register_fake
def _(h, gate_logits, weight, bias, target):
    _check_inputs(h, gate_logits, weight, bias, target)
    return h.new_empty(()), h.new_empty((h.shape[0], weight.shape[0])), h.new_empty((h.shape[0],))


@gated_head_ce_bwd.register_fake
def _(grad_loss, h, gate_logits, weight, logits, lse, target, input_grad, weight_grad):
    return _grad_buffers(h, weight, input_grad, weight_grad)


@gated_head_ce_sgd_.register_fake
def _(h, gate_logits, weight, bias, target, lr):
    _check_inputs(h, gate_logits, weight, bias, target)
    return h.new_empty(()), torch.empty_like(h), torch.empty_like(h)


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------

def _twin_logits(h, gate_logits, weight, bias):
    # The plain-PyTorch twin's math (anml_fast.ops.reference), repeated so that this package
    # does not import the ops package that imports it.
    return torch.nn.functional.linear(h * torch.sigmoid(gate_logits), weight, bias)


def _twin_grads(out, inputs, need, grad_out):
    """Grads of a twin recomputation, as a graph (create_graph): the second-order path."""
    wanted = [t for t, n in zip(inputs, need) if n]
    grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
    return tuple(next(grads) if n else None for n in need)


# The kernels' backward is not itself differentiable. Autograd runs a backward with grad mode on
# exactly when create_graph was asked for (second-order meta-gradients); the backward then
# differentiates the plain-PyTorch twin instead, which autograd can differentiate again. The
# forward's values and all first-order grads stay the kernels'. (anml_fast::conv_block does the same.)

def _setup_gated_head(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_gated_head(ctx, grad_logits):
    h, gate_logits, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        return _twin_grads(_twin_logits(h, gate_logits, weight, bias), (h, gate_logits, weight, bias),
                           need, grad_logits)
    input_grad, weight_grad = need[0] or need[1], need[2] or need[3]
    dh, dz, dw, db = direct.gated_head_bwd(grad_logits, h, gate_logits, weight, input_grad, weight_grad)
    return (dh if need[0] else None, dz if need[1] else None,
            dw if need[2] else None, db if need[3] else None)


def _setup_gated_head_ce(ctx, inputs, output):
    h, gate_logits, weight, bias, target = inputs
    _, logits, lse = output
    ctx.save_for_backward(h, gate_logits, weight, bias, target, logits, lse)
    # logits and lse are outputs only so that the backward can reuse them.
    ctx.mark_non_differentiable(logits, lse)


def _backward_gated_head_ce(ctx, grad_loss, _grad_logits, _grad_lse):
    h, gate_logits, weight, bias, target, logits, lse = ctx.saved_tensors
    need = ctx.needs_input_grad[:4]
    if torch.is_grad_enabled():
        loss = torch.nn.functional.cross_entropy(_twin_logits(h, gate_logits, weight, bias), target)
        return _twin_grads(loss, (h, gate_logits, weight, bias), need, grad_loss) + (None,)
    input_grad, weight_grad = need[0] or need[1], need[2] or need[3]
    dh, dz, dw, db = direct.gated_head_ce_bwd(grad_loss, h, gate_logits, weight, logits, lse, target,
                                              input_grad, weight_grad)
    return (dh if need[0] else None, dz if need[1] else None,
            dw if need[2] else None, db if need[3] else None, None)


gated_head_fwd.register_autograd(_backward_gated_head, setup_context=_setup_gated_head)
gated_head_ce_fwd.register_autograd(_backward_gated_head_ce, setup_context=_setup_gated_head_ce)


class direct:
    """The ops as anml_fast.ops calls them: a plain eager call runs the implementation without
    the custom-op dispatch (kernels/_eager.py), anything else goes through the registered op.
    gated_head_ce_sgd_ is not here: it mutates its weight, whose version counter the dispatcher
    keeps."""
    gated_head_fwd = EagerOp(gated_head_fwd, _setup_gated_head, _backward_gated_head)
    gated_head_ce_fwd = EagerOp(gated_head_ce_fwd, _setup_gated_head_ce, _backward_gated_head_ce)
    gated_head_bwd = EagerOp(gated_head_bwd)
    gated_head_ce_bwd = EagerOp(gated_head_ce_bwd)


# _backward_gated_head's first-order grads as one gated_head_bwd call (grad, h, gate_logits,
# weight, h's or gate_logits' grad wanted, weight's or bias's grad wanted) -> (dh, dz, dw, db),
# which C++ runs from its plan
direct.gated_head_fwd.plan_backward(direct.gated_head_bwd, ((0, 0), (1, 0), (1, 1), (1, 2), (2, 0b0011), (2, 0b1100)),
                                    (0, 1, 2, 3))
# _backward_gated_head_ce's as one gated_head_ce_bwd call (grad_loss, h, gate_logits, weight,
# logits, lse, target, the two wanted flags): logits and lse are saved after the five inputs, as
# _setup_gated_head_ce saves them, and are not differentiable
direct.gated_head_ce_fwd.plan_backward(
    direct.gated_head_ce_bwd, ((0, 0), (1, 0), (1, 1), (1, 2), (1, 5), (1, 6), (1, 4), (2, 0b0011), (2, 0b1100)),
    (0, 1, 2, 3, -1), saved_outputs=(1, 2), nondiff=(1, 2))


def interpreted() -> bool:
    """Whether these kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return type(_gated_head_fwd_kernel).__name__ == "InterpretedFunction"
