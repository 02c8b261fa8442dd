// anml_fast::conv_block on the CPU: ATen's convolution, then the shared per-plane normalisation
// (csrc/conv_block_plane.h, also the op anml_fast::plane_norm) walked by one thread per plane. It runs the op in CI and on machines
// without a GPU, and it is where the plane arithmetic that the CUDA kernels also use is tested.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "conv_block.h"
#include "conv_block_plane.h"

namespace anml_fast {
namespace {

struct SerialLanes {
  static constexpr int stride = 1;
  int first = 0;
  template <typename T>
  T sum(T v) const {
    return v;
  }
};

// Enough planes per task that a task is worth a thread even for the 3 x 3 planes.
int64_t planes_per_task(int64_t hw) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(hw, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> plane_norm_cpu(const at::Tensor& y,
                                                              const at::Tensor& norm_weight,
                                                              const at::Tensor& norm_bias, bool pool) {
  check_plane_norm_args(y, norm_weight, norm_bias);
  const at::Tensor conv_out = y.contiguous();
  const int64_t N = conv_out.size(0), C = conv_out.size(1);
  const int H = static_cast<int>(conv_out.size(2)), W = static_cast<int>(conv_out.size(3));
  const int64_t hw = static_cast<int64_t>(H) * W;
  const int64_t out_hw = pool ? static_cast<int64_t>(H / 2) * (W / 2) : hw;
  at::Tensor out = at::empty({N, C, pool ? H / 2 : H, pool ? W / 2 : W}, conv_out.options());
  at::Tensor mean = conv_block_stats_like(conv_out);
  at::Tensor rstd = conv_block_stats_like(conv_out);
  const at::Tensor gamma = norm_weight.contiguous(), beta = norm_bias.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "plane_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* y_ptr = conv_out.const_data_ptr<scalar_t>();
    const scalar_t* gamma_ptr = gamma.const_data_ptr<scalar_t>();
    const scalar_t* beta_ptr = beta.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    acc_t* mean_ptr = mean.mutable_data_ptr<acc_t>();
    acc_t* rstd_ptr = rstd.mutable_data_ptr<acc_t>();
    at::parallel_for(0, N * C, planes_per_task(hw), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        const plane::Norm<acc_t> n = plane::plane_stats(
            y_ptr + p * hw, hw, static_cast<acc_t>(gamma_ptr[c]), static_cast<acc_t>(beta_ptr[c]),
            SerialLanes{});
        plane::plane_forward(y_ptr + p * hw, out_ptr + p * out_hw, H, W, pool, n, SerialLanes{});
        mean_ptr[p] = n.mean;
        rstd_ptr[p] = n.rstd;
      }
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, bool pool) {
  return conv_block_with(plane_norm_cpu, x, weight, bias, norm_weight, norm_bias, pool);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> plane_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& conv_out, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& norm_weight, const at::Tensor& norm_bias, bool pool) {
  check_plane_norm_backward_args(grad_out, conv_out, mean, rstd, norm_weight, norm_bias, pool);
  const at::Tensor y = conv_out.contiguous(), gout = grad_out.contiguous();
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const at::Tensor gamma = norm_weight.contiguous(), beta = norm_bias.contiguous();
  const int64_t N = y.size(0), C = y.size(1);
  const int H = static_cast<int>(y.size(2)), W = static_cast<int>(y.size(3));
  const int64_t hw = static_cast<int64_t>(H) * W;
  const int64_t out_hw = pool ? static_cast<int64_t>(H / 2) * (W / 2) : hw;
  at::Tensor grad_y = at::empty_like(y);
  // Per-plane partial sums, reduced over the batch afterwards in a fixed order (deterministic).
  at::Tensor dgamma_part = at::empty({N, C}, mean.options());
  at::Tensor dbeta_part = at::empty({N, C}, mean.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "plane_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* y_ptr = y.const_data_ptr<scalar_t>();
    const scalar_t* gout_ptr = gout.const_data_ptr<scalar_t>();
    const scalar_t* gamma_ptr = gamma.const_data_ptr<scalar_t>();
    const scalar_t* beta_ptr = beta.const_data_ptr<scalar_t>();
    const acc_t* mean_ptr = mean_c.const_data_ptr<acc_t>();
    const acc_t* rstd_ptr = rstd_c.const_data_ptr<acc_t>();
    scalar_t* grad_y_ptr = grad_y.mutable_data_ptr<scalar_t>();
    acc_t* dgamma_ptr = dgamma_part.mutable_data_ptr<acc_t>();
    acc_t* dbeta_ptr = dbeta_part.mutable_data_ptr<acc_t>();
    at::parallel_for(0, N * C, planes_per_task(hw), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        const plane::Norm<acc_t> n{mean_ptr[p], rstd_ptr[p], static_cast<acc_t>(gamma_ptr[c]),
                                   static_cast<acc_t>(beta_ptr[c])};
        plane::plane_backward(y_ptr + p * hw, gout_ptr + p * out_hw, grad_y_ptr + p * hw, H, W,
                              pool, n, SerialLanes{}, dgamma_ptr[p], dbeta_ptr[p]);
      }
    });
  });
  return {grad_y, dgamma_part.sum(0).to(norm_weight.scalar_type()),
          dbeta_part.sum(0).to(norm_bias.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& conv_out, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, bool pool,
    std::array<bool, 3> output_mask) {
  return conv_block_backward_with(plane_norm_backward_cpu, grad_out, x, weight, conv_out, mean, rstd,
                                  norm_weight, norm_bias, pool, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(anml_fast, CPU, m) {
  m.impl("conv_block", &conv_block_cpu);
  m.impl("conv_block_backward", &conv_block_backward_cpu);
  m.impl("plane_norm", &plane_norm_cpu);
  m.impl("plane_norm_backward", &plane_norm_backward_cpu);
}

}  // namespace anml_fast
