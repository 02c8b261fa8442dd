"""The whole batch-1 PLN inner step (forward, backward, SGD update) at the protocol's sizes.

twin:  the model's forward on the plain-PyTorch ops, autograd, torch._foreach SGD (what the
       meta-trainer runs with backend="torch");
fused: `pln_sgd_step_fused`, no autograd: the batch-1 Triton convolutions and the norm kernels,
       the Triton head's cross-entropy SGD step in one cooperative launch, norm3's fused backward,
       the Triton input grads with the previous norm's backward in the same launch, the weight
       grads with the SGD step fused, one multi-tensor SGD launch for the norms (13 launches: conv1's
       norm runs in its convolution's launch, inner_step.FUSED_NORM_BLOCKS);
fused_donate: the same with the head's weights updated in place (`donate=True`), as the
       meta-trainer's inner loop runs 19 of its 20 steps (no copy of the 9 MB head);
fused_donate_no_pdl: fused_donate with programmatic dependent launch off (ANML_FAST_PDL=0,
       kernels/_pdl.py): what PDL saves, measured in the same run;
fused_donate_norm_fwd<blocks>: fused_donate with the named blocks' norms in their convolution's
       launch (conv_valid_plane_norm; norm_fwd23: conv2's and conv3's), against the default in the
       same run (these rows run one after another and drift by several us with their order:
       bench/inner_step_ab.py interleaves such variants);
fused_donate_two_launch_head: fused_donate with the head's step as its forward and backward
       launches (kernels/gated_head.py's ONE_LAUNCH_STEP off) instead of one cooperative launch.
Each at two float32 convolution precisions, set alike for the twin and the fused path (both
follow `torch.backends.cudnn.allow_tf32`, see kernels/conv_valid.py): tf32, PyTorch's default
(cuDNN may run float32 convolutions in TF32, 10-bit mantissa; the Triton dots run one TF32
product), and fp32 (cuDNN in IEEE float32; the Triton dots run 3xTF32, float32 accuracy).
Speed-ups are against the twin at the same precision.
Three modes: eager; graph, one step replayed from a CUDA graph (launch overhead gone on both
sides, but each replay still pays the graph launch and the synchronize); graph20, 20 chained steps
(each on the previous one's weights) replayed from one graph and reported per step: the inner loop
as the meta-step's graph runs it (fused_donate then copies the head once, on the first step, as
the trainer does). Timed calls end with torch.cuda.synchronize().

    python3 -m pytest bench/bench_inner_step.py --benchmark-json=inner_step.json
    python3 bench/bench_inner_step.py inner_step.json     # the markdown table
"""
import contextlib
import os
import sys

import pytest
import torch
from _measure import graphed, record_kernel_time, record_peak, timings  # bench/_measure.py

from anml_fast import ops
from anml_fast.kernels import gated_head as head_kernels
from anml_fast.models import ModelConfig, build
from anml_fast.training.inner_step import PLN_NAMES, pln_sgd_step_autograd, pln_sgd_step_fused

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not all(v is True for k, v in ops.available().items() if k.endswith("cuda")),
    reason="needs a CUDA GPU and every compiled op working on it")

ROUNDS = 300
CHAIN = 20  # steps a replay in the graph<CHAIN> mode: the meta-step's inner loop


def _setup():
    net = build(ModelConfig())
    g = torch.Generator(device="cuda").manual_seed(0)
    params = net.init_params(g, "cuda")
    x = torch.randn(1, 3, 28, 28, device="cuda", generator=g) * 0.01 - 0.0427
    y = torch.tensor([5], device="cuda")
    with torch.no_grad():
        gate = net.gate(params, x)
    return net, params, x, y, gate


