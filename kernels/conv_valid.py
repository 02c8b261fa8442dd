"""Stride-1 unpadded ("valid") 2-D convolution as implicit GEMMs, for the inner loop's batch of one.

ANML's inner loop runs each conv layer at batch 1: 256 x 256 x 3 x 3 filters over 13 x 13 and 5 x 5
maps. There cuDNN picks generic kernels (a layout conversion, a TF32 fprop, FFMA dgrad and wgrad
engines, some split in two launches) that spent 108 of the fused inner step's 162 us on an H200
(bench/profile_meta_step.py --inner-step, 2026-11-27). Each product here is one launch of a small
GEMM whose operand tiles are gathered straight from the NCHW tensors (no im2col buffer):

  forward   y[n, co, p]  = sum_k  W[co, k] x[n, ci(k), p + d(k)]                M = C_out, N = n*p, K = C_in*kh*kw
  wgrad     dW[co, k]    = sum_np gy[n, co, p] x[n, ci(k), p + d(k)]            M = C_out, N = C_in*kh*kw, K = n*p
  dgrad     dx[n, ci, q] = sum_(co,d) W[co, ci, d] gy[n, co, q - d] (in range)  M = C_in, N = n*q, K = C_out*kh*kw

The input grad, where the maps are small enough (ANML's 256-channel layers), runs instead as a
GEMM whose reduction is only C_out long, Z[(ci, tap), p] = sum_co W[co, ci, tap] gy[n, co, p],
followed by the sum over taps of Z's shifted columns in the same program (_conv_taps_kernel): at
batch 1 the 2304-long chains of small dots were the cost, not the arithmetic.

The wgrad kernel can apply the SGD step itself (W_new = W - lr dW): the inner loop's weight gradient
is then never written. Where the output tiles are too few to fill the card (a long reduction over a
small output: the 2304-long ones, conv1's weight grad), the reduction is split over programs that
write partials; the last program of each tile to finish (an atomic counter says which) sums them
in split order and applies the SGD step: one launch, and the same bits on every run. The spatial
sizes are compile-time constants (divisions by constants in the address arithmetic; one compile
per layer shape, three in ANML): that alone took the weight grads from 16-38 us to 5-13 us.

float32 dots follow the flag PyTorch's own float32 convolutions follow: while
`torch.backends.cudnn.allow_tf32` is on (PyTorch's default) they are single TF32 products (10-bit
mantissa inputs, float32 accumulation), except for short filters (the image's layer, see
TF32_MIN_FILTER); else "tf32x3" (three TF32 products: float32 accuracy, kernels/gated_head.py
measured it, at tensor-core speed). The flag is read when the op runs (under torch.compile, when
it is traced). float64 uses IEEE FMAs.

Ops (namespace `anml_fast`, each a `torch.library.triton_op` with an explicit fake):
  conv_valid(x, weight) -> y
  conv_valid_backward(grad_y, x, weight, input_grad, weight_grad) -> (grad_x, grad_weight)
  conv_valid_sgd(grad_y, x, weight, lr) -> weight - lr * grad_weight   (a new tensor)
  conv_valid_input_grad_norm_backward(grad_y, weight, y, mean, rstd, norm_weight, norm_bias, pool)
      -> (grad_y_prev, grad_norm_weight, grad_norm_bias): the input grad, then the backward of the
      plane norm (anml_fast::plane_norm) that made the input from the previous conv's output y,
      in one launch (_conv_taps_kernel's NORM_BWD epilogue); the input grad is never returned
  conv_valid_plane_norm(x, weight, norm_weight, norm_bias, pool) -> (out, y, mean, rstd): the
      convolution and the plane norm on its output in one launch (the GEMM's last program of each
      channel block normalises its planes; short filters: _conv_direct_norm_kernel)
Shapes: x [N, C_in, H, W], weight [C_out, C_in, kh, kw], y [N, C_out, H - kh + 1, W - kw + 1];
float32 or float64, contiguous (the wrappers make them so).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._counters import MAX_TILES, counters, last_to_arrive, reset
from ._eager import EagerOp, triton_op
from ._launch import launch
from ._pdl import launch_args as pdl_args
from ._pdl import pdl_enter, pdl_launch_dependents, pdl_wait
from ._scalars import cdiv, join_double, next_pow2, split_double

SUPPORTED_DTYPES = (torch.float32, torch.float64)


@triton.jit
def _window_offsets(p, c_in, h: tl.constexpr, w: tl.constexpr, oh: tl.constexpr, ow: tl.constexpr):
    """For flat output positions p = (sample n, position q): n, q, and the offset in x of each
    position's window corner."""
    n, q = p // (oh * ow), p % (oh * ow)
    return n, q, n * (c_in * h * w) + (q // ow) * w + q % ow


@triton.jit
def _tap_offsets(k, h: tl.constexpr, w: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr):
    """For flat filter indices k = (ci, kh, kw): their offset in x from a window's corner."""
    tap = k % (KH * KW)
    return (k // (KH * KW)) * (h * w) + (tap // KW) * w + tap % KW


@triton.jit
def _finish(acc, offs, mask, Out_ptr, Part_ptr, Count_ptr, W_ptr, numel, lr_hi, lr_lo,
            SPLIT: tl.constexpr, SGD: tl.constexpr):
    """Store a program's tile: Out = acc, or W - lr * acc for the SGD step. Split over the
    reduction (grid axis 2), each program writes its partial and counts itself in on the tile's
    counter; the last to arrive sums the partials in split order (the same bits whichever program
    that is), stores the result and resets the counter to zero for the next launch. This replaces
    a second launch that summed them (5 of the inner step's 26 launches). The number of splits
    stays a runtime value: unrolling the partials' loads (one compile per split count) measured
    no faster on an H200. Returns whether this program finished the tile (the forward's norm
    epilogue counts the finished tiles)."""
    if SPLIT:
        tl.store(Part_ptr + tl.program_id(2) * numel + offs, acc, mask=mask)
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        splits = tl.num_programs(2)
        done = last_to_arrive(Count_ptr + tile, splits)
        if done:
            total = tl.load(Part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            for s in range(1, splits):
                total += tl.load(Part_ptr + s * numel + offs, mask=mask, other=0.0, cache_modifier=".cg")
            reset(Count_ptr + tile)
            if SGD:
                total = tl.load(W_ptr + offs, mask=mask, other=0.0) - join_double(lr_hi, lr_lo, total.dtype) * total
            tl.store(Out_ptr + offs, total, mask=mask)
    else:
        if SGD:
            acc = tl.load(W_ptr + offs, mask=mask, other=0.0) - join_double(lr_hi, lr_lo, acc.dtype) * acc
        tl.store(Out_ptr + offs, acc, mask=mask)
        done = tl.full((), 1, tl.int1)
    return done


@triton.jit
def _rstd(var_eps):
    if var_eps.dtype == tl.float32:
        return 1.0 / tl.sqrt_rn(var_eps)  # IEEE, not the approximate sqrt
    else:
        return 1.0 / tl.sqrt(var_eps)


@triton.jit
def _relu(z):
    return tl.where(z < 0, 0.0, z)  # a NaN stays NaN


@triton.jit
def _pool_max(best, a):
    """The max-pool's step over a window's values in row-major order: a strictly larger value or a NaN wins."""
    return tl.where((a > best) | (a != a), a, best)


@triton.jit
def _plane_norm_fwd_block(Y_ptr, Gamma_ptr, Beta_ptr, Out_ptr, Mean_ptr, Rstd_ptr, c0, channels, n_samples,
                          H: tl.constexpr, W: tl.constexpr, POOL: tl.constexpr, BLOCK_M: tl.constexpr,
                          CH_SUB: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr):
    """anml_fast::plane_norm's forward (csrc/conv_block_plane.h: two-pass mean and biased variance,
    eps 1e-5, z = fma(gamma, (y - mean) * rstd, beta), ReLU, the 2x2 max-pool's rule: row-major
    scan, a strictly larger value or a NaN) on BLOCK_M channels of every sample, CH_SUB channels at
    a time; Y was written by other programs of the launch, so it is read past L1 (.cg)."""
    dt = Out_ptr.dtype.element_ty
    OH: tl.constexpr = H // 2  # the pool's output (whole windows); defined once, outside the unrolled loop
    OW: tl.constexpr = W // 2
    j = tl.arange(0, CH_SUB)
    u = tl.arange(0, BLOCK_U)
    u_ok = u < H * W
    for n in range(n_samples):
        for sub in tl.static_range(BLOCK_M // CH_SUB):
            c = c0 + sub * CH_SUB + j
            c_ok = c < channels
            ok = c_ok[:, None] & u_ok[None, :]
            plane = n * channels + c
            y_base = Y_ptr + (plane * (H * W))[:, None]
            y = tl.load(y_base + u[None, :], mask=ok, other=0.0, cache_modifier=".cg")
            mean = tl.sum(y, axis=1) / (H * W)
            d = tl.where(ok, y - mean[:, None], 0.0)
            rstd = _rstd(tl.sum(d * d, axis=1) / (H * W) + 1e-5)
            tl.store(Mean_ptr + plane, mean, mask=c_ok)
            tl.store(Rstd_ptr + plane, rstd, mask=c_ok)
            gamma = tl.load(Gamma_ptr + c, mask=c_ok, other=0.0)[:, None]
            beta = tl.load(Beta_ptr + c, mask=c_ok, other=0.0)[:, None]
            if POOL:
                v = tl.arange(0, BLOCK_V)
                v_ok = c_ok[:, None] & (v < OH * OW)[None, :]
                corner = (v // OW) * (2 * W) + (v % OW) * 2
                best = tl.zeros((CH_SUB, BLOCK_V), dtype=dt)
                for k in tl.static_range(4):
                    val = tl.load(y_base + (corner + (k // 2) * W + k % 2)[None, :], mask=v_ok, other=0.0,
                                  cache_modifier=".cg")
                    zk = tl.fma(gamma, (val - mean[:, None]) * rstd[:, None], beta)
                    ak = _relu(zk)
                    if k == 0:
                        best = ak
                    else:
                        best = _pool_max(best, ak)
                tl.store(Out_ptr + (plane * (OH * OW))[:, None] + v[None, :], best, mask=v_ok)
            else:
                z = tl.fma(gamma, (y - mean[:, None]) * rstd[:, None], beta)
                tl.store(Out_ptr + (plane * (H * W))[:, None] + u[None, :], _relu(z), mask=ok)


@triton.jit
def _conv_fwd_kernel(X_ptr, W_ptr, Y_ptr, Part_ptr, Count_ptr, c_in, h: tl.constexpr, w: tl.constexpr, c_out,
                     oh: tl.constexpr, ow: tl.constexpr, n_pos, k_total, chunk, numel,
                     Gamma_ptr, Beta_ptr, NOut_ptr, Mean_ptr, Rstd_ptr, NCount_ptr,
                     KH: tl.constexpr, KW: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NORM_FWD: tl.constexpr, POOL: tl.constexpr, CH_SUB: tl.constexpr, BLOCK_U: tl.constexpr,
                     BLOCK_V: tl.constexpr, PDL: tl.constexpr):
    """y for a BLOCK_M (output channels) x BLOCK_N (positions) tile. NORM_FWD: then the plane norm
    of the next block on y (_plane_norm_fwd_block), in the same launch: each program that finishes
    a tile counts itself in on its channel block's counter, and the last of the block's tiles runs
    the norm on those channels (whole planes, all samples), writing NOut, Mean and Rstd."""
    pdl_enter(PDL)
    dt = Y_ptr.dtype.element_ty
    co = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    p = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ohw = oh * ow
    n, q, x_pos = _window_offsets(p, c_in, h, w, oh, ow)
    co_ok, p_ok = co < c_out, p < n_pos
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=dt)
    k_lo = tl.program_id(2) * chunk * BLOCK_K
    k_hi = tl.minimum(k_lo + chunk * BLOCK_K, k_total)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        x_k = _tap_offsets(k, h, w, KH, KW)
        a = tl.load(W_ptr + co[:, None] * k_total + k[None, :], mask=co_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(X_ptr + x_k[:, None] + x_pos[None, :], mask=k_ok[:, None] & p_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=dt)
    y_offs = (n * (c_out * ohw) + q)[None, :] + co[:, None] * ohw
    done = _finish(acc, y_offs, co_ok[:, None] & p_ok[None, :], Y_ptr, Part_ptr, Count_ptr, W_ptr, numel, 0.0, 0.0,
                   SPLIT, False)
    if NORM_FWD:
        if done:
            if last_to_arrive(NCount_ptr + tl.program_id(0), tl.num_programs(1)):
                _plane_norm_fwd_block(Y_ptr, Gamma_ptr, Beta_ptr, NOut_ptr, Mean_ptr, Rstd_ptr,
                                      tl.program_id(0) * BLOCK_M, c_out, n_pos // ohw, oh, ow, POOL, BLOCK_M, CH_SUB,
                                      BLOCK_U, BLOCK_V)
                reset(NCount_ptr + tl.program_id(0))


@triton.jit
def _direct_conv(X_ptr, W_ptr, x_base, c, c_ok, q, q_ok, C_IN: tl.constexpr, h: tl.constexpr, w: tl.constexpr,
                 ow: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, CH: tl.constexpr, BLOCK: tl.constexpr):
    """y at output positions q (a [BLOCK] vector) of channels c, by FMAs over the unrolled taps."""
    dt = X_ptr.dtype.element_ty
    x_q = x_base + (q // ow) * w + q % ow
    acc = tl.zeros((CH, BLOCK), dtype=dt)
    for k in tl.static_range(C_IN * KH * KW):
        tap = k % (KH * KW)
        wk = tl.load(W_ptr + c * (C_IN * KH * KW) + k, mask=c_ok, other=0.0)
        xk = tl.load(X_ptr + x_q + ((k // (KH * KW)) * (h * w) + (tap // KW) * w + tap % KW), mask=q_ok, other=0.0)
        acc = tl.fma(wk[:, None], xk[None, :], acc)
    return acc


@triton.jit
def _conv_direct_norm_kernel(X_ptr, W_ptr, Y_ptr, Gamma_ptr, Beta_ptr, NOut_ptr, Mean_ptr, Rstd_ptr, c_out,
                             C_IN: tl.constexpr, h: tl.constexpr, w: tl.constexpr, oh: tl.constexpr,
                             ow: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, POOL: tl.constexpr,
                             CH: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr):
    """conv_valid_plane_norm for short filters (C_in * kh * kw <= DIRECT_MAX_FILTER: the image's
    layer): each program owns CH output channels of one sample, whole planes, so it convolves them
    by FMAs (the filter's taps unrolled) and normalises them itself: no program waits on another
    (the GEMM path's last-program norm is a serial tail of 32 whole 26 x 26 planes there).
    Pooled planes of even height and width are computed as the four quarters of the pool's
    windows, and unpooled planes whole, so the statistics, the norm and the pool run on registers;
    a pooled odd plane (a row or column outside every window) stores y and normalises it after a
    barrier with _plane_norm_fwd_block. Same formulas as _plane_norm_fwd_block (two-pass mean and
    biased variance, eps 1e-5, fma(gamma, (y - mean) * rstd, beta), ReLU, the pool's NaN rule).

    Under PDL its successor launches only at its end (pdl_wait ... pdl_launch_dependents, not
    pdl_enter): launched at its start, the next convolution's 264 programs were placed while these
    128 held 128 of the 132 SMs, and the inner step lost 7 us (TF32; H200, 2026-11-29, 20 steps a
    graph replay, interleaved: 93.0 us a step against 81.6 with the late launch, 86.0 without this
    kernel; float32 94.2, 89.7, 96.8)."""
    pdl_wait(PDL)
    n = tl.program_id(1)
    c0 = tl.program_id(0) * CH
    c = c0 + tl.arange(0, CH)
    c_ok = c < c_out
    x_base = n * (C_IN * h * w)
    y_planes = Y_ptr + ((n * c_out + c) * (oh * ow))[:, None]
    gamma = tl.load(Gamma_ptr + c, mask=c_ok, other=0.0)[:, None]
    beta = tl.load(Beta_ptr + c, mask=c_ok, other=0.0)[:, None]
    if POOL and oh % 2 == 0 and ow % 2 == 0:
        OH: tl.constexpr = oh // 2
        OW: tl.constexpr = ow // 2
        v = tl.arange(0, BLOCK_V)
        v_ok = v < OH * OW
        ok = c_ok[:, None] & v_ok[None, :]
        corner = (v // OW) * (2 * ow) + (v % OW) * 2
        # the four quarters in the pool's scan order: (0, 0), (0, 1), (1, 0), (1, 1)
        y0 = _direct_conv(X_ptr, W_ptr, x_base, c, c_ok, corner, v_ok, C_IN, h, w, ow, KH, KW, CH, BLOCK_V)
        y1 = _direct_conv(X_ptr, W_ptr, x_base, c, c_ok, corner + 1, v_ok, C_IN, h, w, ow, KH, KW, CH, BLOCK_V)
        y2 = _direct_conv(X_ptr, W_ptr, x_base, c, c_ok, corner + ow, v_ok, C_IN, h, w, ow, KH, KW, CH, BLOCK_V)
        y3 = _direct_conv(X_ptr, W_ptr, x_base, c, c_ok, corner + ow + 1, v_ok, C_IN, h, w, ow, KH, KW, CH,
                          BLOCK_V)
        # masked positions hold zeros (their loads were), so they add nothing to the sums
        mean = (tl.sum(y0, axis=1) + tl.sum(y1, axis=1) + tl.sum(y2, axis=1) + tl.sum(y3, axis=1)) / (oh * ow)
        d0 = tl.where(ok, y0 - mean[:, None], 0.0)
        d1 = tl.where(ok, y1 - mean[:, None], 0.0)
        d2 = tl.where(ok, y2 - mean[:, None], 0.0)
        d3 = tl.where(ok, y3 - mean[:, None], 0.0)
        var = (tl.sum(d0 * d0, axis=1) + tl.sum(d1 * d1, axis=1) + tl.sum(d2 * d2, axis=1)
               + tl.sum(d3 * d3, axis=1)) / (oh * ow)
        rstd = _rstd(var + 1e-5)
        tl.store(y_planes + corner[None, :], y0, mask=ok)
        tl.store(y_planes + corner[None, :] + 1, y1, mask=ok)
        tl.store(y_planes + corner[None, :] + ow, y2, mask=ok)
        tl.store(y_planes + corner[None, :] + (ow + 1), y3, mask=ok)
        best = _relu(tl.fma(gamma, d0 * rstd[:, None], beta))
        a1 = _relu(tl.fma(gamma, d1 * rstd[:, None], beta))
        best = _pool_max(best, a1)
        a2 = _relu(tl.fma(gamma, d2 * rstd[:, None], beta))
        best = _pool_max(best, a2)
        a3 = _relu(tl.fma(gamma, d3 * rstd[:, None], beta))
        best = _pool_max(best, a3)
        tl.store(NOut_ptr + ((n * c_out + c) * (OH * OW))[:, None] + v[None, :], best, mask=ok)
        tl.store(Mean_ptr + n * c_out + c, mean, mask=c_ok)
        tl.store(Rstd_ptr + n * c_out + c, rstd, mask=c_ok)
    elif POOL:
        u = tl.arange(0, BLOCK_U)
        u_ok = u < oh * ow
        acc = _direct_conv(X_ptr, W_ptr, x_base, c, c_ok, u, u_ok, C_IN, h, w, ow, KH, KW, CH, BLOCK_U)
        tl.store(y_planes + u[None, :], acc, mask=c_ok[:, None] & u_ok[None, :])
        # a CTA barrier also makes the block's global stores visible to its other threads
        tl.debug_barrier()
        _plane_norm_fwd_block(Y_ptr + n * (c_out * oh * ow), Gamma_ptr, Beta_ptr,
                              NOut_ptr + n * (c_out * (oh // 2) * (ow // 2)), Mean_ptr + n * c_out,
                              Rstd_ptr + n * c_out, c0, c_out, 1, oh, ow, POOL, CH, CH, BLOCK_U, BLOCK_V)
    else:
        u = tl.arange(0, BLOCK_U)
        u_ok = u < oh * ow
        ok = c_ok[:, None] & u_ok[None, :]
        acc = _direct_conv(X_ptr, W_ptr, x_base, c, c_ok, u, u_ok, C_IN, h, w, ow, KH, KW, CH, BLOCK_U)
        mean = tl.sum(acc, axis=1) / (oh * ow)
        d = tl.where(ok, acc - mean[:, None], 0.0)
        rstd = _rstd(tl.sum(d * d, axis=1) / (oh * ow) + 1e-5)
        tl.store(y_planes + u[None, :], acc, mask=ok)
        z = tl.fma(gamma, d * rstd[:, None], beta)
        tl.store(NOut_ptr + ((n * c_out + c) * (oh * ow))[:, None] + u[None, :], _relu(z), mask=ok)
        tl.store(Mean_ptr + n * c_out + c, mean, mask=c_ok)
        tl.store(Rstd_ptr + n * c_out + c, rstd, mask=c_ok)
    pdl_launch_dependents(PDL)


@triton.jit
def _conv_wgrad_kernel(GY_ptr, X_ptr, W_ptr, Out_ptr, Part_ptr, Count_ptr, c_in, h: tl.constexpr,
                       w: tl.constexpr, c_out, oh: tl.constexpr, ow: tl.constexpr, n_pos, k_total, chunk,
                       numel, lr_hi, lr_lo, SGD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                       SPLIT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """dW (SGD=False) or W - lr dW (SGD=True) for a BLOCK_M x BLOCK_N tile of [C_out, C_in*kh*kw]."""
    pdl_enter(PDL)
    dt = Out_ptr.dtype.element_ty
    co = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok, k_ok = co < c_out, k < k_total
    x_k = _tap_offsets(k, h, w, KH, KW)
    ohw = oh * ow
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=dt)
    p_lo = tl.program_id(2) * chunk * BLOCK_K  # this kernel's reduction runs over positions
    p_hi = tl.minimum(p_lo + chunk * BLOCK_K, n_pos)
    for p0 in range(p_lo, p_hi, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        p_ok = p < p_hi
        n, q, x_pos = _window_offsets(p, c_in, h, w, oh, ow)
        a = tl.load(GY_ptr + (n * (c_out * ohw) + q)[None, :] + co[:, None] * ohw,
                    mask=co_ok[:, None] & p_ok[None, :], other=0.0)
        b = tl.load(X_ptr + x_pos[:, None] + x_k[None, :], mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=dt)
    _finish(acc, co[:, None] * k_total + k[None, :], co_ok[:, None] & k_ok[None, :], Out_ptr, Part_ptr,
            Count_ptr, W_ptr, numel, lr_hi, lr_lo, SPLIT, SGD)


@triton.jit
def _conv_dgrad_kernel(GY_ptr, W_ptr, DX_ptr, Part_ptr, Count_ptr, c_in, h: tl.constexpr, w: tl.constexpr,
                       c_out, oh: tl.constexpr, ow: tl.constexpr, n_pos, k_total, chunk, numel,
                       KH: tl.constexpr, KW: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                       TAPS_INNER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """dx for a BLOCK_M (input channels) x BLOCK_N (input positions) tile; K runs over (c_out, tap).
    TAPS_INNER: each iteration takes BLOCK_K output channels and all their taps (unrolled), so the
    bounds masks are per position (1-D) and the taps of one (c_out, c_in) pair, 36 contiguous bytes
    of W, are read back to back; else K runs flat over (c_out, tap), BLOCK_K at a time, with 2-D
    masks."""
    pdl_enter(PDL)
    dt = DX_ptr.dtype.element_ty
    ci = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    p = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    hw, ohw = h * w, oh * ow
    n, q = p // hw, p % hw
    ih, iw = q // w, q % w
    gy_n = n * (c_out * ohw)
    ci_ok, p_ok = ci < c_in, p < n_pos
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=dt)
    if TAPS_INNER:
        it_lo = tl.program_id(2) * chunk
        it_hi = tl.minimum(it_lo + chunk, tl.cdiv(c_out, BLOCK_K))
        for it in range(it_lo, it_hi):
            co = it * BLOCK_K + tl.arange(0, BLOCK_K)
            co_ok = co < c_out
            w_offs = ci[:, None] * (KH * KW) + (co * (c_in * KH * KW))[None, :]
            gy_offs = (co * ohw)[:, None] + gy_n[None, :]
            for tap in tl.static_range(KH * KW):
                y_r, y_c = ih - tap // KW, iw - tap % KW
                y_ok = (y_r >= 0) & (y_r < oh) & (y_c >= 0) & (y_c < ow) & p_ok
                a = tl.load(W_ptr + w_offs + tap, mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
                b = tl.load(GY_ptr + gy_offs + (y_r * ow + y_c)[None, :], mask=co_ok[:, None] & y_ok[None, :],
                            other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=dt)
    else:
        k_lo = tl.program_id(2) * chunk * BLOCK_K
        k_hi = tl.minimum(k_lo + chunk * BLOCK_K, k_total)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_hi
            co, tap = k // (KH * KW), k % (KH * KW)
            kh, kw = tap // KW, tap % KW
            a = tl.load(W_ptr + ci[:, None] * (KH * KW) + (co * (c_in * KH * KW) + tap)[None, :],
                        mask=ci_ok[:, None] & k_ok[None, :], other=0.0)
            y_r = ih[None, :] - kh[:, None]
            y_c = iw[None, :] - kw[:, None]
            ok = (y_r >= 0) & (y_r < oh) & (y_c >= 0) & (y_c < ow) & k_ok[:, None] & p_ok[None, :]
            b = tl.load(GY_ptr + gy_n[None, :] + (co * ohw)[:, None] + y_r * ow + y_c, mask=ok, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=dt)
    dx_offs = (n * (c_in * hw) + q)[None, :] + ci[:, None] * hw
    _finish(acc, dx_offs, ci_ok[:, None] & p_ok[None, :], DX_ptr, Part_ptr, Count_ptr, W_ptr, numel, 0.0, 0.0,
            SPLIT, False)


@triton.jit
def _taps_sum_store(Z_ptr, Out_ptr, n, c0, c_rows, bh: tl.constexpr, bw: tl.constexpr, dh: tl.constexpr,
                    dw: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DGRAD: tl.constexpr, CH: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[c0 + j, d] = sum over taps of Z[(j, tap), source(d, tap)] for the program's CH channels and
    every output position d, the taps summed in one fixed order. Z is the program's finished tile in
    global memory (row j * taps + tap, BLOCK_S columns), stored before a barrier."""
    j = tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    d_h, d_w = d // dw, d % dw
    ok = ((j < CH) & (c0 + j < c_rows))[:, None] & (d < dh * dw)[None, :]
    out = tl.zeros((BLOCK_C, BLOCK_D), dtype=Out_ptr.dtype.element_ty)
    for tap in tl.static_range(KH * KW):
        if DGRAD:  # dx[q] gathers gy's positions q - d(tap) that exist
            s_h, s_w = d_h - tap // KW, d_w - tap % KW
            s_ok = (s_h >= 0) & (s_h < bh) & (s_w >= 0) & (s_w < bw)
        else:  # y[p] gathers x's positions p + d(tap), all inside for a valid p
            s_h, s_w = d_h + tap // KW, d_w + tap % KW
            s_ok = d < dh * dw
        z = tl.load(Z_ptr + (j * (KH * KW) + tap)[:, None] * BLOCK_S + (s_h * bw + s_w)[None, :],
                    mask=ok & s_ok[None, :], other=0.0, cache_modifier=".cg")
        out += z
    tl.store(Out_ptr + n * (c_rows * dh * dw) + (c0 + j)[:, None] * (dh * dw) + d[None, :], out, mask=ok)


@triton.jit
def _plane_norm_bwd_tile(G_ptr, Y_ptr, Mean_ptr, Rstd_ptr, Gamma_ptr, Beta_ptr, DY_ptr, DGamma_ptr, DBeta_ptr,
                         n, c0, channels, H: tl.constexpr, W: tl.constexpr, POOL: tl.constexpr, CH: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_U: tl.constexpr):
    """The plane norm's backward (csrc/conv_block_plane.h, plane_backward) for CH channels of sample n:
    G holds dL/d(out) (out = the 2x2 max-pool of relu(z) when POOL, else relu(z)), Y the conv output
    y [H, W]; writes dy, and dgamma, dbeta per (sample, channel). The window's argmax is re-derived
    with the forward kernel's arithmetic (xhat = (y - mean) * rstd, z = fma(gamma, xhat, beta)) and
    its rule (row-major scan, a strictly larger value or a NaN), so the gradient goes where the
    CUDA kernels send it."""
    dt = DY_ptr.dtype.element_ty
    j = tl.arange(0, BLOCK_C)
    u = tl.arange(0, BLOCK_U)
    c = c0 + j
    c_ok = (j < CH) & (c < channels)
    u_ok = u < H * W
    ok = c_ok[:, None] & u_ok[None, :]
    plane = n * channels + c
    mean = tl.load(Mean_ptr + plane, mask=c_ok, other=0.0).to(dt)[:, None]
    rstd = tl.load(Rstd_ptr + plane, mask=c_ok, other=0.0).to(dt)[:, None]
    gamma = tl.load(Gamma_ptr + c, mask=c_ok, other=0.0)[:, None]
    beta = tl.load(Beta_ptr + c, mask=c_ok, other=0.0)[:, None]
    y_base = Y_ptr + (plane * (H * W))[:, None]
    xhat = (tl.load(y_base + u[None, :], mask=ok, other=0.0) - mean) * rstd
    z = tl.fma(gamma, xhat, beta)
    if POOL:
        OH: tl.constexpr = H // 2
        OW: tl.constexpr = W // 2
        u_h, u_w = u // W, u % W
        covered = (u_h < 2 * OH) & (u_w < 2 * OW)
        corner = (u_h // 2 * 2) * W + u_w // 2 * 2
        mine = (u_h % 2) * 2 + u_w % 2
        wok = ok & covered[None, :]
        best = tl.zeros((BLOCK_C, BLOCK_U), dtype=dt)
        arg = tl.zeros((BLOCK_C, BLOCK_U), dtype=tl.int32)
        for k in tl.static_range(4):
            v = tl.load(y_base + (corner + (k // 2) * W + k % 2)[None, :], mask=wok, other=0.0)
            zk = tl.fma(gamma, (v - mean) * rstd, beta)
            ak = tl.where(zk < 0, 0.0, zk)
            if k == 0:
                best = ak
            else:
                take = (ak > best) | (ak != ak)
                best = tl.where(take, ak, best)
                arg = tl.where(take, k, arg)
        g = tl.load(G_ptr + (plane * (OH * OW))[:, None] + ((u_h // 2) * OW + u_w // 2)[None, :], mask=wok,
                    other=0.0, cache_modifier=".cg")
        gz = tl.where(wok & (arg == mine[None, :]) & (z > 0), g, 0.0)
    else:
        g = tl.load(G_ptr + (plane * (H * W))[:, None] + u[None, :], mask=ok, other=0.0, cache_modifier=".cg")
        gz = tl.where(ok & (z > 0), g, 0.0)
    xhat = tl.where(ok, xhat, 0.0)
    dbeta = tl.sum(gz, axis=1)
    dgamma = tl.sum(gz * xhat, axis=1)
    tl.store(DBeta_ptr + plane, dbeta, mask=c_ok)
    tl.store(DGamma_ptr + plane, dgamma, mask=c_ok)
    dy = (gamma * rstd) * (gz - (dbeta / (H * W))[:, None] - xhat * (dgamma / (H * W))[:, None])
    tl.store(DY_ptr + (plane * (H * W))[:, None] + u[None, :], dy, mask=ok)


@triton.jit
def _plane_norm_bwd_kernel(G_ptr, Y_ptr, Mean_ptr, Rstd_ptr, Gamma_ptr, Beta_ptr, DY_ptr, DGamma_ptr, DBeta_ptr,
                           channels, H: tl.constexpr, W: tl.constexpr, POOL: tl.constexpr, CH: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_U: tl.constexpr, PDL: tl.constexpr):
    """_plane_norm_bwd_tile on its own: the fused op's second launch where the input grad could not
    run as _conv_taps_kernel."""
    pdl_enter(PDL)
    _plane_norm_bwd_tile(G_ptr, Y_ptr, Mean_ptr, Rstd_ptr, Gamma_ptr, Beta_ptr, DY_ptr, DGamma_ptr, DBeta_ptr,
                         tl.program_id(1), tl.program_id(0) * CH, channels, H, W, POOL, CH, BLOCK_C, BLOCK_U)


@triton.jit
def _taps_finish(Z_ptr, z_offs, z, Out_ptr, Y_ptr, Mean_ptr, Rstd_ptr, Gamma_ptr, Beta_ptr, DY_ptr, DGamma_ptr,
                 DBeta_ptr, n, c0, c_rows, bh: tl.constexpr, bw: tl.constexpr, dh: tl.constexpr, dw: tl.constexpr,
                 KH: tl.constexpr, KW: tl.constexpr, DGRAD: tl.constexpr, CH: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, NORM_BWD: tl.constexpr, NH: tl.constexpr,
                 NW: tl.constexpr, POOL: tl.constexpr, BLOCK_U: tl.constexpr):
    """_conv_taps_kernel's finished tile z: to the program's scratch slot (each thread writes what
    it holds), a barrier, the shifted sum over taps into Out, and with NORM_BWD, after another
    barrier, the previous norm's backward on the program's channels."""
    tl.store(Z_ptr + z_offs, z)
    tl.debug_barrier()
    _taps_sum_store(Z_ptr, Out_ptr, n, c0, c_rows, bh, bw, dh, dw, KH, KW, DGRAD, CH, BLOCK_S, BLOCK_C, BLOCK_D)
    if NORM_BWD:
        tl.debug_barrier()
        _plane_norm_bwd_tile(Out_ptr, Y_ptr, Mean_ptr, Rstd_ptr, Gamma_ptr, Beta_ptr, DY_ptr, DGamma_ptr, DBeta_ptr,
                             n, c0, c_rows, NH, NW, POOL, CH, BLOCK_C, BLOCK_U)


@triton.jit
def _conv_taps_kernel(B_ptr, W_ptr, Out_ptr, Part_ptr, Count_ptr, c_rows, c_red, c_in,
                      bh: tl.constexpr, bw: tl.constexpr, dh: tl.constexpr, dw: tl.constexpr, chunk,
                      Y_ptr, Mean_ptr, Rstd_ptr, Gamma_ptr, Beta_ptr, DY_ptr, DGamma_ptr, DBeta_ptr,
                      KH: tl.constexpr, KW: tl.constexpr, DGRAD: tl.constexpr, SPLIT: tl.constexpr,
                      PRECISION: tl.constexpr, CH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                      NORM_BWD: tl.constexpr, NH: tl.constexpr, NW: tl.constexpr, POOL: tl.constexpr,
                      BLOCK_U: tl.constexpr, PDL: tl.constexpr):
    """The forward (DGRAD=False) or the input grad (DGRAD=True) as a GEMM over channels only, then a
    sum over taps of shifted columns:

      Z[(c, tap), s] = sum_k  A[(c, tap), k] B[n, k, s]      s: all of B's positions
      out[n, c, d]   = sum_tap Z[(c, tap), s(d, tap)]

    forward: A = W[c, k, tap], B = x, s(p, tap) = p + d(tap);  input grad: A = W[k, c, tap],
    B = grad_y, s(q, tap) = q - d(tap). The reduction is C_in (or C_out) long, not 9 times that:
    the other kernels' 2304-long chains of dots were what made the 256-channel layers slow at batch
    1. Each program takes CH channels with all their taps (BLOCK_R >= CH * taps rows; for the input
    grad those rows are contiguous in W) and every position of one sample, so the shifted sum stays
    in the program: its Z tile goes to scratch, a barrier, then the gathers. Split over the
    reduction as _finish does: the last program of a tile sums the partials in split order.
    NORM_BWD (input grad only): the grad is that of the previous block's plane norm output, whose
    backward then runs on the program's channels in the same launch (_plane_norm_bwd_tile: conv
    output Y [NH, NW], stats, affine; writes DY and the affine's grads); Out is then scratch."""
    pdl_enter(PDL)
    dt = Out_ptr.dtype.element_ty
    TAPS: tl.constexpr = KH * KW
    BS: tl.constexpr = bh * bw
    c0 = tl.program_id(0) * CH
    n = tl.program_id(1)
    r = tl.arange(0, BLOCK_R)
    j, t = r // TAPS, r % TAPS
    r_ok = (j < CH) & (c0 + j < c_rows)
    if DGRAD:
        a_row = c0 * TAPS + r
        a_k = c_in * TAPS
    else:
        a_row = (c0 + j) * (c_in * TAPS) + t
        a_k = TAPS
    s = tl.arange(0, BLOCK_S)
    s_ok = s < BS
    b_base = B_ptr + n * (c_red * BS)
    acc = tl.zeros((BLOCK_R, BLOCK_S), dtype=dt)
    k_lo = tl.program_id(2) * chunk * BLOCK_K
    k_hi = tl.minimum(k_lo + chunk * BLOCK_K, c_red)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        a = tl.load(W_ptr + a_row[:, None] + (k * a_k)[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_base + (k * BS)[:, None] + s[None, :], mask=k_ok[:, None] & s_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=dt)
    tiles = tl.num_programs(0) * tl.num_programs(1)
    tile = tl.program_id(0) * tl.num_programs(1) + n
    numel: tl.constexpr = BLOCK_R * BLOCK_S
    z_offs = r[:, None] * BLOCK_S + s[None, :]
    mine = Part_ptr + tile * numel  # split 0's slot: the finished tile goes there
    if SPLIT:
        splits = tl.num_programs(2)
        tl.store(Part_ptr + (tl.program_id(2) * tiles + tile) * numel + z_offs, acc)
        if last_to_arrive(Count_ptr + tile, splits):
            total = tl.load(mine + z_offs, cache_modifier=".cg")
            for sp in range(1, splits):
                total += tl.load(Part_ptr + (sp * tiles + tile) * numel + z_offs, cache_modifier=".cg")
            reset(Count_ptr + tile)
            _taps_finish(mine, z_offs, total, Out_ptr, Y_ptr, Mean_ptr, Rstd_ptr, Gamma_ptr, Beta_ptr, DY_ptr,
                         DGamma_ptr, DBeta_ptr, n, c0, c_rows, bh, bw, dh, dw, KH, KW, DGRAD, CH, BLOCK_S, BLOCK_C,
                         BLOCK_D, NORM_BWD, NH, NW, POOL, BLOCK_U)
    else:
        _taps_finish(mine, z_offs, acc, Out_ptr, Y_ptr, Mean_ptr, Rstd_ptr, Gamma_ptr, Beta_ptr, DY_ptr,
                     DGamma_ptr, DBeta_ptr, n, c0, c_rows, bh, bw, dh, dw, KH, KW, DGRAD, CH, BLOCK_S, BLOCK_C,
                     BLOCK_D, NORM_BWD, NH, NW, POOL, BLOCK_U)


# ----------------------------------------------------------------------------------------------
# Configs and launchers
# ----------------------------------------------------------------------------------------------

# Tiles per GEMM, by the length of its reduction and its N (output columns):
# {kernel: [(max reduction, max N, config)]}, the first row that fits wins. "PROGRAMS" is the
# split target (see PROGRAMS below); TAPS_INNER the input grad's reduction order. The winners of
# bench/tune_conv_valid.py (graph-replayed, each candidate within 1e-5 of the float64 twin;
# bench/results/tune-conv-valid-*.json say which sweep ran which code), per product of the inner
# loop at batch 1, against the twin's cuDNN product timed the same way, H200:
#   forward   conv1 (K 27, N 676)    3.7 us  (cuDNN  4.0)
#             conv2 (K 2304, N 121) 14.8 us  (cuDNN 19.4)
#             conv3 (K 2304, N 9)    7.3 us  (cuDNN 19.0)
#   wgrad+SGD conv1 (P 676, N 27)    6.8 us  (cuDNN wgrad and the subtraction 15.7)
#             conv2 (P 121, N 2304) 11.0 us  (18.8)
#             conv3 (P 9, N 2304)    5.2 us  (10.8)
#   dgrad     conv2 (K 2304, N 169) 23.8 us  (cuDNN 15.7: still slower; TAPS_INNER, was 25.2 flat)
#             conv3 (K 2304, N 25)  12.0 us  (cuDNN 18.6; flat order, before TAPS_INNER existed)
# In TF32 (2026-11-28, H200) the sweep's only clear win was conv3's input grad in TAPS_INNER order,
# 6.4 us against the flat tile's 9.8; timed side by side on an H200 (2026-11-29) it won in float32
# too (8.6 us against 11.5), so it runs at both precisions.
# The input grads now run as _conv_taps_kernel (a 256-long GEMM over output channels, then the
# shifted sum over taps), wherever the shape fits it (_taps_fit). Its sweep on an H200 (2026-11-29,
# bench/tune_conv_valid.py --taps-only; bench/results/tune-conv-valid-taps-*.json), against the
# tiles above in the same run: conv2 10.5 us against 16.4 in TF32 and 12.7 against 24.5 in float32;
# conv3 4.1 against 6.6 in TF32. 32 rows (3 channels, all taps) a program, 86 programs, unsplit.
# As the forward it lost (conv2 16.3 against 12.4 us; conv3 even): its A tile's reduction runs
# across W's taps (stride 9), and it computes Z at every input position, so the forward keeps the
# tiles above.
# (the weight grads and conv1's forward from the sweep before the split was finished in-kernel;
# an H100 sweep of the weight grads after it found these tiles within 0.2 us of its best.)
# Small tiles everywhere: at batch 1 only small tiles and a split reduction give enough programs.
CONFIGS = {
    "fwd": [(64, 1 << 62, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2, PROGRAMS=264)),
            (1 << 62, 16, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=2, PROGRAMS=132)),
            (1 << 62, 1 << 62, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=3, PROGRAMS=264))],
    "wgrad": [(1 << 62, 64, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2, PROGRAMS=132)),
              (1 << 62, 1 << 62, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2, PROGRAMS=132))],
    "dgrad": [(1 << 62, 1 << 62, dict(TAPS_GEMM=True, BLOCK_R=32, BLOCK_K=32, num_warps=4, num_stages=3,
                                      PROGRAMS=132)),
              (1 << 62, 32, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2, PROGRAMS=132,
                                 TAPS_INNER=True)),
              (1 << 62, 1 << 62, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=2, num_stages=2, PROGRAMS=528,
                                      TAPS_INNER=True))],
}


def config(kernel: str, k: int, n: int, taps_fit: bool = False) -> dict:
    """The tiles `kernel` ("fwd", "wgrad" or "dgrad") runs with for a reduction of length k and n
    output columns. A row with TAPS_GEMM (the forward and input grad by _conv_taps_kernel) applies
    only where `taps_fit` says that kernel can take the shape."""
    for max_k, max_n, cfg in CONFIGS[kernel]:
        if k <= max_k and n <= max_n and (taps_fit or not cfg.get("TAPS_GEMM")):
            return cfg
    raise ValueError(f"conv_valid: no {kernel} config for K={k}, N={n}")


# _conv_taps_kernel holds all of one sample's positions of its channels: B's (x's or grad_y's) in
# the GEMM tile, the output's in the gather. Past these it is not the faster kernel anyway.
TAPS_MAX_SOURCE = 256
TAPS_MAX_OUTPUT = 1024
TAPS_MAX_TAPS = 16


def _taps_fit(x, weight, dgrad: bool) -> bool:
    n, c_in, h, w, c_out, kh, kw, oh, ow = _dims(x, weight)
    source, dest = (oh * ow, h * w) if dgrad else (h * w, oh * ow)
    return kh * kw <= TAPS_MAX_TAPS and source <= TAPS_MAX_SOURCE and dest <= TAPS_MAX_OUTPUT and n <= 65535


def _launch_taps(out, source, weight, dgrad: bool, cfg: dict, norm: tuple | None = None) -> None:
    """One _conv_taps_kernel launch: `source` is x (forward) or grad_y (input grad). `norm`, for
    the input grad: (y, mean, rstd, gamma, beta, pool, dy, dgamma, dbeta), the previous block's plane
    norm whose backward runs in the same launch (`out` is then the input grad's scratch)."""
    x_shape = out.shape if dgrad else source.shape
    n, c_in, h, w = x_shape
    c_out, _, kh, kw = weight.shape
    oh, ow = h - kh + 1, w - kw + 1
    c_rows, c_red, (bh, bw), (dh, dw) = ((c_in, c_out, (oh, ow), (h, w)) if dgrad
                                         else (c_out, c_in, (h, w), (oh, ow)))
    cfg = dict(cfg)
    cfg.pop("TAPS_GEMM")
    target = cfg.pop("PROGRAMS", PROGRAMS)
    taps = kh * kw
    block_r = max(cfg.pop("BLOCK_R"), next_pow2(taps))
    ch = block_r // taps
    row_tiles = cdiv(c_rows, ch)
    tiles = row_tiles * n
    block_s = max(16, next_pow2(bh * bw))
    iters = cdiv(c_red, cfg["BLOCK_K"])
    splits = max(1, min(iters, target // tiles)) if tiles <= MAX_SPLIT_TILES else 1
    chunk = cdiv(iters, splits)
    splits = cdiv(iters, chunk)
    scratch = out.new_empty((splits * tiles * block_r * block_s,))
    tile_counters = counters(out, tiles) if splits > 1 else scratch
    precision = dot_precision(out.dtype, c_in * taps)
    if norm is None:
        # every argument explicit, defaults included: wrap_triton's tracing (torch.compile,
        # AOTAutograd) rejects a launch that leaves any out
        norm_args, norm_cfg = (out,) * 8, dict(NORM_BWD=False, NH=1, NW=1, POOL=False, BLOCK_U=16)
    else:
        y, mean, rstd, gamma, beta, pool, dy, dgamma, dbeta = norm
        norm_args = (y, mean, rstd, gamma, beta, dy, dgamma, dbeta)
        norm_cfg = dict(NORM_BWD=True, NH=y.shape[2], NW=y.shape[3], POOL=bool(pool),
                        BLOCK_U=max(16, next_pow2(y.shape[2] * y.shape[3])))
    launch(_conv_taps_kernel, (row_tiles, n, splits),
        source, weight, out, scratch, tile_counters, c_rows, c_red, c_in, bh, bw, dh, dw, chunk, *norm_args,
        KH=kh, KW=kw, DGRAD=dgrad, SPLIT=splits > 1, PRECISION=precision, CH=ch, BLOCK_R=block_r, BLOCK_S=block_s,
        BLOCK_C=max(2, next_pow2(ch)), BLOCK_D=max(16, next_pow2(dh * dw)), **norm_cfg,
        **cfg, **pdl_args(out))


# Shortest filter (C_in * kh * kw) whose float32 products may run in single TF32. Shorter ones, the
# image's layer (3 x 3 x 3), keep float32 accuracy even where TF32 is allowed: they cost a few us
# either way, and ANML's images vary by about 5e-3 around a constant (README, "A float32 caveat"),
# which TF32's input rounding (2^-11 relative) would blur by about a tenth before the norm divides
# the constant out. cuDNN, under the same flag, runs that layer in FFMA float32 too.
TF32_MIN_FILTER = 256


def conv_tf32_allowed() -> bool:
    """Whether PyTorch lets a float32 convolution run in TF32. The legacy switch
    (torch.backends.cudnn.allow_tf32) refuses to answer once it and the fp32_precision API's
    settings disagree (set through both, or cuDNN's conv and RNN set apart); the conv setting,
    or the first one it inherits, then decides."""
    try:
        return torch.backends.cudnn.allow_tf32
    except RuntimeError:
        for precision in (torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.fp32_precision,
                          torch.backends.fp32_precision):
            if precision != "none":
                return precision == "tf32"
        return False  # what the legacy switch set off leaves: "none" throughout


def dot_precision(dtype: torch.dtype, filter_size: int) -> str:
    """tl.dot's input precision for `dtype` and a filter of C_in * kh * kw taps: float64 IEEE;
    float32 single TF32 where PyTorch would let a float32 convolution run in TF32
    (conv_tf32_allowed(), on by default) and the filter is long enough, else tf32x3
    (float32 accuracy). One TF32 product instead of three: the batch-1 dots are latency-bound
    chains of MMAs."""
    if dtype == torch.float64:
        return "ieee"
    if conv_tf32_allowed() and filter_size >= TF32_MIN_FILTER:
        return "tf32"
    return "tf32x3"


def _check(x: torch.Tensor, weight: torch.Tensor, op: str, grad_y: torch.Tensor | None = None):
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: x must be [N, C_in, H, W] and weight [C_out, C_in, kh, kw] with the "
                         f"same C_in, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.shape[2] < 1 or weight.shape[3] < 1:
        raise ValueError(f"{op}: the kernel must be at least 1 x 1, got weight {tuple(weight.shape)}")
    if x.shape[2] < weight.shape[2] or x.shape[3] < weight.shape[3]:
        raise ValueError(f"{op}: input {tuple(x.shape)} is smaller than the kernel {tuple(weight.shape)}")
    if max(x.numel(), weight.numel(), x.shape[0] * weight.shape[0] * x.shape[2] * x.shape[3]) >= 2 ** 31:
        raise ValueError(f"{op}: the kernels index with 32-bit offsets; x {tuple(x.shape)} with weight "
                         f"{tuple(weight.shape)} is too large (split the batch, or use the twin)")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"{op}: the Triton op takes float32 or float64, both alike, got {x.dtype} "
                        f"and {weight.dtype} (use the plain-PyTorch twin for other dtypes)")
    if x.device != weight.device:
        raise ValueError(f"{op}: x and weight must be on one device, got {x.device} and {weight.device}")
    if grad_y is not None:
        want = (x.shape[0], weight.shape[0], x.shape[2] - weight.shape[2] + 1, x.shape[3] - weight.shape[3] + 1)
        if tuple(grad_y.shape) != want or grad_y.dtype != x.dtype or grad_y.device != x.device:
            raise ValueError(f"{op}: grad_y must be {x.dtype} {list(want)} on {x.device}, got "
                             f"{grad_y.dtype} {list(grad_y.shape)} on {grad_y.device}")


def _dims(x, weight):
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    return n, c_in, h, w, c_out, kh, kw, h - kh + 1, w - kw + 1


# Split the reduction until about this many programs run (2 per SM of an H100/H200): at batch 1
# the output tiles alone are too few to fill the card, and each would run a 2304-long reduction
# serially. The default for a config without its own target ("PROGRAMS"; 1 = never split).
PROGRAMS = 264
# Split launches finish in-kernel on arrival counters (kernels/_counters.py, one per output
# tile). A split only pays when the tiles are few; past the counters' eager buffer it is not
# worth the fresh zeros a launch would then need.
MAX_SPLIT_TILES = MAX_TILES


def _launch(kernel, name, out, m, n_cols, red, head, dims, lr=None, taps=None, norm=None, **constexprs):
    """One GEMM: `head` are the kernel's tensors before its output, `dims` its ints up to k_total;
    `red` is the reduction's length, `taps` the filter's taps (the input grad may unroll them).
    Split over the reduction when its output tiles are too few to fill the card; `lr` (the weight
    grad's SGD step) is applied where the tile is finished. `norm`, for the forward:
    (gamma, beta, pool, out, mean, rstd), the plane norm run on the conv output in the same launch."""
    cfg = dict(config(name, red, n_cols))
    target = cfg.pop("PROGRAMS", PROGRAMS)
    m_tiles, n_tiles = cdiv(m, cfg["BLOCK_M"]), cdiv(n_cols, cfg["BLOCK_N"])
    if n_tiles > 65535:  # CUDA's limit on grid axes 1 and 2
        raise ValueError(f"conv_valid: {n_cols} output columns are too many for one launch of the {name} "
                         f"kernel (written for the inner loop's batch of one); split the batch, or use the twin")
    tiles = m_tiles * n_tiles
    if cfg.get("TAPS_INNER") and taps > 9:
        cfg["TAPS_INNER"] = False  # tuned for 3 x 3; a larger filter's unrolled taps only cost compile time
    # the input grad's TAPS_INNER iterations take BLOCK_K output channels with all their taps
    iters = cdiv(red // taps, cfg["BLOCK_K"]) if cfg.get("TAPS_INNER") else cdiv(red, cfg["BLOCK_K"])
    splits = max(1, min(iters, target // tiles)) if tiles <= MAX_SPLIT_TILES else 1
    chunk = cdiv(iters, splits)  # iterations a program
    splits = cdiv(iters, chunk)
    numel = out.numel()
    part = out.new_empty((splits, numel)) if splits > 1 else out
    if norm is None:
        tile_counters = counters(out, tiles) if splits > 1 else out
    else:  # the channel blocks' counters after the tiles': one call, as each hands out the same eager buffer
        tile_counters = counters(out, tiles + m_tiles)
    if kernel is _conv_fwd_kernel:
        constexprs.update(_fwd_norm_args(out, norm, out if norm is None else tile_counters[tiles:], cfg["BLOCK_M"]))
    if kernel is _conv_wgrad_kernel:  # the only GEMM that takes the learning rate
        lr_hi, lr_lo = (0.0, 0.0) if lr is None else split_double(float(lr))
        constexprs.update(SGD=lr is not None, lr_hi=lr_hi, lr_lo=lr_lo)
    precision = dot_precision(out.dtype, dims[0] * constexprs["KH"] * constexprs["KW"])  # dims[0]: C_in
    launch(kernel, (m_tiles, n_tiles, splits), *head, out, part, tile_counters, *dims, chunk, numel,
           **constexprs, SPLIT=splits > 1, PRECISION=precision, **cfg, **pdl_args(out))


def _fwd_norm_args(y, norm, norm_counters, block_m: int) -> dict:
    """_conv_fwd_kernel's norm arguments: the epilogue's, or placeholders with NORM_FWD=False
    (every argument named: wrap_triton's tracing rejects a launch that leaves one to its default)."""
    if norm is None:
        return dict(Gamma_ptr=y, Beta_ptr=y, NOut_ptr=y, Mean_ptr=y, Rstd_ptr=y, NCount_ptr=y, NORM_FWD=False,
                    POOL=False, CH_SUB=1, BLOCK_U=16, BLOCK_V=16)
    gamma, beta, pool, out, mean, rstd = norm
    plane = y.shape[2] * y.shape[3]
    block_u = max(16, next_pow2(plane))
    # at most 4096 values of y a step in registers: whole 26 x 26 planes four channels at a time
    ch_sub = min(block_m, max(1, 4096 // block_u))
    return dict(Gamma_ptr=gamma, Beta_ptr=beta, NOut_ptr=out, Mean_ptr=mean, Rstd_ptr=rstd, NCount_ptr=norm_counters,
                NORM_FWD=True, POOL=bool(pool), CH_SUB=ch_sub, BLOCK_U=block_u,
                BLOCK_V=max(16, next_pow2((y.shape[2] // 2) * (y.shape[3] // 2))))


@triton_op("anml_fast::conv_valid", mutates_args=())
def conv_valid(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    _check(x, weight, "conv_valid")
    x, weight = x.contiguous(), weight.contiguous()
    n, c_in, h, w, c_out, kh, kw, oh, ow = _dims(x, weight)
    y = x.new_empty((n, c_out, oh, ow))
    if y.numel() and c_in:
        cfg = config("fwd", c_in * kh * kw, n * oh * ow, _taps_fit(x, weight, False))
        if cfg.get("TAPS_GEMM"):
            _launch_taps(y, x, weight, False, cfg)
        else:
            _launch(_conv_fwd_kernel, "fwd", y, c_out, n * oh * ow, c_in * kh * kw, (x, weight),
                    (c_in, h, w, c_out, oh, ow, n * oh * ow, c_in * kh * kw), KH=kh, KW=kw)
    elif y.numel():
        y.zero_()
    return y


def _weight_grad(grad_y, x, weight, out, lr: float | None):
    n, c_in, h, w, c_out, kh, kw, oh, ow = _dims(x, weight)
    k = c_in * kh * kw
    if out.numel() == 0:
        return
    if n * oh * ow == 0:  # no positions: the gradient is zero
        if lr is None:
            out.zero_()
        else:
            out.copy_(weight)
        return
    _launch(_conv_wgrad_kernel, "wgrad", out, c_out, k, n * oh * ow, (grad_y, x, weight),
            (c_in, h, w, c_out, oh, ow, n * oh * ow, k), lr=lr, KH=kh, KW=kw)


@triton_op("anml_fast::conv_valid_backward", mutates_args=())
def conv_valid_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool,
                        weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weight, "conv_valid_backward", grad_y)
    grad_y, x, weight = grad_y.contiguous(), x.contiguous(), weight.contiguous()
    n, c_in, h, w, c_out, kh, kw, oh, ow = _dims(x, weight)
    grad_x = torch.empty_like(x) if input_grad else x.new_empty((0,))
    grad_w = torch.empty_like(weight) if weight_grad else weight.new_empty((0,))
    if input_grad and grad_x.numel():
        if c_out * oh * ow == 0:
            grad_x.zero_()
        else:
            cfg = config("dgrad", c_out * kh * kw, n * h * w, _taps_fit(x, weight, True))
            if cfg.get("TAPS_GEMM"):
                _launch_taps(grad_x, grad_y, weight, True, cfg)
            else:
                _launch(_conv_dgrad_kernel, "dgrad", grad_x, c_in, n * h * w, c_out * kh * kw, (grad_y, weight),
                        (c_in, h, w, c_out, oh, ow, n * h * w, c_out * kh * kw), taps=kh * kw, KH=kh, KW=kw)
    if weight_grad:
        _weight_grad(grad_y, x, weight, grad_w, None)
    return grad_x, grad_w


@triton_op("anml_fast::conv_valid_sgd", mutates_args=())
def conv_valid_sgd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lr: float) -> torch.Tensor:
    _check(x, weight, "conv_valid_sgd", grad_y)
    grad_y, x, weight = grad_y.contiguous(), x.contiguous(), weight.contiguous()
    new = torch.empty_like(weight)
    _weight_grad(grad_y, x, weight, new, lr)
    return new


# The largest conv-output plane the fused norm backward takes (one program holds whole planes).
NORM_MAX_PLANE = 4096


def _check_norm_plane_and_affine(op, h, w, c, like, norm_weight, norm_bias, instead):
    """The fused norm's limits: planes of at most NORM_MAX_PLANE positions (one program holds whole
    planes), and affine parameters [c] of `like`'s dtype and device."""
    if h * w > NORM_MAX_PLANE:
        raise ValueError(f"{op}: planes of {h} x {w} exceed the {NORM_MAX_PLANE} positions one program holds; "
                         f"run {instead} separately")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t.shape != (c,) or t.dtype != like.dtype or t.device != like.device:
            raise ValueError(f"{op}: {name} must be {like.dtype} [{c}] on {like.device}, got {t.dtype} "
                             f"{list(t.shape)} on {t.device}")


def _check_norm_backward(grad_y, weight, y, mean, rstd, norm_weight, norm_bias, pool, op):
    if y.dim() != 4:
        raise ValueError(f"{op}: y (the previous block's conv output) must be [N, C, H, W], got {tuple(y.shape)}")
    n, c, h, w = y.shape
    _check_norm_plane_and_affine(op, h, w, c, y, norm_weight, norm_bias, "conv_valid_backward and plane_norm_backward")
    x_shape = (n, c, h // 2, w // 2) if pool else (n, c, h, w)
    _check(y.new_empty((1,)).expand(x_shape), weight, op, grad_y)
    from ..ops.reference import stats_dtype  # at call time: anml_fast.ops imports this module
    stats = stats_dtype(y.dtype)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.numel() != n * c or t.dtype != stats or t.device != y.device:
            raise ValueError(f"{op}: {name} must be {stats} with N * C = {n * c} values on {y.device}, got "
                             f"{t.dtype} {list(t.shape)} on {t.device}")
    return x_shape, stats


@triton_op("anml_fast::conv_valid_input_grad_norm_backward", mutates_args=())
def conv_valid_input_grad_norm_backward(grad_y: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
                                        mean: torch.Tensor, rstd: torch.Tensor, norm_weight: torch.Tensor,
                                        norm_bias: torch.Tensor, pool: bool
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "conv_valid_input_grad_norm_backward"
    x_shape, stats = _check_norm_backward(grad_y, weight, y, mean, rstd, norm_weight, norm_bias, pool, op)
    grad_y, weight, y = grad_y.contiguous(), weight.contiguous(), y.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    n, c_in, h, w = x_shape
    c_out, _, kh, kw = weight.shape
    oh, ow = h - kh + 1, w - kw + 1
    grad_x = y.new_empty(x_shape)  # the conv's input grad: scratch, read back by the norm's backward
    dy = torch.empty_like(y)
    dgamma, dbeta = y.new_empty((n, c_in), dtype=stats), y.new_empty((n, c_in), dtype=stats)
    if dy.numel():
        x_like = y.new_empty((1,)).expand(x_shape)
        cfg = config("dgrad", c_out * kh * kw, n * h * w, _taps_fit(x_like, weight, True))
        norm = (y, mean, rstd, norm_weight, norm_bias, pool, dy, dgamma, dbeta)
        if cfg.get("TAPS_GEMM") and grad_x.numel() and c_out * oh * ow:
            _launch_taps(grad_x, grad_y, weight, True, cfg, norm)
        else:
            if grad_x.numel() and c_out * oh * ow:
                _launch(_conv_dgrad_kernel, "dgrad", grad_x, c_in, n * h * w, c_out * kh * kw, (grad_y, weight),
                        (c_in, h, w, c_out, oh, ow, n * h * w, c_out * kh * kw), taps=kh * kw, KH=kh, KW=kw)
            else:
                grad_x.zero_()
            block_u = max(16, next_pow2(y.shape[2] * y.shape[3]))
            ch = max(1, min(16, 4096 // block_u))
            launch(_plane_norm_bwd_kernel, (cdiv(c_in, ch), n),
                grad_x, y, mean, rstd, norm_weight, norm_bias, dy, dgamma, dbeta, c_in, H=y.shape[2],
                W=y.shape[3], POOL=bool(pool), CH=ch, BLOCK_C=max(2, next_pow2(ch)), BLOCK_U=block_u,
                **pdl_args(dy))
    else:
        dgamma.zero_()
        dbeta.zero_()
    if n == 1:  # no reduction launch at the inner loop's batch of one
        return dy, dgamma[0].to(norm_weight.dtype), dbeta[0].to(norm_bias.dtype)
    return dy, dgamma.sum(0).to(norm_weight.dtype), dbeta.sum(0).to(norm_bias.dtype)


def _check_plane_norm(x, weight, norm_weight, norm_bias, op):
    _check(x, weight, op)
    n, c_in, h, w, c_out, kh, kw, oh, ow = _dims(x, weight)
    _check_norm_plane_and_affine(op, oh, ow, c_out, x, norm_weight, norm_bias, "conv_valid and plane_norm")
    return n, c_out, oh, ow, (oh // 2, ow // 2)  # the pool's output: whole 2 x 2 windows


def _plane_norm_twin(y, norm_weight, norm_bias, pool):
    """(out, mean, rstd) of the plane norm by the twins: for the shapes the kernel does not take
    (no input channels, empty planes) and for conv_valid_plane_norm's backward."""
    from ..ops import reference  # at call time: anml_fast.ops imports this module
    return (reference.plane_norm(y, norm_weight, norm_bias, pool), *reference.plane_stats(y))


# Filters (C_in * kh * kw taps) this short take conv_valid_plane_norm's direct kernel, whose
# programs each own DIRECT_CHANNELS whole output planes of a sample: ANML's conv1 (3 x 3 x 3).
# Its taps are unrolled, so the bound also caps compile time. Longer filters take the GEMM.
DIRECT_MAX_FILTER = 32
DIRECT_CHANNELS = 2
DIRECT_WARPS = 4  # for planes of at most 1024 positions; twice as many past that


@triton_op("anml_fast::conv_valid_plane_norm", mutates_args=())
def conv_valid_plane_norm(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                          pool: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "conv_valid_plane_norm"
    n, c_out, oh, ow, pooled = _check_plane_norm(x, weight, norm_weight, norm_bias, op)
    x, weight = x.contiguous(), weight.contiguous()
    norm_weight, norm_bias = norm_weight.contiguous(), norm_bias.contiguous()
    _, c_in, h, w, _, kh, kw, _, _ = _dims(x, weight)
    y = x.new_empty((n, c_out, oh, ow))
    out = x.new_empty((n, c_out, *pooled) if pool else (n, c_out, oh, ow))
    mean, rstd = x.new_empty((n, c_out)), x.new_empty((n, c_out))
    if not (y.numel() and c_in):
        y.zero_()
        o, m, r = _plane_norm_twin(y, norm_weight, norm_bias, pool)
        out.copy_(o), mean.copy_(m), rstd.copy_(r)
        return out, y, mean, rstd
    if c_in * kh * kw <= DIRECT_MAX_FILTER and n <= 65535:
        block_u = max(16, next_pow2(oh * ow))
        launch(_conv_direct_norm_kernel, (cdiv(c_out, DIRECT_CHANNELS), n),
               x, weight, y, norm_weight, norm_bias, out, mean, rstd, c_out,
               C_IN=c_in, h=h, w=w, oh=oh, ow=ow, KH=kh, KW=kw, POOL=bool(pool), CH=DIRECT_CHANNELS,
               BLOCK_U=block_u, BLOCK_V=max(16, next_pow2((oh // 2) * (ow // 2))),
               num_warps=DIRECT_WARPS if block_u <= 1024 else 2 * DIRECT_WARPS, **pdl_args(y))
    else:
        _launch(_conv_fwd_kernel, "fwd", y, c_out, n * oh * ow, c_in * kh * kw, (x, weight),
                (c_in, h, w, c_out, oh, ow, n * oh * ow, c_in * kh * kw), KH=kh, KW=kw,
                norm=(norm_weight, norm_bias, pool, out, mean, rstd))
    return out, y, mean, rstd


@conv_valid_input_grad_norm_backward.register_fake
def _(grad_y, weight, y, mean, rstd, norm_weight, norm_bias, pool):
    _check_norm_backward(grad_y, weight, y, mean, rstd, norm_weight, norm_bias, pool,
                         "conv_valid_input_grad_norm_backward")
    return (torch.empty_like(y, memory_format=torch.contiguous_format), torch.empty_like(norm_weight),
            torch.empty_like(norm_bias))


# Explicit fakes: triton_op would trace the implementation, which needs wrap_triton's graph capture,
# and Triton's CPU interpreter bypasses that (see kernels/gated_head.py).
@conv_valid_plane_norm.register_fake
def _(x, weight, norm_weight, norm_bias, pool):
    n, c_out, oh, ow, pooled = _check_plane_norm(x, weight, norm_weight, norm_bias, "conv_valid_plane_norm")
    return (x.new_empty((n, c_out, *pooled) if pool else (n, c_out, oh, ow)), x.new_empty((n, c_out, oh, ow)),
            x.new_empty((n, c_out)), x.new_empty((n, c_out)))


@conv_valid.register_fake
def _(x, weight):
    _check(x, weight, "conv_valid")
    n, _, h, w, c_out, kh, kw, oh, ow = _dims(x, weight)
    return x.new_empty((n, c_out, oh, ow))


@conv_valid_backward.register_fake
def _(grad_y, x, weight, input_grad, weight_grad):
    _check(x, weight, "conv_valid_backward", grad_y)
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if input_grad else x.new_empty((0,)),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if weight_grad
            else weight.new_empty((0,)))


@conv_valid_sgd.register_fake
def _(grad_y, x, weight, lr):
    _check(x, weight, "conv_valid_sgd", grad_y)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# Autograd: first-order grads from the kernels; under create_graph (second order) the backward
# differentiates the twin (torch's conv2d), which autograd can differentiate again, as the other
# ops of the package do.
# ----------------------------------------------------------------------------------------------

def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        wanted = [t for t, nd in zip((x, weight), need) if nd]
        grads = iter(torch.autograd.grad(torch.nn.functional.conv2d(x, weight), wanted, grad_y,
                                         create_graph=True))
        return tuple(next(grads) if nd else None for nd in need)
    gx, gw = direct.conv_valid_backward(grad_y, x, weight, need[0], need[1])
    return gx if need[0] else None, gw if need[1] else None


conv_valid.register_autograd(_backward, setup_context=_setup)


def _setup_plane_norm(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.pool = inputs[4]


def _backward_plane_norm(ctx, grad_out, grad_y, grad_mean, grad_rstd):
    """First order: the norm's backward by autograd through its twin on the recomputed conv output,
    then the convolution's grads by the Triton kernels (deterministic, unlike cuDNN's). Second order
    (create_graph): differentiates the whole twin, so double backward is exact. The inner loop,
    which this op is for, runs its own backward ops instead."""
    need = ctx.needs_input_grad[:4]
    x, weight, gamma, beta = ctx.saved_tensors
    grads_in = (grad_out, grad_y, grad_mean, grad_rstd)
    if torch.is_grad_enabled():
        wanted = [t for t, nd in zip((x, weight, gamma, beta), need) if nd]
        y = torch.nn.functional.conv2d(x, weight)
        out, mean, rstd = _plane_norm_twin(y, gamma, beta, ctx.pool)
        pairs = [(o, g) for o, g in zip((out, y, mean, rstd), grads_in) if g is not None]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                         allow_unused=True))
        return (*(next(grads) if nd else None for nd in need), None)
    x, weight = x.detach(), weight.detach()
    with torch.enable_grad():
        y = direct.conv_valid(x, weight).requires_grad_()
        g_leaf, b_leaf = gamma.detach().requires_grad_(), beta.detach().requires_grad_()
        out, mean, rstd = _plane_norm_twin(y, g_leaf, b_leaf, ctx.pool)
        pairs = [(o, g) for o, g in zip((out, mean, rstd), (grad_out, grad_mean, grad_rstd)) if g is not None]
        dy, dgamma, dbeta = (torch.autograd.grad([o for o, _ in pairs], [y, g_leaf, b_leaf], [g for _, g in pairs],
                                                 allow_unused=True) if pairs else (None, None, None))
    dy = torch.zeros_like(y) if dy is None else dy
    dy = dy if grad_y is None else dy + grad_y
    dx, dw = direct.conv_valid_backward(dy, x, weight, need[0], need[1]) if need[0] or need[1] else (None, None)
    zeros = torch.zeros_like
    return (dx if need[0] else None, dw if need[1] else None,
            (zeros(gamma) if dgamma is None else dgamma) if need[2] else None,
            (zeros(beta) if dbeta is None else dbeta) if need[3] else None, None)


conv_valid_plane_norm.register_autograd(_backward_plane_norm, setup_context=_setup_plane_norm)


class direct:
    """The ops as anml_fast.ops calls them: a plain eager call runs the implementation without
    the custom-op dispatch (kernels/_eager.py), anything else goes through the registered op."""
    conv_valid = EagerOp(conv_valid, _setup, _backward)
    conv_valid_plane_norm = EagerOp(conv_valid_plane_norm, _setup_plane_norm, _backward_plane_norm)
    conv_valid_backward = EagerOp(conv_valid_backward)
    conv_valid_sgd = EagerOp(conv_valid_sgd)
    conv_valid_input_grad_norm_backward = EagerOp(conv_valid_input_grad_norm_backward)


# _backward's first-order grads as one conv_valid_backward call (grad_y, x, weight, x's grad
# wanted, weight's grad wanted) -> (grad_x, grad_w), which C++ runs from its plan
direct.conv_valid.plan_backward(direct.conv_valid_backward, ((0, 0), (1, 0), (1, 1), (2, 0b01), (2, 0b10)), (0, 1))


def interpreted() -> bool:
    """Whether these kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return type(_conv_fwd_kernel).__name__ == "InterpretedFunction"
