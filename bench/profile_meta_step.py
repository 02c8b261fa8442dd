"""Where a meta-training step's GPU time goes, kernel by kernel (CUDA only).

    python3 bench/profile_meta_step.py --data omniglot.safetensors [--second-order] [--out bench/results]
    python3 bench/profile_meta_step.py --inner-step [--out bench/results]

With --inner-step it profiles instead the batch-1 PLN inner step alone (bench/bench_inner_step.py's
unit), fused and twin, each eagerly under the profiler and replayed from a CUDA graph for the wall.

The meta-step targets (3 ms first-order, 12 ms second-order) are not met, and the question for the
next kernel is which kernels hold the time. This runs the trainer's meta-step eagerly (--no-graph:
the profiler then sees every launch by name) under torch.profiler, sums each kernel's GPU time
over the profiled steps, and groups the kernels into families by name (cuDNN convolutions, GEMMs,
the package's Triton and CUDA kernels, PyTorch's elementwise and reduction kernels). It also
times the same step replayed from a CUDA graph: when that wall time is close to the kernels' sum,
the step is bound by the kernels themselves, not by launches or gaps. Prints a table and writes
OUT/profile-meta-step-<first|second>-<card>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from _measure import card_slug, graphed  # bench/ is on the path of a script run from it

HERE = Path(__file__).resolve().parent
# first match wins; names as CUPTI reports them
FAMILIES = [
    ("package CUDA kernels", r"anml_fast::"),  # first: the norm kernels' names also say "conv"
    ("package Triton kernels", r"^_(gated_head|output_layer|conv|split_sum)|triton"),
    ("cuDNN convolution", r"cudnn|conv|implicit_convolve|wgrad|dgrad|xmma|fprop"),
    ("GEMM", r"gemm|cutlass|Kernel2|sm\d+_xmma|ampere|hopper"),
    ("reductions", r"reduce|Reduce|softmax|norm|sum"),
    ("elementwise and copies", r"elementwise|vectorized|Memcpy|Memset|copy|fill|index|gather|scatter|multi_tensor_apply"),
]


def _family(name: str) -> str:
    for family, pattern in FAMILIES:
        if re.search(pattern, name):
            return family
    return "other"


def _trainer(data, second_order: bool, graph: bool, tmp: str):
    from anml_fast.training.trainer import MetaTrainConfig, MetaTrainer

    cfg = MetaTrainConfig(second_order=second_order, eval_every=0, steps=10 ** 9)
    return MetaTrainer(cfg, data, tmp, device="cuda", progress=False, log=lambda msg: None, graph=graph)


def _meta_step_runs(args):
    """(eager step, graph-replayed step) of the trainer's meta-step."""
    from anml_fast.data.cache import load_omniglot

    data = load_omniglot(args.data, progress=False)
    tmp_eager, tmp_graph = tempfile.TemporaryDirectory(), tempfile.TemporaryDirectory()
    eager = _trainer(data, args.second_order, False, tmp_eager.name)
    replayed = _trainer(data, args.second_order, True, tmp_graph.name)
    eager._tmp, replayed._tmp = tmp_eager, tmp_graph  # removed with the trainers
    return eager.step_once, replayed.step_once


def _inner_step_runs(impl: str):
    """(eager step, graph-replayed step) of the batch-1 PLN inner step (bench_inner_step.py's)."""
    from bench_inner_step import _step

    step = _step(impl)
    return step, graphed(step)


def _profile(eager, replayed, steps: int):
    """Kernels seen over `steps` eager calls (per call), and the graph replay's wall ms per call."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):  # Triton compilation, cuDNN's first calls
        eager()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eager()
        torch.cuda.synchronize()
    for _ in range(5):  # includes a capture where the step captures itself
        replayed()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        replayed()
    torch.cuda.synchronize()
    graph_ms = 1e3 * (time.perf_counter() - t0) / steps
    kernels = []
    for e in prof.key_averages():
        us = e.self_device_time_total
        if us > 0:
            kernels.append({"name": e.key, "us_per_step": us / steps, "calls_per_step": e.count / steps,
                            "family": _family(e.key)})
    kernels.sort(key=lambda k: -k["us_per_step"])
    return kernels, graph_ms


def _report(label: str, kernels, graph_ms: float, top: int) -> dict:
    total = sum(k["us_per_step"] for k in kernels)
    families = defaultdict(float)
    for k in kernels:
        families[k["family"]] += k["us_per_step"]
    print(f"{label} on {torch.cuda.get_device_name()}: kernels {total:.1f} us a step (eager), "
          f"graph replay {1e3 * graph_ms:.1f} us a step (wall)")
    for fam, us in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:28s} {us:9.1f} us  {100 * us / total:5.1f}%")
    print(f"top {top} kernels (us a step, launches a step):")
    for k in kernels[:top]:
        print(f"  {k['us_per_step']:8.1f}  {k['calls_per_step']:6.1f}  [{k['family']}] {k['name'][:110]}")
    return {"graph_ms_per_step": graph_ms, "kernel_ms_per_step": total / 1e3,
            "families_ms_per_step": {f: us / 1e3 for f, us in families.items()}, "kernels": kernels}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="Omniglot root folder or prepared cache file (the meta-step's tasks)")
    ap.add_argument("--second-order", action="store_true", help="profile the second-order meta-step")
    ap.add_argument("--inner-step", action="store_true",
                    help="profile the batch-1 PLN inner step, fused and twin, instead of the meta-step")
    ap.add_argument("--steps", type=int, default=20, help="steps profiled and timed [20]")
    ap.add_argument("--top", type=int, default=25, help="kernels listed [25]")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_meta_step.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    if not args.inner_step and not args.data:
        ap.error("--data is required to profile the meta-step (or pass --inner-step)")
    card = torch.cuda.get_device_name()
    if args.inner_step:
        name, runs = "inner-step", {impl: _inner_step_runs(impl) for impl in ("fused", "twin")}
    else:
        name = f"meta-step-{'second' if args.second_order else 'first'}"
        runs = {"auto": _meta_step_runs(args)}
    result = {"card": card, "torch": torch.__version__, "date": str(datetime.date.today()), "what": name,
              "steps": args.steps}
    for label, (eager, replayed) in runs.items():
        kernels, graph_ms = _profile(eager, replayed, args.steps)
        if not kernels:
            print("profile_meta_step.py: error: the profiler saw no GPU kernels (CUPTI unavailable?)",
                  file=sys.stderr)
            return 1
        result[label] = _report(f"{name} ({label})", kernels, graph_ms, args.top)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile-{name}-{card_slug(card)}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
