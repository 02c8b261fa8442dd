"""The gated head against its twin at batch 1 (the inner step) and 84 (the meta-loss), interleaved.

bench_gated_head.py times its rows one after another, and on the GPU machines such rows drift by
several percent with their order (clocks, the card's state), and its eager backward rows by more
(the autograd engine's hand-off to its device thread). That is the size of two differences
measured here: at batch 84 both sides spend most of their GPU time in the same cuBLAS float32
products (84 x 1000 x 2304, three of them for forward and backward), and a batch-1 call replayed
alone from a CUDA graph is mostly the replay's own launch cost. This script builds each call
(forward, backward alone, or forward and backward through autograd, as bench_gated_head.py builds
them) for the fused op and the twin, eagerly and as CUDA graphs of one call and of 20 chained
calls, then times them in turn, round after round, and reports each one's median over the rounds
of its per-turn median and, per pair, the median of the per-round ratios (the two sides of a
case run back to back in every round), with programmatic dependent launch on and off
(ANML_FAST_PDL). A graph of one 1-element `add_` takes its turn in every round too: the least a
one-call replay can take, which the batch-1 forward rows come near.

    python3 bench/gated_head_ab.py [--batches 1,84] [--rounds 15] [--reps 30] [--out bench/results]

Writes OUT/gated-head-ab-<card>.json and .md.
"""
from __future__ import annotations

import argparse
import itertools

import torch

from _measure import (add_figures, check_turn_args, eager_us, graphed, ints, pair_cells,  # bench/ on the path
                      paired_note, replay_us, run_label, save_table, summary, take_turns, turn_args, turn_cell,
                      turns_result)
from bench_gated_head import IMPLS, call, inputs
from bench_inner_step import pdl as pdl_switch  # ANML_FAST_PDL for a block (read at each launch)

OPS = ("logits", "ce")
STEM = "gated-head-ab"  # OUT/<STEM>-<card>.json and .md
FLOOR = (False, "floor")  # its turn's key (PDL off: nothing of the package's runs in it)
# (pass, mode): graph modes replay 1 or 20 calls a capture; the backward alone is timed eagerly,
# its forward redone untimed before each call
CASES = [("forward", "eager"), ("backward", "eager"), ("forward_backward", "eager"),
         ("forward", "graph1"), ("forward", "graph20"), ("forward_backward", "graph1"),
         ("forward_backward", "graph20")]


def _call(impl: str, op: str, pass_: str, B: int):
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
    ap.add_argument("--batches", default="1,84", help="batch sizes [1,84]")
    turn_args(ap, STEM, "calls or replays a turn")
    args = ap.parse_args(argv)
    batches = ints(args.batches, "--batches", lambda v: v >= 1, "batch sizes of at least 1")
    check_turn_args(args, "gated_head_ab.py")
    result = turns_result(args.rounds, args.reps)
    turns, alive = {}, []  # turns: (pdl, pass, op, mode, B, impl) -> a turn's median us a call
    for pdl in (True, False):
        with pdl_switch(pdl):
            for (pass_, mode), op, B, impl in itertools.product(CASES, OPS, batches, ("fused", "twin")):
                forward, timed = _call(impl, op, pass_, B)
                if mode == "eager":
                    for _ in range(10):  # compile and settle outside the timing
                        timed(forward())
                    turn = (lambda f, t: lambda: eager_us(f, t, args.reps))(forward, timed)
                else:
                    chain = int(mode.removeprefix("graph"))
                    replay = graphed(lambda t=timed: t(None), chain)
                    alive.append(timed)  # its inputs: a capture frees unreferenced memory
                    turn = (lambda r, c: lambda: replay_us(r, c, args.reps))(replay, chain)
                turns[(pdl, pass_, op, mode, B, impl)] = turn
    # the floor of the graph1 rows: a graph of one 1-element add_, replayed as they are, in the same rounds
    one = torch.zeros(1, device="cuda")
    turns[FLOOR] = (lambda r: lambda: replay_us(r, 1, args.reps))(graphed(lambda: one.add_(1)))
    per_round = take_turns(turns, args.rounds, around=lambda k: pdl_switch(k[0]))
    result["floor"] = summary(per_round.pop(FLOOR))
    add_figures(result, ("pdl", "pass", "op", "mode", "B", "impl"), per_round)
    save_table(args.out, STEM, result, table(result))
    return 0


def _floor_line(result: dict) -> list[str]:
    """The graph1 rows' floor, where the result has it (runs before 2026-11-30's last lack it)."""
    if "floor" not in result:
        return []
    return [f"A CUDA graph of one 1-element `add_`, replayed the same way in the same rounds: "
            f"{turn_cell(result['floor'])} us, the least a graph1 row can take; where both sides are "
            "near it, their ratio says little about the op.", ""]


def table(result: dict) -> list[str]:
    """The Markdown lines of a result."""
    lines = [f"# Gated head, fused vs twin, interleaved over {result['rounds']} rounds "
             f"({run_label(result)})", "",
             "`python3 bench/gated_head_ab.py`. us a call: the median over rounds of each turn's median of "
             f"{result['reps']} calls (eager, each synchronised) or replays (graph1: one call a CUDA-graph "
             "replay, graph20: 20 chained calls); the round range in brackets. `backward`: `torch.autograd.grad` "
             "alone, its forward redone untimed before each call; `forward_backward`: the op and the grad of "
             "its loss (the logits op's: the mean of its squares), as bench_gated_head.py builds them. PDL: "
             "programmatic dependent launch for the package's kernels. " + paired_note("fused"), "",
             *_floor_line(result),
             "| B | pass | op | mode | PDL | fused us | twin us | fused vs twin | paired (rounds won) |",
             "| ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    rows = {(x["pdl"], x["pass"], x["op"], x["mode"], x["B"], x["impl"]): x for x in result["results"]}
    batches = sorted({x["B"] for x in result["results"]})
    for B, (pass_, mode), op, pdl in itertools.product(batches, CASES, OPS, (True, False)):
        f, t = rows[(pdl, pass_, op, mode, B, "fused")], rows[(pdl, pass_, op, mode, B, "twin")]
        lines.append(f"| {B} | {pass_} | {op} | {mode} | {'on' if pdl else 'off'} | {pair_cells(f, t)} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
