"""The gated head's batch-1 cross-entropy SGD step in one launch (gated_head_ce_sgd_ at B = 1).

The inner loop's head step reads the 1000 x 2304 weight for the logits, and needs all 1000
logits (the softmax) before any row of the weight can be updated: as two launches (forward, then
backward with the update) the 9.2 MB weight crosses memory three times and the two kernels took
15.4 us of the 95 us step on an H200. Here each program holds ROWS rows of the weight in
registers from the first pass to the last, and the programs meet at grid barriers
(kernels/_grid_sync.py) where the two launches used to meet:

  A  logits of its rows (a = h * sigmoid(z); logit = w . a + b), and its rows' max and sum of
     exps for the softmax;
  -- barrier --
  B  lse from every program's partials (each program computes the same value the same way),
     dl = softmax - onehot for its rows, the update w -= lr dl a, b -= lr dl (w read once), and
     its rows' share of da = dl W (the old w, still in registers); program 0 writes lse and loss;
  -- barrier --
  C  da summed over the programs' shares in a fixed order, one feature block a program, and
     dh = da * g, dz = da * h * g * (1 - g).

The weight crosses memory twice (read, write). Every program must be resident at once for the
barriers: the grid is at most PROGRAMS_PER_SM programs an SM (`plan`), and the launch asks for a
cooperative grid, which the driver refuses rather than run with fewer resident (the step then
falls back to the two launches, and remembers). Under Triton's interpreter, which runs programs
one by one, the same kernel runs as three launches, one phase each, reloading what the
one-launch form keeps in registers: the same arithmetic, so CI checks it, and a GPU test checks
the two forms agree. Traced (torch.compile), the op takes its two launches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._counters import counters
from ._grid_sync import grid_exit, grid_sync
from ._launch import launch as launch_kernel
from ._pdl import _INTERPRETED  # whether Triton runs its interpreter (decided at its import)
from ._pdl import launch_args as pdl_args
from ._pdl import pdl_enter
from ._scalars import cdiv, join_double, next_pow2, split_double

# Launch shape: at ANML's sizes on a 132-SM H200, two programs an SM of 4 warps, 4 rows of 2304
# (2048 + 256) each, 250 programs: 13.7 us a step (20 a graph replay, 2026-11-29), against 16.5
# for one program an SM of 8 warps and 8 rows (223 registers a thread, 8 warps an SM: ncu found
# it latency-bound), 22.0 for two of 8 warps, and 14.6 for the two launches. Four programs an SM
# do not fit (the driver refuses the grid).
NUM_WARPS = 4
# 32-bit registers a thread may hold of the program's rows of W (ANML's float32 head: 72). Two
# programs of 128 threads share an SM's 64K registers, 255 a thread at most, and the kernel
# needs as many again for the rest; a bigger head (float64 ANML's included), or a card with too
# few SMs for it, takes the two-launch path.
W_REGISTERS = 80
# Programs an SM runs at once: the grid is at most this many per SM (each must fit beside the
# others in registers and shared memory, which the cooperative launch checks).
PROGRAMS_PER_SM = 2
_SMS: dict[int, int] = {}
_REFUSED: set = set()  # launch shapes the driver refused as a cooperative grid


@triton.jit
def _load_part(H_ptr, Z_ptr, W_ptr, outs, out_mask, cols, n_features):
    """a = h * sigmoid(z) over `cols`, and the program's rows of W there (zeros outside)."""
    col_mask = cols < n_features
    h = tl.load(H_ptr + cols, mask=col_mask, other=0.0)
    a = h * tl.sigmoid(tl.load(Z_ptr + cols, mask=col_mask, other=0.0))
    w = tl.load(W_ptr + outs[:, None] * n_features + cols[None, :],
                mask=out_mask[:, None] & col_mask[None, :], other=0.0)
    return a, w


@triton.jit
def _update_part(W_ptr, DAPart_ptr, pid, w, a, dl, lr, outs, out_mask, cols, n_features):
    """W -= lr dl a over `cols` of the program's rows, and its share of da = dl W (old W) there."""
    col_mask = cols < n_features
    tl.store(W_ptr + outs[:, None] * n_features + cols[None, :], w - lr * (dl[:, None] * a[None, :]),
             mask=out_mask[:, None] & col_mask[None, :])
    tl.store(DAPart_ptr + pid * n_features + cols, tl.sum(dl[:, None] * w, axis=0), mask=col_mask)


