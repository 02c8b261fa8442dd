// anml_fast::sgd_update and anml_fast::adam_update_ on the GPU: every tensor of the lists in one
// kernel launch, instead of one (or, for ATen's Adam, about seven) per tensor. The inner loop
// updates 14 PLN tensors 20 times per task; at batch 1 those launches, not the bytes, are the cost.
//
// The launch carries its own table of pointers and sizes as a kernel argument (under 3 KiB, inside
// the 4 KiB argument limit), so there is no host-to-device copy to order or keep alive and
// the launch can be captured in a CUDA graph. Each tensor is cut into chunks of kChunk elements,
// one block per chunk; a block finds its tensor from the table's prefix sums of chunk counts.
// Lists longer than kMaxTensors (ANML has 28 tensors, OML 16) take one launch per kMaxTensors.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h, which also pulls in the cuBLAS, cuSPARSE
// and cuSOLVER headers that a bare CUDA toolkit lacks; at::cuda::getCurrentCUDAStream is this function.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <vector>

#include "../multi_tensor.h"
#include "pdl.cuh"

namespace anml_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kPacksPerThread = 4;
constexpr int kMaxTensors = 64;

template <int kLists>
struct TensorTable {
  void* data[kLists][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_begin[kMaxTensors + 1];  // prefix sums: tensor t owns blocks [begin[t], begin[t+1])
  int32_t count;
};
static_assert(sizeof(TensorTable<4>) + 64 <= 4096, "the table must fit the kernel argument limit");

// 16-byte packs: one vector load or store per list per step.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

template <typename scalar_t>
constexpr int64_t chunk_elems() {
  return static_cast<int64_t>(kThreads) * kPacksPerThread * Pack<scalar_t>::kSize;
}

template <typename scalar_t, typename Step>
__device__ __forceinline__ void apply_one(scalar_t* const (&ptr)[Step::kLists], int64_t e,
                                          const Step& step) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t x[Step::kLists];
#pragma unroll
  for (int l = 0; l < Step::kLists; ++l) {
    x[l] = (Step::kReads >> l) & 1u ? static_cast<acc_t>(ptr[l][e]) : acc_t(0);
  }
  step(x);
#pragma unroll
  for (int l = 0; l < Step::kLists; ++l) {
    if ((Step::kWrites >> l) & 1u) {
      ptr[l][e] = static_cast<scalar_t>(x[l]);
    }
  }
}

// kVectorised: every pointer of the launch is 16-byte aligned, so the packs can be loaded whole;
// chunks start at multiples of the pack size, so only a tensor's last partial pack is scalar.
template <typename scalar_t, typename Step, bool kVectorised>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(TensorTable<Step::kLists> table,
                                                                Step step) {
  pdl_enter();
  using acc_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t>;
  constexpr int kLists = Step::kLists;
  constexpr int kVec = PackT::kSize;
  constexpr int64_t kChunk = chunk_elems<scalar_t>();

  int t = 0;
  while (t + 1 < table.count && static_cast<int32_t>(blockIdx.x) >= table.chunk_begin[t + 1]) {
    ++t;
  }
  const int64_t begin = static_cast<int64_t>(blockIdx.x - table.chunk_begin[t]) * kChunk;
  const int64_t end = begin + kChunk < table.numel[t] ? begin + kChunk : table.numel[t];
  scalar_t* ptr[kLists];
#pragma unroll
  for (int l = 0; l < kLists; ++l) {
    ptr[l] = static_cast<scalar_t*>(table.data[l][t]);
  }

  int64_t scalar_from = begin;
  if constexpr (kVectorised) {
    const int64_t packed_end = begin + (end - begin) / kVec * kVec;
    for (int64_t e = begin + static_cast<int64_t>(threadIdx.x) * kVec; e < packed_end;
         e += static_cast<int64_t>(kThreads) * kVec) {
      PackT pack[kLists];
#pragma unroll
      for (int l = 0; l < kLists; ++l) {
        if ((Step::kReads >> l) & 1u) {
          pack[l] = *reinterpret_cast<const PackT*>(ptr[l] + e);
        }
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        acc_t x[kLists];
#pragma unroll
        for (int l = 0; l < kLists; ++l) {
          x[l] = (Step::kReads >> l) & 1u ? static_cast<acc_t>(pack[l].v[k]) : acc_t(0);
        }
        step(x);
#pragma unroll
        for (int l = 0; l < kLists; ++l) {
          if ((Step::kWrites >> l) & 1u) {
            pack[l].v[k] = static_cast<scalar_t>(x[l]);
          }
        }
      }
#pragma unroll
      for (int l = 0; l < kLists; ++l) {
        if ((Step::kWrites >> l) & 1u) {
          *reinterpret_cast<PackT*>(ptr[l] + e) = pack[l];
        }
      }
    }
    scalar_from = packed_end;
  }
  for (int64_t e = scalar_from + threadIdx.x; e < end; e += kThreads) {
    apply_one<scalar_t, Step>(ptr, e, step);
  }
}

