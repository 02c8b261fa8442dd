// Launching the package's compiled Triton kernels from C++ (kernels/_launch.py decides when).
//
// An eager batch-1 op runs its kernel for a few microseconds, and the host's work around the
// launch is the cost. Through Triton's own launcher an H200 machine (2026-11-29) spent 30 us
// between kernels/_launch.py's cache key (a Python loop over 20-35 arguments) and Triton's
// CudaLauncher (Python, then a C launcher that asks the driver about every pointer). Here one
// C call builds the same key from the arguments, finds the compiled kernel's launch recipe, packs
// the parameters and calls cuLaunchKernelEx.
//
// What the recipe holds (registered from Python after Triton's own path compiled and launched the
// kernel once): the CUfunction, its launch metadata (warps, shared memory, PDL, cooperative grid)
// and, for every parameter the compiled kernel takes, its type and which call argument (or
// default value) feeds it. The key distinguishes calls exactly as Triton specialises them: a
// constexpr or launch option by value, a tensor by dtype and 16-byte alignment, an integer by width
// and whether it is 1 or a multiple of 16, a float by type.
#ifdef ANML_FAST_WITH_CUDA

#include <Python.h>

#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "triton_launch.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

namespace anml_fast_triton {

constexpr size_t kMaxSignatures = 256;  // per kernel, as kernels/_launch.py's MAX_SIGNATURES

std::unordered_map<int64_t, Kernel> g_kernels;

// A driver function by name (through the runtime, so the extension needs no -lcuda), or null.
void* driver_entry(const char* name) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult found;
  if (cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &found) != cudaSuccess ||
      found != cudaDriverEntryPointSuccess) {
    return nullptr;
  }
  return p;
}

using LaunchEx = CUresult (*)(const CUlaunchConfig*, CUfunction, void**, void**);

LaunchEx launch_ex() {
  static LaunchEx fn = reinterpret_cast<LaunchEx>(driver_entry("cuLaunchKernelEx"));
  return fn;
}

// The driver's words for an error ("too many blocks in cooperative launch", which
// kernels/gated_head_step.py looks for, as it does in Triton's own launcher's errors).
std::string error_string(CUresult r) {
  using ErrorString = CUresult (*)(CUresult, const char**);
  static ErrorString fn = reinterpret_cast<ErrorString>(driver_entry("cuGetErrorString"));
  const char* text = nullptr;
  if (fn != nullptr && fn(r, &text) == CUDA_SUCCESS && text != nullptr) {
    return text;
  }
  return "CUresult " + std::to_string(static_cast<int>(r));
}

// Python's hash of a constexpr or launch option, tagged by type (hash(1) == hash(True) == hash(1.0)).
bool value_code(PyObject* v, std::vector<int64_t>& key) {
  if (PyLong_CheckExact(v)) {  // by value: Python's hash(-1) == hash(-2)
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow == 0 && !(x == -1 && PyErr_Occurred())) {
      key.push_back(reinterpret_cast<intptr_t>(Py_TYPE(v)));
      key.push_back(static_cast<int64_t>(x));
      return true;
    }
    PyErr_Clear();
  }
  Py_hash_t h = PyObject_Hash(v);
  if (h == -1) {  // unhashable
    PyErr_Clear();
    return false;
  }
  key.push_back(reinterpret_cast<intptr_t>(Py_TYPE(v)));
  key.push_back(static_cast<int64_t>(h));
  return true;
}

// What Triton specialises a runtime argument on. False: not a plain eager CUDA call (a tensor
// subclass, a CPU tensor, an unknown type): Triton's own path takes it.
bool runtime_code(PyObject* v, std::vector<int64_t>& key) {
  if (THPVariable_CheckExact(v)) {
    const at::Tensor& t = THPVariable_Unpack(v);
    if (!t.is_cuda()) {
      return false;
    }
    key.push_back(1);
    key.push_back((static_cast<int64_t>(t.scalar_type()) << 1) |
                  ((reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0));
    return true;
  }
  if (PyBool_Check(v)) {
    key.push_back(v == Py_True ? 3 : 2);
    return true;
  }
  if (PyLong_CheckExact(v)) {
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow != 0) {
      return false;
    }
    int64_t width = (x >= INT32_MIN && x <= INT32_MAX) ? 32 : 64;
    key.push_back(4);
    key.push_back((width << 2) | ((x == 1) << 1) | ((x & 15) == 0));
    return true;
  }
  if (PyFloat_CheckExact(v)) {
    key.push_back(5);
    return true;
  }
  if (v == Py_None) {
    key.push_back(6);
    return true;
  }
  return false;
}

