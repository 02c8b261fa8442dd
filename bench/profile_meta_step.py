"""Where a meta-training step's (or meta-test fine-tuning's) GPU time goes, kernel by kernel (CUDA only).

    python3 bench/profile_meta_step.py --data omniglot.safetensors [--second-order] [--out bench/results]
    python3 bench/profile_meta_step.py --inner-step [--out bench/results]
    python3 bench/profile_meta_step.py --finetune --data omniglot.safetensors [--model FILE] [--out bench/results]

With --inner-step it profiles instead the batch-1 PLN inner step alone (bench/bench_inner_step.py's
unit), fused and twin, each eagerly under the profiler and replayed from a CUDA graph for the wall.

With --finetune it profiles the 600-class whole-PLN meta-test protocol (end_to_end.py's finetune
row): run_finetune_batched over 150 trajectories of --finetune-updates updates each (the model
from --model, else a fresh initialisation; the timings do not depend on the weights), once under
the profiler and once timed, everything reported per update of all 150 trajectories (what its
table calls a step). Beside it: the batched Adam alone on stacks of the same shapes, and the
arithmetic (finetune_bounds: the bytes and FLOPs an update needs at least, and the times they and
the launches bound it to on this card), each projected to the protocol's 9,000 updates. Writes
OUT/profile-finetune-<card>.json.

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
import math
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
    ("package Triton kernels", r"^_(gated_head|output_layer|conv|adam_batched)|triton"),
    ("cuDNN batch norm", r"cudnn::bn_"),  # before the convolutions: its names say "cudnn" too
    # not a bare "xmma": cuBLAS's GEMMs are sm80_xmma_gemm_..._cublas; cuDNN's say fprop/dgrad/wgrad
    ("cuDNN convolution", r"cudnn|conv|implicit_convolve|wgrad|dgrad|fprop|winograd|nchwTo|nhwcTo|im2col|col2im"),
    ("GEMM", r"gemm|gemv|cutlass|Kernel2|sm\d+_xmma|ampere|hopper"),
    ("pooling", r"max_pool|avg_pool"),
    ("reductions", r"reduce|Reduce|softmax|norm|sum"),
    ("elementwise and copies",
     r"elementwise|vectorized|Memcpy|Memset|copy|Copy|fill|index|gather|scatter|multi_tensor_apply"),
]
TRAJECTORIES = 150  # the 600-class protocol's 14 rates x 10 search draws + 10 final runs
PROTOCOL_UPDATES = 9000  # 600 classes x 15 images, one Adam update each
IMAGE_SIDE = 28  # ANML.trunk: 28 -> 26 -> 13 -> 11 -> 5 -> 3, a 2 x 2 max-pool after all but the last conv
# SXM data-sheet peaks: (HBM bytes/s, FP32 non-tensor FLOP/s, TF32 tensor dense FLOP/s); PCIe and NVL parts differ
PEAKS = {"H200": (4.8e12, 67e12, 495e12), "H100": (3.35e12, 67e12, 495e12)}
LAUNCH_S = 2.5e-6  # about what one kernel launch costs the CPU and the GPU's queue, back to back


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

    step, pln = _step(impl)

    def once():
        step(pln)
    return once, graphed(once)


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
    return _kernels(prof, steps), graph_ms


def _kernels(prof, steps: int) -> list[dict]:
    """The profiled kernels (and copies), each's GPU time and launches per step, slowest first."""
    kernels = []
    for e in prof.key_averages():
        us = e.self_device_time_total
        if us > 0:
            kernels.append({"name": e.key, "us_per_step": us / steps, "calls_per_step": e.count / steps,
                            "family": _family(e.key)})
    kernels.sort(key=lambda k: -k["us_per_step"])
    return kernels


