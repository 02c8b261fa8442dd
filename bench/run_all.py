"""Run every kernel benchmark on this machine's GPU and write the results where the README links.

    python3 bench/run_all.py [--out bench/results]

Writes OUT/<card>.json (pytest-benchmark's JSON: every round, the machine, the commit) and
OUT/<card>.md (one table per benchmark file, each op against its plain-PyTorch twin in the same
run, with the card and the date), and, through the turn-taking scripts (TURNS: bench/gated_head_ab.py,
bench/conv_block_ab.py), OUT/gated-head-ab-<card>.{json,md} and OUT/conv-block-ab-<card>.{json,md}:
the gated head and the conv block timed in turns with their twins, also the last tables of
OUT/<card>.md.
Needs a CUDA GPU and the compiled extension.
"""
import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from _measure import card_slug  # bench/ is on the path of a script run from it

HERE = Path(__file__).resolve().parent
FILES = ["bench_conv_block", "bench_conv_valid", "bench_gated_head", "bench_multi_tensor", "bench_inner_step"]
# rows timed one after another drift by as much as these ops and their twins differ, so these
# time them in turns: (script, section title); each writes OUT/<its STEM>-<card>.json
TURNS = [("gated_head_ab", "gated_head, taking turns with the twin"),
         ("conv_block_ab", "conv_block, eager calls taking turns with the twin")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and Markdown")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("run_all.py: error: no CUDA GPU here; the benchmarks time GPU kernels", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name()
    slug = card_slug(card)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{slug}.json"
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", *[str(HERE / f"{f}.py") for f in FILES],
                          f"--benchmark-json={js}"], cwd=HERE.parent)
    if rc != 0:
        print(f"run_all.py: error: the benchmarks failed (pytest exit {rc})", file=sys.stderr)
        return rc
    sys.path.insert(0, str(HERE))
    for script, _ in TURNS:
        rc = importlib.import_module(script).main(["--out", str(out)])
        if rc != 0:
            print(f"run_all.py: error: {script}.py failed (exit {rc})", file=sys.stderr)
            return rc
    # the device's copy of the tree may carry a stale .git: the caller names the commit
    at = f" at {os.environ['ANML_FAST_COMMIT']}" if os.environ.get("ANML_FAST_COMMIT") else ""
    parts = [f"# Kernel benchmarks on {card} ({datetime.date.today()}{at}, torch {torch.__version__})", "",
             "The pytest-benchmark tables time their rows one after another; rows whose wall time is "
             "mostly the host's (eager calls, one-call graph replays) drift between runs by as much as "
             "some of the differences they show. The last tables time the gated head and the conv block "
             "taking turns with their twins: there the paired column compares each op with its twin round "
             "by round.", ""]
    for f in FILES:
        parts += [f"## {f.removeprefix('bench_')}", "", importlib.import_module(f).table(str(js)), ""]
    for script, title in TURNS:
        module = importlib.import_module(script)
        result = json.loads((out / f"{module.STEM}-{slug}.json").read_text())
        parts += [f"## {title}", "", *module.table(result)[2:], ""]
    (out / f"{slug}.md").write_text("\n".join(parts))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
