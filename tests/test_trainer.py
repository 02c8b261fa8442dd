"""Meta-training loop: outputs, exact resume after a kill, and argument checks (synthetic data)."""
import math
import json

import pytest
import torch

from anml_fast import checkpoint
from anml_fast.errors import AnmlFastError
from anml_fast.training.trainer import METRICS_FILE, MODEL_FILE, RESUME_FILE, MetaTrainConfig, MetaTrainer

TINY_RUN = dict(nm_channels=4, pln_channels=6, steps=6, traj_len=5, remember=8, log_every=1,
                checkpoint_every=2, eval_every=3, eval_classes=5, tasks=2)


class Killed(Exception):
    pass


def _kill_at(step):
    def hook(s):
        if s == step:
            raise Killed
    return hook


def test_killed_and_resumed_run_equals_uninterrupted(synthetic_data, tmp_path):
    cfg = MetaTrainConfig(**TINY_RUN)
    MetaTrainer(cfg, synthetic_data, tmp_path / "a", progress=False, log=lambda m: None).run()
    with pytest.raises(Killed):
        MetaTrainer(cfg, synthetic_data, tmp_path / "b", progress=False,
                    on_step=_kill_at(5), log=lambda m: None).run()
    assert checkpoint.load(tmp_path / "b" / RESUME_FILE).info["step"] == 4
    assert not (tmp_path / "b" / MODEL_FILE).exists()
    MetaTrainer(cfg, synthetic_data, tmp_path / "b", resume=True, progress=False, log=lambda m: None).run()
    a = checkpoint.load(tmp_path / "a" / MODEL_FILE)
    b = checkpoint.load(tmp_path / "b" / MODEL_FILE)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    rows = lambda d: [json.loads(l) for l in (tmp_path / d / METRICS_FILE).read_text().splitlines()]
    ra, rb = rows("a"), rows("b")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rs]
    assert strip(ra) == strip(rb)


