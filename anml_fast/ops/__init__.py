"""The ops that models and trainers call, and the one place that decides which implementation runs.

Every op has a compiled implementation and a plain-PyTorch twin in `reference` with the same
signature (the twin is the fallback and the tests' reference):

  op                                     compiled implementation
  conv_block                             C++/CUDA extension: cuDNN conv + one fused norm/ReLU/pool kernel
  plane_norm                             C++/CUDA extension: that norm/ReLU/pool kernel alone
  conv_valid, conv_valid_backward        Triton: the batch-1 inner loop's convolution and its grads as
                                         implicit GEMMs (cuDNN's kernels are slow at batch 1)
  conv_valid_sgd                         Triton: the conv weight's SGD step, dW never written
  conv_valid_input_grad_norm_backward    Triton: the input grad carried on through the previous
                                         block's plane norm in the same launch
  conv_valid_plane_norm                  Triton: the convolution, then the plane norm on its output,
                                         in one launch
  gated_head, gated_head_cross_entropy   Triton: gate, linear layer and cross-entropy fused (from 17
                                         rows up the three products on cuBLAS, the rest in Triton)
  gated_head_ce_sgd_                     Triton: the head's batch-1 SGD step, dW never written
  sgd_update, adam_update_               C++/CUDA extension: one launch over all tensors
  output_layer_adam_step_                Triton: T meta-test output layers' Adam step, gW never written,
                                         W read once (the next step's logits carried in `logits`,
                                         primed once by output_layer_logits, plain PyTorch)
  adam_update_batched_                   Triton: Adam on T stacked tensors with one learning rate each
                                         (the whole-PLN meta-test), one launch a tensor

Which one runs, per call (`backend=`), for a block (`with use_backend(...)`), or for the process
(`set_backend`):
  "auto"      the compiled op for CUDA tensors when it works here, else the twin. On the CPU the
              twins run: the C++ CPU kernels exist to test the ops' arithmetic;
  "compiled"  the compiled op on any device where it works; an error where it does not;
  "torch"     the twin.
`available()` reports what is built and works: it runs each op once (the answer is remembered).
Call it before `torch.compile` traces a model, so that the self-tests are not traced.
Second order: every compiled op's backward, when asked for a graph (create_graph=True),
differentiates its twin, so double backward is exact (gradgradcheck in the tests).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from . import reference
from . import adam_batched as _adam_batched_triton
from . import conv_block as _conv_block_ext  # bound before the op names below, which they shadow
from . import conv_valid as _conv_valid_triton
from . import gated_head as _gated_head_triton
from . import multi_tensor as _multi_tensor_ext
from . import output_layer as _output_layer_triton

BACKENDS = ("auto", "compiled", "torch")
_setting = "auto"

_COMPILED = {
    "conv_block": _conv_block_ext,
    "plane_norm": _conv_block_ext,
    "conv_valid": _conv_valid_triton,
    "conv_valid_backward": _conv_valid_triton,
    "conv_valid_sgd": _conv_valid_triton,
    "conv_valid_input_grad_norm_backward": _conv_valid_triton,
    "conv_valid_plane_norm": _conv_valid_triton,
    "sgd_update": _multi_tensor_ext,
    "adam_update_": _multi_tensor_ext,
    "gated_head": _gated_head_triton,
    "gated_head_cross_entropy": _gated_head_triton,
    "gated_head_ce_sgd_": _gated_head_triton,
    "output_layer_adam_step_": _output_layer_triton,
    "adam_update_batched_": _adam_batched_triton,
}


def set_backend(name: str) -> None:
    """The process-wide default backend ("auto", "compiled" or "torch")."""
    global _setting
    _check(name)
    _setting = name


def get_backend() -> str:
    return _setting


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another default backend, e.g. `with use_backend("torch"):` for the twins."""
    global _setting
    _check(name)
    old, _setting = _setting, name
    try:
        yield
    finally:
        _setting = old


