// Autograd of anml_fast::conv_block and anml_fast::plane_norm, in C++ (both builds).
//
// Registered from Python (torch.library.register_autograd), each call's forward went from the
// dispatcher into Python and back, and its backward was a Python node that the autograd engine
// calls from its device thread: at batch 1 on an H200 machine that made the block's eager
// backward 0.74-0.94x its twin's in wall time while its kernels were 1.03-1.12x faster
// (bench/bench_conv_block.py, 2026-11-29). Here both are C++ nodes, as the twin's are.
//
// First-order grads come from the fused backward ops. With create_graph=True (grad mode on in the
// backward) the grads are taken instead through the plain-PyTorch twin, which autograd can
// differentiate again: that stays in Python (anml_fast/ops/conv_block.py registers it through
// `set_second_order`), called with the GIL.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include "python_grads.h"

#include <array>
#include <string>
#include <tuple>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

PyObject* g_second_order = nullptr;  // second_order(op, inputs: tuple, needs: tuple, pool, grad) -> tuple

// The second-order grads of `op` through its twin, one per input (undefined where not needed).
variable_list second_order(const char* op, const variable_list& inputs, const std::vector<bool>& needs, bool pool,
                           const at::Tensor& grad) {
  pybind11::gil_scoped_acquire gil;
  TORCH_CHECK(g_second_order != nullptr, "anml_fast: ", op, "'s second-order backward is not registered "
              "(anml_fast.ops.conv_block registers it at import)");
  PyObject* args = Py_BuildValue("(sNNON)", op, anml_fast::tensor_tuple(inputs), anml_fast::bool_tuple(needs),
                                  pool ? Py_True : Py_False, THPVariable_Wrap(grad));
  const std::string what = std::string(op) + "'s second-order backward";
  return anml_fast::call_python_grads(g_second_order, args, needs.size(), what.c_str());
}

using Four = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Three = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Five = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

const auto& conv_block_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("anml_fast::conv_block", "")
                       .typed<Four(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, bool)>();
  return op;
}

const auto& conv_block_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("anml_fast::conv_block_backward", "")
                       .typed<Five(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                   std::array<bool, 3>)>();
  return op;
}

const auto& plane_norm_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("anml_fast::plane_norm", "")
                       .typed<Three(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  return op;
}

const auto& plane_norm_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("anml_fast::plane_norm_backward", "")
                       .typed<Three(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, bool)>();
  return op;
}

std::vector<bool> needs_of(AutogradContext* ctx, size_t n) {
  std::vector<bool> needs(n);
  for (size_t i = 0; i < n; ++i) {
    needs[i] = ctx->needs_input_grad(i);
  }
  return needs;
}

struct ConvBlockFunction : public torch::autograd::Function<ConvBlockFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                               bool pool) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, conv_out, mean, rstd] = conv_block_op().call(x, weight, bias, norm_weight, norm_bias, pool);
    ctx->saved_data["pool"] = pool;
    ctx->save_for_backward({x, weight, bias, norm_weight, norm_bias, conv_out, mean, rstd});
    ctx->mark_non_differentiable({conv_out, mean, rstd});
    return {out, conv_out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const bool pool = ctx->saved_data["pool"].toBool();
    const auto needs = needs_of(ctx, 5);
    variable_list result(6);  // + pool's
    if (at::GradMode::is_enabled()) {
      auto g = second_order("conv_block", {s[0], s[1], s[2], s[3], s[4]}, needs, pool, grads[0]);
      std::copy(g.begin(), g.end(), result.begin());
      return result;
    }
    auto r = conv_block_backward_op().call(grads[0], s[0], s[1], s[5], s[6], s[7], s[3], s[4], pool,
                                           {needs[0], needs[1], needs[2]});
    at::Tensor g[5] = {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r)};
    for (size_t i = 0; i < 5; ++i) {
      if (needs[i]) {
        result[i] = g[i];
      }
    }
    return result;
  }
};

struct PlaneNormFunction : public torch::autograd::Function<PlaneNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& norm_weight,
                               const at::Tensor& norm_bias, bool pool) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, mean, rstd] = plane_norm_op().call(y, norm_weight, norm_bias, pool);
    ctx->saved_data["pool"] = pool;
    ctx->save_for_backward({y, norm_weight, norm_bias, mean, rstd});
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const bool pool = ctx->saved_data["pool"].toBool();
    const auto needs = needs_of(ctx, 3);
    variable_list result(4);
    if (at::GradMode::is_enabled()) {
      auto g = second_order("plane_norm", {s[0], s[1], s[2]}, needs, pool, grads[0]);
      std::copy(g.begin(), g.end(), result.begin());
      return result;
    }
    auto r = plane_norm_backward_op().call(grads[0], s[0], s[3], s[4], s[1], s[2], pool);
    at::Tensor g[3] = {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
    for (size_t i = 0; i < 3; ++i) {
      if (needs[i]) {
        result[i] = g[i];
      }
    }
    return result;
  }
};

Four conv_block_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& norm_weight, const at::Tensor& norm_bias, bool pool) {
  auto r = ConvBlockFunction::apply(x, weight, bias, norm_weight, norm_bias, pool);
  return {r[0], r[1], r[2], r[3]};
}

Three plane_norm_autograd(const at::Tensor& y, const at::Tensor& norm_weight, const at::Tensor& norm_bias, bool pool) {
  auto r = PlaneNormFunction::apply(y, norm_weight, norm_bias, pool);
  return {r[0], r[1], r[2]};
}

// set_second_order(fn) -> None: fn(op: str, inputs: tuple, needs: tuple, pool: bool, grad) -> grads
PyObject* set_second_order(PyObject*, PyObject* fn) {
  if (!PyCallable_Check(fn)) {
    PyErr_SetString(PyExc_TypeError, "set_second_order(fn): fn must be callable");
    return nullptr;
  }
  Py_INCREF(fn);
  Py_XDECREF(g_second_order);
  g_second_order = fn;
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"set_second_order", set_second_order, METH_O,
     "Register the Python function that conv_block's and plane_norm's C++ backward call for second-order grads."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

TORCH_LIBRARY_IMPL(anml_fast, Autograd, m) {
  m.impl("conv_block", &conv_block_autograd);
  m.impl("plane_norm", &plane_norm_autograd);
}

int anml_fast_add_conv_block_autograd(PyObject* module) {
  return PyModule_AddFunctions(module, kMethods);
}
