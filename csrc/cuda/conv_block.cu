// anml_fast::conv_block on the GPU: cuDNN's convolution through ATen, then one fused kernel for
// normalisation + affine + ReLU + pooling (forward) and one for their backward, around the
// per-plane arithmetic shared with the CPU (csrc/conv_block_plane.h). The two kernels are also the
// ops anml_fast::plane_norm and plane_norm_backward, for callers that convolve by other means
// (the inner loop's batch-1 Triton convolutions, kernels/conv_valid.py).
//
// A plane (one sample's channel) holds at most 26 x 26 = 676 values in ANML, so it is given to one
// warp: its statistics are two warp shuffles away, with no shared memory or block barrier, and a
// meta-batch of 84 x 256 planes still fills the GPU. The backward recomputes xhat, z and the
// pooling argmax from the saved conv output, mean and rstd instead of storing them or an index:
// that costs a few FLOPs on values it must read anyway, and saves the forward (in the inner loop,
// at batch 1) a write of the activations.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h, which also pulls in the cuBLAS, cuSPARSE
// and cuSOLVER headers that a bare CUDA toolkit lacks; at::cuda::getCurrentCUDAStream is this function.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../conv_block.h"
#include "../conv_block_plane.h"
#include "pdl.cuh"

namespace anml_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;  // small blocks, so that the 3 x 3 layer at batch 1 still spreads

struct WarpLanes {
  static constexpr int stride = kWarp;
  int first;
  template <typename T>
  __device__ __forceinline__ T sum(T v) const {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
  }
};

