"""The batch-1 Triton convolution ops against their plain-PyTorch twins, at the inner step's shapes.

For conv2 (256 -> 256 on 13 x 13, after norm1's pooled 26 x 26 planes) and conv3 (256 -> 256 on
5 x 5, after norm2's pooled 11 x 11 planes), batch 1: the forward (`conv_valid`), the input grad
(`conv_valid_backward`), the weight grad's SGD step (`conv_valid_sgd`) and the input grad carried
on through the previous block's plane norm (`conv_valid_input_grad_norm_backward`; its twin is the
input grad then autograd through `reference.plane_norm`). Both sides at two float32 precisions set
alike (`torch.backends.cudnn.allow_tf32`, which the Triton kernels follow too): tf32 (PyTorch's
default) and fp32. Two modes: eager, one call a timed round; graph20, 20 calls replayed from one
CUDA graph, reported per call (the launch overhead gone, as in the meta-step's graph). Timed calls
end with torch.cuda.synchronize().

    python3 -m pytest bench/bench_conv_valid.py --benchmark-json=conv_valid.json
    python3 bench/bench_conv_valid.py conv_valid.json      # the markdown table
"""
import importlib
import sys

import pytest
import torch
from _measure import graphed, record_kernel_time, timings  # bench/_measure.py
from bench_inner_step import conv_precision

from anml_fast.ops import reference

cv = importlib.import_module("anml_fast.ops.conv_valid")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not cv.available("cuda"),
                                reason="needs a CUDA GPU and the Triton convolutions working on it")

ROUNDS = 200
CHAIN = 20
# layer: (C_in = C_out, input side, side of the conv output y that the input was normed from)
LAYERS = {"conv2": (256, 13, 26), "conv3": (256, 5, 11)}
IMPLS = {"triton": cv, "twin": reference}


def _inputs(layer):
    c, side, y_side = LAYERS[layer]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, c, side, side, device="cuda", generator=g)
    w = torch.randn(c, c, 3, 3, device="cuda", generator=g) / (9 * c) ** 0.5
    gy = torch.randn(1, c, side - 2, side - 2, device="cuda", generator=g)
    y = torch.randn(1, c, y_side, y_side, device="cuda", generator=g)
    gamma, beta = 1 + 0.1 * torch.randn(c, device="cuda", generator=g), 0.1 * torch.randn(c, device="cuda", generator=g)
    return x, w, gy, (y, *cv.plane_stats(y), gamma, beta, True)


def _call(impl, op, layer):
    m = IMPLS[impl]
    x, w, gy, norm = _inputs(layer)
    return {"forward": lambda: m.conv_valid(x, w),
            "input_grad": lambda: m.conv_valid_backward(gy, x, w, True, False),
            "sgd": lambda: m.conv_valid_sgd(gy, x, w, 0.1),
            "input_grad_norm_backward": lambda: m.conv_valid_input_grad_norm_backward(gy, w, *norm)}[op]


# impl varies fastest (the top decorator): each op runs right beside its twin, so a drift
# between rows (clocks, the host) parts the pair as little as the order allows
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", ["eager", f"graph{CHAIN}"])
@pytest.mark.parametrize("precision", ["tf32", "fp32"])
@pytest.mark.parametrize("op", ["forward", "input_grad", "sgd", "input_grad_norm_backward"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_conv_valid_op(benchmark, impl, layer, op, precision, mode):
    with conv_precision(precision):  # read at each launch, and captured with the graph
        fn = _call(impl, op, layer)
        calls = graphed(fn, CHAIN) if mode != "eager" else fn

        def run():
            calls()
            torch.cuda.synchronize()
        record_kernel_time(benchmark, run)
        benchmark.extra_info.update(card=torch.cuda.get_device_name(), precision=precision,
                                    calls=CHAIN if mode != "eager" else 1)
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=10)


def table(path: str) -> str:
    """Median (IQR) microseconds a call, and the speed-up over the twin of the same row."""
    rows = timings(path, __file__, lambda b: (b["params"]["layer"], b["params"]["op"], b["params"]["mode"],
                                              b["params"]["precision"]), per_call="calls")
    lines = ["| layer | op | mode | float32 convs | impl | wall us (IQR) | vs twin | GPU us |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: |"]
    for (layer, op, mode, precision), r in sorted(rows.items()):
        twin = r.get("twin", (None,))[0]
        for impl, (m, iqr, gpu, _) in sorted(r.items()):
            lines.append(f"| {layer} | {op} | {mode} | {precision} | {impl} | {m:.1f} ({iqr:.1f}) | "
                         f"{'' if twin is None else f'{twin / m:.2f}x'} | {gpu if gpu is None else f'{gpu:.1f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