// The key of a call; `values` gets the call's arguments (positional, then keyword values in call
// order), which the recipe's sources index. False: this call is not for the C++ launch.
bool call_key(int64_t kernel_id, const Kernel& k, PyObject* args, PyObject* kwargs, int device,
              std::vector<int64_t>& key, std::vector<PyObject*>& values) {
  Py_ssize_t n = PyTuple_GET_SIZE(args);
  if (n > static_cast<Py_ssize_t>(k.constexpr_positional.size())) {
    return false;
  }
  key.reserve(2 * (n + 24));
  key.push_back(kernel_id);
  key.push_back(device);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* v = PyTuple_GET_ITEM(args, i);
    values.push_back(v);
    if (!(k.constexpr_positional[i] ? value_code(v, key) : runtime_code(v, key))) {
      return false;
    }
  }
  {
    PyObject *name, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(kwargs, &pos, &name, &v)) {
      values.push_back(v);
      Py_hash_t h = PyObject_Hash(name);
      if (h == -1) {
        PyErr_Clear();
        return false;
      }
      key.push_back(static_cast<int64_t>(h));
      int runtime = PySet_Contains(k.runtime_names, name);
      if (runtime < 0) {
        PyErr_Clear();
        return false;
      }
      if (!(runtime ? runtime_code(v, key) : value_code(v, key))) {
        return false;
      }
    }
  }
  return true;
}

bool as_i64(PyObject* v, int64_t& out) {
  if (THPVariable_CheckExact(v)) {
    out = reinterpret_cast<int64_t>(THPVariable_Unpack(v).data_ptr());
    return true;
  }
  if (v == Py_None) {
    out = 0;
    return true;
  }
  out = PyLong_AsLongLong(v);  // bools are ints
  return !(out == -1 && PyErr_Occurred());
}

// Launches `e` on `stream` with its parameters' bits in slots (params, then the null scratch pointers).
CUresult launch_packed(const Entry& e, const unsigned grid[3], std::vector<uint64_t>& slots, CUstream stream) {
  std::vector<void*> params(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    params[i] = &slots[i];
  }
  CUlaunchAttribute attrs[2];
  unsigned n_attrs = 0;
  if (e.pdl) {
    attrs[n_attrs].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attrs[n_attrs++].value.programmaticStreamSerializationAllowed = 1;
  }
  if (e.cooperative) {
    attrs[n_attrs].id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
    attrs[n_attrs++].value.cooperative = 1;
  }
  CUlaunchConfig config{};
  config.gridDimX = grid[0];
  config.gridDimY = grid[1];
  config.gridDimZ = grid[2];
  config.blockDimX = 32 * e.num_warps;
  config.blockDimY = 1;
  config.blockDimZ = 1;
  config.sharedMemBytes = e.shared;
  config.hStream = stream;
  config.attrs = attrs;
  config.numAttrs = n_attrs;
  return launch_ex()(&config, e.function, params.data(), nullptr);
}

// Packs one parameter of kind `kind` (an integer or pointer x, or a float f) into its slot.
void pack(int kind, int64_t x, double f, uint64_t& slot) {
  switch (kind) {
    case kF32: { float y = static_cast<float>(f); std::memcpy(&slot, &y, sizeof y); break; }
    case kF64: std::memcpy(&slot, &f, sizeof f); break;
    case kI8: { int8_t y = static_cast<int8_t>(x); std::memcpy(&slot, &y, sizeof y); break; }
    case kI16: { int16_t y = static_cast<int16_t>(x); std::memcpy(&slot, &y, sizeof y); break; }
    case kI32: { int32_t y = static_cast<int32_t>(x); std::memcpy(&slot, &y, sizeof y); break; }
    default: std::memcpy(&slot, &x, sizeof x);  // pointers and 64-bit integers
  }
}

}  // namespace anml_fast_triton

