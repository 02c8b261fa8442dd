"""Tile sweep for the gated head's batch-1 kernels (kernels/gated_head.py) at ANML's head.

    python3 bench/tune_gated_head.py [--out bench/results] [--quick]

The inner loop's head step, `gated_head_ce_sgd_` at one row (2304 features, 1000 outputs), is two
launches: the forward kernel (logits, and the loss finished by its last program) and the weight
kernel (W -= lr dW in place, the input grads from its partials). Both only stream the 9.2 MB
weight (read once, and read and written once), so their bound is bandwidth, about 2 and 4 us on
an H200; the shipped tiles took 8.0 and 11.7 us there (2026-11-28 profile). This sweeps each
kernel's tiles with the other at its shipped tiles, checks every candidate against the
plain-PyTorch twin (loss, dh, dz and the updated W and b within 1e-5), and times the whole step
replayed from a CUDA graph (20 steps a replay, the weights updated in place each time: the work
does not depend on their values). Prints the best tiles per kernel and writes
OUT/tune-gated-head-<card>.json. The winners go into kernels/gated_head.py by hand.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import json
import sys
from pathlib import Path

import torch

from _measure import card_slug, replayed_us

HERE = Path(__file__).resolve().parent
FEATURES, OUTPUTS = 2304, 1000
REPLAY = 20


def _time_us(fn) -> float:
    """Median microseconds per call of fn, replayed REPLAY times per graph."""
    return replayed_us(fn, REPLAY)


def candidates(kernel: str, quick: bool):
    if kernel == "fwd":
        space = itertools.product((1, 2, 4, 8), (256, 512, 1024, 2048, 4096), (2, 4, 8), (1, 2))
        for o, f, warps, stages in space:
            per_thread = o * f // (32 * warps)
            if 4 <= per_thread <= 128 and not (stages > 1 and f >= FEATURES):
                yield dict(BLOCK_B=1, BLOCK_O=o, BLOCK_F=f, num_warps=warps, num_stages=stages)
    else:
        for o, f, warps in itertools.product((8, 16, 32, 64, 128), (32, 64, 128, 256, 512), (2, 4, 8)):
            if 4 <= o * f // (32 * warps) <= 64:
                yield dict(BLOCK_B=1, BLOCK_O=o, BLOCK_F=f, num_warps=warps, num_stages=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON")
    ap.add_argument("--quick", action="store_true", help="every fourth candidate only (a smoke run)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("tune_gated_head.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    from anml_fast.ops import reference
    kernels = importlib.import_module("anml_fast.ops.gated_head")._kernels()

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.relu(torch.randn(1, FEATURES, device="cuda", generator=g))
    z = torch.randn(1, FEATURES, device="cuda", generator=g)
    w0 = torch.randn(OUTPUTS, FEATURES, device="cuda", generator=g) * FEATURES ** -0.5
    b0 = torch.randn(OUTPUTS, device="cuda", generator=g) * 0.01
    y = torch.tensor([7], device="cuda")
    lr = 0.1
    w_ref, b_ref = w0.clone(), b0.clone()
    want = (*reference.gated_head_ce_sgd_(h, z, w_ref, b_ref, y, lr), w_ref, b_ref)
    w, b = w0.clone(), b0.clone()

    def step():
        kernels.gated_head_ce_sgd_(h, z, w, b, y, lr)

    def error() -> float:
        w.copy_(w0)
        b.copy_(b0)
        got = (*kernels.gated_head_ce_sgd_(h, z, w, b, y, lr), w, b)
        return max(((a - e).norm() / e.norm().clamp_min(1e-30)).item() for a, e in zip(got, want))

    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": str(datetime.date.today()), "kernels": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tune-gated-head-{card_slug(results['card'])}.json"
    shipped = {"fwd": kernels._fwd_config, "weight": kernels._weight_config}
    results["shipped_us"] = _time_us(step)
    print(f"shipped tiles: {results['shipped_us']:.2f} us a head step", flush=True)
    for kernel, attr in (("fwd", "_fwd_config"), ("weight", "_weight_config")):
        rows = []
        for i, cfg in enumerate(candidates(kernel, args.quick)):
            if args.quick and i % 4:
                continue
            setattr(kernels, attr, lambda n_rows, dot, cfg=cfg, base=shipped[kernel]:
                    dict(cfg) if n_rows == 1 else base(n_rows, dot))
            try:
                err = error()
                us = _time_us(step) if err < 1e-5 else None
            except Exception as e:  # a tile Triton rejects (too many registers, ...)
                err, us = None, f"{type(e).__name__}: {str(e)[:80]}"
            rows.append({"config": cfg, "us": us, "rel_err": err})
        setattr(kernels, attr, shipped[kernel])
        timed = [r for r in rows if isinstance(r["us"], float)]
        best = min(timed, key=lambda r: r["us"]) if timed else None
        results["kernels"][kernel] = {"candidates": rows, "best": best}
        print(f"{kernel}: best {best['us'] if best else float('nan'):.2f} us a head step "
              f"{best['config'] if best else ''} ({len(timed)} of {len(rows)} candidates timed)", flush=True)
        path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
