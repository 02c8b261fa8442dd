"""The compiled multi-tensor updates against their plain-PyTorch twins, at ANML's sizes.

sgd_update over the PLN's 14 tensors (3.5M values: the inner loop's step, 20 per task) and over all
28 tensors; adam_update_ over all 28 (6.1M values: the meta-step), with torch.optim.Adam's own
fused CUDA step as a further baseline (C++/CUDA); adam_update_batched_ (Triton) over the PLN's 14
tensors stacked over the whole-PLN protocol's 150 trajectories (8.4 GB of state). Batch size does
not enter an update; the sizes are the model's, read from anml_fast.models so that they are the
ones the trainer uses. Each timed call ends with torch.cuda.synchronize(); peak memory above the
inputs is recorded in extra_info.

    python3 -m pytest bench/bench_multi_tensor.py --benchmark-json=multi_tensor.json
    python3 bench/bench_multi_tensor.py multi_tensor.json      # the markdown table for the README
"""
import importlib
import sys

import pytest
import torch
from _measure import kind_of, record_kernel_time, record_peak, timings  # bench/_measure.py

from anml_fast.models import ModelConfig, build, select
from anml_fast.ops import reference

mt = importlib.import_module("anml_fast.ops.multi_tensor")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not mt.available("cuda"),
                                reason="needs a CUDA GPU and the extension's CUDA kernels")

ROUNDS = 200
_NET = build(ModelConfig())
PARTS = {"pln": select(_NET.init_params().keys(), ["pln"]),
         "anml": list(_NET.init_params().keys())}


def tensors(part, count):
    shapes = {s.name: s.shape for s in _NET.param_specs()}
    g = torch.Generator(device="cuda").manual_seed(0)
    return [[torch.randn(shapes[n], device="cuda", generator=g) for n in PARTS[part]]
            for _ in range(count)]




# impl varies fastest (the top decorator): each op runs right beside its twin, so a drift
# between rows (clocks, the host) parts the pair as little as the order allows
@pytest.mark.parametrize("impl", ["compiled", "twin"])
@pytest.mark.parametrize("part", list(PARTS))
def test_sgd_update(benchmark, impl, part):
    params, grads = tensors(part, 2)
    fn = mt.sgd_update if impl == "compiled" else reference.sgd_update

    def run():
        out = fn(params, grads, 0.1)
        torch.cuda.synchronize()
        return out

    run()
    record_peak(benchmark, run)
    record_kernel_time(benchmark, run)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=10)


@pytest.mark.parametrize("impl", ["compiled", "twin", "torch_fused"])
@pytest.mark.parametrize("part", ["anml"])
def test_adam_update(benchmark, impl, part):
    params, grads, exp_avgs, exp_avg_sqs = tensors(part, 4)
    exp_avg_sqs = [v.abs() for v in exp_avg_sqs]
    if impl == "torch_fused":
        # torch.optim.Adam(fused=True)'s kernel, called as its step calls it (one step count).
        steps = [torch.tensor(10.0, device="cuda") for _ in params]

        def update():
            torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=1e-3,
                               beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                               maximize=False)
    else:
        fn = mt.adam_update_ if impl == "compiled" else reference.adam_update_

        def update():
            fn(params, grads, exp_avgs, exp_avg_sqs, 10, 1e-3)

    def run():
        update()
        torch.cuda.synchronize()

    run()
    record_peak(benchmark, run)
    record_kernel_time(benchmark, run)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=10)


TRAJECTORIES = 150  # the 600-class whole-PLN protocol's trajectories, side by side


@pytest.mark.parametrize("impl", ["compiled", "twin"])
@pytest.mark.parametrize("part", ["pln"])
def test_adam_update_batched(benchmark, impl, part):
    """One Adam update of every trajectory's PLN, each tensor stacked over the trajectories with a
    learning rate per trajectory (run_finetune_batched's update): Triton, one launch a tensor,
    against the twin's elementwise passes."""
    ab = importlib.import_module("anml_fast.ops.adam_batched")
    if impl == "compiled" and not ab.available("cuda"):
        pytest.skip(f"the Triton batched Adam does not work here: {ab.unavailable_reason('cuda')}")
    shapes = {s.name: s.shape for s in _NET.param_specs()}
    g = torch.Generator(device="cuda").manual_seed(0)
    stacks = [[torch.randn(TRAJECTORIES, *shapes[n], device="cuda", generator=g) for _ in range(4)]
              for n in PARTS[part]]
    for s in stacks:
        s[3].abs_()
    lr = torch.full((TRAJECTORIES,), 1e-4, device="cuda")
    fn = ab.adam_update_batched_ if impl == "compiled" else reference.adam_update_batched_

    def run():
        for p, grad, m, v in stacks:
            fn(p, grad, m, v, 10, lr)
        torch.cuda.synchronize()

    run()
    record_peak(benchmark, run)
    record_kernel_time(benchmark, run)
    benchmark.pedantic(run, rounds=20, warmup_rounds=3)


def table(path: str) -> str:
    """Median (IQR) wall time and GPU kernel time in microseconds per implementation."""
    rows = timings(path, __file__, lambda b: (kind_of(b), b["params"]["part"]))
    lines = ["| op | tensors | impl | wall us (IQR) | wall vs twin | GPU us | GPU vs twin | peak MB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    num = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for (op, part), r in sorted(rows.items()):
        twin_wall, _, twin_gpu, _ = r.get("twin", (None, None, None, None))
        for impl, (m, iqr, gpu, peak) in sorted(r.items()):
            wall_x = f"{twin_wall / m:.2f}x" if twin_wall else "-"
            gpu_x = f"{twin_gpu / gpu:.2f}x" if twin_gpu and gpu else "-"
            lines.append(f"| {op} | {part} ({len(PARTS[part])}) | {impl} | {m:.1f} ({iqr:.1f}) | {wall_x} | "
                         f"{num(gpu)} | {gpu_x} | {num(peak)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
