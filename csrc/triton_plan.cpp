// An op's whole eager call replayed from C++: its output allocations and its Triton launches
// (kernels/_plan.py records them; kernels/_eager.py calls here first).
//
// With each launch already in C++ (csrc/triton_launch.cpp), an eager batch-1 op still spent most
// of its host time in its own Python: input checks, output allocation, the tile choice, the
// keyword arguments of each launch (conv2's forward: about 45 us on an H200 machine against 33 us
// for cuDNN's whole call). That Python is a function of what the plan key below holds: the
// arguments' dtypes, shapes, strides, 16-byte alignment and scalar values, the device and stream,
// and the two global switches the kernels read (TF32 for float32 convolutions, PDL). So a call
// with a key seen before can skip it: allocate the same outputs and scratch, and launch the same
// recipes with the new tensors' pointers in place of the recorded ones.
//
// A plan is used only once two recordings of its key agree exactly (the same steps, grids,
// constants and allocations): kernels/_plan.py refuses to record a call that does anything but
// allocate, launch, and call a few ATen ops (its _STEPS: the cuBLAS products of the batch-84
// head and their transposes, replayed here through the dispatcher), or that hands a kernel a
// tensor other than an input, a fresh allocation, such an op's result or a registered persistent
// buffer (the arrival counters). A key whose recordings do not agree is refused for good.
//
// The autograd half: `plan_autograd` runs an op's forward plan and records a C++ autograd node
// whose backward runs the backward op's plan, on the engine's device thread without the GIL.
// Where that plan is missing, or a second-order graph is wanted (grad mode on in the backward),
// the node calls the op's Python backward.
#ifdef ANML_FAST_WITH_CUDA

#include <Python.h>

#include <ATen/Context.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/ops/empty_strided.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include "python_grads.h"
#include "triton_launch.h"