// Launches `step` over the tensors given by their per-list pointers and sizes (all of dtype
// scalar_t, contiguous, on the current device), kMaxTensors tensors per launch.
template <typename scalar_t, typename Step>
void launch_multi_tensor(const std::vector<std::array<void*, Step::kLists>>& data,
                         const std::vector<int64_t>& numel, const Step& step) {
  constexpr int kLists = Step::kLists;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  size_t i = 0;
  while (i < data.size()) {
    TensorTable<kLists> table{};
    bool aligned = true;
    int64_t blocks = 0;
    table.count = 0;
    for (; i < data.size() && table.count < kMaxTensors; ++i) {
      if (numel[i] == 0) {
        continue;
      }
      const int64_t chunks = (numel[i] + chunk_elems<scalar_t>() - 1) / chunk_elems<scalar_t>();
      if (blocks + chunks > 0x7fffffff) {
        break;
      }
      const int t = table.count++;
      for (int l = 0; l < kLists; ++l) {
        table.data[l][t] = data[i][l];
        aligned = aligned && reinterpret_cast<std::uintptr_t>(data[i][l]) % 16 == 0;
      }
      table.numel[t] = numel[i];
      table.chunk_begin[t] = static_cast<int32_t>(blocks);
      blocks += chunks;
    }
    if (table.count == 0) {
      continue;
    }
    table.chunk_begin[table.count] = static_cast<int32_t>(blocks);
    const dim3 grid(static_cast<unsigned int>(blocks));
    if (aligned) {
      launch_kernel(multi_tensor_kernel<scalar_t, Step, true>, grid, kThreads, stream, table, step);
    } else {
      launch_kernel(multi_tensor_kernel<scalar_t, Step, false>, grid, kThreads, stream, table, step);
    }
  }
}

// The tensors of the common dtype that can be walked flat go to the fused launch; the rest (views,
// other dtypes) go through ATen one by one.
std::vector<size_t> fused_subset(const std::vector<at::TensorList>& lists, int64_t count,
                                 at::ScalarType dtype) {
  std::vector<size_t> fused;
  for (int64_t i = 0; i < count; ++i) {
    if (flat_walkable(lists, static_cast<size_t>(i), dtype)) {
      fused.push_back(static_cast<size_t>(i));
    }
  }
  return fused;
}

// Where each tensor starts in one shared block: 512-byte steps, as the caching allocator would
// have placed separate allocations, so every start keeps the kernel's 16-byte packs aligned.
constexpr int64_t kCarveBytes = 512;

int64_t carve_round_up(int64_t elems, int64_t elem_bytes) {
  const int64_t step = kCarveBytes / elem_bytes;
  return (elems + step - 1) / step * step;
}

// A contiguous tensor of `sizes` over block's storage from element `offset`: a tensor of its own
// (not a view, so autograd and in-place ops treat it as any new tensor) that shares the storage.
at::Tensor carve(const at::Tensor& block, int64_t offset, at::IntArrayRef sizes) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(block.storage()), block.key_set(),
                                                   block.dtype());
  impl->set_storage_offset(offset);
  impl->set_sizes_contiguous(sizes);
  return at::Tensor(std::move(impl));
}

