"""End-to-end timings of meta-training and meta-testing on one GPU, fast path against plain PyTorch.

    python3 bench/end_to_end.py --data omniglot.safetensors [--rows ...] [--out bench/results]

Both columns run in this process on this card. "fast" is the package as it runs by default on
CUDA (compiled ops, the meta-step replayed from a CUDA graph, the fused output-layer Adam step).
"plain PyTorch" is the same code on the twins (`backend="torch"`): the meta-step is still replayed
from a CUDA graph, the inner loop is autograd at batch 1, the NM gate is batched over the
trajectory, and meta-test trajectories are stacked (`baddbmm`) with a batched Adam written with
tensor ops (ops/reference.py), i.e. the strong baseline, not the authors' loop.

Rows (--rows picks some; the JSON keeps rows from earlier calls on the same card):
  step1      first-order meta-step (20 inner steps + 84-image meta-loss + Adam), ms per step
  step2      second-order meta-step, ms per step
  train      N first-order meta-steps with sampling, metrics, held-out checks and checkpoints: the
             reference's README run (seed 9) written to --train-out, so it is also a real model
  traj       one 600-class output-layer trajectory (9,000 Adam updates)
  protocol   the 600-class output-layer protocol (14 rates x 10 search draws + 10 final runs)
  schedule   the whole schedule 10..600, output layer only (results written to --eval-out)
  finetune   600 classes with the whole PLN fine-tuned (150 trajectories): the batched
             trajectories against one-by-one twins, each timed over a prefix of the updates
             and projected to 9,000
Models: --model FILE, else the model the train row wrote, else a fresh initialisation (timings do
not depend on the weights). Baselines that would take minutes (protocol, schedule) are estimated
from their per-step cost measured on the same stacked trajectories; the table says so.
Writes OUT/end-to-end-<card>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from _measure import card_slug, output_layer_stack  # bench/ is on the path of a script run from it

HERE = Path(__file__).resolve().parent
ROWS = ("step1", "step2", "train", "traj", "protocol", "schedule", "finetune")
TITLES = {
    "step1": ("meta-training step, first-order", "<= 3 ms", ">= 3x"),
    "step2": ("meta-training step, second-order", "<= 12 ms", ">= 2.5x"),
    "train": ("first-order meta-training run incl. sampling and checkpoints", "<= 2 min", ""),
    "traj": ("one 600-class trajectory, output layer only", "<= 0.5 s", ""),
    "protocol": ("600-class protocol, output layer only (150 trajectories)", "<= 25 s", ">= 3x"),
    "schedule": ("whole schedule 10..600, output layer only", "<= 90 s", ""),
    "finetune": ("600-class protocol, whole PLN fine-tuned (150 trajectories)", "<= 60 s", ">= 4x"),
}


DEVICE = "cuda"  # --device cpu only smoke-tests this script


def _sync_time(fn) -> tuple[float, float]:
    """(seconds, peak MiB above the memory in use before) of fn()."""
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, 0.0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _quiet(msg: str) -> None:
    pass


def meta_step_ms(data, backend: str, second_order: bool, graph: bool, steps: int) -> tuple[float, float]:
    from anml_fast import ops
    from anml_fast.training.trainer import MetaTrainConfig, MetaTrainer

    with ops.use_backend(backend), tempfile.TemporaryDirectory() as tmp:
        cfg = MetaTrainConfig(second_order=second_order, eval_every=0, steps=10 ** 9)
        tr = MetaTrainer(cfg, data, tmp, device=DEVICE, progress=False, log=_quiet,
                         graph=graph and DEVICE == "cuda")
        for _ in range(5):  # capture (graph), Triton compilation, cuDNN's first calls
            tr.step_once()

        def run():
            for _ in range(steps):
                tr.step_once()

        sec, peak = _sync_time(run)
    return 1e3 * sec / steps, peak


def row_steps(data, second_order: bool, steps: int) -> dict:
    fast = meta_step_ms(data, "auto", second_order, True, steps)
    eager = meta_step_ms(data, "auto", second_order, False, max(steps // 4, 5))
    base = meta_step_ms(data, "torch", second_order, True, steps)
    row = {"fast": fast[0], "fast_peak_mb": fast[1], "baseline": base[0], "baseline_peak_mb": base[1],
           "unit": "ms", "fast_eager_no_graph": eager[0], "steps_timed": steps}
    if DEVICE == "cuda":
        # Not the default: cuDNN's heuristics pick the batch-1 convolutions' algorithms, and the
        # convolution backward is most of the inner step. Recorded beside the row (benchmarking
        # runs in the warm-up before the graph capture) to show what letting cuDNN time its
        # algorithms would give; it may also pick non-deterministic ones.
        before, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
        try:
            row["fast_cudnn_benchmark"] = meta_step_ms(data, "auto", second_order, True, steps)[0]
        finally:
            torch.backends.cudnn.benchmark = before
    return row


def row_train(data, steps: int, out: Path) -> dict:
    from anml_fast.training.trainer import MetaTrainConfig, MetaTrainer

    cfg = MetaTrainConfig(steps=steps)
    tr = MetaTrainer(cfg, data, out, device=DEVICE, progress=False, log=print)
    sec, peak = _sync_time(tr.run)
    return {"fast": sec, "fast_peak_mb": peak, "unit": "s", "steps": steps, "run": str(out),
            "command": f"anml-fast meta-train --steps {steps} --seed {cfg.seed} --out {out}"}


def _eval_parts(data, model: Path | None):
    from anml_fast.data.tasks import MetaTestSet
    from anml_fast.models import ModelConfig, build

    if model is not None:
        from anml_fast.commands import _load_model  # any MODEL the CLI takes, pretrained:NAME too

        ck = _load_model(str(model), DEVICE)[0]
        net, params = build(ck.config), ck.params
    else:
        net = build(ModelConfig())
        params = net.init_params(torch.Generator(DEVICE).manual_seed(0), DEVICE)
    return net, params, MetaTestSet(data, DEVICE, input_norm=net.config.input_norm)


def _per_step_ms(bank, net, T: int, backend: str, steps: int) -> float:
    """ms per output-layer Adam step of T stacked 600-class trajectories on `backend`, replayed
    from CUDA graphs as run_output_layer does."""
    from anml_fast import ops
    from anml_fast.evaluation.trajectories import run_steps

    w = bank.params[f"{net.output_layer}.weight"]
    # 256 images: later steps reuse the last one (the index is clamped), the same work
    state, X, Y, lr = output_layer_stack(w, T, 256)
    fn = ops.choose("output_layer_adam_step_", w.device, backend)
    step = torch.ones((), dtype=torch.int64, device=w.device)

    def one():
        fn(*state, X, Y, lr, step)
        step.add_(1)

    run_steps(one, 101, w.device)  # compiles, captures and replays once: not timed
    sec, _ = _sync_time(lambda: run_steps(one, steps + 1, w.device))
    return 1e3 * sec / (steps + 1)


def row_traj(net, params, test_set) -> dict:
    from anml_fast import ops
    from anml_fast.evaluation.trajectories import FeatureBank, Trajectory, run_output_layer

    bank = FeatureBank(net, params, test_set)
    g = torch.Generator(DEVICE).manual_seed(0)
    traj = [Trajectory(test_set.draw_classes(g, 600), 1e-3)]
    bank.get(traj[0].classes)  # features are shared by both columns: not timed
    out = {}
    for col, backend in (("fast", "auto"), ("baseline", "torch")):
        with ops.use_backend(backend):
            run_output_layer(bank, net, [Trajectory(traj[0].classes[:10], 1e-3)], "adam", False, g)  # warm
            sec, peak = _sync_time(lambda: run_output_layer(bank, net, traj, "adam", False, g))
        out[col], out[f"{col}_peak_mb"] = sec, peak
    out["unit"] = "s"
    return out


def _evaluate(net, params, test_set, counts, out_dir=None, system="model"):
    from anml_fast.evaluation.protocol import EvalConfig, Evaluator

    ev = Evaluator(net, params, test_set, EvalConfig(class_counts=list(counts)), out_dir=out_dir,
                   system=system, progress=False, log=print)
    holder = {}
    sec, peak = _sync_time(lambda: holder.setdefault("r", ev.run()))
    return sec, peak, holder["r"]


def row_protocol(net, params, test_set, counts, out_dir=None, system="model") -> dict:
    """Fast path measured whole; the baseline = the same run with each Adam step's cost swapped
    for the twin's, both measured here on the same 150 stacked trajectories."""
    from anml_fast.evaluation.protocol import EvalConfig
    from anml_fast.evaluation.trajectories import FeatureBank

    sec, peak, res = _evaluate(net, params, test_set, counts, out_dir, system)
    cfg = EvalConfig()
    bank = FeatureBank(net, params, test_set)
    steps_timed = 200
    T = len(cfg.lrs) * cfg.search_draws  # the search batch; the final runs are another 10
    fast_ms = _per_step_ms(bank, net, T, "auto", steps_timed)
    base_ms = _per_step_ms(bank, net, T, "torch", steps_timed)
    fast_ms10 = _per_step_ms(bank, net, cfg.final_runs, "auto", steps_timed)
    base_ms10 = _per_step_ms(bank, net, cfg.final_runs, "torch", steps_timed)
    updates = sum(n * 15 for n in counts)  # per trajectory
    est = sec + updates * ((base_ms - fast_ms) + (base_ms10 - fast_ms10)) / 1e3
    accs = {n: r["final"]["test_mean"] for n, r in res["class_counts"].items()}
    return {"fast": sec, "fast_peak_mb": peak, "baseline": est, "baseline_estimated": True,
            "unit": "s", "per_step_ms": {"fast_T140": fast_ms, "baseline_T140": base_ms,
                                         "fast_T10": fast_ms10, "baseline_T10": base_ms10},
            "test_acc": accs}


