"""Where an eager forward + backward of a batch-1 Triton op spends its host time (conv2).

The eager forward + backward rows of bench/host_cost.py lose to the twin while the op's own
forward and backward calls win. This times, in one run, host us a call (no synchronise per call,
medians of 5 rounds):
  twin fwd+bwd                          the twin through autograd
  compiled fwd+bwd                      the compiled op through autograd (its backward is Python)
  ..., no engine threads                the same under torch.autograd.set_multithreading_enabled(False):
                                        the backward runs on the calling thread, not the engine's
                                        CUDA device thread
  manual fwd + backward op              the op's forward and backward called directly, no autograd
  fwd with grad                         the forward alone, recording its autograd node
each with plans (kernels/_plan.py: the op's call replayed from C++, and, through autograd, a C++
node whose backward runs the backward op's plan), with the C++ launch alone, and with the Python
launch (kernels/_launch.py); and, to tell the
engine's cost of any Python backward from this op's, an identity autograd.Function on a CUDA
tensor (its backward returns the grad) with and without the engine's threads.

    python3 bench/autograd_hop.py [--out FILE.json]
"""
import argparse
import json
import statistics
import sys
import time

import torch

from anml_fast import ops


def per_call_us(fn, calls: int = 400) -> float:
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / (calls // 5) * 1e6)
    return statistics.median(rounds)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the figures to this JSON file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("autograd_hop.py: needs a CUDA GPU")
    ops.available()
    kernels = sys.modules["anml_fast.ops.conv_valid"]._kernels()
    launch = sys.modules[kernels.launch.__module__]
    x = torch.randn(1, 256, 13, 13, device="cuda")  # conv2's input at batch 1
    w = torch.randn(256, 256, 3, 3, device="cuda") * 0.02
    gy = torch.randn(1, 256, 11, 11, device="cuda")
    x_leaf, w_leaf = x.clone().requires_grad_(), w.clone().requires_grad_()

    def forward_backward(backend):
        def call():
            x_leaf.grad = w_leaf.grad = None
            ops.conv_valid(x_leaf, w_leaf, backend=backend).backward(gy)
        return call

    def manual():
        with torch.no_grad():
            kernels.direct.conv_valid(x, w)
            kernels.direct.conv_valid_backward(gy, x, w, True, True)

    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    plan = sys.modules[launch.__name__.replace("_launch", "_plan")]
    for tag, cxx, plans in (("plans", True, True), ("cxx launch", True, False), ("python launch", False, False)):
        launch._CXX_ENABLED[0] = cxx
        plan.enable(plans)
        res["twin fwd+bwd"] = per_call_us(forward_backward("torch"))
        res[f"{tag}: compiled fwd+bwd"] = per_call_us(forward_backward("compiled"))
        with torch.autograd.set_multithreading_enabled(False):
            res[f"{tag}: compiled fwd+bwd, no engine threads"] = per_call_us(forward_backward("compiled"))
            res["twin fwd+bwd, no engine threads"] = per_call_us(forward_backward("torch"))
        res[f"{tag}: manual fwd + backward op"] = per_call_us(manual)
        res[f"{tag}: fwd with grad"] = per_call_us(lambda: ops.conv_valid(x_leaf, w_leaf, backend="compiled"))
    t_leaf = torch.randn(16, device="cuda", requires_grad=True)
    ones = torch.ones(16, device="cuda")

    def identity():
        t_leaf.grad = None
        _Identity.apply(t_leaf).backward(ones)

    def view_only():  # the same graph with a C++ backward node (view) in place of the Python one
        t_leaf.grad = None
        t_leaf.view_as(t_leaf).backward(ones)
    res["identity Function fwd+bwd"] = per_call_us(identity)
    res["view (C++ node) fwd+bwd"] = per_call_us(view_only)
    with torch.autograd.set_multithreading_enabled(False):
        res["identity Function fwd+bwd, no engine threads"] = per_call_us(identity)
        res["view (C++ node) fwd+bwd, no engine threads"] = per_call_us(view_only)
    for k, v in res.items():
        print(f"{k:50s} {v:8.1f}" if isinstance(v, float) else f"{k}: {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