namespace {

using namespace anml_fast_triton;

// One argument of an op call, as the plan key and the bindings see it.
struct Arg {
  enum Type { kTensor, kBool, kInt, kFloat, kNone } type;
  at::Tensor tensor;
  int64_t i = 0;
  double f = 0.0;
  bool same_constant(const Arg& o) const {  // for non-tensors
    return type == o.type && i == o.i && std::memcmp(&f, &o.f, sizeof f) == 0;
  }
  c10::IValue ivalue() const {
    switch (type) {
      case kBool: return c10::IValue(i != 0);
      case kInt: return c10::IValue(i);
      case kFloat: return c10::IValue(f);
      default: return c10::IValue();
    }
  }
};

// Where a launch parameter's value comes from.
struct Binding {
  int src;  // 0: the constant below; 1: input `index`; 2: allocation `index`; 3: ATen steps' result `index`
  int index;
  int64_t ivalue;
  double fvalue;
  bool operator==(const Binding& o) const {
    return src == o.src && index == o.index && ivalue == o.ivalue &&
           (src != 0 || std::memcmp(&fvalue, &o.fvalue, sizeof fvalue) == 0);
  }
};

struct PlanLaunch {
  Entry entry;
  unsigned grid[3];
  std::vector<Binding> params;  // one per entry.params
  bool operator==(const PlanLaunch& o) const {
    return entry.function == o.entry.function && entry.num_warps == o.entry.num_warps &&
           entry.shared == o.entry.shared && entry.pdl == o.entry.pdl && entry.cooperative == o.entry.cooperative &&
           entry.null_params == o.entry.null_params && grid[0] == o.grid[0] && grid[1] == o.grid[1] &&
           grid[2] == o.grid[2] && params == o.params;
  }
};

// An ATen op called through the dispatcher (kernels/_plan.py's _STEPS), below autograd as in the
// op's implementation; its new results become the steps' results the later steps bind.
struct AtenStep {
  std::string name, overload;
  std::optional<c10::OperatorHandle> op;
  std::vector<Arg> constants;  // per schema argument (kNone where a tensor is bound)
  std::vector<Binding> binds;  // per schema argument; src 0: the constant
  std::vector<int> slots;      // per return: its index among the steps' results, -1 if already bound
  bool operator==(const AtenStep& o) const {
    if (name != o.name || overload != o.overload || binds != o.binds || slots != o.slots ||
        constants.size() != o.constants.size()) {
      return false;
    }
    for (size_t i = 0; i < constants.size(); ++i) {
      if (!constants[i].same_constant(o.constants[i])) {
        return false;
      }
    }
    return true;
  }
};

using Step = std::variant<PlanLaunch, AtenStep>;

struct Alloc {
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  bool operator==(const Alloc& o) const { return sizes == o.sizes && strides == o.strides && dtype == o.dtype; }
};

struct Plan {
  int state = 0;  // 0: awaiting a (second) recording; 1: confirmed; -1: refused
  int failures = 0;
  bool recorded = false;  // holds one recording
  std::vector<Alloc> allocs;
  std::vector<Step> steps;   // in the recorded call's order
  std::vector<int> outputs;  // allocation indices
  bool tuple_out = false;
  std::vector<at::Tensor> keep;  // the persistent buffers its constants point into
  bool same(const Plan& o) const {
    return allocs == o.allocs && steps == o.steps && outputs == o.outputs && tuple_out == o.tuple_out;
  }
};

constexpr int kMaxFailures = 3;      // unrecordable calls of a key before it is refused
constexpr size_t kMaxPlans = 4096;   // all ops together; past it the table starts afresh

// The table's lock (the backward's plans are looked up on autograd's device threads, without the
// GIL). A plan runs after the lock is released, from a shared pointer: its allocations may call
// back into Python (a memory-history recorder), which must not wait on a thread holding the lock.
std::mutex g_mutex;
std::unordered_map<std::vector<int64_t>, std::shared_ptr<Plan>, KeyHash> g_plans;
std::atomic<uint64_t> g_plan_hits{0};
std::atomic<bool> g_enabled{true};

bool pdl_enabled() {  // kernels/_pdl.py's switch, read at each launch there too
  const char* v = std::getenv("ANML_FAST_PDL");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// The key of a call of op `op` with these arguments; false: not a call a plan may serve
// (a non-CUDA tensor, an argument type plans do not know, a stream being captured).
bool plan_key(int64_t op, const std::vector<Arg>& args, std::vector<int64_t>& key, int& device) {
  key.reserve(8 + 12 * args.size());
  key.push_back(op);
  int tensor_device = -1;
  for (const Arg& a : args) {
    key.push_back(a.type);
    switch (a.type) {
      case Arg::kTensor: {
        const at::Tensor& t = a.tensor;
        // a plain CUDA tensor: not a Python subclass (its dispatch is Python's), not sparse
        if (!t.defined() || !t.is_cuda() || t.layout() != at::kStrided ||
            t.key_set().has(c10::DispatchKey::Python)) {
          return false;
        }
        int d = t.get_device();
        if (tensor_device >= 0 && d != tensor_device) {
          return false;
        }
        tensor_device = d;
        key.push_back(static_cast<int64_t>(t.scalar_type()));
        key.push_back(t.dim());
        for (int64_t s : t.sizes()) key.push_back(s);
        for (int64_t s : t.strides()) key.push_back(s);
        key.push_back((reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0);
        // which earlier argument it shares its address with, if any: a recording binds each
        // launch's tensor to one argument
        int64_t alias = -1;
        for (size_t j = 0; &args[j] != &a; ++j) {
          if (args[j].type == Arg::kTensor && args[j].tensor.data_ptr() == t.data_ptr()) {
            alias = static_cast<int64_t>(j);
            break;
          }
        }
        key.push_back(alias);
        break;
      }
      case Arg::kBool:
      case Arg::kInt:
        key.push_back(a.i);
        break;
      case Arg::kFloat: {
        int64_t bits;
        std::memcpy(&bits, &a.f, sizeof bits);
        key.push_back(bits);
        break;
      }
      case Arg::kNone:
        break;
    }
  }
  // A torch-function or dispatch mode (which autograd carries over to its threads) must see
  // the call: Python's path. So must autocast, which would cast a replayed ATen step's result
  // (mm has an autocast kernel) under a recipe recorded for float32 (autograd carries it too).
  if (at::impl::PythonTorchFunctionTLS::stack_len() > 0 || c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
      at::autocast::is_autocast_enabled(at::kCUDA)) {
    return false;
  }
  device = c10::cuda::current_device();
  if (tensor_device < 0 || tensor_device != device) {
    return false;
  }
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    return false;  // a capture takes counters of its own (kernels/_counters.py): Python's path
  }
  key.push_back(device);
  key.push_back(c10::cuda::getCurrentCUDAStream(device).id());
  try {
    key.push_back(at::globalContext().allowTF32CuDNN());
  } catch (const c10::Error&) {
    // the legacy switch and the fp32_precision API's settings disagree (set through both, or
    // conv and RNN apart): the unqualified getter refuses to answer; Python's path reads the
    // conv setting itself (kernels/conv_valid.py, conv_tf32_allowed)
    return false;
  }
  key.push_back(pdl_enabled());
  // The cuBLAS products' own switches (matmul TF32, reduced-precision sums) are not in the key:
  // a replayed ATen step reads them when it runs, as the Python path's call does, and no op's
  // Python branches on them. (Reading the legacy TF32 getter also throws once the new
  // fp32_precision API has been used.)
  return true;
}

bool to_args(PyObject* tuple, std::vector<Arg>& args) {
  Py_ssize_t n = PyTuple_GET_SIZE(tuple);
  args.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* v = PyTuple_GET_ITEM(tuple, i);
    Arg& a = args[i];
    if (THPVariable_CheckExact(v)) {
      a.type = Arg::kTensor;
      a.tensor = THPVariable_Unpack(v);
    } else if (PyBool_Check(v)) {
      a.type = Arg::kBool;
      a.i = v == Py_True;
    } else if (PyLong_CheckExact(v)) {
      int overflow = 0;
      a.type = Arg::kInt;
      a.i = PyLong_AsLongLongAndOverflow(v, &overflow);
      if (overflow != 0) {
        return false;
      }
    } else if (PyFloat_CheckExact(v)) {
      a.type = Arg::kFloat;
      a.f = PyFloat_AS_DOUBLE(v);
    } else if (v == Py_None) {
      a.type = Arg::kNone;
    } else {
      return false;
    }
  }
  return true;
}

// Runs the confirmed plan `p` on `args`: its allocations, then its steps in order. False with
// `error` set when a launch fails (outputs are then not to be used).
bool run_plan(const Plan& p, const std::vector<Arg>& args, int device, std::vector<at::Tensor>& outs,
              std::string& error) {
  std::vector<at::Tensor> allocs;
  allocs.reserve(p.allocs.size());
  auto options = at::TensorOptions().device(at::kCUDA, device);
  for (const Alloc& a : p.allocs) {
    allocs.push_back(at::empty_strided(a.sizes, a.strides, options.dtype(a.dtype)));
  }
  std::vector<at::Tensor> made;  // the ATen steps' new results
  auto tensor_of = [&](const Binding& b) -> const at::Tensor& {
    return b.src == 1 ? args[b.index].tensor : (b.src == 2 ? allocs[b.index] : made[b.index]);
  };
  CUstream stream = c10::cuda::getCurrentCUDAStream(device).stream();
  std::vector<uint64_t> slots;
  torch::jit::Stack stack;
  for (const Step& step : p.steps) {
    if (const AtenStep* a = std::get_if<AtenStep>(&step)) {
      stack.clear();
      for (size_t i = 0; i < a->binds.size(); ++i) {
        if (a->binds[i].src == 0) {
          stack.push_back(a->constants[i].ivalue());
        } else {
          stack.emplace_back(tensor_of(a->binds[i]));
        }
      }
      {
        at::AutoDispatchBelowADInplaceOrView below;  // as inside the op's implementation
        a->op->callBoxed(stack);
      }
      for (size_t r = 0; r < a->slots.size() && r < stack.size(); ++r) {
        if (a->slots[r] >= 0) {  // numbered in the order the steps make them (parse_aten_step checks)
          made.push_back(stack[r].toTensor());
        }
      }
      continue;
    }
    const PlanLaunch& l = std::get<PlanLaunch>(step);
    if (l.grid[0] == 0 || l.grid[1] == 0 || l.grid[2] == 0) {
      continue;  // as Triton's launcher: nothing to run
    }
    slots.assign(l.params.size() + l.entry.null_params, 0);
    for (size_t i = 0; i < l.params.size(); ++i) {
      const Binding& b = l.params[i];
      int64_t x = b.src == 0 ? b.ivalue : reinterpret_cast<int64_t>(tensor_of(b).data_ptr());
      pack(l.entry.params[i].kind, x, b.fvalue, slots[i]);
    }
    CUresult r = launch_packed(l.entry, l.grid, slots, stream);
    if (r != CUDA_SUCCESS) {
      error = "anml_fast: launching a planned Triton kernel failed: " + error_string(r);
      return false;
    }
  }
  outs.clear();
  for (int i : p.outputs) {
    outs.push_back(allocs[i]);
  }
  return true;
}

// 1: ran, outputs in `outs`; 0: no confirmed plan for this key yet (record this call); -1: no plan
// will serve this call (Python's path, unrecorded); -2: a launch failed (`error`).
int try_plan(int64_t op, const std::vector<Arg>& args, std::vector<at::Tensor>& outs, bool& tuple_out,
             std::string& error) {
  std::vector<int64_t> key;
  int device = 0;
  if (!g_enabled.load(std::memory_order_relaxed) || !plan_key(op, args, key, device)) {
    return -1;
  }
  std::shared_ptr<const Plan> plan;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_plans.find(key);
    if (it == g_plans.end() || it->second->state == 0) {
      return 0;
    }
    if (it->second->state < 0) {
      return -1;
    }
    plan = it->second;
  }
  tuple_out = plan->tuple_out;
  if (!run_plan(*plan, args, device, outs, error)) {
    return -2;
  }
  g_plan_hits.fetch_add(1, std::memory_order_relaxed);
  return 1;
}

