"""The compiled conv block (C++/CUDA) against its plain-PyTorch twin, at ANML's PLN shapes.

Forward, backward and both, for the three blocks of the 256-channel trunk (conv 3->256 on 28x28
with pooling, 256->256 on 13x13 with pooling, 256->256 on 5x5 without), at B = 1 (inner loop,
meta-test), 20 and 84 (meta-loss). Both sides come from the modules the tests check
(anml_fast.ops.conv_block and anml_fast.ops.reference). Each timed call ends with
torch.cuda.synchronize() (pytest-benchmark does not wait for the GPU); peak memory above the
inputs is recorded in extra_info. cuDNN runs with PyTorch's defaults (TF32 allowed) on both sides.

    python3 -m pytest bench/bench_conv_block.py --benchmark-json=conv_block.json
    python3 bench/bench_conv_block.py conv_block.json      # the markdown table for the README
"""
import importlib
import sys

import pytest
import torch
from _measure import kind_of, record_kernel_time, record_peak, time_backward, timings  # bench/_measure.py

from anml_fast import ops
from anml_fast.ops import reference

cb = importlib.import_module("anml_fast.ops.conv_block")
if not callable(ops.conv_block):  # the submodule import rebinds the package's name (see the tests)
    ops.conv_block = reference.conv_block

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not cb.available("cuda"),
                                reason="needs a CUDA GPU and the extension's CUDA kernels")

C = 256
# layer: (C_in, input side, pool); the input of block 1 is the image, which needs no gradient.
LAYERS = {1: (3, 28, True), 2: (C, 13, True), 3: (C, 5, False)}
BATCHES = [1, 20, 84]
ROUNDS = 200
IMPLS = {"compiled": cb.conv_block, "twin": reference.conv_block}


def inputs(layer, B, requires_grad=False):
    c_in, side, pool = LAYERS[layer]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, c_in, side, side, device="cuda", generator=g)
    w = torch.randn(C, c_in, 3, 3, device="cuda", generator=g) * (2 / (9 * c_in)) ** 0.5
    b, nw, nb = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda"), torch.zeros(C, device="cuda")
    params = [t.requires_grad_(requires_grad) for t in (w, b, nw, nb)]
    x.requires_grad_(requires_grad and layer > 1)
    leaves = params + ([x] if x.requires_grad else [])
    return [x, *params], leaves, pool




# impl varies fastest (the top decorator): each op runs right beside its twin, so a drift
# between rows (clocks, the host) parts the pair as little as the order allows
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_forward(benchmark, impl, layer, B):
    args, _, pool = inputs(layer, B)
    fn = IMPLS[impl]

    def run():
        out = fn(*args, pool=pool)
        torch.cuda.synchronize()
        return out

    run()  # cuDNN picks its algorithms outside the timing
    record_peak(benchmark, run)
    record_kernel_time(benchmark, run)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=10)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_backward(benchmark, impl, layer, B):
    args, leaves, pool = inputs(layer, B, requires_grad=True)
    fn = IMPLS[impl]
    time_backward(benchmark, lambda: fn(*args, pool=pool).square().mean(), leaves, ROUNDS)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_forward_backward(benchmark, impl, layer, B):
    args, leaves, pool = inputs(layer, B, requires_grad=True)
    fn = IMPLS[impl]

    def run():
        grads = torch.autograd.grad(fn(*args, pool=pool).square().mean(), leaves)
        torch.cuda.synchronize()
        return grads

    run()
    record_peak(benchmark, run)
    record_kernel_time(benchmark, run)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=10)


def table(path: str) -> str:
    """Median (IQR) wall time and GPU kernel time in microseconds, compiled next to twin."""
    rows = timings(path, __file__, lambda b: (kind_of(b), b["params"]["layer"], b["params"]["B"]))
    lines = ["| pass | block | B | wall us, compiled (IQR) | wall us, twin (IQR) | wall speed-up | "
             "GPU us, compiled / twin | GPU speed-up | peak MB, compiled / twin |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    num = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for (kind, layer, B), r in sorted(rows.items()):
        if "compiled" not in r or "twin" not in r:
            continue
        (cm, ci, ck, cp), (tm, ti, tk, tp) = r["compiled"], r["twin"]
        gpu = f"{tk / ck:.2f}x" if ck and tk else "-"
        lines.append(f"| {kind} | {layer} | {B} | {cm:.1f} ({ci:.1f}) | {tm:.1f} ({ti:.1f}) | {tm / cm:.2f}x | "
                     f"{num(ck)} / {num(tk)} | {gpu} | {num(cp)} / {num(tp)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
