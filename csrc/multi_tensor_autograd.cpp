// Autograd of anml_fast::sgd_update in C++, and the list checks the Python wrappers call.
//
// Registered from Python, every sgd_update call detoured from the dispatcher through Python's
// custom-op autograd (each call, grads wanted or not), and its argument checks looped in Python
// over the 14-28 tensors: on an H200 machine (2026-11-29, bench/bench_multi_tensor.py) the one
// launch took 179 us of wall time against 74 us for the twin's torch._foreach_sub. Here the
// autograd node is C++, and the checks are the C++ op's own, returned as a message the Python
// side raises (csrc/multi_tensor.cpp says why the message is built without iostreams).
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "multi_tensor.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& sgd_update_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("anml_fast::sgd_update", "")
                       .typed<std::vector<at::Tensor>(at::TensorList, at::TensorList, double)>();
  return op;
}

// out_i = p_i - lr g_i. Backward: dp_i = dout_i, dg_i = -lr dout_i, in ATen arithmetic, which
// autograd differentiates again (second-order inner loops).
struct SgdUpdateFunction : public torch::autograd::Function<SgdUpdateFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList params, at::TensorList grads, double lr) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["lr"] = lr;
    ctx->saved_data["n"] = static_cast<int64_t>(params.size());
    return sgd_update_op().call(params, grads, lr);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outs) {
    const double lr = ctx->saved_data["lr"].toDouble();
    const size_t n = static_cast<size_t>(ctx->saved_data["n"].toInt());
    variable_list result(2 * n + 1);  // params', grads', lr's
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& g = grad_outs[i];
      if (!g.defined()) {
        continue;
      }
      if (ctx->needs_input_grad(i)) {
        result[i] = g;
      }
      if (ctx->needs_input_grad(n + i)) {
        result[n + i] = g * -lr;
      }
    }
    return result;
  }
};

// whether any tensor carries a forward-mode tangent (Function::apply refuses those: no jvp)
bool any_tangent(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (t._fw_grad(/*level=*/0).defined()) {
      return true;
    }
  }
  return false;
}

bool any_requires_grad(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.requires_grad()) {
      return true;
    }
  }
  return false;
}

std::vector<at::Tensor> sgd_update_autograd(at::TensorList params, at::TensorList grads, double lr) {
  const bool graph = at::GradMode::is_enabled() && (any_requires_grad(params) || any_requires_grad(grads));
  if (!graph && !any_tangent(params) && !any_tangent(grads)) {
    // no graph to build: Function::apply would still make a node and note all 2n inputs
    at::AutoDispatchBelowADInplaceOrView below;
    return sgd_update_op().call(params, grads, lr);
  }
  return SgdUpdateFunction::apply(params, grads, lr);
}

// exact: only plain tensors (no Python subclass), else false without an error set
bool tensors_of(PyObject* seq, std::vector<at::Tensor>& out, bool* exact = nullptr) {
  PyObject* fast = PySequence_Fast(seq, "expected a list of tensors");
  if (fast == nullptr) {
    return false;
  }
  Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* v = PySequence_Fast_GET_ITEM(fast, i);
    if (!THPVariable_Check(v)) {
      Py_DECREF(fast);
      PyErr_Format(PyExc_TypeError, "expected tensors in the list, got %s at index %zd", Py_TYPE(v)->tp_name, i);
      return false;
    }
    if (exact != nullptr && !THPVariable_CheckExact(v)) {
      *exact = false;
    }
    out.push_back(THPVariable_Unpack(v));
  }
  Py_DECREF(fast);
  return true;
}

