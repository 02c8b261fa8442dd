"""The gated head at the meta-loss's batch (84 rows) against its twin, interleaved.

bench_gated_head.py times its rows one after another, and on the GPU machines such rows drift by
several percent with their order (clocks, the card's state), and its eager backward rows by more
(the autograd engine's hand-off to its device thread): at batch 84 that is the size of the
difference measured here, since both sides spend most of their GPU time in the same cuBLAS float32
products (84 x 1000 x 2304, three of them for forward and backward). This script builds each call
(forward, backward alone, or forward and backward through autograd, as bench_gated_head.py builds
them) for the fused op and the twin, eagerly and as CUDA graphs of one call and of 20 chained
calls, then times them in turn, round after round, and reports each one's median over the rounds
of its per-turn median, with programmatic dependent launch on and off (ANML_FAST_PDL).

    python3 bench/head84_ab.py [--rounds 15] [--reps 30] [--out bench/results]

Writes OUT/head84-ab-<card>.json and .md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _measure import (add_figures, card_slug, eager_us, graphed, replay_us, run_label, take_turns,  # bench/ on the path
                      paired_cell, turn_cell, turns_result, write_result)
from bench_gated_head import IMPLS, call, inputs
from bench_inner_step import pdl as pdl_switch  # ANML_FAST_PDL for a block (read at each launch)

B = 84
OPS = ("logits", "ce")
# (pass, mode): graph modes replay 1 or 20 calls a capture; the backward alone is timed eagerly,
# its forward redone untimed before each call
CASES = [("forward", "eager"), ("backward", "eager"), ("forward_backward", "eager"),
         ("forward", "graph1"), ("forward", "graph20"), ("forward_backward", "graph1"),
         ("forward_backward", "graph20")]


def _call(impl: str, op: str, pass_: str):
    """(forward, timed): `timed(forward())` is one timed call (forward() untimed, for the backward
    alone; else a no-op)."""
    leaves, y = inputs(B, requires_grad=pass_ != "forward")
    fn = IMPLS[impl][op]
    if pass_ == "forward":
        run = (lambda: fn(*leaves)) if op == "logits" else (lambda: fn(*leaves, y))
        return (lambda: None), (lambda _: run())
    if pass_ == "backward":
        return (lambda: call(impl, op, leaves, y)), (lambda out: torch.autograd.grad(out, leaves))
    return (lambda: None), (lambda _: torch.autograd.grad(call(impl, op, leaves, y), leaves))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="rounds of turns [15]")
    ap.add_argument("--reps", type=int, default=30, help="calls or replays a turn [30]")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                    help="folder for head84-ab-<card>.json and .md [bench/results]")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("head84_ab.py needs a CUDA GPU")
    if args.rounds < 1 or args.reps < 1:
        raise SystemExit(f"--rounds and --reps must be at least 1, got {args.rounds} and {args.reps}")
    result = turns_result(args.rounds, args.reps, rows=B)
    turns, alive = {}, []  # turns: (pdl, pass, op, mode, impl) -> a turn's median us a call
    for pdl in (True, False):
        with pdl_switch(pdl):
            for pass_, mode in CASES:
                for op in OPS:
                    for impl in ("fused", "twin"):
                        forward, timed = _call(impl, op, pass_)
                        if mode == "eager":
                            for _ in range(10):  # compile and settle outside the timing
                                timed(forward())
                            turn = (lambda f, t: lambda: eager_us(f, t, args.reps))(forward, timed)
                        else:
                            chain = int(mode.removeprefix("graph"))
                            replay = graphed(lambda t=timed: t(None), chain)
                            alive.append(timed)  # its inputs: a capture frees unreferenced memory
                            turn = (lambda r, c: lambda: replay_us(r, c, args.reps))(replay, chain)
                        turns[(pdl, pass_, op, mode, impl)] = turn
    add_figures(result, ("pdl", "pass", "op", "mode", "impl"),
                take_turns(turns, args.rounds, around=lambda k: pdl_switch(k[0])))
    lines = table(result)
    write_result(args.out, f"head84-ab-{card_slug(result['card'])}", result, lines)
    print("\n".join(lines))
    return 0


def table(result: dict) -> list[str]:
    """The Markdown lines of a result."""
    lines = [f"# Gated head, batch {result['rows']}, fused vs twin, interleaved over {result['rounds']} rounds "
             f"({run_label(result)})", "",
             "`python3 bench/head84_ab.py`. us a call: the median over rounds of each turn's median of "
             f"{result['reps']} calls (eager, each synchronised) or replays (graph1: one call a CUDA-graph "
             "replay, graph20: 20 chained calls); the round range in brackets. `backward`: `torch.autograd.grad` "
             "alone, its forward redone untimed before each call; `forward_backward`: the op and the grad of "
             "its loss (the logits op's: the mean of its squares), as bench_gated_head.py builds them. PDL: "
             "programmatic dependent launch for the package's kernels. `fused vs twin`: the ratio of the two "
             "medians; `paired`: the median of the per-round ratios (the two turns run back to back each "
             "round), and the rounds the fused op won.", "",
             "| pass | op | mode | PDL | fused us | twin us | fused vs twin | paired (rounds won) |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    rows = {(x["pdl"], x["pass"], x["op"], x["mode"], x["impl"]): x for x in result["results"]}
    for pass_, mode in CASES:
        for op in OPS:
            for pdl in (True, False):
                f, t = rows[(pdl, pass_, op, mode, "fused")], rows[(pdl, pass_, op, mode, "twin")]
                lines.append(f"| {pass_} | {op} | {mode} | {'on' if pdl else 'off'} | {turn_cell(f)} | {turn_cell(t)} | "
                             f"{t['us_per_call'] / f['us_per_call']:.2f}x | {paired_cell(f, t)} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