def test_meta_loss_falls_and_outputs_exist(synthetic_data, tmp_path):
    # learnable synthetic task: the model can memorise class rows even on noise images
    cfg = MetaTrainConfig(**{**TINY_RUN, "steps": 30, "log_every": 10, "eval_every": 0, "checkpoint_every": 10})
    MetaTrainer(cfg, synthetic_data, tmp_path, progress=False).run()
    for name in ("config.json", METRICS_FILE, RESUME_FILE, MODEL_FILE):
        assert (tmp_path / name).exists(), name
    assert any((tmp_path / "tb").iterdir())
    losses = [json.loads(l)["meta_loss"] for l in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_existing_run_needs_resume(synthetic_data, tmp_path):
    cfg = MetaTrainConfig(**{**TINY_RUN, "steps": 1})
    MetaTrainer(cfg, synthetic_data, tmp_path, progress=False).run()
    with pytest.raises(AnmlFastError, match="--resume"):
        MetaTrainer(cfg, synthetic_data, tmp_path, progress=False)


@pytest.mark.parametrize("bad, match", [
    ({"steps": 0}, "--steps"), ({"inner_lr": -1.0}, "--inner-lr"), ({"traj_len": 21}, "--traj-len"),
    ({"inner_layers": ["decoder"]}, "--inner-layers decoder names no parameter"),
])
def test_bad_settings_are_named(bad, match):
    with pytest.raises(AnmlFastError, match=match):
        MetaTrainConfig(**{**TINY_RUN, **bad}).validate()


def test_second_order_and_oml_run(synthetic_data, tmp_path):
    cfg = MetaTrainConfig(**{**TINY_RUN, "steps": 1, "second_order": True, "eval_every": 0})
    MetaTrainer(cfg, synthetic_data, tmp_path / "so", progress=False).run()
    cfg = MetaTrainConfig(**{**TINY_RUN, "model": "oml", "steps": 1, "eval_every": 0})
    MetaTrainer(cfg, synthetic_data, tmp_path / "oml", progress=False).run()
    assert checkpoint.load(tmp_path / "oml" / MODEL_FILE).config.kind == "oml"


def test_sampler_is_deterministic_and_well_formed(synthetic_data):
    from anml_fast.data.tasks import MetaTrainSampler

    s = MetaTrainSampler(synthetic_data, "cpu")
    a = s.sample(torch.Generator().manual_seed(1), tasks=3, traj_len=20, remember=64)
    b = s.sample(torch.Generator().manual_seed(1), tasks=3, traj_len=20, remember=64)
    assert torch.equal(a.meta_x, b.meta_x) and torch.equal(a.meta_y, b.meta_y)
    assert a.traj_x.shape == (3, 20, 3, 28, 28) and a.meta_x.shape == (3, 84, 3, 28, 28)
    assert len(set(a.classes.tolist())) == 3
    assert torch.equal(a.meta_y[:, 64:], a.traj_y) and (a.meta_y < 963).all()
    # the trajectory holds each of its class's 20 drawings once
    for t in range(3):
        imgs = s.images[a.classes[t], :, 0]
        traj = a.traj_x[t, :, 0]
        matches = (traj[:, None] == imgs[None]).flatten(2).all(2).float()
        assert torch.equal(matches.sum(0), torch.ones(20))


def test_cosine_meta_lr_schedule():
    from anml_fast.training.trainer import meta_lr_at

    cfg = MetaTrainConfig(steps=100, meta_lr=1e-3, meta_lr_schedule="cosine")
    assert meta_lr_at(cfg, 0) == pytest.approx(1e-3)
    assert meta_lr_at(cfg, 50) == pytest.approx(5e-4)
    assert meta_lr_at(cfg, 99) == pytest.approx(1e-3 * (1 + math.cos(math.pi * 0.99)) / 2)
    assert meta_lr_at(MetaTrainConfig(steps=100), 73) == 1e-3  # constant: the reference
    with pytest.raises(AnmlFastError, match="--meta-lr-schedule 'step'"):
        MetaTrainConfig(meta_lr_schedule="step").validate()


def _resume_args(out, **given):
    """The meta-train CLI's namespace: every MetaTrainConfig flag unset except `given`."""
    from dataclasses import fields
    from types import SimpleNamespace

    ns = {f.name: None for f in fields(MetaTrainConfig)}
    ns.update(given, out=str(out), resume=True)
    return SimpleNamespace(**ns)


def test_resume_compares_flags_with_what_the_run_saw(tmp_path):
    from anml_fast.commands import _train_config
    from anml_fast.training.trainer import CONFIG_FILE

    # a run stored before input_norm and the schedule existed: it saw the reference scaling
    old = {k: v for k, v in MetaTrainConfig(model="oml").__dict__.items()
           if k not in ("input_norm", "meta_lr_schedule")}
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"train": old}))
    cfg = _train_config(_resume_args(tmp_path, input_norm="reference", meta_lr_schedule="constant"))
    assert cfg.input_norm == "reference" and cfg.model_config().input_norm == "reference"
    with pytest.raises(AnmlFastError, match="--input-norm standard differs from this run's reference"):
        _train_config(_resume_args(tmp_path, input_norm="standard"))
    assert MetaTrainConfig(model="oml").input_norm == "standard"  # a new OML run records its scaling


def test_cosine_run_refuses_another_length_on_resume(tmp_path):
    from dataclasses import asdict

    from anml_fast.commands import _train_config
    from anml_fast.training.trainer import CONFIG_FILE

    stored = asdict(MetaTrainConfig(steps=100, meta_lr_schedule="cosine"))
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"train": stored}))
    assert _train_config(_resume_args(tmp_path, steps=100)).steps == 100
    with pytest.raises(AnmlFastError, match="cosine learning-rate schedule is laid out over its 100 steps"):
        _train_config(_resume_args(tmp_path, steps=200))
    stored = asdict(MetaTrainConfig(steps=100))
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"train": stored}))
    assert _train_config(_resume_args(tmp_path, steps=200)).steps == 200  # constant rate: fine