def _check(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")


_works: dict[tuple[str, str], bool] = {}  # (op, device type) -> the self-test's answer


def _compiled_works(op: str, device: torch.device, backend: str) -> bool:
    key = (op, device.type)
    if key not in _works:
        if torch.compiler.is_compiling():
            # the self-test runs kernels: never trace it. Unresolved here, only a forced
            # "compiled" uses the compiled op (call available() first to resolve it).
            return backend == "compiled"
        _works[key] = _COMPILED[op].available(device)
    return _works[key]


def choose(op: str, device: torch.device, backend: str | None = None) -> Callable:
    """The implementation of `op` that runs for tensors on `device`."""
    backend = backend or _setting
    _check(backend)
    module = _COMPILED[op]
    if backend == "torch":
        return getattr(reference, op)
    if backend == "compiled":
        if not _compiled_works(op, device, backend):
            raise RuntimeError(f"compiled {op} does not work on {device.type} here: "
                               f"{module.unavailable_reason(device)} (use backend='torch')")
        return getattr(module, op)
    if device.type != "cuda":
        return getattr(reference, op)
    return getattr(module, op) if _compiled_works(op, device, backend) else getattr(reference, op)


def conv_block(x, weight, bias, norm_weight, norm_bias, pool: bool, *, backend: str | None = None):
    return choose("conv_block", x.device, backend)(x, weight, bias, norm_weight, norm_bias, pool)


def plane_norm(y, norm_weight, norm_bias, pool: bool, *, backend: str | None = None):
    return choose("plane_norm", y.device, backend)(y, norm_weight, norm_bias, pool)


def conv_valid(x, weight, *, backend: str | None = None):
    return choose("conv_valid", x.device, backend)(x, weight)


def conv_valid_backward(grad_y, x, weight, input_grad: bool, weight_grad: bool, *, backend: str | None = None):
    return choose("conv_valid_backward", x.device, backend)(grad_y, x, weight, input_grad, weight_grad)


def conv_valid_sgd(grad_y, x, weight, lr: float, *, backend: str | None = None):
    return choose("conv_valid_sgd", x.device, backend)(grad_y, x, weight, lr)


def conv_valid_input_grad_norm_backward(grad_y, weight, y, mean, rstd, norm_weight, norm_bias, pool: bool, *,
                                        backend: str | None = None):
    fn = choose("conv_valid_input_grad_norm_backward", y.device, backend)
    return fn(grad_y, weight, y, mean, rstd, norm_weight, norm_bias, pool)


def conv_valid_plane_norm(x, weight, norm_weight, norm_bias, pool: bool, *, backend: str | None = None):
    return choose("conv_valid_plane_norm", x.device, backend)(x, weight, norm_weight, norm_bias, pool)


def gated_head(h, gate_logits, weight, bias, *, backend: str | None = None):
    return choose("gated_head", h.device, backend)(h, gate_logits, weight, bias)


def gated_head_cross_entropy(h, gate_logits, weight, bias, target, *, backend: str | None = None):
    fn = choose("gated_head_cross_entropy", h.device, backend)
    return fn(h, gate_logits, weight, bias, target)


def gated_head_ce_sgd_(h, gate_logits, weight, bias, target, lr: float, *, backend: str | None = None):
    fn = choose("gated_head_ce_sgd_", h.device, backend)
    return fn(h, gate_logits, weight, bias, target, lr)


def sgd_update(params, grads, lr: float, *, backend: str | None = None):
    if not params:
        return []
    return choose("sgd_update", params[0].device, backend)(params, grads, lr)


def adam_update_(params, grads, exp_avgs, exp_avg_sqs, step: int, lr: float, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, *, backend: str | None = None) -> None:
    if params:
        choose("adam_update_", params[0].device, backend)(params, grads, exp_avgs, exp_avg_sqs,
                                                          step, lr, beta1, beta2, eps)


def output_layer_logits(W, b, X, step: torch.Tensor) -> torch.Tensor:
    """The `logits` state output_layer_adam_step_ expects before step `step` (one GEMV; call it once,
    before step 1): W[t] X[t, step - 1] + b[t]. The same for every backend."""
    return reference.output_layer_logits(W, b, X, step)


def output_layer_adam_step_(W, b, mW, vW, mb, vb, logits, X, Y, lr, step: torch.Tensor, *,
                            backend: str | None = None) -> None:
    choose("output_layer_adam_step_", W.device, backend)(W, b, mW, vW, mb, vb, logits, X, Y, lr, step)


def adam_update_batched_(p, g, m, v, step, lr, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, *,
                         backend: str | None = None) -> None:
    choose("adam_update_batched_", p.device, backend)(p, g, m, v, step, lr, beta1, beta2, eps)


def available() -> dict:
    """What works here, per op and device type: True, or the reason it does not."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report: dict = {"torch": True}
    for op, module in _COMPILED.items():
        for dev in devices:
            _works[(op, dev)] = ok = module.available(dev)
            report[f"{op}@{dev}"] = True if ok else module.unavailable_reason(dev)
    return report


__all__ = ["BACKENDS", "available", "choose", "get_backend", "set_backend", "use_backend", "reference",
           "conv_block", "plane_norm", "conv_valid", "conv_valid_backward", "conv_valid_sgd",
           "conv_valid_input_grad_norm_backward", "conv_valid_plane_norm", "gated_head", "gated_head_cross_entropy", "gated_head_ce_sgd_",
           "sgd_update", "adam_update_",
           "output_layer_logits", "output_layer_adam_step_", "adam_update_batched_"]