PyObject* wrap_outputs(const std::vector<at::Tensor>& outs, bool tuple_out) {
  if (!tuple_out) {
    return THPVariable_Wrap(outs.at(0));
  }
  PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(outs.size()));
  if (t == nullptr) {
    return nullptr;
  }
  for (size_t i = 0; i < outs.size(); ++i) {
    PyObject* o = THPVariable_Wrap(outs[i]);
    if (o == nullptr) {
      Py_DECREF(t);
      return nullptr;
    }
    PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), o);
  }
  return t;
}

// plan_run(op_id, args: tuple) -> the op's outputs, or 0 (record this call) or -1 (Python, unrecorded)
PyObject* plan_run(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  HANDLE_TH_ERRORS
  if (argc != 2 || !PyTuple_Check(argv[1])) {
    PyErr_SetString(PyExc_TypeError, "plan_run(op_id, args: tuple)");
    return nullptr;
  }
  int64_t op = PyLong_AsLongLong(argv[0]);
  if (op == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  std::vector<Arg> args;
  if (!to_args(argv[1], args)) {
    PyErr_Clear();
    return PyLong_FromLong(-1);
  }
  std::vector<at::Tensor> outs;
  bool tuple_out = false;
  std::string error;
  int state = try_plan(op, args, outs, tuple_out, error);
  if (state == -2) {
    PyErr_SetString(PyExc_RuntimeError, error.c_str());
    return nullptr;
  }
  if (state != 1) {
    return PyLong_FromLong(state);
  }
  return wrap_outputs(outs, tuple_out);
  END_HANDLE_TH_ERRORS
}

// One recorded ATen step (name, overload, values, binds, slots): values and binds one per schema
// argument (a constant, or None where binds names a tensor), slots one per return. Appends it to
// `steps`; false if it is not one a replay can make (unknown op, argument count or binding).
template <typename BoundOk>
bool parse_aten_step(PyObject* item, int& made, const BoundOk& bound_ok, std::vector<Step>& steps) {
  PyObject* values = PyTuple_GET_ITEM(item, 2);
  PyObject* binds = PyTuple_GET_ITEM(item, 3);
  PyObject* slots = PyTuple_GET_ITEM(item, 4);
  const char* name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(item, 0));
  const char* overload = PyUnicode_Check(PyTuple_GET_ITEM(item, 1)) ? PyUnicode_AsUTF8(PyTuple_GET_ITEM(item, 1)) : nullptr;
  if (name == nullptr || overload == nullptr || !PyTuple_Check(values) || !PyTuple_Check(binds) ||
      !PyTuple_Check(slots) || PyTuple_GET_SIZE(values) != PyTuple_GET_SIZE(binds)) {
    PyErr_Clear();
    return false;
  }
  AtenStep a;
  a.name = name;
  a.overload = overload;
  a.op = c10::Dispatcher::singleton().findOp(c10::OperatorName(a.name, a.overload));
  if (!a.op.has_value() || a.op->schema().arguments().size() != static_cast<size_t>(PyTuple_GET_SIZE(values)) ||
      a.op->schema().returns().size() != static_cast<size_t>(PyTuple_GET_SIZE(slots))) {
    return false;
  }
  std::vector<Arg> constants;
  if (!to_args(values, constants)) {
    PyErr_Clear();
    return false;
  }
  a.constants = std::move(constants);
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(binds); ++k) {
    int src = 0, index = 0;
    if (!PyArg_ParseTuple(PyTuple_GET_ITEM(binds, k), "ii", &src, &index)) {
      PyErr_Clear();
      return false;
    }
    if (src == 0 ? a.constants[k].type == Arg::kTensor : !bound_ok(src, index)) {
      return false;
    }
    a.binds.push_back(Binding{src, src == 0 ? 0 : index, 0, 0.0});
  }
  for (Py_ssize_t r = 0; r < PyTuple_GET_SIZE(slots); ++r) {
    long slot = PyLong_AsLong(PyTuple_GET_ITEM(slots, r));
    if (slot == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    if (slot >= 0) {
      if (slot != made) {
        return false;  // results are numbered in the order the steps make them
      }
      ++made;
    }
    a.slots.push_back(static_cast<int>(slot));
  }
  steps.emplace_back(std::move(a));
  return true;
}