// From the eager entry (SgdUpdateSharedBlock), the fused tensors' results are carved from one
// allocation: at batch 1 the call's cost is the host's, and 14 separate at::empty calls
// (dispatcher and caching allocator each) were most of it (bench/host_cost.py). The block lives
// until the last of its tensors is freed; the inner loop replaces all of them together, so
// nothing is held longer there. Sharing a storage, the results act as views of one tensor do:
// torch.save of one writes the whole block, and a resize_ that grows one can run into the next.
std::vector<at::Tensor> sgd_update_cuda(at::TensorList params, at::TensorList grads, double lr) {
  const int64_t count = check_sgd_update_args(params, grads);
  std::vector<at::Tensor> out(count);
  if (count == 0) {
    return out;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const at::ScalarType dtype = params[0].scalar_type();
  const std::vector<size_t> fused = fused_subset({params, grads}, count, dtype);
  std::vector<bool> is_fused(count, false);
  std::vector<std::array<void*, 3>> data;
  std::vector<int64_t> numel;
  const int64_t elem_bytes = static_cast<int64_t>(c10::elementSize(dtype));
  const bool shared = SgdUpdateSharedBlock::take() && !fused.empty();
  at::Tensor block;
  if (shared) {
    int64_t total = 0;
    for (size_t i : fused) {
      total += carve_round_up(params[i].numel(), elem_bytes);
    }
    block = at::empty({total}, params[fused[0]].options());
  }
  int64_t offset = 0;
  for (size_t i : fused) {
    is_fused[i] = true;
    if (shared) {
      out[i] = carve(block, offset, params[i].sizes());
      offset += carve_round_up(params[i].numel(), elem_bytes);
    } else {
      out[i] = at::empty(params[i].sizes(), params[i].options());
    }
    data.push_back({const_cast<void*>(params[i].const_data_ptr()),
                    const_cast<void*>(grads[i].const_data_ptr()), out[i].mutable_data_ptr()});
    numel.push_back(params[i].numel());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sgd_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_multi_tensor<scalar_t>(data, numel, SgdStep<acc_t>{static_cast<acc_t>(lr)});
  });
  for (int64_t i = 0; i < count; ++i) {
    if (!is_fused[i]) {
      out[i] = sgd_update_one_aten(params[i], grads[i], lr);
    }
  }
  return out;
}

void adam_update_cuda_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, int64_t step, double lr, double beta1,
                       double beta2, double eps) {
  const int64_t count = check_adam_update_args(params, grads, exp_avgs, exp_avg_sqs, step);
  if (count == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const at::ScalarType dtype = params[0].scalar_type();
  const std::vector<size_t> fused = fused_subset({params, grads, exp_avgs, exp_avg_sqs}, count, dtype);
  std::vector<bool> is_fused(count, false);
  std::vector<std::array<void*, 4>> data;
  std::vector<int64_t> numel;
  for (size_t i : fused) {
    is_fused[i] = true;
    data.push_back({params[i].mutable_data_ptr(), const_cast<void*>(grads[i].const_data_ptr()),
                    exp_avgs[i].mutable_data_ptr(), exp_avg_sqs[i].mutable_data_ptr()});
    numel.push_back(params[i].numel());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "adam_update_cuda_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_multi_tensor<scalar_t>(data, numel, AdamStep<acc_t>::make(step, lr, beta1, beta2, eps));
  });
  for (int64_t i = 0; i < count; ++i) {
    if (!is_fused[i]) {
      adam_update_one_aten_(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], step, lr, beta1,
                            beta2, eps);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(anml_fast, CUDA, m) {
  m.impl("sgd_update", &sgd_update_cuda);
  m.impl("adam_update_", &adam_update_cuda_);
}

}  // namespace anml_fast
