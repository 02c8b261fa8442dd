// The schemas of anml_fast's compiled ops, defined once; each device registers its kernels in
// its own file (csrc/<op>.cpp for CPU, csrc/cuda/<op>.cu for CUDA). The Triton ops of the same
// namespace (gated_head*) are registered from Python as library fragments, which coexist with
// this one definition.
#include <Python.h>
#include <torch/library.h>

int anml_fast_add_conv_block_autograd(PyObject* module);   // csrc/conv_block_autograd.cpp
int anml_fast_add_multi_tensor_autograd(PyObject* module);  // csrc/multi_tensor_autograd.cpp
#ifdef ANML_FAST_WITH_CUDA
int anml_fast_add_triton_launch(PyObject* module);  // csrc/triton_launch.cpp
int anml_fast_add_triton_plan(PyObject* module);    // csrc/triton_plan.cpp
#endif

extern "C" {
// `import anml_fast._C` only has to load this shared object: loading runs the static
// registrations below and in the kernel files. The ops are called through torch.ops.anml_fast,
// where the dispatcher, fake tensors and autograd see them. The module's own functions:
// set_second_order (conv_block's C++ autograd calls it for second-order grads),
// check_update_args (the multi-tensor updates' checks, as a message), and in CUDA
// builds kernels/_launch.py's C++ launch of compiled Triton kernels and kernels/_plan.py's plans.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "anml_fast's compiled ops; call them through torch.ops.anml_fast",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  // Lets Python tell "built without CUDA kernels" from "no GPU here" without probing the
  // dispatcher's private tables.
#ifdef ANML_FAST_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  if (anml_fast_add_conv_block_autograd(module) != 0 || anml_fast_add_multi_tensor_autograd(module) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
#ifdef ANML_FAST_WITH_CUDA
  if (anml_fast_add_triton_launch(module) != 0 || anml_fast_add_triton_plan(module) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
#endif
  return module;
}
}

TORCH_LIBRARY(anml_fast, m) {
  // Returns (out, conv_out, mean, rstd): the last three are what the backward needs, so that it
  // recomputes the normalised and activated values instead of the forward storing them.
  m.def(
      "conv_block(Tensor x, Tensor weight, Tensor bias, Tensor norm_weight, Tensor norm_bias, "
      "bool pool) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // output_mask selects grad_x, grad_weight and grad_bias; the ones not asked for come back as
  // empty tensors (shape [0]) so that the schema's outputs are always tensors.
  m.def(
      "conv_block_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor conv_out, "
      "Tensor mean, Tensor rstd, Tensor norm_weight, Tensor norm_bias, bool pool, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // conv_block's normalisation + affine + ReLU + optional 2x2 max-pool alone, on a given conv
  // output y: (out, mean, rstd); and its backward: (grad_y, grad_norm_weight, grad_norm_bias).
  m.def("plane_norm(Tensor y, Tensor norm_weight, Tensor norm_bias, bool pool) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "plane_norm_backward(Tensor grad_out, Tensor y, Tensor mean, Tensor rstd, Tensor norm_weight, "
      "Tensor norm_bias, bool pool) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def("sgd_update(Tensor[] params, Tensor[] grads, float lr) -> Tensor[]",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "adam_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, int step, float lr, float beta1=0.9, float beta2=0.999, "
      "float eps=1e-08) -> ()",
      {at::Tag::pt2_compliant_tag});
}
