"""The whole batch-1 PLN inner step (forward, backward, SGD update) at the protocol's sizes.

twin:  the model's forward on the plain-PyTorch ops, autograd, torch._foreach SGD (what the
       meta-trainer runs with backend="torch");
fused: `pln_sgd_step_fused`, no autograd: the batch-1 Triton convolutions and the norm kernels,
       the Triton head's fused cross-entropy SGD step, the norms' fused backward, the Triton input
       grads and weight grads with the SGD step fused, one multi-tensor SGD launch for the norms;
fused_donate: the same with the head's weights updated in place (`donate=True`), as the
       meta-trainer's inner loop runs 19 of its 20 steps (no copy of the 9 MB head).
Each eagerly and replayed from a CUDA graph (launch overhead gone on both sides). Timed calls end
with torch.cuda.synchronize().

    python3 -m pytest bench/bench_inner_step.py --benchmark-json=inner_step.json
    python3 bench/bench_inner_step.py inner_step.json     # the markdown table
"""
import sys

import pytest
import torch
from _measure import graphed, record_kernel_time, record_peak, timings  # bench/_measure.py

from anml_fast import ops
from anml_fast.models import ModelConfig, build
from anml_fast.training.inner_step import PLN_NAMES, pln_sgd_step_autograd, pln_sgd_step_fused

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not all(v is True for k, v in ops.available().items() if k.endswith("cuda")),
    reason="needs a CUDA GPU and every compiled op working on it")

ROUNDS = 300


def _setup():
    net = build(ModelConfig())
    g = torch.Generator(device="cuda").manual_seed(0)
    params = net.init_params(g, "cuda")
    x = torch.randn(1, 3, 28, 28, device="cuda", generator=g) * 0.01 - 0.0427
    y = torch.tensor([5], device="cuda")
    with torch.no_grad():
        gate = net.gate(params, x)
    return net, params, x, y, gate


def _step(impl):
    net, params, x, y, gate = _setup()
    pln = {n: params[n] for n in PLN_NAMES}
    if impl == "twin":
        def run():
            with ops.use_backend("torch"):
                return pln_sgd_step_autograd(net, params, pln, x, y, gate, 0.1)
    else:
        # fused_donate updates the benchmark's own head weights in place every round: harmless
        # for a timing (the values drift, the work does not change)
        donate = impl == "fused_donate"

        def run():
            return pln_sgd_step_fused(net, params, pln, x, y, gate, 0.1, donate=donate)
    return run


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("impl", ["fused", "fused_donate", "twin"])
def test_pln_inner_step(benchmark, impl, mode):
    step = _step(impl)
    call = graphed(step) if mode == "graph" else step

    def run():
        call()
        torch.cuda.synchronize()
    record_peak(benchmark, run)
    record_kernel_time(benchmark, run)
    benchmark.extra_info["card"] = torch.cuda.get_device_name()
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=20)


def table(path: str) -> str:
    """Median (IQR) microseconds per step, and the speed-up over the twin in the same mode."""
    rows = timings(path, __file__, lambda b: b["params"]["mode"])
    lines = ["| PLN inner step, batch 1 | impl | wall us (IQR) | vs twin | GPU us | peak MB |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for mode, r in sorted(rows.items()):
        twin = r.get("twin", (None,))[0]
        for impl, (m, iqr, gpu, peak) in sorted(r.items()):
            lines.append(f"| {mode} | {impl} | {m:.1f} ({iqr:.1f}) | {twin / m:.2f}x | "
                         f"{gpu if gpu is None else f'{gpu:.1f}'} | {peak if peak is None else f'{peak:.1f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
