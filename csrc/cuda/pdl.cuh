// Programmatic dependent launch (PDL) for the package's CUDA kernels, as kernels/_pdl.py does for
// its Triton kernels (the reason is written there): a kernel launched with PDL may be placed on
// the card while the kernel before it is finishing. Each kernel's first act is pdl_enter(): wait
// until the previous kernel has completed and its writes are visible, then let the next kernel
// launch. Nothing touches memory before the wait, so results are the same with PDL or without.
// The instructions exist from sm_90 on; below that pdl_enter() is empty and launches are plain.
// ANML_FAST_PDL=0 in the environment turns PDL off (read at each launch, as the Triton side does).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace anml_fast {

__device__ __forceinline__ void pdl_enter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether launches on the current device may ask for PDL: compute capability 9.0 or more (asked
// once per device) and not switched off.
inline bool pdl_allowed() {
  const char* env = std::getenv("ANML_FAST_PDL");
  if (env != nullptr && std::strcmp(env, "0") == 0) {
    return false;
  }
  static std::array<int, 64> major{};  // 0: not asked yet
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= static_cast<int>(major.size())) {
    return false;
  }
  if (major[device] == 0) {
    int m = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, device));
    major[device] = m;
  }
  return major[device] >= 9;
}

// kernel<<<grid, block, 0, stream>>>(args...), with PDL where pdl_allowed().
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = pdl_allowed() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace anml_fast