namespace {

using namespace anml_fast_triton;

uint64_t g_hits = 0;

// triton_kernel(kernel_id, constexpr_positional: tuple[bool], runtime_names: frozenset) -> None
PyObject* triton_kernel(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  if (argc != 3 || !PyTuple_Check(argv[1]) || !PyFrozenSet_Check(argv[2])) {
    PyErr_SetString(PyExc_TypeError, "triton_kernel(kernel_id, constexpr_positional: tuple, runtime_names: frozenset)");
    return nullptr;
  }
  int64_t id = PyLong_AsLongLong(argv[0]);
  if (id == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  Kernel& k = g_kernels[id];
  k.constexpr_positional.clear();
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(argv[1]); ++i) {
    k.constexpr_positional.push_back(PyObject_IsTrue(PyTuple_GET_ITEM(argv[1], i)) == 1);
  }
  Py_XDECREF(k.runtime_names);
  Py_INCREF(argv[2]);
  k.runtime_names = argv[2];
  k.cache.clear();
  Py_RETURN_NONE;
}

// triton_register(kernel_id, args, kwargs, function, (num_warps, num_ctas, shared, pdl, cooperative),
//                 null_params, params: tuple of (kind, source, default)) -> bool
PyObject* triton_register(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  HANDLE_TH_ERRORS
  if (argc != 7 || !PyTuple_Check(argv[1]) || !PyDict_Check(argv[2]) || !PyTuple_Check(argv[4]) ||
      !PyTuple_Check(argv[6])) {
    PyErr_SetString(PyExc_TypeError,
                    "triton_register(kernel_id, args: tuple, kwargs: dict, function, meta: tuple, null_params, params: tuple)");
    return nullptr;
  }
  int64_t id = PyLong_AsLongLong(argv[0]);
  auto it = g_kernels.find(id);
  if (it == g_kernels.end() || launch_ex() == nullptr) {
    Py_RETURN_FALSE;
  }
  Kernel& k = it->second;
  std::vector<int64_t> key;
  std::vector<PyObject*> values;
  if (!call_key(id, k, argv[1], argv[2], c10::cuda::current_device(), key, values)) {
    Py_RETURN_FALSE;
  }
  Entry e;
  e.function = reinterpret_cast<CUfunction>(PyLong_AsUnsignedLongLong(argv[3]));
  int num_ctas = 1, pdl = 0, coop = 0;
  if (!PyArg_ParseTuple(argv[4], "iiipp", &e.num_warps, &num_ctas, &e.shared, &pdl, &coop)) {
    return nullptr;
  }
  if (num_ctas != 1) {  // clusters: Triton's own launcher
    Py_RETURN_FALSE;
  }
  e.pdl = pdl;
  e.cooperative = coop;
  e.null_params = static_cast<int>(PyLong_AsLong(argv[5]));
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(argv[6]); ++i) {
    Param p{};
    PyObject* d = nullptr;
    if (!PyArg_ParseTuple(PyTuple_GET_ITEM(argv[6], i), "iiO", &p.kind, &p.source, &d)) {
      return nullptr;
    }
    if (p.source >= static_cast<int>(values.size())) {
      Py_RETURN_FALSE;
    }
    if (p.source < 0) {
      if (p.kind == kF32 || p.kind == kF64) {
        p.fvalue = PyFloat_AsDouble(d);
      } else if (!as_i64(d, p.ivalue)) {
        PyErr_Clear();
        Py_RETURN_FALSE;
      }
    }
    e.params.push_back(p);
  }
  if (PyErr_Occurred()) {
    return nullptr;
  }
  if (k.cache.size() >= kMaxSignatures) {
    k.cache.clear();
  }
  k.cache[std::move(key)] = std::move(e);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// triton_launch(kernel_id, grid: tuple, args: tuple, kwargs: dict) -> int
//   1: launched; 0: no recipe for this call yet; -1: not a call for this launcher (Triton's path)
PyObject* triton_launch(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  HANDLE_TH_ERRORS
  if (argc != 4 || !PyTuple_Check(argv[1]) || !PyTuple_Check(argv[2]) || !PyDict_Check(argv[3])) {
    PyErr_SetString(PyExc_TypeError, "triton_launch(kernel_id, grid: tuple, args: tuple, kwargs: dict)");
    return nullptr;
  }
  int64_t id = PyLong_AsLongLong(argv[0]);
  auto it = g_kernels.find(id);
  if (it == g_kernels.end()) {
    return PyLong_FromLong(0);
  }
  const int device = c10::cuda::current_device();
  std::vector<int64_t> key;
  std::vector<PyObject*> values;
  if (!call_key(id, it->second, argv[2], argv[3], device, key, values)) {
    return PyLong_FromLong(-1);
  }
  auto found = it->second.cache.find(key);
  if (found == it->second.cache.end()) {
    return PyLong_FromLong(0);
  }
  const Entry& e = found->second;
  unsigned grid[3] = {1, 1, 1};
  Py_ssize_t dims = PyTuple_GET_SIZE(argv[1]);
  for (Py_ssize_t i = 0; i < dims && i < 3; ++i) {
    long g = PyLong_AsLong(PyTuple_GET_ITEM(argv[1], i));
    if (g < 0 || (g == -1 && PyErr_Occurred())) {
      if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "triton_launch: negative grid");
      }
      return nullptr;
    }
    grid[i] = static_cast<unsigned>(g);
  }
  if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0) {  // as Triton's launcher: nothing to run
    ++g_hits;
    return PyLong_FromLong(1);
  }
  std::vector<uint64_t> slots(e.params.size() + e.null_params, 0);  // the scratch pointers stay null
  for (size_t i = 0; i < e.params.size(); ++i) {
    const Param& p = e.params[i];
    PyObject* v = p.source >= 0 ? values[p.source] : nullptr;
    int64_t x = p.ivalue;
    double f = p.fvalue;
    if (p.kind == kF32 || p.kind == kF64) {
      if (v != nullptr) {
        f = PyFloat_AsDouble(v);
      }
    } else if (v != nullptr && !as_i64(v, x)) {
      return nullptr;
    }
    pack(p.kind, x, f, slots[i]);
  }
  if (PyErr_Occurred()) {
    return nullptr;
  }
  CUresult r = launch_packed(e, grid, slots, c10::cuda::getCurrentCUDAStream(device).stream());
  if (r != CUDA_SUCCESS) {
    PyErr_Format(PyExc_RuntimeError, "anml_fast: launching a cached Triton kernel failed: %s (CUresult %d)",
                 error_string(r).c_str(), static_cast<int>(r));
    return nullptr;
  }
  ++g_hits;
  return PyLong_FromLong(1);
  END_HANDLE_TH_ERRORS
}

