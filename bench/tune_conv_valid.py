"""Tile sweep for the batch-1 Triton convolutions (kernels/conv_valid.py) at ANML's PLN shapes.

    python3 bench/tune_conv_valid.py [--out bench/results] [--quick] [--only conv2:dgrad,...]

For each of the inner step's three conv layers (batch 1: 3->256 on 28x28, 256->256 on 13x13 and
on 5x5) and each kernel (forward, the weight grad with its SGD step, the input grad), every
candidate tile (and split of the reduction: the PROGRAMS target) is checked against the twin in
float64 and timed replayed from a CUDA graph (20 launches a
replay, so launch overhead is out), beside cuDNN's own kernel for the same product (F.conv2d,
torch.nn.grad.conv2d_weight / conv2d_input), all at one float32 precision (--precision: fp32,
the Triton dots in 3xTF32 and cuDNN in IEEE float32, each candidate within 1e-5 of the twin; or
tf32, PyTorch's default, single TF32 products on both sides, within 5e-3). Prints, per kernel
and layer, the best tiles and their time, and writes OUT/tune-conv-valid-<card>[-tf32].json.
The winners go into kernels/conv_valid.py's CONFIGS by hand, with the date and card.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch

from _measure import card_slug, replayed_us

HERE = Path(__file__).resolve().parent
LAYERS = {"conv1": (3, 28), "conv2": (256, 13), "conv3": (256, 5)}  # (C_in, H = W), C_out 256
REPLAY = 20


def _time_us(fn) -> float:
    """Median microseconds per call of fn, replayed REPLAY times per graph."""
    return replayed_us(fn, REPLAY)


def candidates(kernel: str, quick: bool, taps_only: bool = False):
    flat = [(16, 16, 64), (16, 32, 64), (32, 16, 64), (32, 32, 32), (32, 32, 64), (32, 64, 32),
            (64, 32, 32), (16, 16, 128)]
    # the input grad's other reduction order (kernels/conv_valid.py, TAPS_INNER): an iteration is
    # 9 unrolled taps of BLOCK_K channels, so smaller BLOCK_K
    unrolled = [(16, 16, 16), (16, 32, 16), (32, 16, 16), (32, 32, 16), (16, 16, 32), (16, 32, 32),
                (32, 16, 32), (32, 32, 32)]
    tiles = [(t, {}) for t in flat]
    if kernel == "dgrad":
        tiles = [(t, dict(TAPS_INNER=False)) for t in flat] + [(t, dict(TAPS_INNER=True)) for t in unrolled]
    if quick:
        tiles = tiles[:3] + tiles[-3:]
    if taps_only:
        tiles = []
    for ((m, n, k), order), warps, stages, programs in itertools.product(
            tiles, (2, 4), (2, 3), (1, 132, 264, 528, 1056)):
        if warps == 2 and m * n > 512:
            continue
        yield dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=warps, num_stages=stages, PROGRAMS=programs, **order)
    if kernel in ("fwd", "dgrad"):
        # _conv_taps_kernel: a C_in- (or C_out-) long GEMM, then the shifted sum over taps
        rows = [(32, 32), (64, 32), (64, 64), (128, 32)] if not quick else [(64, 32)]
        for (r, k), warps, stages, programs in itertools.product(rows, (4, 8), (2, 3), (1, 132, 264)):
            yield dict(TAPS_GEMM=True, BLOCK_R=r, BLOCK_K=k, num_warps=warps, num_stages=stages, PROGRAMS=programs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON")
    ap.add_argument("--quick", action="store_true", help="a few candidates only (a smoke run)")
    ap.add_argument("--only", default="", metavar="LAYER:KERNEL,...",
                    help="sweep only these products, e.g. conv2:dgrad,conv3:fwd (default: all eight)")
    ap.add_argument("--taps-only", action="store_true",
                    help="sweep only _conv_taps_kernel's candidates (forward and input grad)")
    ap.add_argument("--precision", choices=("fp32", "tf32"), default="fp32",
                    help="float32 convolutions in IEEE/3xTF32 (fp32, default) or in TF32 (PyTorch's default)")
    args = ap.parse_args()
    torch.backends.cudnn.allow_tf32 = args.precision == "tf32"  # the Triton kernels follow it too
    max_err = 5e-3 if args.precision == "tf32" else 1e-5
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    known = {f"{layer}:{kernel}" for layer in LAYERS for kernel in ("fwd", "wgrad", "dgrad")} - {"conv1:dgrad"}
    if only - known:
        ap.error(f"--only: unknown product(s) {sorted(only - known)}; choose from {sorted(known)}")
    if not torch.cuda.is_available():
        print("tune_conv_valid.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    import importlib

    import torch.nn.functional as F

    from anml_fast.ops import reference
    kernels = importlib.import_module("anml_fast.ops.conv_valid")._kernels()

    g = torch.Generator(device="cuda").manual_seed(0)
    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": str(datetime.date.today()), "precision": args.precision, "layers": {}}
    saved = {k: list(v) for k, v in kernels.CONFIGS.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tune-conv-valid-{card_slug(results['card'])}{'-tf32' if args.precision == 'tf32' else ''}.json"
    if only and path.exists():  # a partial sweep updates its products in the card's file, keeping the rest
        kept = json.loads(path.read_text())
        results["layers"] = kept.get("layers", {})
    for layer, (c_in, hw) in LAYERS.items():
        x = torch.randn(1, c_in, hw, hw, device="cuda", generator=g)
        w = torch.randn(256, c_in, 3, 3, device="cuda", generator=g) * 0.05
        gy = torch.randn(1, 256, hw - 2, hw - 2, device="cuda", generator=g)
        runs = {
            "fwd": (lambda: kernels.conv_valid(x, w), lambda: reference.conv_valid(x, w)),
            "wgrad": (lambda: kernels.conv_valid_sgd(gy, x, w, 0.1), lambda: reference.conv_valid_sgd(gy, x, w, 0.1)),
            "dgrad": (lambda: kernels.conv_valid_backward(gy, x, w, True, False)[0],
                      lambda: reference.conv_valid_backward(gy, x, w, True, False)[0]),
        }
        # the same products on cuBLAS through ATen (im2col, GEMM, col2im), for comparison
        k, p = c_in * 9, (hw - 2) ** 2
        col = F.unfold(x, 3)[0]
        aten = {"fwd": lambda: torch.mm(w.view(256, k), F.unfold(x, 3)[0]),
                "wgrad": lambda: torch.addmm(w.view(256, k), gy.view(256, p), col.t(), alpha=-0.1),
                "dgrad": lambda: F.fold(torch.mm(w.view(256, k).t(), gy.view(256, p))[None], (hw, hw), 3)}
        entry = results["layers"].setdefault(layer, {})
        for kernel, (ours, twin) in runs.items():
            if kernel == "dgrad" and layer == "conv1":
                continue  # the inner step never asks for the image's gradient
            if only and f"{layer}:{kernel}" not in only:
                continue
            with torch.no_grad():  # the twin in float64: the accuracy reference
                x64, w64, gy64 = x.double(), w.double(), gy.double()
                want = {"fwd": lambda: reference.conv_valid(x64, w64),
                        "wgrad": lambda: reference.conv_valid_sgd(gy64, x64, w64, 0.1),
                        "dgrad": lambda: reference.conv_valid_backward(gy64, x64, w64, True, False)[0]}[kernel]()
            rows = []
            for cfg in candidates(kernel, args.quick, args.taps_only):
                kernels.CONFIGS[kernel] = [(1 << 62, 1 << 62, cfg)]
                try:
                    got = ours()
                    err = ((got.double() - want).norm() / want.norm()).item()
                    us = _time_us(ours) if err < max_err else None
                except Exception as e:  # a tile Triton rejects (too many registers, ...)
                    err, us = None, f"{type(e).__name__}: {str(e)[:80]}"
                rows.append({"config": cfg, "us": us, "rel_err": err})
            kernels.CONFIGS[kernel] = saved[kernel]
            timed = [r for r in rows if isinstance(r["us"], float)]
            best = min(timed, key=lambda r: r["us"]) if timed else None
            cudnn = _time_us(twin)
            entry[kernel] = {"swept": results["date"], "candidates": rows, "best": best, "twin_us": cudnn,
                             "shipped_us": _time_us(ours), "aten_cublas_us": _time_us(aten[kernel])}
            print(f"{layer} {kernel}: twin (cuDNN) {cudnn:.1f} us, cuBLAS {entry[kernel]['aten_cublas_us']:.1f} us, "
                  f"shipped {entry[kernel]['shipped_us']:.1f} us, "
                  f"best {best['us'] if best else float('nan'):.1f} us {best['config'] if best else ''}",
                  flush=True)
            path.write_text(json.dumps(results, indent=1))  # after each product: a cut-off sweep keeps its part
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