// plan_store(op_id, args, ok, steps, allocs, outputs, tuple_out, keep) -> state
//   steps: tuple, in call order, of launches (kernel_id, grid, args, kwargs, binds), binds one
//   (src, index) per value (positional, then keyword in call order), and ATen steps (see
//   parse_aten_step); allocs: the recorded call's allocated tensors;
//   outputs: allocation indices; keep: the persistent tensors its constants point into.
//   ok False: the call could not be recorded. Returns the key's state: 1 confirmed, 0 awaiting a
//   second recording, -1 refused (or not a plannable call).
PyObject* plan_store(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  HANDLE_TH_ERRORS
  if (argc != 8 || !PyTuple_Check(argv[1]) || !PyTuple_Check(argv[3]) || !PyTuple_Check(argv[4]) ||
      !PyTuple_Check(argv[5]) || !PyTuple_Check(argv[7])) {
    PyErr_SetString(PyExc_TypeError,
                    "plan_store(op_id, args: tuple, ok, steps: tuple, allocs: tuple, outputs: tuple, tuple_out, keep: tuple)");
    return nullptr;
  }
  int64_t op = PyLong_AsLongLong(argv[0]);
  if (op == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  std::vector<Arg> args;
  std::vector<int64_t> key;
  int device = 0;
  if (!to_args(argv[1], args) || !plan_key(op, args, key, device)) {
    PyErr_Clear();
    return PyLong_FromLong(-1);
  }
  Plan p;
  bool ok = PyObject_IsTrue(argv[2]) == 1;
  for (Py_ssize_t i = 0; ok && i < PyTuple_GET_SIZE(argv[4]); ++i) {
    PyObject* v = PyTuple_GET_ITEM(argv[4], i);
    if (!THPVariable_CheckExact(v)) {
      ok = false;
      break;
    }
    const at::Tensor& t = THPVariable_Unpack(v);
    if (!t.is_cuda() || t.get_device() != device || t.layout() != at::kStrided) {
      ok = false;  // a replay allocates on the current CUDA device only
      break;
    }
    p.allocs.push_back(Alloc{t.sizes().vec(), t.strides().vec(), t.scalar_type()});
  }
  for (Py_ssize_t i = 0; ok && i < PyTuple_GET_SIZE(argv[5]); ++i) {
    long j = PyLong_AsLong(PyTuple_GET_ITEM(argv[5], i));
    ok = j >= 0 && j < static_cast<long>(p.allocs.size());
    p.outputs.push_back(static_cast<int>(j));
  }
  p.tuple_out = PyObject_IsTrue(argv[6]) == 1;
  for (Py_ssize_t i = 0; ok && i < PyTuple_GET_SIZE(argv[7]); ++i) {
    PyObject* v = PyTuple_GET_ITEM(argv[7], i);
    ok = THPVariable_CheckExact(v);
    if (ok) {
      p.keep.push_back(THPVariable_Unpack(v));
    }
  }
  int made = 0;  // the ATen steps' results so far: what a later step may bind
  auto bound_ok = [&](int src, int index) {
    return (src == 1 && index >= 0 && index < static_cast<int>(args.size()) && args[index].type == Arg::kTensor) ||
           (src == 2 && index >= 0 && index < static_cast<int>(p.allocs.size())) ||
           (src == 3 && index >= 0 && index < made);
  };
  for (Py_ssize_t i = 0; ok && i < PyTuple_GET_SIZE(argv[3]); ++i) {
    PyObject* item = PyTuple_GET_ITEM(argv[3], i);
    if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 5 && PyUnicode_Check(PyTuple_GET_ITEM(item, 0))) {
      ok = parse_aten_step(item, made, bound_ok, p.steps);
      continue;
    }
    PyObject *kid, *grid, *largs, *lkwargs, *binds;
    if (!PyArg_ParseTuple(item, "OO!O!O!O!", &kid, &PyTuple_Type, &grid, &PyTuple_Type,
                          &largs, &PyDict_Type, &lkwargs, &PyTuple_Type, &binds)) {
      return nullptr;
    }
    int64_t kernel_id = PyLong_AsLongLong(kid);
    auto kit = g_kernels.find(kernel_id);
    std::vector<int64_t> lkey;
    std::vector<PyObject*> values;
    if (kit == g_kernels.end() || !call_key(kernel_id, kit->second, largs, lkwargs, device, lkey, values) ||
        PyTuple_GET_SIZE(binds) != static_cast<Py_ssize_t>(values.size())) {
      ok = false;
      break;
    }
    auto eit = kit->second.cache.find(lkey);
    if (eit == kit->second.cache.end()) {
      ok = false;  // its recipe is not in C++ (yet): the next recording may find it
      break;
    }
    PlanLaunch l;
    l.entry = eit->second;
    l.grid[0] = l.grid[1] = l.grid[2] = 1;
    for (Py_ssize_t d = 0; d < PyTuple_GET_SIZE(grid) && d < 3; ++d) {
      long g = PyLong_AsLong(PyTuple_GET_ITEM(grid, d));
      if (g < 0) {
        ok = false;
      }
      l.grid[d] = static_cast<unsigned>(g);
    }
    for (const Param& prm : l.entry.params) {
      Binding b{0, 0, prm.ivalue, prm.fvalue};
      if (prm.source >= 0) {
        int src = 0, index = 0;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(binds, prm.source), "ii", &src, &index)) {
          return nullptr;
        }
        b.src = src;
        b.index = index;
        if (src == 0) {  // a constant: a scalar, None, or a persistent tensor's pointer
          PyObject* v = values[prm.source];
          if (prm.kind == kF32 || prm.kind == kF64) {
            b.fvalue = PyFloat_AsDouble(v);
          } else if (!as_i64(v, b.ivalue)) {
            PyErr_Clear();
            ok = false;
          }
          b.index = 0;
        } else if (!bound_ok(src, index)) {
          ok = false;
        }
      }
      if (b.src != 0) {
        b.ivalue = 0;
        b.fvalue = 0.0;
      }
      l.params.push_back(b);
    }
    p.steps.emplace_back(std::move(l));
  }
  if (PyErr_Occurred()) {
    PyErr_Clear();
    ok = false;
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_plans.find(key);
  if (it == g_plans.end()) {
    if (g_plans.size() >= kMaxPlans) {
      g_plans.clear();
    }
    it = g_plans.emplace(std::move(key), std::make_shared<Plan>()).first;
  }
  // a held plan is replaced, never changed: a replay in progress keeps the one it started with
  const Plan& held = *it->second;
  if (held.state != 0) {
    return PyLong_FromLong(held.state);
  }
  auto next = std::make_shared<Plan>();
  if (!ok) {
    *next = held;
    if (++next->failures >= kMaxFailures) {
      next->state = -1;
    }
  } else if (!held.recorded) {
    *next = std::move(p);
    next->failures = held.failures;
    next->recorded = true;
  } else {
    *next = held;
    if (held.same(p)) {
      next->state = 1;
      next->keep = std::move(p.keep);
    } else {
      next->state = -1;  // two recordings disagree: something outside the key steers this op
    }
  }
  it->second = std::move(next);
  return PyLong_FromLong(it->second->state);
  END_HANDLE_TH_ERRORS
}

