// The per-plane arithmetic of the gated conv block's normalisation, shared by the CPU loop
// (csrc/conv_block.cpp) and the CUDA kernels (csrc/cuda/conv_block.cu). Sharing it means the CPU
// tests exercise the code that decides the GPU's numbers: the statistics, the ReLU, the pooling
// argmax and the backward formula. Only the walk over a plane differs: one CPU thread at stride 1,
// or one warp whose lanes start at their lane index, step by 32 and combine partial sums with
// `Lanes::sum`.
//
// A plane is one (sample, channel) of the conv output y, H x W, contiguous. With
// xhat = (y - mean) * rstd, z = gamma * xhat + beta, a = relu(z):
//   forward:  out = a, or the 2x2 max-pool of a (floor: a trailing odd row/column is dropped).
//   backward: gz = dL/dz (dout routed to each window's argmax, times [z > 0]);
//             dgamma = sum gz * xhat, dbeta = sum gz,
//             dy = gamma * rstd * (gz - mean(gz) - xhat * mean(gz * xhat)).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define ANML_HD __host__ __device__ __forceinline__
#define ANML_UNROLL _Pragma("unroll")
#else
#define ANML_HD inline
#define ANML_UNROLL
#endif

namespace anml_fast {
namespace plane {

constexpr double kNormEps = 1e-5;

ANML_HD float inv_sqrt(float v) {
#ifdef __CUDA_ARCH__
  return rsqrtf(v);
#else
  return 1.0f / std::sqrt(v);
#endif
}

ANML_HD double inv_sqrt(double v) {
#ifdef __CUDA_ARCH__
  return rsqrt(v);
#else
  return 1.0 / std::sqrt(v);
#endif
}

// The backward re-derives the pooling argmax from recomputed values, so the forward and backward
// kernels must round z identically. An explicit fma on the device keeps nvcc from contracting
// (or not) differently at the two call sites; the host has no contraction without -mfma.
ANML_HD float affine(float gamma, float xhat, float beta) {
#ifdef __CUDA_ARCH__
  return fmaf(gamma, xhat, beta);
#else
  return gamma * xhat + beta;
#endif
}

ANML_HD double affine(double gamma, double xhat, double beta) {
#ifdef __CUDA_ARCH__
  return fma(gamma, xhat, beta);
#else
  return gamma * xhat + beta;
#endif
}

// torch.relu keeps NaN (clamp_min propagates it); `z > 0 ? z : 0` would turn it into 0.
template <typename acc_t>
ANML_HD acc_t relu(acc_t z) {
  return z < acc_t(0) ? acc_t(0) : z;
}

template <typename acc_t>
struct Norm {
  acc_t mean, rstd, gamma, beta;
  ANML_HD acc_t xhat(acc_t y) const { return (y - mean) * rstd; }
  ANML_HD acc_t pre(acc_t xhat) const { return affine(gamma, xhat, beta); }
};

// One 2x2 pooling window: the four positions' xhat and z, and the one F.max_pool2d routes the
// gradient to. Its rule, copied: scan in row-major order, take a strictly larger value or a NaN.
// Ties among positive values have measure zero, and where all four are clamped to 0 the choice
// does not matter because relu' is 0 at every one of them.
template <typename acc_t>
struct Window {
  acc_t xhat[4];
  acc_t z[4];
  acc_t best;
  int arg;
};

template <typename scalar_t, typename acc_t>
ANML_HD Window<acc_t> load_window(const scalar_t* y, int64_t base, int W, const Norm<acc_t>& n) {
  Window<acc_t> w{};
ANML_UNROLL
  for (int j = 0; j < 4; ++j) {
    const acc_t v = static_cast<acc_t>(y[base + (j >> 1) * W + (j & 1)]);
    w.xhat[j] = n.xhat(v);
    w.z[j] = n.pre(w.xhat[j]);
    const acc_t a = relu(w.z[j]);
    if (j == 0 || a > w.best || a != a) {
      w.best = a;
      w.arg = j;
    }
  }
  return w;
}

// Mean, then the mean squared deviation from it: two passes over a plane that sits in cache,
// for the accuracy of the textbook formula without E[y^2] - E[y]^2's cancellation.
template <typename scalar_t, typename acc_t, typename Lanes>
ANML_HD Norm<acc_t> plane_stats(const scalar_t* y, int64_t hw, acc_t gamma, acc_t beta,
                                const Lanes& lanes) {
  acc_t s = 0;
  for (int64_t i = lanes.first; i < hw; i += Lanes::stride) {
    s += static_cast<acc_t>(y[i]);
  }
  const acc_t mean = lanes.sum(s) / static_cast<acc_t>(hw);
  acc_t q = 0;
  for (int64_t i = lanes.first; i < hw; i += Lanes::stride) {
    const acc_t d = static_cast<acc_t>(y[i]) - mean;
    q += d * d;
  }
  const acc_t var = lanes.sum(q) / static_cast<acc_t>(hw);
  return Norm<acc_t>{mean, inv_sqrt(var + static_cast<acc_t>(kNormEps)), gamma, beta};
}

template <typename scalar_t, typename acc_t, typename Lanes>
ANML_HD void plane_forward(const scalar_t* y, scalar_t* out, int H, int W, bool pool,
                           const Norm<acc_t>& n, const Lanes& lanes) {
  if (!pool) {
    const int64_t hw = static_cast<int64_t>(H) * W;
    for (int64_t i = lanes.first; i < hw; i += Lanes::stride) {
      out[i] = static_cast<scalar_t>(relu(n.pre(n.xhat(static_cast<acc_t>(y[i])))));
    }
    return;
  }
  const int OW = W / 2;
  const int64_t windows = static_cast<int64_t>(H / 2) * OW;
  for (int64_t p = lanes.first; p < windows; p += Lanes::stride) {
    const int64_t oh = p / OW, ow = p % OW;
    out[p] = static_cast<scalar_t>(load_window(y, 2 * oh * W + 2 * ow, W, n).best);
  }
}

// Calls visit(position, gz, xhat) for the positions of a plane: every one (with_uncovered), or
// only those that can carry a gradient (the pooling drops a trailing odd row/column, whose gz is
// 0 but whose dy is not, through the mean terms).
template <typename scalar_t, typename acc_t, typename Lanes, typename Visit>
ANML_HD void plane_visit_grad(const scalar_t* y, const scalar_t* gout, int H, int W, bool pool,
                              bool with_uncovered, const Norm<acc_t>& n, const Lanes& lanes,
                              Visit&& visit) {
  if (!pool) {
    const int64_t hw = static_cast<int64_t>(H) * W;
    for (int64_t i = lanes.first; i < hw; i += Lanes::stride) {
      const acc_t xhat = n.xhat(static_cast<acc_t>(y[i]));
      // relu's backward passes the gradient where its output is > 0 (threshold_backward).
      const acc_t gz = n.pre(xhat) > acc_t(0) ? static_cast<acc_t>(gout[i]) : acc_t(0);
      visit(i, gz, xhat);
    }
    return;
  }
  const int OH = H / 2, OW = W / 2;
  const int64_t windows = static_cast<int64_t>(OH) * OW;
  for (int64_t p = lanes.first; p < windows; p += Lanes::stride) {
    const int64_t oh = p / OW, ow = p % OW;
    const int64_t base = 2 * oh * W + 2 * ow;
    const Window<acc_t> w = load_window(y, base, W, n);
    const acc_t g = static_cast<acc_t>(gout[p]);
ANML_UNROLL
    for (int j = 0; j < 4; ++j) {
      const acc_t gz = (j == w.arg && w.z[j] > acc_t(0)) ? g : acc_t(0);
      visit(base + (j >> 1) * W + (j & 1), gz, w.xhat[j]);
    }
  }
  if (!with_uncovered) {
    return;
  }
  const int64_t row_tail = static_cast<int64_t>(H - 2 * OH) * W;      // the last row, if H is odd
  const int64_t col_tail = static_cast<int64_t>(W - 2 * OW) * 2 * OH;  // the last column above it
  for (int64_t q = lanes.first; q < row_tail + col_tail; q += Lanes::stride) {
    const int64_t pos = q < row_tail ? 2 * static_cast<int64_t>(OH) * W + q
                                     : (q - row_tail) * W + (W - 1);
    visit(pos, acc_t(0), n.xhat(static_cast<acc_t>(y[pos])));
  }
}

// Writes dy for the plane and returns its contributions to dgamma and dbeta. Two passes that
// both recompute from y: the sums must be complete before any dy can be written, and keeping gz
// in dy's buffer between the passes would round it to half/bfloat16 there.
template <typename scalar_t, typename acc_t, typename Lanes>
ANML_HD void plane_backward(const scalar_t* y, const scalar_t* gout, scalar_t* dy, int H, int W,
                            bool pool, const Norm<acc_t>& n, const Lanes& lanes, acc_t& dgamma,
                            acc_t& dbeta) {
  acc_t s_gz = 0, s_gz_xhat = 0;
  plane_visit_grad(y, gout, H, W, pool, false, n, lanes, [&](int64_t, acc_t gz, acc_t xhat) {
    s_gz += gz;
    s_gz_xhat += gz * xhat;
  });
  dbeta = lanes.sum(s_gz);
  dgamma = lanes.sum(s_gz_xhat);
  const acc_t hw = static_cast<acc_t>(static_cast<int64_t>(H) * W);
  const acc_t scale = n.gamma * n.rstd;
  const acc_t mean_gz = dbeta / hw;
  const acc_t mean_gz_xhat = dgamma / hw;
  plane_visit_grad(y, gout, H, W, pool, true, n, lanes, [&](int64_t pos, acc_t gz, acc_t xhat) {
    dy[pos] = static_cast<scalar_t>(scale * (gz - mean_gz - xhat * mean_gz_xhat));
  });
}

}  // namespace plane
}  // namespace anml_fast
