"""The gated head at the meta-loss's batch (84 rows) against its twin, graph-replayed and interleaved.

bench_gated_head.py times its rows one after another, and on the GPU machines such rows drift by
several percent with their order (clocks, the card's state): at batch 84 that is the size of the
difference measured here, since both sides spend most of their GPU time in the same cuBLAS float32
products (84 x 1000 x 2304, three of them for forward and backward). This script captures each
call (forward, or forward and backward through autograd, as bench_gated_head.py builds them) for
the fused op and the twin in CUDA graphs, one call and 20 chained calls a replay, then replays
them in turn, round after round, and reports each one's median over the rounds of its per-round
median, with programmatic dependent launch on and off (ANML_FAST_PDL, read as a graph is captured).

    python3 bench/head84_ab.py [--rounds 9] [--reps 30] [--out bench/results]

Writes OUT/head84-ab-<card>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from pathlib import Path

import torch

from _measure import card_slug, graphed, replay_us  # bench/ is on the path of a script run from it
from bench_gated_head import IMPLS, call, inputs

B = 84
PASSES = ("forward", "forward_backward")
OPS = ("logits", "ce")
CHAINS = (1, 20)


def _call(impl: str, op: str, pass_: str):
    leaves, y = inputs(B, requires_grad=pass_ != "forward")
    if pass_ == "forward":
        fn = IMPLS[impl][op]
        return (lambda: fn(*leaves)) if op == "logits" else (lambda: fn(*leaves, y))
    return lambda: torch.autograd.grad(call(impl, op, leaves, y), leaves)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9, help="rounds of turns [9]")
    ap.add_argument("--reps", type=int, default=30, help="replays a turn [30]")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("head84_ab.py needs a CUDA GPU")
    if args.rounds < 1 or args.reps < 1:
        raise SystemExit(f"--rounds and --reps must be at least 1, got {args.rounds} and {args.reps}")
    card = torch.cuda.get_device_name()
    result = {"card": card, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "commit": os.environ.get("ANML_FAST_COMMIT"), "rows": B, "rounds": args.rounds,
              "reps": args.reps, "results": []}
    was = os.environ.get("ANML_FAST_PDL")
    replays, alive = {}, []
    try:
        for pdl in ("1", "0"):
            os.environ["ANML_FAST_PDL"] = pdl
            for pass_ in PASSES:
                for op in OPS:
                    for impl in ("fused", "twin"):
                        fn = _call(impl, op, pass_)
                        alive.append(fn)  # its inputs: a capture frees unreferenced memory to the driver
                        for chain in CHAINS:
                            replays[(pdl, pass_, op, impl, chain)] = graphed(fn, chain)
    finally:
        if was is None:
            os.environ.pop("ANML_FAST_PDL", None)
        else:
            os.environ["ANML_FAST_PDL"] = was
    keys = list(replays)
    per_round = {k: [] for k in keys}
    for r in range(args.rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):  # neither side always first
            per_round[k].append(replay_us(replays[k], k[4], args.reps))
    for k in keys:
        pdl, pass_, op, impl, chain = k
        result["results"].append({"pdl": pdl == "1", "pass": pass_, "op": op, "impl": impl, "calls_per_replay": chain,
                                  "us_per_call": statistics.median(per_round[k]),
                                  "round_min": min(per_round[k]), "round_max": max(per_round[k])})
    at = f" at {result['commit']}" if result["commit"] else ""
    lines = [f"# Gated head, batch {B}, fused vs twin, graph replays interleaved over {args.rounds} rounds "
             f"({card}, {result['date']}{at}, torch {torch.__version__})", "",
             "`python3 bench/head84_ab.py`. us a call, the median over rounds of each round's median of "
             f"{args.reps} replays (round range in brackets). `forward_backward`: the op and "
             "`torch.autograd.grad` of its loss (the logits op's: the mean of its squares), as "
             "bench_gated_head.py builds it. PDL: programmatic dependent launch for the package's kernels.", "",
             "| pass | op | calls a replay | PDL | fused us | twin us | fused vs twin |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    rows = {(x["pdl"], x["pass"], x["op"], x["impl"], x["calls_per_replay"]): x for x in result["results"]}
    for pass_ in PASSES:
        for op in OPS:
            for chain in CHAINS:
                for pdl in (True, False):
                    f, t = rows[(pdl, pass_, op, "fused", chain)], rows[(pdl, pass_, op, "twin", chain)]
                    cell = lambda x: f"{x['us_per_call']:.1f} ({x['round_min']:.1f}-{x['round_max']:.1f})"
                    lines.append(f"| {pass_} | {op} | {chain} | {'on' if pdl else 'off'} | {cell(f)} | {cell(t)} | "
                                 f"{t['us_per_call'] / f['us_per_call']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"head84-ab-{card_slug(card)}"
    for suffix, text in ((".json", json.dumps(result, indent=1) + "\n"), (".md", "\n".join(lines) + "\n")):
        tmp = stem.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(stem.with_suffix(suffix))  # atomically: a crash keeps the earlier table
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