@contextlib.contextmanager
def conv_precision(precision: str):
    """Inside the block, float32 convolutions (cuDNN's and the Triton kernels') in "tf32" or "fp32"."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _step(impl, fused_norm_blocks=None):
    """A callable taking PLN weights and donate, doing one step of `impl`, returning the new weights."""
    net, params, x, y, gate = _setup()
    if impl == "twin":
        def step(pln, donate=False):
            with ops.use_backend("torch"):
                return pln_sgd_step_autograd(net, params, pln, x, y, gate, 0.1)[1]
    else:
        def step(pln, donate=False):
            return pln_sgd_step_fused(net, params, pln, x, y, gate, 0.1, donate=donate,
                                      fused_norm_blocks=fused_norm_blocks)[1]
    return step, {n: params[n] for n in PLN_NAMES}


# impl varies fastest (the top decorator): each mode's variants run in one block of rows with its
# twin, so a drift between rows (clocks, the host) parts them as little as the order allows
@pytest.mark.parametrize("impl", ["fused", "fused_donate", "fused_donate_no_pdl", "fused_donate_norm_fwd1",
                                  "fused_donate_norm_fwd3", "fused_donate_norm_fwd13", "fused_donate_norm_fwd23",
                                  "fused_donate_two_launch_head", "twin"])
@pytest.mark.parametrize("mode", ["eager", "graph", f"graph{CHAIN}"])
@pytest.mark.parametrize("precision", ["tf32", "fp32"])
def test_pln_inner_step(benchmark, impl, precision, mode, monkeypatch):
    monkeypatch.setattr(head_kernels, "ONE_LAUNCH_STEP", not impl.endswith("_two_launch_head"))
    base, _, blocks = impl.partition("_norm_fwd")
    # the launches read these settings when called, and graphs keep what they captured
    with conv_precision(precision), pdl(not impl.endswith("_no_pdl")):
        _time(benchmark, base.removesuffix("_no_pdl").removesuffix("_two_launch_head"), mode,
              tuple(int(b) for b in blocks) if blocks else None)
    benchmark.extra_info["precision"] = precision


@contextlib.contextmanager
def pdl(on: bool):
    """Inside the block, the package's launches use programmatic dependent launch or not."""
    before = os.environ.get("ANML_FAST_PDL")
    os.environ["ANML_FAST_PDL"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["ANML_FAST_PDL"]
        else:
            os.environ["ANML_FAST_PDL"] = before


def _time(benchmark, impl, mode, fused_norm_blocks=None):
    step, pln = _step(impl, fused_norm_blocks)
    if mode == f"graph{CHAIN}":
        # the inner loop as the meta-step graph holds it: CHAIN steps, each on the last one's
        # weights; fused_donate updates the head in place after the first, as the trainer does
        def call_steps():
            p = pln
            for k in range(CHAIN):
                p = step(p, donate=impl == "fused_donate" and k > 0)
    else:
        # fused_donate updates the benchmark's own head weights in place every round: harmless
        # for a timing (the values drift, the work does not change)
        def call_steps():
            step(pln, donate=impl == "fused_donate")
    call = call_steps if mode == "eager" else graphed(call_steps)

    def run():
        call()
        torch.cuda.synchronize()
    record_peak(benchmark, run)
    record_kernel_time(benchmark, run)
    benchmark.extra_info["card"] = torch.cuda.get_device_name()
    benchmark.extra_info["steps_per_call"] = CHAIN if mode == f"graph{CHAIN}" else 1
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=20)


def table(path: str) -> str:
    """Median (IQR) microseconds per step, and the speed-up over the twin of the same mode and precision."""
    rows = timings(path, __file__, lambda b: (b["params"]["mode"], b["params"]["precision"]),
                   per_call="steps_per_call")
    lines = ["| PLN inner step, batch 1 | float32 convs | impl | wall us (IQR) | vs twin | GPU us | peak MB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for (mode, precision), r in sorted(rows.items()):
        twin = r.get("twin", (None,))[0]
        for impl, (m, iqr, gpu, peak) in sorted(r.items()):
            lines.append(f"| {mode} | {precision} | {impl} | {m:.1f} ({iqr:.1f}) | "
                         f"{'' if twin is None else f'{twin / m:.2f}x'} | "
                         f"{gpu if gpu is None else f'{gpu:.1f}'} | {peak if peak is None else f'{peak:.1f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
