// anml_fast::sgd_update and anml_fast::adam_update_ on the CPU: one fused pass per tensor over all
// of its lists (ATen's Adam makes about seven), with the element arithmetic the CUDA kernel uses.
// Also the checks and the per-tensor ATen fallback that both devices share.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <utility>

#include "multi_tensor.h"

namespace anml_fast {

namespace {

// The checks build a message rather than throw: the Python wrappers ask for it first
// (sgd_update_eager, check_update_args) and raise it themselves. The message is put together
// without iostreams: on the GPU machine's torch image (torch 2.11, 2026-11-30) formatting a
// number into a stream in this extension (c10::str, TORCH_CHECK's message) crashed the process.
std::string shape_str(at::IntArrayRef sizes) {
  std::string r = "[";
  for (size_t k = 0; k < sizes.size(); ++k) {
    r += (k ? ", " : "") + std::to_string(sizes[k]);
  }
  return r + "]";
}

// The messages are built only once a check fails: these run on every eager update call.
std::string same_layout_problem(const char* op, const char* what, at::TensorList lists_a,
                                at::TensorList lists_b, size_t i) {
  const at::Tensor& a = lists_a[i];
  const at::Tensor& b = lists_b[i];
  auto where = [&] { return std::string(op) + ": " + what + "[" + std::to_string(i) + "] "; };
  auto param = [&] { return " but params[" + std::to_string(i) + "] "; };
  if (a.sizes() != b.sizes()) {
    return where() + "has shape " + shape_str(b.sizes()) + param() + "has " + shape_str(a.sizes());
  }
  if (a.device() != b.device()) {
    return where() + "is on " + b.device().str() + param() + "is on " + a.device().str();
  }
  if (!at::isFloatingType(b.scalar_type())) {
    return where() + "must be floating point, got " + c10::toString(b.scalar_type());
  }
  return {};
}

std::string common_problem(const char* op, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    auto where = [&] { return std::string(op) + ": params[" + std::to_string(i) + "] "; };
    if (!at::isFloatingType(params[i].scalar_type())) {
      return where() + "must be floating point, got " + c10::toString(params[i].scalar_type());
    }
    if (params[i].device() != params[0].device()) {
      return where() + "is on " + params[i].device().str() + " but params[0] is on " + params[0].device().str();
    }
  }
  return {};
}

}  // namespace

std::string sgd_update_problem(at::TensorList params, at::TensorList grads) {
  if (params.size() != grads.size()) {
    return "sgd_update: " + std::to_string(params.size()) + " params but " + std::to_string(grads.size()) +
           " grads";
  }
  std::string problem = common_problem("sgd_update", params);
  for (size_t i = 0; problem.empty() && i < params.size(); ++i) {
    problem = same_layout_problem("sgd_update", "grads", params, grads, i);
  }
  return problem;
}

