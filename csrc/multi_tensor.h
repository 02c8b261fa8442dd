// The per-element arithmetic of the multi-tensor inner-loop updates, shared by the CPU loops
// (csrc/multi_tensor.cpp) and the single CUDA launch (csrc/cuda/multi_tensor.cu), plus the checks
// and the per-tensor ATen path both fall back on for tensors a flat loop cannot walk.
//
// Each step sees one element of every list as op-math values x[0..kLists) and updates in place
// the ones its kWrites bits name; kReads names the ones it needs loaded.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "conv_block_plane.h"  // ANML_HD

namespace anml_fast {

// out = p - lr * g, lists (params, grads, out).
template <typename acc_t>
struct SgdStep {
  static constexpr int kLists = 3;
  static constexpr unsigned kReads = 0b011;
  static constexpr unsigned kWrites = 0b100;
  acc_t lr;
  ANML_HD void operator()(acc_t (&x)[3]) const { x[2] = x[0] - lr * x[1]; }
};

// torch.optim.Adam (foreach=False, no amsgrad, no weight decay), lists (params, grads, exp_avgs,
// exp_avg_sqs), in the same order of operations as its single-tensor path:
//   m.lerp_(g, 1 - beta1); v.mul_(beta2).addcmul_(g, g, value=1 - beta2);
//   p.addcdiv_(m, v.sqrt() / sqrt(1 - beta2^t) + eps, value=-lr / (1 - beta1^t)).
// The scalars are formed in double on the host, as Python forms them, then rounded once.
template <typename acc_t>
struct AdamStep {
  static constexpr int kLists = 4;
  static constexpr unsigned kReads = 0b1111;
  static constexpr unsigned kWrites = 0b1101;
  acc_t lerp_weight, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size;

  static AdamStep make(int64_t step, double lr, double beta1, double beta2, double eps) {
    const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
    const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
    return AdamStep{static_cast<acc_t>(1.0 - beta1), static_cast<acc_t>(beta2),
                    static_cast<acc_t>(1.0 - beta2),
                    static_cast<acc_t>(std::sqrt(bias_correction2)), static_cast<acc_t>(eps),
                    static_cast<acc_t>(-(lr / bias_correction1))};
  }

  ANML_HD void operator()(acc_t (&x)[4]) const {
    const acc_t g = x[1];
    acc_t m = x[2], v = x[3];
    // at::lerp's two-sided formula, which is exact at both ends of the weight range.
    m = lerp_weight < acc_t(0.5) ? m + lerp_weight * (g - m)
                                 : g - (g - m) * (acc_t(1) - lerp_weight);
    v = v * beta2 + one_minus_beta2 * g * g;
    const acc_t denom = sqrt_(v) / bias_correction2_sqrt + eps;
    x[0] = x[0] + neg_step_size * (m / denom);
    x[2] = m;
    x[3] = v;
  }

 private:
  ANML_HD static float sqrt_(float v) {
#ifdef __CUDA_ARCH__
    return sqrtf(v);
#else
    return std::sqrt(v);
#endif
  }
  ANML_HD static double sqrt_(double v) {
#ifdef __CUDA_ARCH__
    return sqrt(v);
#else
    return std::sqrt(v);
#endif
  }
};

// Checks shared by both devices: the message of what is wrong, or empty.
std::string sgd_update_problem(at::TensorList params, at::TensorList grads);
std::string adam_update_problem(at::TensorList params, at::TensorList grads,
                                at::TensorList exp_avgs, at::TensorList exp_avg_sqs, int64_t step);
// The same, thrown; returns the number of tensors.
int64_t check_sgd_update_args(at::TensorList params, at::TensorList grads);
int64_t check_adam_update_args(at::TensorList params, at::TensorList grads,
                               at::TensorList exp_avgs, at::TensorList exp_avg_sqs, int64_t step);

// Whether sgd_update's CUDA kernel may carve its results from one shared allocation. Only the
// eager entry (sgd_update_eager: plain tensors, no torch-function or dispatch mode) allows it, for
// its own dispatcher call on this thread: the registered op, as torch.compile and opcheck see it,
// keeps one allocation per result, as its fake implementation says (results that share a storage
// count as aliasing each other there).
struct SgdUpdateSharedBlock {
  SgdUpdateSharedBlock();
  ~SgdUpdateSharedBlock();
  SgdUpdateSharedBlock(const SgdUpdateSharedBlock&) = delete;
  SgdUpdateSharedBlock& operator=(const SgdUpdateSharedBlock&) = delete;
  // Whether this call may carve; it takes the permission, so an sgd_update nested inside the same
  // dispatcher call (a Python kernel of another key, say) does not inherit it.
  static bool take();

 private:
  bool was_;
};

// Whether tensor i of the lists can be walked as one flat array of `dtype`: dense, contiguous,
// and of that dtype in every list.
bool flat_walkable(const std::vector<at::TensorList>& lists, size_t i, at::ScalarType dtype);

// One tensor through ATen ops, on any device: for tensors flat_walkable rejects (strided views,
// mixed dtypes), so the fast paths never have to be general.
at::Tensor sgd_update_one_aten(const at::Tensor& param, const at::Tensor& grad, double lr);
void adam_update_one_aten_(const at::Tensor& param, const at::Tensor& grad,
                           const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, int64_t step,
                           double lr, double beta1, double beta2, double eps);

}  // namespace anml_fast