// plan_stats() -> (calls served by plans, confirmed, awaiting confirmation, refused)
PyObject* plan_stats(PyObject*, PyObject*) {
  std::lock_guard<std::mutex> lock(g_mutex);
  unsigned long long counts[3] = {0, 0, 0};
  for (const auto& kv : g_plans) {
    counts[kv.second->state == 1 ? 0 : (kv.second->state == 0 ? 1 : 2)]++;
  }
  return Py_BuildValue("(KKKK)", static_cast<unsigned long long>(g_plan_hits.load()), counts[0], counts[1],
                       counts[2]);
}

PyObject* plan_clear(PyObject*, PyObject*) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_plans.clear();
  Py_RETURN_NONE;
}

// plan_enable(on: bool) -> the previous setting
PyObject* plan_enable(PyObject*, PyObject* on) {
  bool was = g_enabled.exchange(PyObject_IsTrue(on) == 1);
  return PyBool_FromLong(was);
}

// ---------------------------------------------------------------------------------------------
// Autograd: a C++ node for ops whose forward and backward both have plans.
// ---------------------------------------------------------------------------------------------

// How an op's backward op is called from what its forward saved and the grads of its outputs.
struct GradSpec {
  int64_t backward_op;
  // per backward-op argument: (0, k) output k's grad; (1, i) saved tensor i (the forward's inputs,
  // then its saved outputs); (2, mask) a bool, whether any forward input in the bit mask needs its grad
  std::vector<std::pair<int, int64_t>> args;
  std::vector<int> grad_of;        // per forward input: the backward op's output that is its grad, or -1
  std::vector<int> saved_outputs;  // forward outputs saved after the inputs (for the backward's use)
  std::vector<int> nondiff;        // forward outputs that are not differentiable
  PyObject* fallback;              // fallback(saved: tuple, needs: tuple, grads: tuple) -> grads (owned)
};