std::string adam_update_problem(at::TensorList params, at::TensorList grads,
                                at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                int64_t step) {
  if (grads.size() != params.size() || exp_avgs.size() != params.size() ||
      exp_avg_sqs.size() != params.size()) {
    return "adam_update_: the four lists must have one length, got " + std::to_string(params.size()) + ", " +
           std::to_string(grads.size()) + ", " + std::to_string(exp_avgs.size()) + ", " +
           std::to_string(exp_avg_sqs.size());
  }
  if (step < 1) {
    return "adam_update_: step counts from 1, got " + std::to_string(step);
  }
  std::string problem = common_problem("adam_update_", params);
  for (size_t i = 0; problem.empty() && i < params.size(); ++i) {
    for (const auto& [what, list] : {std::pair<const char*, at::TensorList>{"grads", grads},
                                     {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}) {
      if (problem.empty()) {
        problem = same_layout_problem("adam_update_", what, params, list, i);
      }
    }
  }
  return problem;
}

int64_t check_sgd_update_args(at::TensorList params, at::TensorList grads) {
  const std::string problem = sgd_update_problem(params, grads);
  TORCH_CHECK(problem.empty(), problem.c_str());
  return static_cast<int64_t>(params.size());
}

int64_t check_adam_update_args(at::TensorList params, at::TensorList grads,
                               at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                               int64_t step) {
  const std::string problem = adam_update_problem(params, grads, exp_avgs, exp_avg_sqs, step);
  TORCH_CHECK(problem.empty(), problem.c_str());
  return static_cast<int64_t>(params.size());
}

bool flat_walkable(const std::vector<at::TensorList>& lists, size_t i, at::ScalarType dtype) {
  for (const at::TensorList& list : lists) {
    const at::Tensor& t = list[i];
    if (t.scalar_type() != dtype || !t.is_contiguous() || t.is_conj() || t.is_neg()) {
      return false;
    }
  }
  return true;
}

namespace {
thread_local bool g_shared_block = false;
}  // namespace

SgdUpdateSharedBlock::SgdUpdateSharedBlock() : was_(g_shared_block) {
  g_shared_block = true;
}

SgdUpdateSharedBlock::~SgdUpdateSharedBlock() {
  g_shared_block = was_;
}

bool SgdUpdateSharedBlock::take() {
  return std::exchange(g_shared_block, false);
}

at::Tensor sgd_update_one_aten(const at::Tensor& param, const at::Tensor& grad, double lr) {
  return at::sub(param, grad, lr).contiguous();
}

void adam_update_one_aten_(const at::Tensor& param, const at::Tensor& grad,
                           const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, int64_t step,
                           double lr, double beta1, double beta2, double eps) {
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  exp_avg.lerp_(grad, 1.0 - beta1);
  exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1.0 - beta2);
  const at::Tensor denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps);
  param.addcdiv_(exp_avg, denom, -(lr / bias_correction1));
}

namespace {

// Runs `step` over elements [0, n) of one tensor's lists, in parallel chunks.
template <typename scalar_t, typename Step>
void flat_loop(const std::array<void*, Step::kLists>& data, int64_t n, const Step& step) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kLists = Step::kLists;
  at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      acc_t x[kLists];
      for (int l = 0; l < kLists; ++l) {
        x[l] = (Step::kReads >> l) & 1u ? static_cast<acc_t>(static_cast<scalar_t*>(data[l])[e])
                                        : acc_t(0);
      }
      step(x);
      for (int l = 0; l < kLists; ++l) {
        if ((Step::kWrites >> l) & 1u) {
          static_cast<scalar_t*>(data[l])[e] = static_cast<scalar_t>(x[l]);
        }
      }
    }
  });
}

std::vector<at::Tensor> sgd_update_cpu(at::TensorList params, at::TensorList grads, double lr) {
  const int64_t count = check_sgd_update_args(params, grads);
  std::vector<at::Tensor> out;
  out.reserve(count);
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    if (!flat_walkable({params, grads}, i, p.scalar_type())) {
      out.push_back(sgd_update_one_aten(p, grads[i], lr));
      continue;
    }
    at::Tensor o = at::empty(p.sizes(), p.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "sgd_update_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      flat_loop<scalar_t>({const_cast<void*>(p.const_data_ptr()),
                           const_cast<void*>(grads[i].const_data_ptr()), o.mutable_data_ptr()},
                          p.numel(), SgdStep<acc_t>{static_cast<acc_t>(lr)});
    });
    out.push_back(std::move(o));
  }
  return out;
}

void adam_update_cpu_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, int64_t step, double lr, double beta1,
                      double beta2, double eps) {
  const int64_t count = check_adam_update_args(params, grads, exp_avgs, exp_avg_sqs, step);
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    if (!flat_walkable({params, grads, exp_avgs, exp_avg_sqs}, i, p.scalar_type())) {
      adam_update_one_aten_(p, grads[i], exp_avgs[i], exp_avg_sqs[i], step, lr, beta1, beta2, eps);
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "adam_update_cpu_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      flat_loop<scalar_t>({p.mutable_data_ptr(), const_cast<void*>(grads[i].const_data_ptr()),
                           exp_avgs[i].mutable_data_ptr(), exp_avg_sqs[i].mutable_data_ptr()},
                          p.numel(), AdamStep<acc_t>::make(step, lr, beta1, beta2, eps));
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(anml_fast, CPU, m) {
  m.impl("sgd_update", &sgd_update_cpu);
  m.impl("adam_update_", &adam_update_cpu_);
}

}  // namespace anml_fast
