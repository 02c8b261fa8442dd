// What the CPU and CUDA implementations of anml_fast::conv_block and anml_fast::plane_norm (the
// block's normalisation alone) share around their kernels: argument checks, the ATen convolution
// on either side of the fused normalisation, and the shapes of the saved statistics.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <array>
#include <tuple>

namespace anml_fast {

// The normalisation's own arguments: y [N, C, H, W] (the conv output), gamma and beta [C].
inline void check_plane_norm_args(const at::Tensor& y, const at::Tensor& norm_weight,
                                  const at::Tensor& norm_bias) {
  TORCH_CHECK(y.dim() == 4, "plane_norm: y must be [N, C, H, W], got ", y.sizes());
  TORCH_CHECK(at::isFloatingType(y.scalar_type()), "plane_norm: y must be floating point, got ",
              y.scalar_type());
  for (const at::Tensor* t : {&norm_weight, &norm_bias}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == y.size(1),
                "plane_norm: norm_weight and norm_bias must be [C] = [", y.size(1), "], got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == y.scalar_type() && t->device() == y.device(),
                "plane_norm: norm_weight and norm_bias must be ", y.scalar_type(), " on ",
                y.device(), ", got ", t->scalar_type(), " on ", t->device());
  }
}

inline void check_conv_block_args(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& bias, const at::Tensor& norm_weight,
                                  const at::Tensor& norm_bias) {
  TORCH_CHECK(x.dim() == 4, "conv_block: x must be [N, C_in, H, W], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1),
              "conv_block: weight must be [C_out, C_in, kH, kW] with C_in = ", x.size(1),
              ", got ", weight.sizes());
  const int64_t c_out = weight.size(0);
  for (const at::Tensor* t : {&bias, &norm_weight, &norm_bias}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == c_out,
                "conv_block: bias, norm_weight and norm_bias must be [C_out] = [", c_out,
                "], got ", t->sizes());
  }
  TORCH_CHECK(x.size(2) >= weight.size(2) && x.size(3) >= weight.size(3),
              "conv_block: input ", x.sizes(), " is smaller than the kernel ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "conv_block: x must be floating point, got ",
              x.scalar_type());
  for (const at::Tensor* t : {&weight, &bias, &norm_weight, &norm_bias}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "conv_block: all arguments must be ",
                x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), "conv_block: all arguments must be on ", x.device(),
                ", got ", t->device());
  }
}

// The convolution without its bias. The normalisation subtracts each plane's mean, which removes
// any per-channel constant exactly, so adding the bias would only cost a pass over the output
// (cuDNN adds it in a separate kernel). The fused kernels assume dense NCHW.
inline at::Tensor conv_block_conv(const at::Tensor& x, const at::Tensor& weight) {
  return at::conv2d(x, weight).contiguous();
}

// Per (sample, channel) statistics are kept in the op-math type (float for half/bfloat16), so the
// backward sees the forward's mean and rstd unrounded.
inline at::Tensor conv_block_stats_like(const at::Tensor& conv_out) {
  return at::empty({conv_out.size(0), conv_out.size(1)},
                   conv_out.options().dtype(at::toOpMathType(conv_out.scalar_type())));
}

// dx and dW by ATen (cuDNN on the GPU); db is exactly zero because the output does not depend on
// the bias (an unfused implementation gets rounding noise of order eps * sum|dy| instead). Grads
// not asked for come back as empty tensors, as the schema promises.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_block_conv_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    std::array<bool, 3> output_mask) {
  at::Tensor grad_x, grad_weight;
  if (output_mask[0] || output_mask[1]) {
    std::tie(grad_x, grad_weight, std::ignore) = at::convolution_backward(
        grad_y, x, weight, std::nullopt, /*stride=*/{1, 1}, /*padding=*/{0, 0},
        /*dilation=*/{1, 1}, /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1,
        {output_mask[0], output_mask[1], false});
  }
  if (!output_mask[0]) {
    grad_x = at::empty({0}, x.options());
  }
  if (!output_mask[1]) {
    grad_weight = at::empty({0}, weight.options());
  }
  at::Tensor grad_bias = output_mask[2] ? at::zeros({weight.size(0)}, weight.options())
                                        : at::empty({0}, weight.options());
  return {grad_x, grad_weight, grad_bias};
}

// What the normalisation's backward reads (the conv_block backward's and plane_norm_backward's).
inline void check_plane_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& conv_out,
                                           const at::Tensor& mean, const at::Tensor& rstd,
                                           const at::Tensor& norm_weight,
                                           const at::Tensor& norm_bias, bool pool) {
  check_plane_norm_args(conv_out, norm_weight, norm_bias);
  for (const at::Tensor* t : {&grad_out, &mean, &rstd}) {
    TORCH_CHECK(t->device() == conv_out.device(),
                "plane_norm_backward: grad_out, mean and rstd must be on ", conv_out.device(),
                ", got ", t->device());
  }
  const int64_t N = conv_out.size(0), C = conv_out.size(1);
  const int64_t H = conv_out.size(2), W = conv_out.size(3);
  const std::array<int64_t, 4> expect{N, C, pool ? H / 2 : H, pool ? W / 2 : W};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(expect), "plane_norm_backward: grad_out must be ",
              at::IntArrayRef(expect), ", got ", grad_out.sizes());
  TORCH_CHECK(mean.numel() == N * C && rstd.numel() == N * C,
              "plane_norm_backward: mean and rstd must hold N * C = ", N * C, " values");
  TORCH_CHECK(mean.scalar_type() == at::toOpMathType(conv_out.scalar_type()) &&
                  rstd.scalar_type() == mean.scalar_type(),
              "plane_norm_backward: mean and rstd must be ",
              at::toOpMathType(conv_out.scalar_type()));
  TORCH_CHECK(grad_out.scalar_type() == conv_out.scalar_type(),
              "plane_norm_backward: grad_out must be ", conv_out.scalar_type(), ", got ",
              grad_out.scalar_type());
}

// conv_block is ATen's convolution followed by the device's plane_norm; its backward is the
// device's plane_norm_backward followed by ATen's convolution backward. The CPU and CUDA files
// pass their own norm functions (and the CUDA one sets its device guard around the call).
template <typename PlaneNorm>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_with(
    PlaneNorm plane_norm, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, bool pool) {
  check_conv_block_args(x, weight, bias, norm_weight, norm_bias);
  const at::Tensor conv_out = conv_block_conv(x, weight);
  auto [out, mean, rstd] = plane_norm(conv_out, norm_weight, norm_bias, pool);
  return {out, conv_out, mean, rstd};
}

template <typename PlaneNormBackward>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_backward_with(
    PlaneNormBackward plane_norm_backward, const at::Tensor& grad_out, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& conv_out, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& norm_weight, const at::Tensor& norm_bias, bool pool,
    std::array<bool, 3> output_mask) {
  TORCH_CHECK(conv_out.dim() == 4 && conv_out.size(0) == x.size(0),
              "conv_block_backward: conv_out must be [N, C_out, H, W], got ", conv_out.sizes());
  auto [grad_y, grad_gamma, grad_beta] =
      plane_norm_backward(grad_out, conv_out, mean, rstd, norm_weight, norm_bias, pool);
  auto [grad_x, grad_weight, grad_bias] = conv_block_conv_backward(grad_y, x, weight, output_mask);
  return {grad_x, grad_weight, grad_bias, grad_gamma, grad_beta};
}

}  // namespace anml_fast