def _report(label: str, kernels, wall_ms: float, top: int, wall: str = "graph replay",
            key: str = "graph_ms_per_step") -> dict:
    total = sum(k["us_per_step"] for k in kernels)
    launches = sum(k["calls_per_step"] for k in kernels)
    families = defaultdict(float)
    for k in kernels:
        families[k["family"]] += k["us_per_step"]
    print(f"{label} on {torch.cuda.get_device_name()}: kernels {total:.1f} us a step (eager, "
          f"{launches:.0f} launches), {wall} {1e3 * wall_ms:.1f} us a step (wall)")
    for fam, us in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:28s} {us:9.1f} us  {100 * us / total:5.1f}%")
    print(f"top {top} kernels (us a step, launches a step):")
    for k in kernels[:top]:
        print(f"  {k['us_per_step']:8.1f}  {k['calls_per_step']:6.1f}  [{k['family']}] {k['name'][:110]}")
    return {key: wall_ms, "kernel_ms_per_step": total / 1e3, "launches_per_step": launches,
            "families_ms_per_step": {f: us / 1e3 for f, us in families.items()}, "kernels": kernels}


def finetune_bounds(shapes: dict[str, tuple[int, ...]], trajectories: int, card: str,
                    launches: float | None = None) -> dict:
    """The arithmetic of one whole-PLN fine-tuning update of `trajectories` trajectories at batch 1,
    from the shapes of the parameters each trains (ANML's PLN, in model order): the bytes and FLOPs
    it needs at least, the ms each bound (and `launches` x LAUNCH_S) gives on `card` (None where its
    peaks are unknown), and those bounds projected to the protocol's 9,000 updates, in s."""
    per_trajectory = sum(math.prod(s) for s in shapes.values())
    # Adam reads param, grad, m, v and writes param, m, v; the backward writes the gradient once.
    # A floor: the forward's and the backward's reads of the weights come on top.
    adam_bytes, grad_bytes = trajectories * per_trajectory * 7 * 4, trajectories * per_trajectory * 4
    side, forward = IMAGE_SIDE, 0
    convs = [s for s in shapes.values() if len(s) == 4]
    for i, (c_out, c_in, kh, kw) in enumerate(convs):
        side -= kh - 1  # valid
        forward += 2 * side * side * c_out * c_in * kh * kw
        side = side // 2 if i < len(convs) - 1 else side
    forward += sum(2 * s[0] * s[1] for s in shapes.values() if len(s) == 2)  # the head, all its outputs
    flops = trajectories * 3 * forward  # the backward ~2x the forward: input and weight gradients
    peaks = next((v for k, v in PEAKS.items() if k in card and not re.search("PCIe|NVL", card)), None)
    ms = {"bandwidth": None, "fp32": None, "tf32": None,
          "launches": None if launches is None else 1e3 * launches * LAUNCH_S}
    if peaks is not None:
        bandwidth, fp32, tf32 = peaks
        ms.update(bandwidth=1e3 * (adam_bytes + grad_bytes) / bandwidth, fp32=1e3 * flops / fp32,
                  tf32=1e3 * flops / tf32)
    return {"trajectories": trajectories, "params_per_trajectory": per_trajectory,
            "bytes_per_update": {"adam": adam_bytes, "gradient": grad_bytes, "total": adam_bytes + grad_bytes},
            "forward_flops_per_trajectory": forward, "flops_per_update": flops,
            "peaks": None if peaks is None else dict(zip(("bytes_per_s", "fp32_flops", "tf32_flops"), peaks)),
            "launches_per_update": launches, "bound_ms_per_update": ms,
            "bound_s_protocol": {k: None if v is None else v * PROTOCOL_UPDATES / 1e3 for k, v in ms.items()}}


def print_bounds(arith: dict, measured: dict[str, float]) -> None:
    """The arithmetic and its bounds beside the `measured` ms per update, each projected to 9,000."""
    b, p = arith["bytes_per_update"], arith["peaks"] or {}
    print(f"arithmetic per update of {arith['trajectories']} trajectories "
          f"({arith['params_per_trajectory']:,} trained parameters each):\n"
          f"  bytes at least {b['total'] / 1e9:6.2f} GB (Adam 7 x 4 B + the gradient 4 B a parameter)\n"
          f"  FLOPs          {arith['flops_per_update'] / 1e9:6.2f} GFLOP (3 x a forward's "
          f"{arith['forward_flops_per_trajectory'] / 1e6:.1f} MFLOP a trajectory)")
    if not p:
        print("  this card's peaks are unknown: no bandwidth or FLOP bounds")
    labels = {"bandwidth": f"bytes / {p.get('bytes_per_s', 0) / 1e12:.2f} TB/s",
              "fp32": f"FLOPs / FP32 {p.get('fp32_flops', 0) / 1e12:.0f} TFLOPS",
              "tf32": f"FLOPs / TF32 tensor {p.get('tf32_flops', 0) / 1e12:.0f} TFLOPS",
              "launches": f"{arith['launches_per_update'] or 0:.0f} launches x {1e6 * LAUNCH_S:.1f} us"}
    rows = [(k, v) for k, v in measured.items()]
    rows += [(labels[k], v) for k, v in arith["bound_ms_per_update"].items() if v is not None]
    print(f"  {'':40s} {'ms/update':>10s} {f'{PROTOCOL_UPDATES:,} updates':>14s}")
    for label, v in rows:
        print(f"  {label:40s} {v:10.3f} {v * PROTOCOL_UPDATES / 1e3:12.1f} s")


