"""The meta-testing protocol: for each class count, a learning-rate search, then the final runs.

Per class count N (its own RNG stream, so skipping finished counts on resume changes nothing):
1. search: `search_draws` class draws; every draw is trained at every rate; each draw's best rate
   is picked on meta-test-train accuracy (or on test accuracy, the reference's leaky choice);
   the most frequent best rate wins (ties: the earlier rate in the list);
2. final: `final_runs` fresh draws at that rate; mean and standard deviation of train/test accuracy.
"""
from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from ..atomic import write_json
from ..data.tasks import MetaTestSet
from ..distributed import Dist
from ..errors import AnmlFastError
from ..models import Network, Params, select
from . import report
from .finetune_batched import run_finetune_batched
from .trajectories import FeatureBank, Trajectory, run_finetune, run_output_layer

CLASS_COUNTS = (10, 50, 75, 100, 200, 300, 400, 500, 600)
LEARNING_RATES = (0.001, 0.0006, 0.0004, 0.00035, 0.0003, 0.00025, 0.0002, 0.00015, 0.0001,
                  0.00009, 0.00008, 0.00006, 0.00003, 0.00001)
RESULTS_JSON, RESULTS_MD, RESULTS_PNG = "results.json", "results.md", "results.png"


@dataclass
class EvalConfig:
    class_counts: list[int] = field(default_factory=lambda: list(CLASS_COUNTS))
    lrs: list[float] = field(default_factory=lambda: list(LEARNING_RATES))
    search_draws: int = 10
    final_runs: int = 10
    select_on: str = "train"  # "test" reproduces the reference's choice (it leaks the test set)
    train_layers: str = "output"  # "output" or "pln" (or any parameter-name prefixes, comma-separated)
    optimizer: str = "adam"
    iid: bool = False
    seed: int = 0
    max_batch: int = 0  # trajectories side by side; 0: chosen from the device's memory

    def validate(self) -> None:
        if not self.class_counts or any(not 1 <= n <= 650 for n in self.class_counts):
            raise AnmlFastError(f"--classes {self.class_counts}: each count must be in 1..650")
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise AnmlFastError(f"--lrs {self.lrs}: give one or more positive learning rates")
        if self.search_draws < 1 or self.final_runs < 1:
            raise AnmlFastError("--search-draws and --runs must be at least 1")
        if self.select_on not in ("train", "test"):
            raise AnmlFastError(f"--select-on {self.select_on!r}: expected 'train' or 'test'")
        if self.optimizer not in ("adam", "sgd"):
            raise AnmlFastError(f"--optimizer {self.optimizer!r}: expected 'adam' or 'sgd'")

    @classmethod
    def from_dict(cls, d: dict) -> "EvalConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _class_count_seed(seed: int, n: int) -> int:
    return seed * 1_000_003 + n


