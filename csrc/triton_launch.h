// What csrc/triton_launch.cpp (the cached launch of one Triton kernel) shares with
// csrc/triton_plan.cpp (an op's whole call replayed from C++): the stored launch recipes and the
// helpers that key, pack and launch them. CUDA builds only.
#pragma once
#ifdef ANML_FAST_WITH_CUDA

#include <Python.h>
#include <cuda.h>

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace anml_fast_triton {

enum Kind : int { kPtr = 0, kI8 = 1, kI16 = 2, kI32 = 3, kI64 = 4, kF32 = 5, kF64 = 6 };

struct Param {
  int kind;
  int source;      // index into the call's values (positional, then keyword in call order); -1: constant
  int64_t ivalue;  // the constant, for source -1
  double fvalue;
};

struct Entry {
  CUfunction function;
  int num_warps, shared;
  bool pdl, cooperative;
  int null_params;  // the trailing scratch pointers Triton's launcher appends (always null here)
  std::vector<Param> params;
};

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& k) const noexcept {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : k) {
      h ^= static_cast<uint64_t>(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    }
    return static_cast<size_t>(h);
  }
};

struct Kernel {
  std::vector<char> constexpr_positional;  // per parameter in order: constexpr?
  PyObject* runtime_names = nullptr;       // frozenset of the runtime parameters' names (owned)
  std::unordered_map<std::vector<int64_t>, Entry, KeyHash> cache;
};

extern std::unordered_map<int64_t, Kernel> g_kernels;  // by the Python kernel object's id

// The key of a launch of kernel `kernel_id` with these arguments; `values` gets the call's
// arguments (positional, then keyword values in call order), which a recipe's sources index.
// False: not a call for the C++ launch.
bool call_key(int64_t kernel_id, const Kernel& k, PyObject* args, PyObject* kwargs, int device,
              std::vector<int64_t>& key, std::vector<PyObject*>& values);
// A tensor's data pointer, None as 0, or an integer (bools are ints). False with a Python error set.
bool as_i64(PyObject* v, int64_t& out);
void pack(int kind, int64_t x, double f, uint64_t& slot);
CUresult launch_packed(const Entry& e, const unsigned grid[3], std::vector<uint64_t>& slots, CUstream stream);
std::string error_string(CUresult r);

}  // namespace anml_fast_triton

#endif  // ANML_FAST_WITH_CUDA