std::deque<GradSpec> g_specs;  // a deque: appending never moves the specs the backwards point to
std::mutex g_specs_mutex;

const GradSpec* spec_at(int64_t id) {
  std::lock_guard<std::mutex> lock(g_specs_mutex);
  return id >= 0 && static_cast<size_t>(id) < g_specs.size() ? &g_specs[static_cast<size_t>(id)] : nullptr;
}

struct PlannedFunction : public torch::autograd::Function<PlannedFunction> {
  static thread_local std::vector<at::Tensor>* pending;  // the forward plan's outputs

  // the inputs as a TensorList: Function::apply takes those (not a std::vector) as tensor inputs
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::TensorList inputs,
                                                int64_t spec) {
    const GradSpec* s = spec_at(spec);
    std::vector<at::Tensor> saved = inputs.vec();
    torch::autograd::variable_list nondiff;
    for (int k : s->saved_outputs) {
      saved.push_back(pending->at(static_cast<size_t>(k)));
    }
    for (int k : s->nondiff) {
      nondiff.push_back(pending->at(static_cast<size_t>(k)));
    }
    ctx->save_for_backward(saved);
    if (!nondiff.empty()) {
      ctx->mark_non_differentiable(nondiff);
      if (nondiff.size() + 1 == pending->size()) {
        // one differentiable output: the others' grads would be zeros that nothing reads (a fill
        // per output per backward); they arrive undefined, and so may its own (see backward)
        ctx->set_materialize_grads(false);
      }
    }
    ctx->saved_data["spec"] = spec;
    ctx->saved_data["n"] = static_cast<int64_t>(inputs.size());
    return *pending;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const GradSpec* s = spec_at(ctx->saved_data["spec"].toInt());
    const size_t n = static_cast<size_t>(ctx->saved_data["n"].toInt());  // the forward's inputs
    auto saved = ctx->get_saved_variables();
    // (a spec registered by plan_grad_spec names as many inputs as the op has: this is a bug check)
    TORCH_CHECK(s != nullptr && s->grad_of.size() == n, "anml_fast: a plan grad spec does not fit its op");
    std::vector<bool> needs(n);
    for (size_t i = 0; i < n; ++i) {
      needs[i] = ctx->needs_input_grad(i);
    }
    torch::autograd::variable_list result(n + 1);  // + the spec's slot
    if (std::none_of(grads.begin(), grads.end(), [](const at::Tensor& g) { return g.defined(); })) {
      return result;  // where grads are not materialised: all zero, so are the inputs' (gradcheck asks)
    }
    if (!at::GradMode::is_enabled()) {
      std::vector<Arg> args(s->args.size());
      for (size_t j = 0; j < s->args.size(); ++j) {
        auto [code, v] = s->args[j];
        if (code == 0) {
          args[j].type = Arg::kTensor;
          args[j].tensor = grads.at(static_cast<size_t>(v));
        } else if (code == 1) {
          args[j].type = Arg::kTensor;
          args[j].tensor = saved.at(static_cast<size_t>(v));
        } else {
          bool any = false;
          for (size_t i = 0; i < needs.size(); ++i) {
            any = any || (((v >> i) & 1) && needs[i]);
          }
          args[j].type = Arg::kBool;
          args[j].i = any;
        }
      }
      std::vector<at::Tensor> outs;
      bool tuple_out = false;
      std::string error;
      int state = try_plan(s->backward_op, args, outs, tuple_out, error);
      TORCH_CHECK(state != -2, error.c_str());
      if (state == 1) {
        for (size_t i = 0; i < n; ++i) {
          if (needs[i] && s->grad_of[i] >= 0 && static_cast<size_t>(s->grad_of[i]) < outs.size()) {
            result[i] = outs.at(static_cast<size_t>(s->grad_of[i]));
          }
        }
        return result;
      }
    }
    // the op's Python backward: it records the backward op's plan, or builds the second-order graph
    pybind11::gil_scoped_acquire gil;
    PyObject* args = Py_BuildValue("(NNN)", anml_fast::tensor_tuple(saved), anml_fast::bool_tuple(needs),
                                   anml_fast::tensor_tuple(grads));
    auto g = anml_fast::call_python_grads(s->fallback, args, n, "a planned op's Python backward");
    std::copy(g.begin(), g.end(), result.begin());
    return result;
  }
};