def _max_batch(cfg: EvalConfig, params: Params, names: list[str], extra_bytes: int = 0) -> int:
    """Trajectories side by side: --max-batch, else as many as half the free GPU memory holds when
    each keeps its own copy of `names` (weights, two Adam moments, the gradient and temporaries:
    6 copies) plus `extra_bytes`; 8 on the CPU."""
    if cfg.max_batch:
        return cfg.max_batch
    t = params[names[0]]
    per_traj = sum(params[n].numel() for n in names) * t.element_size() * 6 + extra_bytes
    if t.is_cuda:
        free, _ = torch.cuda.mem_get_info(t.device)
        return max(1, int(free * 0.5) // per_traj)
    return 8


class Evaluator:
    """Runs the protocol for one model and writes results.json, results.md and results.png."""

    def __init__(self, net: Network, params: Params, test_set: MetaTestSet, cfg: EvalConfig,
                 out_dir: str | Path | None = None, system: str = "model", source: dict | None = None,
                 progress: bool = True, log: Callable[[str], None] = print, dist: Dist | None = None):
        cfg.validate()
        # several processes (anml_fast.distributed): trajectories dealt round-robin, results
        # gathered on every rank, rank 0 alone writes, logs and shows progress
        self.dist = dist or Dist()
        if not self.dist.is_main:
            out_dir, progress, log = None, False, (lambda msg: None)
        self.net, self.params, self.test_set, self.cfg = net, params, test_set, cfg
        self.out = Path(out_dir) if out_dir is not None else None
        self.system, self.source = system, source or {}
        self.progress, self.log = progress, log
        self.train_prefixes = ([net.output_layer] if cfg.train_layers == "output"
                               else [p.strip() for p in cfg.train_layers.split(",") if p.strip()])
        self.output_only = self.train_prefixes == [net.output_layer]
        self.bank = FeatureBank(net, params, test_set) if self.output_only else None

    def _run(self, trajs: list[Trajectory], g: torch.Generator, on_steps) -> list[tuple[float, float]]:
        keep = [self.dist.mine(i) for i in range(len(trajs))]
        if self.output_only:
            # a chunk holds about max_batch trajectories per process; chunking changes nothing
            # in the results (the random numbers are drawn per trajectory, in order)
            out, step = [], _max_batch(self.cfg, self.params, [f"{self.net.output_layer}.weight"])
            step *= self.dist.world
            for i in range(0, len(trajs), step):
                out += run_output_layer(self.bank, self.net, trajs[i:i + step], self.cfg.optimizer,
                                        self.cfg.iid, g, on_steps, keep[i:i + step])
        elif not self.test_set.device.type == "cuda":
            # on a CPU the grouped convolutions of the batched version are slower than one by one
            # (measured on 2 cores: 0.4x); both give the same numbers
            out = run_finetune(self.net, self.params, self.test_set, trajs, self.train_prefixes,
                               self.cfg.optimizer, self.cfg.iid, g, on_steps, keep)
        else:
            # all trajectories side by side (vmap); the random numbers are drawn per trajectory in
            # order, so chunks change nothing but memory
            # per trajectory: its trained layers and reset output layer, plus activations
            names = sorted(set(select(list(self.params), self.train_prefixes))
                           | {f"{self.net.output_layer}.weight", f"{self.net.output_layer}.bias"})
            out, step = [], _max_batch(self.cfg, self.params, names, extra_bytes=32 * 2 ** 20)
            step *= self.dist.world
            for i in range(0, len(trajs), step):
                out += run_finetune_batched(self.net, self.params, self.test_set, trajs[i:i + step],
                                            self.train_prefixes, self.cfg.optimizer, self.cfg.iid, g,
                                            on_steps, keep[i:i + step])
        if not self.dist.enabled:
            return out
        merged: list = [None] * len(trajs)
        mine = [i for i, k in enumerate(keep) if k]
        for part in self.dist.all_gather_object(list(zip(mine, out))):
            for i, acc in part:
                merged[i] = tuple(acc)
        return merged

    def class_count(self, n: int) -> dict:
        """The protocol at one class count, as a JSON-able record."""
        from tqdm import tqdm

        c = self.cfg
        g = torch.Generator(self.test_set.device).manual_seed(_class_count_seed(c.seed, n))
        search = len(c.lrs) > 1
        runs = (c.search_draws * len(c.lrs) if search else 0, c.final_runs)
        mine = sum(sum(self.dist.mine(i) for i in range(r)) for r in runs)  # this process's share
        total = n * self.test_set.train.shape[1] * mine
        bar = tqdm(total=total, desc=f"{self.system} {n} classes", unit="update", unit_scale=True,
                   disable=not self.progress, dynamic_ncols=True, leave=False)
        t0 = time.perf_counter()
        record: dict = {"classes": n}
        with torch.no_grad() if self.output_only else torch.enable_grad():
            if search:
                draws = [self.test_set.draw_classes(g, n) for _ in range(c.search_draws)]
                trajs = [Trajectory(d, lr) for d in draws for lr in c.lrs]
                accs = self._run(trajs, g, bar.update)
                L = len(c.lrs)
                train = [[accs[d * L + i][0] for i in range(L)] for d in range(c.search_draws)]
                test = [[accs[d * L + i][1] for i in range(L)] for d in range(c.search_draws)]
                crit = train if c.select_on == "train" else test
                best = [c.lrs[max(range(L), key=lambda i: (row[i], -i))] for row in crit]
                counts = Counter(best)
                lr = max(c.lrs, key=lambda r: (counts[r], -c.lrs.index(r)))
                record["search"] = {"lrs": c.lrs, "train_acc": train, "test_acc": test,
                                    "best_lr_per_draw": best, "chosen_lr": lr, "selected_on": c.select_on}
            else:
                lr = c.lrs[0]
            draws = [self.test_set.draw_classes(g, n) for _ in range(c.final_runs)]
            accs = self._run([Trajectory(d, lr) for d in draws], g, bar.update)
        bar.close()
        tr, te = [a[0] for a in accs], [a[1] for a in accs]
        record["final"] = {"lr": lr, "train_acc": tr, "test_acc": te,
                           "train_mean": statistics.fmean(tr), "test_mean": statistics.fmean(te),
                           "train_std": statistics.pstdev(tr), "test_std": statistics.pstdev(te)}
        record["seconds"] = time.perf_counter() - t0
        return record

    def run(self, resume: bool = False) -> dict:
        results = self.dist.from_main(lambda: self._initial_results(resume))
        for n in self.cfg.class_counts:
            if str(n) in results["class_counts"]:
                self.log(f"{n} classes: done already, skipped")
                continue
            rec = self.class_count(n)
            results["class_counts"][str(n)] = rec
            f = rec["final"]
            self.log(f"{self.system} {n:4d} classes  lr {f['lr']:g}  test {f['test_mean']:.3f} ± {f['test_std']:.3f}"
                     f"  train {f['train_mean']:.3f} ± {f['train_std']:.3f}  ({rec['seconds']:.1f} s)")
            if self.out is not None:
                write_outputs(self.out, [results])
        return results

    def _initial_results(self, resume: bool) -> dict:
        results = {"system": self.system, "source": self.source, "config": asdict(self.cfg), "class_counts": {}}
        if self.out is not None and (self.out / RESULTS_JSON).exists():
            if not resume:
                raise AnmlFastError(f"{self.out / RESULTS_JSON} exists: pass --resume to finish that "
                                    f"evaluation, or choose another --out")
            results = self._resume(results)
        return results

    def _resume(self, fresh: dict) -> dict:
        path = self.out / RESULTS_JSON
        try:
            old = json.loads(path.read_text())
            old_results = old["results"][0]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise AnmlFastError(f"{path}: cannot resume from it ({e})") from None
        # class counts may differ (a resumed run may add counts); everything else must match
        strip = lambda cfg: {k: v for k, v in (cfg or {}).items() if k != "class_counts"}
        if strip(old_results.get("config")) != strip(fresh["config"]) or old_results.get("source") != fresh["source"]:
            raise AnmlFastError(f"{path} was made with another model or settings; "
                                f"use the same ones to resume, or another --out")
        old_results["config"] = fresh["config"]
        return old_results


def write_outputs(out: Path, all_results: list[dict]) -> None:
    """results.json (every run), results.md (the table) and results.png (the plot), atomically."""
    write_json(out / RESULTS_JSON, {"results": all_results})
    report.write_table(out / RESULTS_MD, all_results)
    report.write_plot(out / RESULTS_PNG, all_results)


def quick_check(net: Network, params: Params, test_set: MetaTestSet, n_classes: int, lr: float,
                seed: int) -> tuple[float, float]:
    """One output-layer-only trajectory on held-out classes: (train acc, test acc)."""
    g = torch.Generator(test_set.device).manual_seed(seed)
    with torch.no_grad():
        detached = {k: v.detach() for k, v in params.items()}
        bank = FeatureBank(net, detached, test_set)
        (acc,) = run_output_layer(bank, net, [Trajectory(test_set.draw_classes(g, n_classes), lr)],
                                  "adam", False, g)
    return acc