// Every lane of a warp takes the same branch on `plane`, so the full-mask shuffles are safe.
template <typename scalar_t>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock) conv_block_norm_fwd_kernel(
    const scalar_t* __restrict__ y_ptr, const scalar_t* __restrict__ gamma_ptr,
    const scalar_t* __restrict__ beta_ptr, scalar_t* __restrict__ out_ptr,
    at::opmath_type<scalar_t>* __restrict__ mean_ptr,
    at::opmath_type<scalar_t>* __restrict__ rstd_ptr, int64_t planes, int64_t channels, int H,
    int W, int64_t out_plane_stride, bool pool) {
  pdl_enter();
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (plane >= planes) {
    return;
  }
  const WarpLanes lanes{static_cast<int>(threadIdx.x % kWarp)};
  const int64_t c = plane % channels;
  const int64_t hw = static_cast<int64_t>(H) * W;
  const scalar_t* y = y_ptr + plane * hw;
  const plane::Norm<acc_t> n = plane::plane_stats(y, hw, static_cast<acc_t>(gamma_ptr[c]),
                                                  static_cast<acc_t>(beta_ptr[c]), lanes);
  plane::plane_forward(y, out_ptr + plane * out_plane_stride, H, W, pool, n, lanes);
  if (lanes.first == 0) {
    mean_ptr[plane] = n.mean;
    rstd_ptr[plane] = n.rstd;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock) conv_block_norm_bwd_kernel(
    const scalar_t* __restrict__ grad_out_ptr, const scalar_t* __restrict__ y_ptr,
    const at::opmath_type<scalar_t>* __restrict__ mean_ptr,
    const at::opmath_type<scalar_t>* __restrict__ rstd_ptr,
    const scalar_t* __restrict__ gamma_ptr, const scalar_t* __restrict__ beta_ptr,
    scalar_t* __restrict__ grad_y_ptr, at::opmath_type<scalar_t>* __restrict__ dgamma_part_ptr,
    at::opmath_type<scalar_t>* __restrict__ dbeta_part_ptr, int64_t planes, int64_t channels,
    int H, int W, int64_t out_plane_stride, bool pool) {
  pdl_enter();
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (plane >= planes) {
    return;
  }
  const WarpLanes lanes{static_cast<int>(threadIdx.x % kWarp)};
  const int64_t c = plane % channels;
  const int64_t hw = static_cast<int64_t>(H) * W;
  const plane::Norm<acc_t> n{mean_ptr[plane], rstd_ptr[plane], static_cast<acc_t>(gamma_ptr[c]),
                             static_cast<acc_t>(beta_ptr[c])};
  acc_t dgamma, dbeta;
  plane::plane_backward(y_ptr + plane * hw, grad_out_ptr + plane * out_plane_stride,
                        grad_y_ptr + plane * hw, H, W, pool, n, lanes, dgamma, dbeta);
  if (lanes.first == 0) {
    dgamma_part_ptr[plane] = dgamma;
    dbeta_part_ptr[plane] = dbeta;
  }
}

unsigned int blocks_for(int64_t planes) {
  const int64_t blocks = (planes + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= 0x7fffffff, "conv_block: too many planes (", planes, ")");
  return static_cast<unsigned int>(blocks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> plane_norm_cuda(const at::Tensor& y,
                                                               const at::Tensor& norm_weight,
                                                               const at::Tensor& norm_bias, bool pool) {
  check_plane_norm_args(y, norm_weight, norm_bias);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor conv_out = y.contiguous();
  const int64_t N = conv_out.size(0), C = conv_out.size(1);
  const int H = static_cast<int>(conv_out.size(2)), W = static_cast<int>(conv_out.size(3));
  const int64_t out_hw = pool ? static_cast<int64_t>(H / 2) * (W / 2) : static_cast<int64_t>(H) * W;
  at::Tensor out = at::empty({N, C, pool ? H / 2 : H, pool ? W / 2 : W}, conv_out.options());
  at::Tensor mean = conv_block_stats_like(conv_out);
  at::Tensor rstd = conv_block_stats_like(conv_out);
  const int64_t planes = N * C;
  if (planes == 0) {
    return {out, mean, rstd};
  }
  const at::Tensor gamma = norm_weight.contiguous(), beta = norm_bias.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "plane_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_kernel(conv_block_norm_fwd_kernel<scalar_t>, blocks_for(planes), kWarp * kWarpsPerBlock, stream,
                  conv_out.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(),
                  beta.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                  mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), planes, C, H, W, out_hw,
                  pool);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, bool pool) {
  const c10::cuda::CUDAGuard guard(x.device());
  return conv_block_with(plane_norm_cuda, x, weight, bias, norm_weight, norm_bias, pool);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> plane_norm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& conv_out, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& norm_weight, const at::Tensor& norm_bias, bool pool) {
  check_plane_norm_backward_args(grad_out, conv_out, mean, rstd, norm_weight, norm_bias, pool);
  const c10::cuda::CUDAGuard guard(conv_out.device());
  const at::Tensor y = conv_out.contiguous(), gout = grad_out.contiguous();
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const at::Tensor gamma = norm_weight.contiguous(), beta = norm_bias.contiguous();
  const int64_t N = y.size(0), C = y.size(1);
  const int H = static_cast<int>(y.size(2)), W = static_cast<int>(y.size(3));
  const int64_t out_hw = pool ? static_cast<int64_t>(H / 2) * (W / 2) : static_cast<int64_t>(H) * W;
  const int64_t planes = N * C;
  at::Tensor grad_y = at::empty_like(y);
  // Per-plane partials of dgamma/dbeta, summed over the batch by ATen in a fixed order: no
  // atomics, so the gradients are deterministic. At batch 1 (the inner loop) the partials are
  // the result and that sum is a view, not a launch.
  at::Tensor dgamma_part = at::empty({N, C}, mean.options());
  at::Tensor dbeta_part = at::empty({N, C}, mean.options());
  if (planes > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "plane_norm_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch_kernel(conv_block_norm_bwd_kernel<scalar_t>, blocks_for(planes), kWarp * kWarpsPerBlock, stream,
                    gout.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                    mean_c.const_data_ptr<acc_t>(), rstd_c.const_data_ptr<acc_t>(),
                    gamma.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
                    grad_y.mutable_data_ptr<scalar_t>(), dgamma_part.mutable_data_ptr<acc_t>(),
                    dbeta_part.mutable_data_ptr<acc_t>(), planes, C, H, W, out_hw, pool);
    });
  }
  auto reduce = [&](const at::Tensor& part, const at::Tensor& like) {
    const at::Tensor total = N == 1 ? part[0] : part.sum(0);
    return total.to(like.scalar_type());
  };
  return {grad_y, reduce(dgamma_part, norm_weight), reduce(dbeta_part, norm_bias)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& conv_out, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, bool pool,
    std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(conv_out.device());
  return conv_block_backward_with(plane_norm_backward_cuda, grad_out, x, weight, conv_out, mean,
                                  rstd, norm_weight, norm_bias, pool, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(anml_fast, CUDA, m) {
  m.impl("conv_block", &conv_block_cuda);
  m.impl("conv_block_backward", &conv_block_backward_cuda);
  m.impl("plane_norm", &plane_norm_cuda);
  m.impl("plane_norm_backward", &plane_norm_backward_cuda);
}

}  // namespace anml_fast