@triton.jit
def _gated_head_step_kernel(
    H_ptr, Z_ptr, W_ptr, Bias_ptr, Target_ptr, Logits_ptr, PartMax_ptr, PartSum_ptr, DAPart_ptr,
    Lse_ptr, Loss_ptr, DH_ptr, DZ_ptr, Bar_ptr, lr_hi, lr_lo, n_features, n_outputs,
    RUN_A: tl.constexpr, RUN_B: tl.constexpr, RUN_C: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr, PDL: tl.constexpr,
):
    """Phases A, B, C above; the ones not run here ran in earlier launches of the same grid.

    The features are held as two blocks, BLOCK_F (the largest power of two within them) and a
    tail of BLOCK_T from there: 2048 + 256 = 2304 exactly, where one 4096 block would leave 44%
    of the registers padding (and spill: measured with ptxas for sm_90).
    """
    pdl_enter(PDL)
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    dt = H_ptr.dtype.element_ty
    outs = pid * ROWS + tl.arange(0, ROWS)
    out_mask = outs < n_outputs
    cols = tl.arange(0, BLOCK_F)
    tail = BLOCK_F + tl.arange(0, BLOCK_T)

    if RUN_A or RUN_B:
        a, w = _load_part(H_ptr, Z_ptr, W_ptr, outs, out_mask, cols, n_features)
        a_t, w_t = _load_part(H_ptr, Z_ptr, W_ptr, outs, out_mask, tail, n_features)
        bias = tl.load(Bias_ptr + outs, mask=out_mask, other=0.0)
    if RUN_A:
        logits = tl.sum(w * a[None, :], axis=1) + tl.sum(w_t * a_t[None, :], axis=1) + bias
        tl.store(Logits_ptr + outs, logits, mask=out_mask)
        masked = tl.where(out_mask, logits, float("-inf"))
        row_max = tl.max(masked, axis=0)
        tl.store(PartMax_ptr + pid, row_max)
        tl.store(PartSum_ptr + pid, tl.sum(tl.exp(masked - row_max), axis=0))
        if RUN_B:
            grid_sync(Bar_ptr, n_programs, 1)
    elif RUN_B:
        logits = tl.load(Logits_ptr + outs, mask=out_mask, other=0.0)

    if RUN_B:
        parts = tl.arange(0, BLOCK_P)
        part_mask = parts < n_programs
        part_max = tl.load(PartMax_ptr + parts, mask=part_mask, other=float("-inf"), cache_modifier=".cg")
        part_sum = tl.load(PartSum_ptr + parts, mask=part_mask, other=0.0, cache_modifier=".cg")
        top = tl.max(part_max, axis=0)
        lse = top + tl.log(tl.sum(part_sum * tl.exp(part_max - top), axis=0))
        y = tl.load(Target_ptr)
        p = tl.exp(logits - lse)
        dl = tl.where(out_mask, tl.where(outs == y, p - 1.0, p), 0.0)
        lr = join_double(lr_hi, lr_lo, dt)
        _update_part(W_ptr, DAPart_ptr, pid, w, a, dl, lr, outs, out_mask, cols, n_features)
        _update_part(W_ptr, DAPart_ptr, pid, w_t, a_t, dl, lr, outs, out_mask, tail, n_features)
        tl.store(Bias_ptr + outs, bias - lr * dl, mask=out_mask)
        if pid == 0:
            tl.store(Lse_ptr, lse)
            tl.store(Loss_ptr, lse - tl.load(Logits_ptr + y, cache_modifier=".cg"))
        if RUN_C:
            grid_sync(Bar_ptr, n_programs, 2)
            grid_exit(Bar_ptr, n_programs)

    if RUN_C:
        feats = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        feat_mask = feats < n_features
        parts = tl.arange(0, BLOCK_P)
        part_mask = parts < n_programs
        shares = tl.load(DAPart_ptr + parts[:, None] * n_features + feats[None, :],
                         mask=part_mask[:, None] & feat_mask[None, :], other=0.0, cache_modifier=".cg")
        da = tl.sum(shares, axis=0)
        h = tl.load(H_ptr + feats, mask=feat_mask, other=0.0)
        g = tl.sigmoid(tl.load(Z_ptr + feats, mask=feat_mask, other=0.0))
        dh = da * g
        tl.store(DH_ptr + feats, dh, mask=feat_mask)
        tl.store(DZ_ptr + feats, dh * h * (1.0 - g), mask=feat_mask)


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def plan(h: torch.Tensor, weight: torch.Tensor) -> dict | None:
    """The launch's shape for this step, or None where the one-launch step does not apply (more
    than one row, a weight too big to sit in registers across the grid, not on a GPU nor under
    the interpreter), or when traced: fake or functional tensors have symbolic shapes, which
    the refusal memo cannot key on, and a tracer takes the two launches anyway (see `launch`)."""
    if type(h) is not torch.Tensor or torch.compiler.is_compiling():
        return None
    n_rows, n_features = h.shape
    n_outputs = weight.shape[0]
    if n_rows != 1 or h.dtype not in (torch.float32, torch.float64) or n_outputs == 0 or n_features == 0:
        return None
    if h.device.type == "cuda" and not _INTERPRETED:
        sms = _sm_count(h.device)
    elif h.device.type == "cpu" and _INTERPRETED:
        sms = 132  # the H100/H200's count, so CI runs the grid the GPU runs
    else:
        return None
    block_f = next_pow2(n_features + 1) // 2  # the largest power of two <= n_features
    block_t = max(16, next_pow2(n_features - block_f))
    rows = next_pow2(cdiv(n_outputs, sms * PROGRAMS_PER_SM))
    if rows * (block_f + block_t) * h.element_size() > W_REGISTERS * 4 * 32 * NUM_WARPS:
        return None
    n_programs = cdiv(n_outputs, rows)
    cfg = dict(grid=n_programs, ROWS=rows, BLOCK_F=block_f, BLOCK_T=block_t,
               BLOCK_P=next_pow2(n_programs), BLOCK_C=next_pow2(cdiv(n_features, n_programs)))
    return None if _refusal_key(h, cfg) in _REFUSED else cfg


