"""The gated head's ops, fused against the twin, 20 calls a CUDA-graph replay (us a call).

    python3 bench/chained_gated_head.py

bench_gated_head.py's `graph` rows replay one call per graph launch, so each carries the replay's
fixed cost (10-15 us on an H200), several times the batch-1 kernels' own time, and moves between
runs. Here 20 calls share a replay, as 20 inner-loop steps share the meta-step's graph: the
per-call numbers are the ops' own. Same inputs and ops as bench_gated_head.py. Prints one line
per batch size and implementation.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import replayed_us  # noqa: E402

import bench_gated_head as b  # noqa: E402

CALLS = 20


def us_a_call(fn) -> float:
    return replayed_us(fn, CALLS, reps=40)


def main() -> int:
    if not torch.cuda.is_available():
        print("chained_gated_head.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, {CALLS} calls a graph replay, us a call")
    for rows in b.ROWS:
        (h, z, w, bias), y = b.inputs(rows)
        for impl in ("fused", "twin"):
            ops = b.IMPLS[impl]
            fns = {"logits": lambda: ops["logits"](h, z, w, bias),
                   "ce": lambda: ops["ce"](h, z, w, bias, y),
                   "sgd": lambda: ops["sgd"](h, z, w, bias, y, 1e-6)}  # a tiny lr: W barely moves
            print(f"B={rows} {impl}: " + ", ".join(f"{op} {us_a_call(fn):.2f}" for op, fn in fns.items()),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