thread_local std::vector<at::Tensor>* PlannedFunction::pending = nullptr;

bool int_tuple(PyObject* t, std::vector<int>& out) {
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(t); ++i) {
    out.push_back(static_cast<int>(PyLong_AsLong(PyTuple_GET_ITEM(t, i))));
  }
  return !PyErr_Occurred();
}

// plan_grad_spec(backward_op_id, args: tuple of (code, value), grad_of: tuple, saved_outputs: tuple,
// nondiff: tuple, fallback) -> spec id
PyObject* plan_grad_spec(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  if (argc != 6 || !PyTuple_Check(argv[1]) || !PyTuple_Check(argv[2]) || !PyTuple_Check(argv[3]) ||
      !PyTuple_Check(argv[4]) || !PyCallable_Check(argv[5])) {
    PyErr_SetString(PyExc_TypeError, "plan_grad_spec(backward_op_id, args: tuple, grad_of: tuple, "
                                     "saved_outputs: tuple, nondiff: tuple, fallback)");
    return nullptr;
  }
  GradSpec s;
  s.backward_op = PyLong_AsLongLong(argv[0]);
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(argv[1]); ++i) {
    int code = 0;
    long long v = 0;
    if (!PyArg_ParseTuple(PyTuple_GET_ITEM(argv[1], i), "iL", &code, &v)) {
      return nullptr;
    }
    s.args.emplace_back(code, v);
  }
  if (!int_tuple(argv[2], s.grad_of) || !int_tuple(argv[3], s.saved_outputs) || !int_tuple(argv[4], s.nondiff)) {
    return nullptr;
  }
  Py_INCREF(argv[5]);  // held for the life of the process, as the spec
  s.fallback = argv[5];
  std::lock_guard<std::mutex> lock(g_specs_mutex);
  g_specs.push_back(std::move(s));
  return PyLong_FromSize_t(g_specs.size() - 1);
}