def _refusal_key(h, cfg):
    return (h.device, h.dtype, NUM_WARPS, tuple(sorted(cfg.items())))


def launch(h, z, weight, bias, target, lr, loss, lse, dh, dz, cfg, *, one_launch: bool | None = None) -> bool:
    """The step: W, b updated in place; loss, lse, dh, dz written; True. `one_launch` None: one
    launch on a GPU, three (one phase each) under the interpreter; False forces the three.

    Returns False, having written nothing, where it does not run: traced (torch.compile, fake
    tensors), where the caller's two launches beat three; or where the driver refused the
    cooperative grid (its programs would not all be resident: remembered, and `plan` then
    declines the shape)."""
    n_features, n_outputs = h.shape[1], weight.shape[0]
    if type(h) is not torch.Tensor or torch.compiler.is_compiling():
        return False
    if one_launch is None:
        one_launch = h.is_cuda and not _INTERPRETED
    elif one_launch and _INTERPRETED:
        # the interpreter runs programs one after another: the first would wait at the barrier forever
        raise ValueError("gated_head_step.launch: one_launch=True cannot run under TRITON_INTERPRET")
    n = cfg["grid"]
    logits = h.new_empty((n_outputs,))
    part_max, part_sum = h.new_empty((n,)), h.new_empty((n,))
    da_part = h.new_empty((n, n_features))
    bar = counters(h, 2) if one_launch else h
    lr_hi, lr_lo = split_double(lr)
    sizes = {k: cfg[k] for k in ("ROWS", "BLOCK_F", "BLOCK_T", "BLOCK_P", "BLOCK_C")}
    phases = [(True, True, True)] if one_launch else [(True, False, False), (False, True, False),
                                                       (False, False, True)]
    # A cooperative grid: the driver refuses a launch whose programs cannot all be resident at
    # once (which the barriers need) rather than start it and deadlock.
    extra = {"launch_cooperative_grid": True} if one_launch else {}
    for run_a, run_b, run_c in phases:
        try:
            launch_kernel(_gated_head_step_kernel, (n,),
                h, z, weight, bias, target, logits, part_max, part_sum, da_part, lse, loss, dh, dz,
                bar, lr_hi, lr_lo, n_features, n_outputs, RUN_A=run_a, RUN_B=run_b, RUN_C=run_c,
                **sizes, num_warps=NUM_WARPS, num_stages=1, **extra, **pdl_args(dh))
        except RuntimeError as e:
            # "too many blocks in cooperative launch": the launch did not start
            if not extra or "cooperative" not in str(e):
                raise
            _REFUSED.add(_refusal_key(h, cfg))
            return False
    return True
