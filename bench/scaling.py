"""Multi-GPU scaling of meta-training (weak) and of the 600-class evaluation protocol (strong).

    python3 bench/scaling.py --data omniglot.safetensors [--gpus 1,2,4] [--out bench/results]

For each process count N it launches the package the way users do (`torchrun --nproc_per_node=N
-m anml_fast ...`) and reads the run's own records:
  - weak scaling: `meta-train --tasks N` (one task per GPU per meta-step) for --steps steps;
    throughput = tasks per second from metrics.jsonl's steps/s (the first interval, which holds the
    graph capture and the warm-up, is left out);
  - strong scaling: `evaluate --scratch --classes 600` (140 search + 10 final trajectories, shared
    round-robin); time = the class count's "seconds" in results.json.
Writes OUT/scaling-<card>.json and .md with speed-ups against N = 1 measured in the same call.
Keep NVLink multicast off on the GPU machine (NCCL_NVLS_ENABLE=0, set here).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _measure import card_slug  # bench/ is on the path of a script run from it

HERE = Path(__file__).resolve().parent


def _torchrun(n: int, args: list[str], env: dict) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "anml_fast", *args]
    if n == 1:
        cmd = [sys.executable, "-m", "anml_fast", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"scaling.py: {' '.join(cmd)} failed:\n{res.stderr[-3000:]}")


def weak(n: int, data: str, steps: int, device: str, env: dict, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log_every = max(steps // 5, 1)
        _torchrun(n, ["meta-train", "--data", data, "--out", f"{tmp}/run", "--tasks", str(n), "--steps", str(steps),
                      "--log-every", str(log_every), "--eval-every", "0", "--checkpoint-every", str(steps),
                      "--device", device, "--quiet", *extra], env)
        rows = [json.loads(l) for l in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    rates = [r["steps_per_s"] for r in rows if "steps_per_s" in r][1:]  # drop the warm-up interval
    steps_per_s = sum(rates) / len(rates)
    return {"processes": n, "tasks_per_step": n, "steps_per_s": steps_per_s, "tasks_per_s": steps_per_s * n}


def strong(n: int, data: str, classes: int, device: str, env: dict, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        _torchrun(n, ["evaluate", "--scratch", "--data", data, "--out", f"{tmp}/ev", "--classes", str(classes),
                      "--device", device, "--quiet", *extra], env)
        rec = json.loads(Path(f"{tmp}/ev/results.json").read_text())["results"][0]["class_counts"][str(classes)]
    return {"processes": n, "classes": classes, "seconds": rec["seconds"], "test_mean": rec["final"]["test_mean"]}


def table(doc: dict) -> str:
    w, s = doc["weak"], doc["strong"]
    lines = [f"Scaling on {doc['card']} x up to {max(r['processes'] for r in w + s)} ({doc['date']}, "
             f"torch {doc['torch']}); speed-ups against 1 process in the same call.", "",
             f"| processes | meta-training tasks/s | weak-scaling speed-up | {s[0]['classes']}-class protocol "
             "| strong-scaling speed-up |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for a, b in zip(w, s):
        lines.append(f"| {a['processes']} | {a['tasks_per_s']:.1f} | {a['tasks_per_s'] / w[0]['tasks_per_s']:.2f}x | "
                     f"{b['seconds']:.1f} s | {s[0]['seconds'] / b['seconds']:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="Omniglot root folder or prepared cache file")
    ap.add_argument("--gpus", default=None, help="process counts, e.g. 1,2,4 [1, 2, 4 up to the GPU count]")
    ap.add_argument("--steps", type=int, default=2000, help="meta-steps per weak-scaling run [2000]")
    ap.add_argument("--classes", type=int, default=600, help="class count of the strong-scaling protocol [600]")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and Markdown")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu only smoke-tests this script (gloo; add tiny-model flags with --extra)")
    ap.add_argument("--train-extra", default="", help="extra meta-train flags (smoke tests)")
    ap.add_argument("--eval-extra", default="", help="extra evaluate flags (smoke tests)")
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("scaling.py: error: no CUDA GPU here (--device cpu only smoke-tests the script)", file=sys.stderr)
        return 2
    count = torch.cuda.device_count() if args.device == "cuda" else 2
    counts = [int(x) for x in args.gpus.split(",")] if args.gpus else [n for n in (1, 2, 4, 8) if n <= count]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS="1")
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu-smoke-test"
    doc = {"card": card, "torch": torch.__version__, "date": str(datetime.date.today()), "weak": [], "strong": []}
    for n in counts:
        doc["weak"].append(weak(n, args.data, args.steps, args.device, env, args.train_extra.split()))
        print(json.dumps(doc["weak"][-1]), flush=True)
    for n in counts:
        doc["strong"].append(strong(n, args.data, args.classes, args.device, env, args.eval_extra.split()))
        print(json.dumps(doc["strong"][-1]), flush=True)
    slug = card_slug(card)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scaling-{slug}.json").write_text(json.dumps(doc, indent=1))
    (out / f"scaling-{slug}.md").write_text(table(doc) + "\n")
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
