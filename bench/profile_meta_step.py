"""Where a meta-training step's GPU time goes, kernel by kernel (CUDA only).

    python3 bench/profile_meta_step.py --data omniglot.safetensors [--second-order] [--out bench/results]

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

from _measure import card_slug  # bench/ is on the path of a script run from it

HERE = Path(__file__).resolve().parent
# first match wins; names as CUPTI reports them
FAMILIES = [
    ("cuDNN convolution", r"cudnn|conv|implicit_convolve|wgrad|dgrad|xmma|fprop"),
    ("GEMM", r"gemm|cutlass|Kernel2|sm\d+_xmma|ampere|hopper"),
    ("package Triton kernels", r"^_(gated_head|output_layer|conv)|triton"),
    ("package CUDA kernels", r"anml_fast|conv_block|multi_tensor|plane"),
    ("reductions", r"reduce|Reduce|softmax|norm|sum"),
    ("elementwise and copies", r"elementwise|vectorized|Memcpy|Memset|copy|fill|index|gather|scatter"),
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="Omniglot root folder or prepared cache file")
    ap.add_argument("--second-order", action="store_true", help="profile the second-order meta-step")
    ap.add_argument("--steps", type=int, default=20, help="meta-steps profiled and timed [20]")
    ap.add_argument("--top", type=int, default=25, help="kernels listed [25]")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_meta_step.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    from torch.profiler import ProfilerActivity, profile

    from anml_fast.data.cache import load_omniglot

    data = load_omniglot(args.data, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tr = _trainer(data, args.second_order, False, tmp)
        for _ in range(5):  # Triton compilation, cuDNN's first calls
            tr.step_once()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                tr.step_once()
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        tr = _trainer(data, args.second_order, True, tmp)
        for _ in range(5):  # includes the capture
            tr.step_once()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            tr.step_once()
        torch.cuda.synchronize()
        graph_ms = 1e3 * (time.perf_counter() - t0) / args.steps

    kernels = []
    for e in prof.key_averages():
        us = e.self_device_time_total
        if us > 0:
            kernels.append({"name": e.key, "us_per_step": us / args.steps, "calls_per_step": e.count / args.steps,
                            "family": _family(e.key)})
    kernels.sort(key=lambda k: -k["us_per_step"])
    total = sum(k["us_per_step"] for k in kernels)
    if total == 0:
        print("profile_meta_step.py: error: the profiler saw no GPU kernels (CUPTI unavailable?)", file=sys.stderr)
        return 1
    families = defaultdict(float)
    for k in kernels:
        families[k["family"]] += k["us_per_step"]
    card = torch.cuda.get_device_name()
    order = "second" if args.second_order else "first"
    print(f"{order}-order meta-step on {card}: kernels {total / 1e3:.2f} ms a step (eager), "
          f"graph replay {graph_ms:.2f} ms a step (wall)")
    for fam, us in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:28s} {us / 1e3:7.3f} ms  {100 * us / total:5.1f}%")
    print(f"top {args.top} kernels (us a step, launches a step):")
    for k in kernels[:args.top]:
        print(f"  {k['us_per_step']:8.1f}  {k['calls_per_step']:6.1f}  [{k['family']}] {k['name'][:110]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile-meta-step-{order}-{card_slug(card)}.json"
    path.write_text(json.dumps({"card": card, "torch": torch.__version__, "date": str(datetime.date.today()),
                                "order": order, "steps": args.steps, "graph_ms_per_step": graph_ms,
                                "kernel_ms_per_step": total / 1e3,
                                "families_ms_per_step": {f: us / 1e3 for f, us in families.items()},
                                "kernels": kernels}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
