"""Sweep the tile shapes of the meta-test output-layer Adam kernel (kernels/output_layer.py) on a GPU.

    python3 bench/tune_output_layer.py [--trajectories 140,10,1] [--out bench/results]

The 600-class protocol is memory-bound: a step of T trajectories moves T x 2.3M weights x 24 B
(read and write W, mW, vW; the next logits come from the new W in registers). This script times
every candidate tile of the Adam kernel at the protocol's stack sizes (140 search trajectories,
10 final ones, 1 for a single trajectory), each step replayed from a CUDA graph of 50 steps as the
evaluator runs it, and checks each candidate once against the twin. It prints the achieved
bandwidth per candidate and the best per stack size, and writes OUT/tune-output-layer-<card>.json,
whose "adam_configs" (the winners, keyed like the kernel's ADAM_CONFIGS) `bench/end_to_end.py
--output-layer-tiles` can load. It changes no source: copy the winners into ADAM_CONFIGS by hand,
with the measurement in the comment.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from _measure import card_slug, output_layer_stack  # bench/ is on the path of a script run from it

HERE = Path(__file__).resolve().parent
O, F = 1000, 2304  # ANML's output layer
# (BLOCK_O rows per program, BLOCK_F features per chunk, warps, pipeline stages)
CANDIDATES = [dict(BLOCK_O=o, BLOCK_F=f, num_warps=w, num_stages=st) for o, f, w, st in [
    (1, 512, 2, 1), (1, 1024, 4, 1), (2, 512, 4, 1), (2, 1024, 8, 1), (2, 512, 4, 2),
    (4, 128, 2, 1), (4, 256, 4, 1), (4, 512, 4, 1), (4, 512, 8, 1), (4, 256, 4, 2),
    (8, 128, 4, 1), (8, 256, 4, 1), (8, 256, 8, 1), (8, 512, 8, 1), (8, 256, 4, 2),
    (16, 128, 4, 1), (16, 256, 8, 1), (32, 128, 8, 1)]]


def _state(T: int, device):
    """T output layers from one Kaiming-scale start, and 64 images each."""
    g = torch.Generator(device).manual_seed(0)
    w = torch.randn(O, F, device=device, generator=g) * (2 / F) ** 0.5
    return output_layer_stack(w, T, 64, g)


def _check(K, ref_fn, device) -> str | None:
    """None if 3 steps at ANML's size (the tiles' masks included) match the twin, tensor by tensor
    to a relative tolerance (the moments are ~1e-5 and ~1e-11), else what differs."""
    from anml_fast.ops._compare import first_mismatch

    state, X, Y, lr = _state(3, device)
    ref = [t.clone() for t in state]
    for s in range(1, 4):
        step = torch.tensor(s, device=device)
        K.output_layer_adam_step_(*state, X, Y, lr, step)
        ref_fn(*ref, X, Y, lr, step)
    for name, got, want in zip(("W", "b", "mW", "vW", "mb", "vb", "logits"), state, ref):
        scale = want.abs().max().item()  # each tensor against its own size
        bad = first_mismatch([(name, got, want)], device, atol=1e-4 * scale, rtol=1e-4)
        if bad:
            return bad
    return None


def _time(K, T: int, device, steps: int = 50, repeats: int = 5) -> float:
    """Median ms per step, replaying a CUDA graph of `steps` steps."""
    state, X, Y, lr = _state(T, device)
    step = torch.ones((), dtype=torch.int64, device=device)

    def one():
        K.output_layer_adam_step_(*state, X, Y, lr, step)
        step.add_(1)

    one()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            one()
    times = []
    for _ in range(repeats):
        step.fill_(1)  # keep the image index inside the sequence
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectories", default="140,10,1", help="stack sizes T to time [140,10,1]")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("tune_output_layer.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    from anml_fast.ops import output_layer as ol
    from anml_fast.ops.reference import output_layer_adam_step_ as twin

    K = ol._kernels()
    device = torch.device("cuda")
    shipped = dict(K.ADAM_CONFIGS)
    sizes = [int(t) for t in args.trajectories.split(",")]
    tier = {T: max(k for k in shipped if k <= max(T, min(shipped))) for T in sizes}  # as adam_config picks
    rows = []

    def run(cfg, shipped_at=None):
        K.ADAM_CONFIGS = {k: cfg for k in shipped}
        row = {"adam": cfg, "mismatch": _check(K, twin, device), "ms": {}, "tb_per_s": {}}
        for T in sizes if shipped_at is None else [shipped_at]:
            row["ms"][T] = ms = _time(K, T, device)
            row["tb_per_s"][T] = T * O * F * 24 / (ms * 1e-3) / 1e12
        return row

    try:
        for cfg in CANDIDATES:
            rows.append(run(cfg))
            print(json.dumps(rows[-1]), flush=True)
        shipped_ms = {T: run(shipped[tier[T]], T)["ms"][T] for T in sizes}
    finally:
        K.ADAM_CONFIGS = shipped
    card = torch.cuda.get_device_name()
    correct = [r for r in rows if r["mismatch"] is None]
    if not correct:
        print("tune_output_layer.py: no candidate matched the twin (see each row's mismatch)")
    best = {}
    # sizes that share an ADAM_CONFIGS entry: the largest, the protocol's bulk, decides
    for T in sorted(sizes) if correct else []:
        r = min(correct, key=lambda r: r["ms"][T])
        best[tier[T]] = r["adam"]
        print(f"T={T}: best {r['ms'][T]:.3f} ms ({r['tb_per_s'][T]:.2f} TB/s) with {r['adam']}; "
              f"shipped tiles {shipped_ms[T]:.3f} ms")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tune-output-layer-{card_slug(card)}.json"
    path.write_text(json.dumps(
        {"card": card, "torch": torch.__version__, "date": str(datetime.date.today()), "rows": rows,
         "shipped": {str(k): v for k, v in shipped.items()},
         "shipped_ms": shipped_ms, "adam_configs": {str(k): v for k, v in best.items()}}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
