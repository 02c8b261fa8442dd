"""The compiled conv block against its twin, eager calls taking turns.

bench_conv_block.py times its rows one after another. Its eager backward rows are the noisiest of
run_all's tables (medians of 500-1000 us with IQRs of 100-340 us on an H200, 2026-11-30): the
host's work in cuDNN's dgrad and wgrad and in the autograd engine, the same on both sides, is most
of the call, and the same row moved by up to 0.5x between two runs. This script builds each call
(forward, backward alone, forward and backward through autograd, as bench_conv_block.py builds
them) for the compiled op and the twin, then times them in turn, round after round, and reports
each one's median over the rounds of its per-turn median and, per pair, the median of the
per-round ratios (the two sides of a case run back to back in every round).

    python3 bench/conv_block_ab.py [--blocks 1,2,3] [--batches 1,20,84] [--rounds 15] [--reps 30]
                                   [--out bench/results]

Writes OUT/conv-block-ab-<card>.json and .md.
"""
from __future__ import annotations

import argparse

import torch

from _measure import (add_figures, check_turn_args, eager_us, ints, pair_cells, paired_note,  # bench/
                      run_label, save_table, take_turns, turn_args, turns_result)
from bench_conv_block import IMPLS, LAYERS, inputs

PASSES = ("forward", "backward", "forward_backward")
STEM = "conv-block-ab"  # OUT/<STEM>-<card>.json and .md


def _call(impl: str, layer: int, B: int, pass_: str):
    """(forward, timed): `timed(forward())` is one timed call (forward() untimed: the graph the
    backward alone differentiates; else nothing)."""
    args, leaves, pool = inputs(layer, B, requires_grad=pass_ != "forward")
    fn = IMPLS[impl]
    if pass_ == "forward":
        return (lambda: None), (lambda _: fn(*args, pool=pool))
    loss = lambda: fn(*args, pool=pool).square().mean()  # noqa: E731 (bench_conv_block's scalar)
    if pass_ == "backward":
        return loss, (lambda out: torch.autograd.grad(out, leaves))
    return (lambda: None), (lambda _: torch.autograd.grad(loss(), leaves))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", default="1,2,3", help="PLN blocks (bench_conv_block.LAYERS) [1,2,3]")
    ap.add_argument("--batches", default="1,20,84", help="batch sizes [1,20,84]")
    turn_args(ap, STEM, "calls a turn")
    args = ap.parse_args(argv)
    blocks = ints(args.blocks, "--blocks", lambda v: v in LAYERS, f"some of {sorted(LAYERS)}")
    batches = ints(args.batches, "--batches", lambda v: v >= 1, "batch sizes of at least 1")
    check_turn_args(args, "conv_block_ab.py")
    result = turns_result(args.rounds, args.reps)
    turns = {}  # (pass, block, B, impl) -> a turn's median us a call
    for pass_ in PASSES:
        for block in blocks:
            for B in batches:
                for impl in IMPLS:
                    forward, timed = _call(impl, block, B, pass_)
                    for _ in range(10):  # cuDNN's algorithm choice and the kernels' compiles outside the timing
                        timed(forward())
                    turns[(pass_, block, B, impl)] = (lambda f, t: lambda: eager_us(f, t, args.reps))(forward, timed)
    add_figures(result, ("pass", "block", "B", "impl"), take_turns(turns, args.rounds))
    save_table(args.out, STEM, result, table(result))
    return 0


def table(result: dict) -> list[str]:
    """The Markdown lines of a result."""
    lines = [f"# Conv block, compiled vs twin, eager calls taking turns over {result['rounds']} rounds "
             f"({run_label(result)})", "",
             "`python3 bench/conv_block_ab.py`. us a call: the median over rounds of each turn's median of "
             f"{result['reps']} calls, each synchronised; the round range in brackets. `backward`: "
             "`torch.autograd.grad` alone, its forward redone untimed before each call; `forward_backward`: "
             "the block and the grad of the mean of its squares, as bench_conv_block.py builds them. cuDNN "
             "at PyTorch's defaults on both sides. " + paired_note("compiled"), "",
             "| pass | block | B | compiled us | twin us | compiled vs twin | paired (rounds won) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = {(x["pass"], x["block"], x["B"], x["impl"]): x for x in result["results"]}
    for pass_ in PASSES:
        for block, B in sorted({(k[1], k[2]) for k in rows if k[0] == pass_}):
            ours, twin = rows[(pass_, block, B, "compiled")], rows[(pass_, block, B, "twin")]
            lines.append(f"| {pass_} | {block} | {B} | {pair_cells(ours, twin)} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