def _finetune_run(args):
    """(run(trajectories, on_steps=None), its 150 trajectories, updates each, the trained parameters'
    shapes) of the whole-PLN protocol as end_to_end.py's finetune row runs it."""
    from end_to_end import _eval_parts  # the row's model and meta-test set

    from anml_fast.data.cache import load_omniglot
    from anml_fast.evaluation.finetune_batched import run_finetune_batched
    from anml_fast.evaluation.trajectories import Trajectory
    from anml_fast.models import select

    net, params, test_set = _eval_parts(load_omniglot(args.data, progress=False), args.model)
    g = torch.Generator("cuda").manual_seed(0)
    n = max(1, args.finetune_updates // 15)
    trajs = [Trajectory(test_set.draw_classes(g, n), 1e-4) for _ in range(TRAJECTORIES)]

    def run(some, on_steps=None):
        run_finetune_batched(net, params, test_set, some, ["pln"], "adam", False, g, on_steps)

    shapes = {k: tuple(params[k].shape) for k in select(list(params), ["pln"])}
    return run, trajs, n * test_set.train.shape[1], shapes


def _profile_finetune(run, trajs, updates: int):
    """Kernels per update of all trajectories (one run under the profiler); the wall ms per update
    of another run, timed, and of its part after the last update (the accuracies)."""
    from torch.profiler import ProfilerActivity, profile

    run(trajs[:2])  # cuDNN's and vmap's first calls, the allocator
    torch.cuda.synchronize()
    # CUDA only: the CPU's share shows as the timed wall above the kernels' sum, and a CPU trace
    # would give the ops' launches a device time of their own, beside the kernels'
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(trajs)
        torch.cuda.synchronize()
    kernels = _kernels(prof, updates)
    ends = []

    def mark(_):  # called after every 100th update and the last, before the accuracies
        torch.cuda.synchronize()
        ends.append(time.perf_counter())

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(trajs, mark)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    return kernels, 1e3 * (t1 - t0) / updates, 1e3 * (t1 - ends[-1]) / updates


def _adam_alone(shapes: dict[str, tuple[int, ...]], backend: str, steps: int = 5) -> list[dict]:
    """Kernels per update of the batched Adam alone on `backend` ("auto": what run_finetune_batched
    runs; "torch": the twin) on stacks of TRAJECTORIES trajectories' parameters of these shapes."""
    from torch.profiler import ProfilerActivity, profile

    from anml_fast import ops

    stacks = [[torch.rand(TRAJECTORIES, *s, device="cuda") for _ in range(4)] for s in shapes.values()]
    lr = torch.full((TRAJECTORIES,), 1e-4, device="cuda")
    adam = ops.choose("adam_update_batched_", torch.device("cuda"), backend)

    def update(step):
        for p, g, m, v in stacks:
            adam(p, g, m, v, step, lr)

    update(1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for step in range(2, 2 + steps):
            update(step)
        torch.cuda.synchronize()
    return _kernels(prof, steps)


def _finetune(args, card: str) -> dict | None:
    run, trajs, updates, shapes = _finetune_run(args)
    kernels, wall_ms, tail_ms = _profile_finetune(run, trajs, updates)
    if not kernels:
        return None
    print(f"finetune: {len(trajs)} trajectories x {updates} updates ({len(trajs[0].classes)} classes each); "
          f"a step below = one update of all of them; of the wall, {1e3 * tail_ms:.1f} us a step come "
          "after the last update (the accuracies)")
    rep = _report("finetune", kernels, wall_ms, args.top, wall="timed run", key="wall_ms_per_step")
    arith = finetune_bounds(shapes, len(trajs), card, rep["launches_per_step"])
    adam_alone = {}
    for backend in ("auto", "torch"):  # what the run used, and the twin, on the same stacks
        adam = _adam_alone(shapes, backend)
        adam_ms = sum(k["us_per_step"] for k in adam) / 1e3
        adam_tbs = arith["bytes_per_update"]["adam"] / (adam_ms / 1e3) / 1e12
        print(f"batched Adam alone ({backend}): {adam_ms:.3f} ms a step of kernels, "
              f"{sum(k['calls_per_step'] for k in adam):.0f} launches: its 28 B a parameter at {adam_tbs:.2f} TB/s")
        adam_alone[backend] = {"kernel_ms_per_step": adam_ms, "tb_per_s_at_28_bytes": adam_tbs, "kernels": adam}
    print_bounds(arith, {"measured wall (timed run)": wall_ms, "kernels' sum (profiled run)": rep["kernel_ms_per_step"],
                         "batched Adam alone (kernels, as run)": adam_alone["auto"]["kernel_ms_per_step"]})
    return {"trajectories": len(trajs), "classes": len(trajs[0].classes), "updates": updates,
            "step": "one Adam update of all trajectories", "after_last_update_ms_per_step": tail_ms,
            "finetune": rep, "adam_alone": adam_alone,
            "arithmetic": arith,
            "measured_s_protocol": {"wall": wall_ms * PROTOCOL_UPDATES / 1e3,
                                    "kernels": rep["kernel_ms_per_step"] * PROTOCOL_UPDATES / 1e3}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="Omniglot root folder or prepared cache file (the meta-step's tasks, or with "
                    "--finetune the meta-test set)")
    ap.add_argument("--second-order", action="store_true", help="profile the second-order meta-step")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--inner-step", action="store_true",
                      help="profile the batch-1 PLN inner step, fused and twin, instead of the meta-step")
    what.add_argument("--finetune", action="store_true",
                      help="profile the 600-class whole-PLN meta-test protocol (150 trajectories) instead")
    ap.add_argument("--model", default=None, help="with --finetune: the model, as `anml-fast evaluate` takes it "
                    "(default: a fresh initialisation)")
    ap.add_argument("--finetune-updates", type=int, default=60,
                    help="with --finetune: updates each trajectory runs, 15 a class [60]")
    ap.add_argument("--steps", type=int, default=20, help="meta-steps or inner steps profiled and timed [20]")
    ap.add_argument("--top", type=int, default=25, help="kernels listed [25]")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    if args.finetune and not args.data:
        ap.error("--finetune needs --data (the meta-test set's Omniglot folder or cache file)")
    if not args.inner_step and not args.data:
        ap.error("--data is required to profile the meta-step (or pass --inner-step)")
    if args.finetune and args.finetune_updates < 15:
        ap.error(f"--finetune-updates must be at least 15 (one class), got {args.finetune_updates}")
    if not torch.cuda.is_available():
        print("profile_meta_step.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name()
    no_kernels = "profile_meta_step.py: error: the profiler saw no GPU kernels (CUPTI unavailable?)"
    if args.finetune:
        name = "finetune"
    elif args.inner_step:
        name, runs = "inner-step", {impl: _inner_step_runs(impl) for impl in ("fused", "twin")}
    else:
        name = f"meta-step-{'second' if args.second_order else 'first'}"
        runs = {"auto": _meta_step_runs(args)}
    result = {"card": card, "torch": torch.__version__, "date": str(datetime.date.today()), "what": name}
    if args.finetune:
        found = _finetune(args, card)
        if found is None:
            print(no_kernels, file=sys.stderr)
            return 1
        result.update(found)
    else:
        result["steps"] = args.steps
        for label, (eager, replayed) in runs.items():
            kernels, graph_ms = _profile(eager, replayed, args.steps)
            if not kernels:
                print(no_kernels, file=sys.stderr)
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