def row_finetune(net, params, test_set, updates: int) -> dict:
    """600-class whole-PLN protocol (150 trajectories x 9,000 updates), projected from a prefix:
    fast = all 150 side by side (run_finetune_batched), baseline = one by one (run_finetune, the
    twins), each timed over trajectories of `updates` updates."""
    from anml_fast import ops
    from anml_fast.evaluation.finetune_batched import run_finetune_batched
    from anml_fast.evaluation.trajectories import Trajectory, run_finetune

    g = torch.Generator(DEVICE).manual_seed(0)
    n = max(1, updates // 15)
    trajs = [Trajectory(test_set.draw_classes(g, n), 1e-4) for _ in range(150)]
    out = {}
    run_finetune_batched(net, params, test_set, trajs[:2], ["pln"], "adam", False, g)  # warm-up
    sec, peak = _sync_time(lambda: run_finetune_batched(net, params, test_set, trajs, ["pln"], "adam", False, g))
    out["fast"], out["fast_peak_mb"] = sec / (n * 15) * 9000, peak
    with ops.use_backend("torch"):
        run_finetune(net, params, test_set, trajs[:1], ["pln"], "adam", False, g)
        sec, peak = _sync_time(lambda: run_finetune(net, params, test_set, trajs[:2], ["pln"], "adam", False, g))
    out["baseline"], out["baseline_peak_mb"] = sec / 2 / (n * 15) * 9000 * 150, peak
    out.update(unit="s", projected_from_updates=n * 15)
    return out


def _fmt(v: float, unit: str) -> str:
    if unit == "ms":
        return f"{v:.2f} ms"
    return f"{v:.2f} s" if v < 10 else f"{v:.1f} s"


def table(doc: dict) -> str:
    lines = [f"End-to-end on {doc['card']} (torch {doc['torch']}, {doc['date']}); "
             "plain PyTorch = the same code on the twins, in the same process.", "",
             "| what | target | fast | plain PyTorch | speed-up | peak GPU memory (fast / plain) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for key in ROWS:
        r = doc["rows"].get(key)
        if r is None:
            continue
        what, target, speed_target = TITLES[key]
        if key == "train":
            what = f"{r['steps']:,} first-order meta-steps incl. sampling and checkpoints"
        base = r.get("baseline")
        base_s = "" if base is None else _fmt(base, r["unit"]) + (" (est.)" if r.get("baseline_estimated") else "")
        speed = "" if base is None else f"{base / r['fast']:.1f}x" + (f" (target {speed_target})" if speed_target else "")
        fast_s = _fmt(r["fast"], r["unit"])
        if key == "finetune":
            fast_s += " (proj.)"
            base_s += " (proj.)"
        peaks = f"{r['fast_peak_mb']:.0f} MiB" + (f" / {r['baseline_peak_mb']:.0f} MiB" if "baseline_peak_mb" in r else "")
        lines.append(f"| {what} | {target} | {fast_s} | {base_s} | {speed} | {peaks} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="Omniglot root folder or prepared cache file")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--model", default=None,
                    help="model to evaluate, as `anml-fast evaluate` takes it (default: see above)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and Markdown")
    ap.add_argument("--train-steps", type=int, default=20000, help="steps of the train row [20000]")
    ap.add_argument("--train-out", default="runs/anml-seed9", help="run folder of the train row")
    ap.add_argument("--eval-out", default="runs/eval-anml-seed9", help="results folder of the schedule row")
    ap.add_argument("--step-count", type=int, default=200, help="meta-steps timed per step row [200]")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    ap.add_argument("--finetune-updates", type=int, default=300, help="updates timed in the finetune row")
    ap.add_argument("--output-layer-tiles", default=None, metavar="JSON",
                    help="run the output-layer Adam kernel with the tiles a bench/tune_output_layer.py "
                         "JSON recommends (its adam_configs) instead of the shipped ones")
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"--rows: unknown {bad}; choose from {','.join(ROWS)}")
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("end_to_end.py: error: no CUDA GPU here (--device cpu only smoke-tests the script)", file=sys.stderr)
        return 2
    from anml_fast.data.cache import load_omniglot

    tiles = None
    if args.output_layer_tiles:
        from anml_fast.ops import output_layer as ol

        try:
            tiles = {int(k): v for k, v in json.loads(Path(args.output_layer_tiles).read_text())["adam_configs"].items()}
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--output-layer-tiles {args.output_layer_tiles}: expected a tune_output_layer.py JSON "
                     f"with adam_configs ({e})")
        if not tiles:
            ap.error(f"--output-layer-tiles {args.output_layer_tiles}: its adam_configs is empty")
        ol._kernels().ADAM_CONFIGS = tiles
        print(f"output-layer Adam tiles from {args.output_layer_tiles}: {tiles}")
    data = load_omniglot(args.data, progress=False)
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu-smoke-test"
    slug = card_slug(card)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"end-to-end-{slug}.json"
    doc = json.loads(js.read_text()) if js.exists() else {"rows": {}}
    doc.update(card=card, torch=torch.__version__, date=str(datetime.date.today()))
    doc.pop("output_layer_tiles", None)  # once file-wide; the rows now say which tiles they ran with
    model = args.model

    def save(key, value):
        if tiles is not None and key in ("traj", "protocol", "schedule"):  # not the shipped tiles
            value["output_layer_tiles"] = {str(k): v for k, v in tiles.items()}
        doc["rows"][key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        js.write_text(json.dumps(doc, indent=1))
        (out / f"end-to-end-{slug}.md").write_text(table(doc) + "\n")

    if "step1" in rows:
        save("step1", row_steps(data, False, args.step_count))
    if "step2" in rows:
        save("step2", row_steps(data, True, max(args.step_count // 4, 10)))
    if "train" in rows:
        save("train", row_train(data, args.train_steps, Path(args.train_out)))
        model = model or str(Path(args.train_out) / "model.safetensors")
    parts = _eval_parts(data, model) if set(rows) & {"traj", "protocol", "schedule", "finetune"} else None
    if "traj" in rows:
        save("traj", row_traj(*parts))
    if "protocol" in rows:
        save("protocol", row_protocol(*parts, [600]))
    if "schedule" in rows:
        from anml_fast.evaluation.protocol import CLASS_COUNTS
        save("schedule", row_protocol(*parts, CLASS_COUNTS, Path(args.eval_out), "ANML (seed 9)"))
    if "finetune" in rows:
        save("finetune", row_finetune(*parts, args.finetune_updates))
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