// check_update_args("sgd_update", params, grads) or ("adam_update_", params, grads, exp_avgs,
// exp_avg_sqs, step) -> None, or the message of what is wrong
PyObject* check_update_args(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  if (argc < 3 || !PyUnicode_Check(argv[0])) {
    PyErr_SetString(PyExc_TypeError, "check_update_args(op, params, grads, ...)");
    return nullptr;
  }
  const char* name = PyUnicode_AsUTF8(argv[0]);
  if (name == nullptr) {
    return nullptr;
  }
  const std::string op = name;
  const bool adam = op == "adam_update_";
  if (!(op == "sgd_update" && argc == 3) && !(adam && argc == 6)) {
    PyErr_SetString(PyExc_TypeError, "check_update_args: sgd_update takes (params, grads); adam_update_ "
                                     "(params, grads, exp_avgs, exp_avg_sqs, step)");
    return nullptr;
  }
  std::vector<at::Tensor> lists[4];
  for (int i = 0; i < (adam ? 4 : 2); ++i) {
    if (!tensors_of(argv[1 + i], lists[i])) {
      return nullptr;
    }
  }
  std::string problem;
  if (adam) {
    int64_t step = PyLong_AsLongLong(argv[5]);
    if (step == -1 && PyErr_Occurred()) {
      return nullptr;
    }
    problem = anml_fast::adam_update_problem(lists[0], lists[1], lists[2], lists[3], step);
  } else {
    problem = anml_fast::sgd_update_problem(lists[0], lists[1]);
  }
  if (!problem.empty()) {
    return PyUnicode_FromString(problem.c_str());
  }
  Py_RETURN_NONE;
}

// sgd_update_eager(params, grads, lr) -> the new tensors, through the dispatcher, or None where the
// call is not a plain one (a tensor subclass, a torch-function mode: torch.ops' Python handles
// those). A bad argument raises RuntimeError with the op's own message. At batch 1 the call's
// cost is the host's: on an H200 machine (2026-11-30, bench/host_cost.py) the checks in one C
// call and then torch.ops' Python parsing the two lists took 55 us against the twin's 39 us.
PyObject* sgd_update_eager(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  HANDLE_TH_ERRORS
  if (argc != 3) {
    PyErr_SetString(PyExc_TypeError, "sgd_update_eager(params, grads, lr)");
    return nullptr;
  }
  const double lr = PyFloat_AsDouble(argv[2]);
  if (lr == -1.0 && PyErr_Occurred()) {
    return nullptr;
  }
  std::vector<at::Tensor> params, grads;
  bool exact = true;
  if (!tensors_of(argv[0], params, &exact) || !tensors_of(argv[1], grads, &exact)) {
    return nullptr;
  }
  if (!exact || at::impl::PythonTorchFunctionTLS::stack_len() > 0 ||
      c10::impl::TorchDispatchModeTLS::stack_len() > 0) {
    Py_RETURN_NONE;
  }
  const std::string problem = anml_fast::sgd_update_problem(params, grads);
  if (!problem.empty()) {
    PyErr_SetString(PyExc_RuntimeError, problem.c_str());
    return nullptr;
  }
  std::vector<at::Tensor> out;
  {
    pybind11::gil_scoped_release no_gil;  // as torch.ops does around a dispatcher call
    const anml_fast::SgdUpdateSharedBlock shared;  // plain eager: the results may share one block
    out = sgd_update_op().call(params, grads, lr);
  }
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(out.size()));
  if (list == nullptr) {
    return nullptr;
  }
  for (size_t i = 0; i < out.size(); ++i) {
    PyObject* t = THPVariable_Wrap(std::move(out[i]));
    if (t == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), t);
  }
  return list;
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"sgd_update_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sgd_update_eager)),
     METH_FASTCALL, "sgd_update's eager call: checks, then the op through the dispatcher; None if not plain."},
    {"check_update_args", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(check_update_args)),
     METH_FASTCALL, "The multi-tensor updates' argument checks: None, or the message of what is wrong."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

TORCH_LIBRARY_IMPL(anml_fast, Autograd, m) {
  m.impl("sgd_update", &sgd_update_autograd);
}

int anml_fast_add_multi_tensor_autograd(PyObject* module) {
  return PyModule_AddFunctions(module, kMethods);
}