// triton_launch_stats() -> (launches from the cache, recipes held)
PyObject* triton_launch_stats(PyObject*, PyObject*) {
  size_t held = 0;
  for (const auto& k : g_kernels) {
    held += k.second.cache.size();
  }
  return Py_BuildValue("(KK)", static_cast<unsigned long long>(g_hits), static_cast<unsigned long long>(held));
}

PyObject* triton_launch_clear(PyObject*, PyObject*) {
  for (auto& k : g_kernels) {
    k.second.cache.clear();
  }
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"triton_kernel", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(triton_kernel)), METH_FASTCALL,
     "Register a Triton kernel's parameters (which are constexpr, the runtime ones' names)."},
    {"triton_register", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(triton_register)), METH_FASTCALL,
     "Store the launch recipe of a compiled Triton kernel for calls like this one."},
    {"triton_launch", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(triton_launch)), METH_FASTCALL,
     "Launch a Triton kernel from its stored recipe: 1 launched, 0 no recipe yet, -1 not for this launcher."},
    {"triton_launch_stats", triton_launch_stats, METH_NOARGS, "(launches from stored recipes, recipes held)"},
    {"triton_launch_clear", triton_launch_clear, METH_NOARGS, "Forget every stored recipe."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

int anml_fast_add_triton_launch(PyObject* module) {
  return PyModule_AddFunctions(module, kMethods);
}

#endif  // ANML_FAST_WITH_CUDA
