"""The fused gated head (Triton) against its plain-PyTorch twin, at ANML's shapes (F = 2304, O = 1000).

Forward, backward and both, for the logits op and the fused cross-entropy, at B = 1 (inner loop,
meta-test) and B = 84 (meta-loss); and the batch-1 SGD step of the head (fused update vs the twin's
grads plus an explicit update). Both sides come from anml_fast.ops.gated_head, the code the tests
check. Each timed call ends with torch.cuda.synchronize() (pytest-benchmark does not wait for the
GPU); peak memory above the inputs is recorded in extra_info. mode "eager" launches from Python as
a training loop would; mode "graph" replays a CUDA graph of the same call, which leaves the GPU
time (plus one synchronisation): at these sizes eager times are mostly Python and launch overhead.

    python3 -m pytest bench/bench_gated_head.py --benchmark-json=gated_head.json
    python3 bench/bench_gated_head.py gated_head.json      # the markdown table for the README
"""
import importlib
import sys

import pytest
import torch
from _measure import graphed, kind_of, record_peak, time_backward, timings  # bench/_measure.py

gh = importlib.import_module("anml_fast.ops.gated_head")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

F_, O_ = 2304, 1000
ROWS = [1, 84]
ROUNDS = 200
IMPLS = {
    "fused": {"logits": gh.gated_head, "ce": gh.gated_head_cross_entropy, "sgd": gh.gated_head_ce_sgd_},
    "twin": {"logits": gh.gated_head_reference, "ce": gh.gated_head_cross_entropy_reference,
             "sgd": gh.gated_head_ce_sgd_reference_},
}


def inputs(B, requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(B, F_, device="cuda", generator=g).relu()
    z = torch.randn(B, F_, device="cuda", generator=g)
    w = torch.randn(O_, F_, device="cuda", generator=g) * (2 / F_) ** 0.5
    b = torch.zeros(O_, device="cuda")
    y = torch.randint(0, O_, (B,), device="cuda", generator=g)
    return [t.requires_grad_(requires_grad) for t in (h, z, w, b)], y


def call(impl, op, leaves, y):
    fn = IMPLS[impl][op]
    out = fn(*leaves) if op == "logits" else fn(*leaves, y)
    return out if op == "ce" else out.square().mean()  # a scalar to differentiate


def timed(fn, mode):
    inner = graphed(fn) if mode == "graph" else fn

    def run():
        inner()
        torch.cuda.synchronize()
    return run



# impl varies fastest (the top decorator): each op runs right beside its twin, so a drift
# between rows (clocks, the host) parts the pair as little as the order allows
@pytest.mark.parametrize("impl", ["fused", "twin"])
@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("B", ROWS)
@pytest.mark.parametrize("op", ["logits", "ce"])
def test_forward(benchmark, impl, op, B, mode):
    leaves, y = inputs(B)
    fn = IMPLS[impl][op]
    run = timed(lambda: fn(*leaves) if op == "logits" else fn(*leaves, y), mode)
    run()  # compile the kernels outside the timing
    record_peak(benchmark, run)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=10)


@pytest.mark.parametrize("impl", ["fused", "twin"])
@pytest.mark.parametrize("B", ROWS)
@pytest.mark.parametrize("op", ["logits", "ce"])
def test_backward(benchmark, impl, op, B):
    leaves, y = inputs(B, requires_grad=True)
    time_backward(benchmark, lambda: call(impl, op, leaves, y), leaves, ROUNDS, kernel_time=False)


@pytest.mark.parametrize("impl", ["fused", "twin"])
@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("B", ROWS)
@pytest.mark.parametrize("op", ["logits", "ce"])
def test_forward_backward(benchmark, impl, op, B, mode):
    leaves, y = inputs(B, requires_grad=True)
    run = timed(lambda: torch.autograd.grad(call(impl, op, leaves, y), leaves), mode)
    run()
    record_peak(benchmark, run)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=10)


@pytest.mark.parametrize("impl", ["fused", "twin"])
@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("B", ROWS)
def test_sgd_step(benchmark, impl, B, mode):
    """The inner loop's head step: loss, dh, dz and the in-place update of W and b."""
    (h, z, w, b), y = inputs(B)
    step = IMPLS[impl]["sgd"]
    run = timed(lambda: step(h, z, w, b, y, 1e-6), mode)  # a tiny lr: W barely moves over the rounds
    run()
    record_peak(benchmark, run)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=10)


def table(path: str) -> str:
    """Median and interquartile range in microseconds, fused next to twin, from a benchmark JSON."""
    rows = timings(path, __file__, lambda b: (kind_of(b), b["params"].get("op", "sgd"), b["params"]["B"],
                                              b["params"].get("mode", "eager")))
    lines = ["| pass | op | B | mode | fused median (IQR) us | twin median (IQR) us | speed-up | peak MB fused / twin |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    mb = lambda v: "-" if v is None else f"{v:.1f}"
    for (kind, op, B, mode), r in sorted(rows.items()):
        if "fused" not in r or "twin" not in r:
            continue
        (fm, fi, _, fp), (tm, ti, _, tp) = r["fused"], r["twin"]
        lines.append(f"| {kind} | {op} | {B} | {mode} | {fm:.1f} ({fi:.1f}) | {tm:.1f} ({ti:.1f}) | "
                     f"{tm / fm:.2f}x | {mb(fp)} / {mb(tp)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