// plan_autograd(op_id, args: tuple of tensors, spec_id) -> the outputs (the differentiable ones
// with a C++ grad_fn), or 0 / -1 as plan_run (the caller then takes its Python path)
PyObject* plan_autograd(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  HANDLE_TH_ERRORS
  if (argc != 3 || !PyTuple_Check(argv[1])) {
    PyErr_SetString(PyExc_TypeError, "plan_autograd(op_id, args: tuple, spec_id)");
    return nullptr;
  }
  int64_t op = PyLong_AsLongLong(argv[0]);
  int64_t spec = PyLong_AsLongLong(argv[2]);
  if (PyErr_Occurred()) {
    return nullptr;
  }
  std::vector<Arg> args;
  if (!to_args(argv[1], args)) {
    PyErr_Clear();
    return PyLong_FromLong(-1);
  }
  torch::autograd::variable_list inputs;
  for (const Arg& a : args) {
    if (a.type != Arg::kTensor) {
      return PyLong_FromLong(-1);
    }
    inputs.push_back(a.tensor);
  }
  const GradSpec* s = spec_at(spec);
  if (s == nullptr) {
    PyErr_SetString(PyExc_ValueError, "plan_autograd: no such grad spec");
    return nullptr;
  }
  std::vector<at::Tensor> outs;
  bool tuple_out = false;
  std::string error;
  int state;
  {
    at::AutoGradMode no_grad(false);
    state = try_plan(op, args, outs, tuple_out, error);
  }
  if (state == -2) {
    PyErr_SetString(PyExc_RuntimeError, error.c_str());
    return nullptr;
  }
  if (state != 1) {
    return PyLong_FromLong(state);
  }
  for (const std::vector<int>* ks : {&s->saved_outputs, &s->nondiff}) {
    for (int k : *ks) {
      if (k < 0 || static_cast<size_t>(k) >= outs.size()) {
        PyErr_SetString(PyExc_ValueError, "plan_autograd: the grad spec names an output the op does not have");
        return nullptr;
      }
    }
  }
  torch::autograd::variable_list result;
  PlannedFunction::pending = &outs;
  try {
    result = PlannedFunction::apply(at::TensorList(inputs), spec);
  } catch (...) {
    PlannedFunction::pending = nullptr;
    throw;
  }
  PlannedFunction::pending = nullptr;
  return wrap_outputs(result, tuple_out);
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"plan_run", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_run)), METH_FASTCALL,
     "Run an op's call from its confirmed plan: its outputs, or 0 (record this call) or -1 (no plan serves it)."},
    {"plan_store", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_store)), METH_FASTCALL,
     "Store a recorded call's plan; two agreeing recordings confirm it. Returns 1, 0 or -1."},
    {"plan_stats", plan_stats, METH_NOARGS, "(calls served by plans, confirmed, awaiting confirmation, refused)"},
    {"plan_clear", plan_clear, METH_NOARGS, "Forget every plan."},
    {"plan_enable", plan_enable, METH_O, "Turn plans on or off; returns the previous setting."},
    {"plan_grad_spec", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_grad_spec)), METH_FASTCALL,
     "Register how an op's backward op is called from its saved inputs; returns the spec's id."},
    {"plan_autograd", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_autograd)), METH_FASTCALL,
     "Run an op's forward plan under a C++ autograd node whose backward runs the backward op's plan."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

int anml_fast_add_triton_plan(PyObject* module) {
  return PyModule_AddFunctions(module, kMethods);
}

#endif  // ANML_FAST_WITH_CUDA
