// Calling a Python backward from a C++ autograd node (csrc/conv_block_autograd.cpp's second-order
// grads, csrc/triton_plan.cpp's fallback): the argument tuples, the call, the grads it returns.
// The caller holds the GIL.
#pragma once

#include <Python.h>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <vector>

namespace anml_fast {

// A new tuple of the tensors, or null with a Python error set.
inline PyObject* tensor_tuple(const std::vector<at::Tensor>& ts) {
  PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(ts.size()));
  for (size_t i = 0; t != nullptr && i < ts.size(); ++i) {
    PyObject* v = THPVariable_Wrap(ts[i]);
    if (v == nullptr) {
      Py_CLEAR(t);
      break;
    }
    PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), v);
  }
  return t;
}

// A new tuple of the bools, or null with a Python error set.
inline PyObject* bool_tuple(const std::vector<bool>& bs) {
  PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(bs.size()));
  for (size_t i = 0; t != nullptr && i < bs.size(); ++i) {
    PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), PyBool_FromLong(bs[i]));
  }
  return t;
}

// fn(*args), where args is a new reference (consumed; null if building it failed, its error set)
// and fn returns a tuple of a grad or None per input: the n grads, undefined for None. A Python
// error comes back as python_error, persisted so that the engine may rethrow it on its caller's
// thread.
inline std::vector<at::Tensor> call_python_grads(PyObject* fn, PyObject* args, size_t n, const char* what) {
  PyObject* r = args != nullptr ? PyObject_CallObject(fn, args) : nullptr;
  Py_XDECREF(args);
  if (r == nullptr) {
    python_error err;
    err.persist();
    throw std::move(err);
  }
  std::vector<at::Tensor> grads(n);
  bool bad = !PyTuple_Check(r) || PyTuple_GET_SIZE(r) < static_cast<Py_ssize_t>(n);
  for (size_t i = 0; !bad && i < n; ++i) {
    PyObject* g = PyTuple_GET_ITEM(r, static_cast<Py_ssize_t>(i));
    if (THPVariable_Check(g)) {
      grads[i] = THPVariable_Unpack(g);
    } else if (g != Py_None) {
      bad = true;
    }
  }
  Py_DECREF(r);
  TORCH_CHECK(!bad, "anml_fast: ", what, " must return a tuple of a grad or None per input");
  return grads;
}

}  // namespace anml_fast
