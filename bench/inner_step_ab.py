"""Variants of the fused batch-1 PLN inner step against each other and the twin, interleaved.

bench_inner_step.py times its rows one after another; on the GPU machines two runs of the same
row have differed by 3-8 us a step (clocks, the card's state), more than the changes compared
here. This script captures every variant's 20 chained steps (bench_inner_step's graph20 mode: the
meta-step's inner loop, head updated in place after the first step) in its own CUDA graph, then
replays them in turn, round after round, and reports each variant's median over the rounds of its
per-round median. A variant is the tuple of blocks whose norm runs in its convolution's launch
(`pln_sgd_step_fused(fused_norm_blocks=...)`; "default" is FUSED_NORM_BLOCKS), or "twin"; after
an "@", settings of kernels/conv_valid.py for that variant (13@DIRECT_CHANNELS=1,DIRECT_WARPS=8).

    python3 bench/inner_step_ab.py [--variants "twin;default;none;3"] [--rounds 9] [--out bench/results]

Writes OUT/inner-step-ab-<card>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

from _measure import card_slug, graphed, replay_us  # bench/ is on the path of a script run from it
from bench_inner_step import CHAIN, _step, conv_precision

from anml_fast.kernels import conv_valid as conv_kernels
from anml_fast.training.inner_step import FUSED_NORM_BLOCKS


def _split(variant: str):
    """"13@DIRECT_CHANNELS=1,DIRECT_WARPS=8" -> ("13", {"DIRECT_CHANNELS": 1, "DIRECT_WARPS": 8})."""
    name, _, sets = variant.partition("@")
    settings = {}
    for item in filter(None, sets.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not hasattr(conv_kernels, key) or not value.lstrip("-").isdigit():
            raise SystemExit(f"--variants: {item!r} in {variant!r} is not NAME=INT for a setting of "
                             f"kernels/conv_valid.py")
        settings[key] = int(value)
    return name, settings


def _blocks(variant: str):
    variant = _split(variant)[0]
    if variant == "default":
        return FUSED_NORM_BLOCKS
    if variant == "none":
        return ()
    if not variant.isdigit() or not set(variant) <= {"1", "2", "3"}:
        raise SystemExit(f"--variants: {variant!r} is not twin, default, none or a string of blocks 1-3 (e.g. 13)")
    return tuple(int(b) for b in variant)


def _replay(variant: str):
    """The graph replay of CHAIN chained steps of `variant`."""
    impl = "twin" if variant == "twin" else "fused_donate"
    step, pln = _step(impl, None if variant == "twin" else _blocks(variant))

    def chain():
        p = pln
        for k in range(CHAIN):
            p = step(p, donate=impl == "fused_donate" and k > 0)
    settings = _split(variant)[1]
    before = {k: getattr(conv_kernels, k) for k in settings}
    try:  # the graph keeps the launches these settings shaped
        for k, v in settings.items():
            setattr(conv_kernels, k, v)
        return graphed(chain)
    finally:
        for k, v in before.items():
            setattr(conv_kernels, k, v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="twin;default;none;3",
                    help="semicolon-separated: twin, default, none, or the fused blocks (e.g. 13), each optionally "
                         "with @NAME=INT,... settings of kernels/conv_valid.py [twin;default;none;3]")
    ap.add_argument("--precision", default="tf32,fp32", help="float32 convolutions: tf32 and/or fp32 [tf32,fp32]")
    ap.add_argument("--rounds", type=int, default=9, help="rounds of turns [9]")
    ap.add_argument("--reps", type=int, default=30, help="replays a turn [30]")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("inner_step_ab.py needs a CUDA GPU")
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    for v in variants:
        if v != "twin":
            _blocks(v)
    card = torch.cuda.get_device_name()
    result = {"card": card, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "steps_per_replay": CHAIN, "rounds": args.rounds, "reps": args.reps, "rows": []}
    for precision in args.precision.split(","):
        with conv_precision(precision):
            replays = {v: _replay(v) for v in variants}
            per_round = {v: [] for v in variants}
            for r in range(args.rounds):
                order = variants if r % 2 == 0 else variants[::-1]  # neither always first
                for v in order:
                    per_round[v].append(replay_us(replays[v], CHAIN, args.reps))
        for v in variants:
            us = statistics.median(per_round[v])
            row = {"precision": precision, "variant": v,
                   "fused_norm_blocks": None if v == "twin" else list(_blocks(v)), "us_per_step": us,
                   "round_min": min(per_round[v]), "round_max": max(per_round[v])}
            result["rows"].append(row)
            print(f"{precision} {v:8s} {us:7.1f} us a step (rounds {min(per_round[v]):.1f}-{max(per_round[v]):.1f})",
                  flush=True)
    lines = [f"PLN inner step, {CHAIN} chained steps a graph replay, variants interleaved over {args.rounds} rounds "
             f"({card}, torch {torch.__version__}, {result['date']})", "",
             "| float32 convs | variant (norms in the conv launch) | us a step (round range) | vs twin |",
             "| --- | --- | ---: | ---: |"]
    for row in result["rows"]:
        twin = next((r["us_per_step"] for r in result["rows"]
                     if r["precision"] == row["precision"] and r["variant"] == "twin"), None)
        blocks = "twin" if row["variant"] == "twin" else f"{row['variant']} {tuple(row['fused_norm_blocks'])}"
        blocks = blocks.replace(";", " ")
        speedup = "" if twin is None else f"{twin / row['us_per_step']:.2f}x"
        lines.append(f"| {row['precision']} | {blocks} | {row['us_per_step']:.1f} "
                     f"({row['round_min']:.1f}-{row['round_max']:.1f}) | {speedup} |")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"inner-step-ab-{card_slug(card)}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
