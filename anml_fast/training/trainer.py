"""The meta-training loop: sampling, meta-steps, Adam, metrics, atomic checkpoints, exact resume.

A run lives in one output folder:
  config.json             training and model settings (written once)
  metrics.jsonl           one JSON line per log interval (and per held-out evaluation)
  tb/                     the same metrics for TensorBoard
  checkpoint.safetensors  everything needed to resume: weights, Adam state, RNG state, step
  model.safetensors       the final model (weights and config only)
Metrics are read back from the device every `log_every` steps, not every step.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoint as ckpt_io
from ..atomic import write_json, write_text
from ..data.cache import OmniglotImages
from ..data.tasks import REMEMBER_SIZE, MetaTestSet, MetaTrainSampler
from ..errors import AnmlFastError
from ..models import ModelConfig, build, select
from ..models.config import INPUT_NORMS, KINDS
from ..distributed import Dist
from .adam import Adam
from .graphed import GraphedMetaStep
from .meta_step import StepResult, meta_loss_and_grads

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESUME_FILE = "checkpoint.safetensors"
MODEL_FILE = "model.safetensors"


META_LR_SCHEDULES = ("constant", "cosine")


def meta_lr_at(config: "MetaTrainConfig", step: int) -> float:
    """The outer learning rate of meta-step `step` (0-based); a function of the step alone, so a
    resumed or distributed run follows the same schedule."""
    if config.meta_lr_schedule == "cosine":
        return config.meta_lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
    return config.meta_lr


@dataclass
class MetaTrainConfig:
    """The README command of the reference code by default (20,000 first-order steps, seed 9)."""

    model: str = "anml"
    nm_channels: int = 112
    pln_channels: int = 256
    steps: int = 20000
    inner_lr: float = 0.1
    meta_lr: float = 1e-3
    meta_lr_schedule: str = "constant"  # or "cosine": meta_lr * (1 + cos(pi * step / steps)) / 2
    seed: int = 9
    tasks: int = 1
    traj_len: int = 20
    remember: int = REMEMBER_SIZE
    input_norm: str | None = None  # None: the model kind's default (see ModelConfig)
    inner_layers: list[str] | None = None  # parameter-name prefixes; None: the model's PLN
    second_order: bool = False
    checkpoint_every: int = 1000
    log_every: int = 50
    eval_every: int = 1000  # held-out continual-learning check; 0 turns it off
    eval_classes: int = 10
    eval_lr: float = 1e-3

    def model_config(self) -> ModelConfig:
        return ModelConfig(kind=self.model, nm_channels=self.nm_channels, pln_channels=self.pln_channels,
                           input_norm=self.input_norm)

    def validate(self) -> None:
        for name in ("steps", "tasks", "traj_len", "checkpoint_every", "log_every", "eval_classes"):
            if getattr(self, name) < 1:
                raise AnmlFastError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("inner_lr", "meta_lr", "eval_lr"):
            if not getattr(self, name) > 0:
                raise AnmlFastError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.input_norm not in (None, *INPUT_NORMS):
            raise AnmlFastError(f"--input-norm {self.input_norm!r}: expected one of {', '.join(INPUT_NORMS)}")
        if self.meta_lr_schedule not in META_LR_SCHEDULES:
            raise AnmlFastError(f"--meta-lr-schedule {self.meta_lr_schedule!r}: expected one of "
                                f"{', '.join(META_LR_SCHEDULES)}")
        if self.traj_len > 20:
            raise AnmlFastError(f"--traj-len {self.traj_len}: a class has only 20 drawings")
        if self.remember < 0 or self.eval_every < 0:
            raise AnmlFastError("--remember and --eval-every must not be negative")
        net = build(self.model_config())
        names = [s.name for s in net.param_specs()]
        prefixes = self.inner_layers or list(net.inner_default)
        if not select(names, prefixes):
            raise AnmlFastError(f"--inner-layers {','.join(prefixes)} names no parameter of the "
                                f"{self.model} model (names look like {names[0]}, {names[-1]})")

    def __post_init__(self):
        # the run records the scaling it trains with, not "the kind's default"
        if self.input_norm is None and self.model in KINDS:  # a bad kind is validate()'s to report
            self.input_norm = ModelConfig(kind=self.model).input_norm

    @classmethod
    def from_dict(cls, d: dict) -> "MetaTrainConfig":
        known = {f.name for f in fields(cls)}
        d = {"input_norm": "reference", **d}  # runs stored before the field saw the reference's scaling
        return cls(**{k: v for k, v in d.items() if k in known})


class MetaTrainer:
    def __init__(self, config: MetaTrainConfig, data: OmniglotImages, out_dir: str | Path,
                 device: str | torch.device = "cpu", resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print,
                 on_step: Callable[[int], None] | None = None, dtype: torch.dtype = torch.float32,
                 graph: bool | None = None, dist: Dist | None = None):
        config.validate()
        self.config, self.out = config, Path(out_dir)
        self.device = torch.device(device)
        # several processes (anml_fast.distributed): rank 0 writes, logs and shows progress
        self.dist = dist or Dist()
        self.share = self.dist.share(config.tasks)
        self.progress = progress and self.dist.is_main
        self.log = log if self.dist.is_main else (lambda msg: None)
        self.on_step = on_step
        self.net = build(config.model_config())
        names = [s.name for s in self.net.param_specs()]
        self.inner_names = select(names, config.inner_layers or self.net.inner_default)
        # dtype: float64 lets the tests compare implementations without float32's cancellation
        norm = self.net.config.input_norm
        self.sampler = MetaTrainSampler(data, self.device, dtype=dtype, input_norm=norm)
        self.test_set = MetaTestSet(data, self.device, dtype=dtype, input_norm=norm) if config.eval_every else None
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.params = self.net.init_params(self.generator, self.device, dtype)
        self.opt = Adam(self.params, lr=config.meta_lr)
        self.step = 0
        # graph: replay the meta-step from a CUDA graph (None: on CUDA devices); `--no-graph`
        # keeps every kernel launch visible to a debugger or profiler
        self.use_graph = self.device.type == "cuda" if graph is None else graph
        if self.use_graph and self.device.type != "cuda":
            raise AnmlFastError(f"CUDA graphs need a CUDA device, not {self.device} (drop the graph option)")
        self._graphed = None
        self._start(resume)

    def _start(self, resume: bool) -> None:
        """Rank 0 prepares the folder (or resumes); then every rank takes its state, so that the
        other processes need neither the folder nor the same file system."""
        if not self.dist.enabled:
            self._prepare_out(resume)
            return
        self.dist.from_main(lambda: self._prepare_out(resume))
        state = {"step": self.step, "rng": self.generator.get_state().tolist()}
        state = self.dist.broadcast_object(state)
        self.step = state["step"]
        self.generator.set_state(torch.tensor(state["rng"], dtype=torch.uint8))
        self.opt.step_count = self.step
        self.dist.broadcast_tensors_(list(self.params.values()) + list(self.opt.exp_avg.values())
                                     + list(self.opt.exp_avg_sq.values()))

    # -- output folder and resume -------------------------------------------------------------
    def _prepare_out(self, resume: bool) -> None:
        cfg_path = self.out / CONFIG_FILE
        record = {"train": asdict(self.config), "model": self.config.model_config().to_dict()}
        if cfg_path.exists() and not resume:
            raise AnmlFastError(f"{self.out} already holds a meta-training run: pass --resume to "
                                f"continue it, or choose another --out")
        if not resume or not (self.out / RESUME_FILE).exists():
            if resume:
                self.log(f"no checkpoint in {self.out} yet: starting from step 0")
            write_json(cfg_path, record)
            (self.out / METRICS_FILE).unlink(missing_ok=True)
            return
        state = ckpt_io.load(self.out / RESUME_FILE, device=self.device)
        for k, v in state.params.items():
            self.params[k].copy_(v)
        self.opt.load_state_tensors(state.state)
        self.generator.set_state(state.state["rng"].cpu())
        self.step = int(state.info["step"])
        self._truncate_metrics(self.step)
        self.log(f"resumed {self.out} at step {self.step}")

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint (they will be written again)."""
        path = self.out / METRICS_FILE
        if path.exists():
            keep = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
            write_text(path, "".join(l + "\n" for l in keep))

    def _save(self, final: bool = False) -> None:
        info = {"step": self.step, "train": asdict(self.config)}
        state = dict(self.opt.state_tensors())
        state["rng"] = self.generator.get_state()
        cfg = self.config.model_config()
        ckpt_io.save(self.out / RESUME_FILE, ckpt_io.Checkpoint(cfg, self.params, state, info))
        if final:
            ckpt_io.save(self.out / MODEL_FILE, ckpt_io.Checkpoint(cfg, self.params, {}, info))

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> Path:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        c = self.config
        if self.step >= c.steps:
            self.log(f"{self.out} is already at step {self.step} of {c.steps}")
            if self.dist.is_main and not (self.out / MODEL_FILE).exists():
                self._save(final=True)
            return self.out / MODEL_FILE
        tb = SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1) if self.dist.is_main else None
        bar = tqdm(total=c.steps, initial=self.step, unit="step", desc="meta-train",
                   disable=not self.progress, dynamic_ncols=True)
        loss_sum = torch.zeros((), device=self.device)
        correct_sum = torch.zeros((), device=self.device, dtype=torch.int64)
        seen, t_last = 0, time.perf_counter()
        try:
            while self.step < c.steps:
                res = self.step_once()
                loss_sum += res.loss
                correct_sum += res.correct
                seen += res.count
                bar.update(1)
                if self.step % c.log_every == 0 or self.step == c.steps:
                    now = time.perf_counter()
                    steps_done = c.log_every if self.step % c.log_every == 0 else self.step % c.log_every
                    row = {"step": self.step,
                           "meta_loss": loss_sum.item() / steps_done,
                           "meta_acc": correct_sum.item() / max(seen, 1),
                           "steps_per_s": steps_done / (now - t_last)}
                    self._write_metrics(row, tb)
                    bar.set_postfix(loss=f"{row['meta_loss']:.3f}", acc=f"{row['meta_acc']:.3f}")
                    loss_sum.zero_(), correct_sum.zero_()
                    seen, t_last = 0, now
                if c.eval_every and self.step % c.eval_every == 0 and self.dist.is_main:
                    self._write_metrics(self._heldout(), tb)
                if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                    self.dist.check_identical(self.params)
                    if self.dist.is_main:
                        self._save(final=self.step == c.steps)
                if self.on_step is not None:
                    self.on_step(self.step)
        finally:
            bar.close()
            if tb is not None:
                tb.close()
        return self.out / MODEL_FILE

    def step_once(self) -> StepResult:
        """One meta-step (sample, re-draw the output rows, meta-gradient, Adam); reads nothing back.
        Its result's tensors may be overwritten by the next step."""
        c = self.config
        batch = self.sampler.sample(self.generator, c.tasks, c.traj_len, c.remember)
        self.net.reset_output_rows(self.params, batch.classes, self.generator)
        if self.dist.enabled:  # every rank drew the whole batch; each meta-trains on its share
            batch = batch.select(self.share)
        grads, res = self._meta_step(batch)
        if self.dist.enabled:
            self.dist.all_reduce_mean_([g for g in grads.values() if g is not None] + [res.loss])
            self.dist.all_reduce_sum_(res.correct)
            res = StepResult(res.loss, res.correct, res.count * self.dist.world)
        self.opt.lr = meta_lr_at(c, self.step)
        self.opt.step(grads)
        self.step += 1
        return res

    def _meta_grads(self, batch):
        c = self.config
        return meta_loss_and_grads(self.net, self.params, batch, self.inner_names, c.inner_lr, c.second_order)

    def _meta_step(self, batch):
        if not self.use_graph:
            return self._meta_grads(batch)
        if self._graphed is None:
            self._graphed = GraphedMetaStep(self._meta_grads, batch)
        return self._graphed(batch)

    def _write_metrics(self, row: dict, tb) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                tb.add_scalar(k, v, row["step"])

    def _heldout(self) -> dict:
        """A small continual-learning check on held-out classes (its own RNG: resume stays exact)."""
        from ..evaluation.protocol import quick_check

        acc = quick_check(self.net, self.params, self.test_set, self.config.eval_classes,
                          self.config.eval_lr, seed=self.config.seed * 1_000_003 + self.step)
        return {"step": self.step, "heldout_train_acc": acc[0], "heldout_test_acc": acc[1]}
