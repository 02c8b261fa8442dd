"""Distributed meta-training and evaluation on CPU processes (gloo), against a single process.

The Python-API tests spawn processes with torch.multiprocessing and compare in float64, where a
different summation order cannot grow into different weights; the CLI tests launch `torchrun`
(one machine with 2 processes, and 2 "machines" on loopback) the way users do.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from anml_fast.data.cache import OmniglotImages
from anml_fast.distributed import Dist
from anml_fast.evaluation.protocol import EvalConfig, Evaluator
from anml_fast.training.trainer import METRICS_FILE, MODEL_FILE, MetaTrainConfig, MetaTrainer

TRAIN = dict(nm_channels=4, pln_channels=6, traj_len=4, remember=6, tasks=2, log_every=1,
             checkpoint_every=1, eval_every=0)


def _data() -> OmniglotImages:
    # as conftest's synthetic_data; rebuilt in each spawned process
    g = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (1623, 20, 28, 28), dtype=torch.uint8, generator=g)
    return OmniglotImages(images, [f"images_x/class{i:04d}" for i in range(1623)], 964)


def _train(out, steps, dist=None, resume=False):
    cfg = MetaTrainConfig(steps=steps, **TRAIN)
    MetaTrainer(cfg, _data(), out, progress=False, log=lambda m: None, dtype=torch.float64,
                dist=dist, resume=resume).run()


def _params(out):
    from anml_fast import checkpoint
    return checkpoint.load(out / MODEL_FILE).params


def _in_group(rank, world, store, fn, *args):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(*args, Dist(rank, world, rank))
    finally:
        torch.distributed.destroy_process_group()


def _train_worker(rank, world, store, out, steps, resume):
    _in_group(rank, world, store, lambda d: _train(out, steps, d, resume))


def _spawn(fn, world, tmp_path, *args):
    store = tmp_path / f"store-{fn.__name__}-{len(list(tmp_path.iterdir()))}"
    mp.spawn(fn, args=(world, str(store), *args), nprocs=world, join=True)


def _assert_same_params(a, b, rel=1e-9):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rel, atol=rel, msg=k)


def test_two_processes_train_like_one_with_the_same_tasks(tmp_path):
    _spawn(_train_worker, 2, tmp_path, tmp_path / "two", 3, False)
    _train(tmp_path / "one", 3)
    _assert_same_params(_params(tmp_path / "two"), _params(tmp_path / "one"))
    two = [json.loads(l) for l in (tmp_path / "two" / METRICS_FILE).read_text().splitlines()]
    one = [json.loads(l) for l in (tmp_path / "one" / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(two, one, strict=True):
        assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-9)
        assert a["meta_acc"] == b["meta_acc"]


def test_resume_with_another_world_size(tmp_path):
    _spawn(_train_worker, 2, tmp_path, tmp_path / "run", 2, False)
    _train(tmp_path / "run", 4, resume=True)  # the second half in one process
    _train(tmp_path / "ref", 4)
    _assert_same_params(_params(tmp_path / "run"), _params(tmp_path / "ref"))


def test_tasks_must_split_evenly(tmp_path):
    with pytest.raises(Exception, match="split evenly over 2"):
        MetaTrainer(MetaTrainConfig(steps=1, **{**TRAIN, "tasks": 3}), _data(), tmp_path,
                    progress=False, log=lambda m: None, dist=Dist(0, 2, 0))


def _evaluate(cfg_kw, dist=None, train_layers="output"):
    from anml_fast.data.tasks import MetaTestSet
    from anml_fast.models import ModelConfig, build

    net = build(ModelConfig(nm_channels=4, pln_channels=6))
    params = net.init_params(torch.Generator().manual_seed(5))
    cfg = EvalConfig(train_layers=train_layers, **cfg_kw)
    return Evaluator(net, params, MetaTestSet(_data(), "cpu"), cfg, progress=False,
                     log=lambda m: None, dist=dist).run()["class_counts"]


EVAL = dict(class_counts=[3], lrs=[1e-3, 3e-4], search_draws=2, final_runs=3, iid=True, seed=7)


def _eval_worker(rank, world, store, out, train_layers):
    def run(d):
        res = _evaluate(EVAL, d, train_layers)
        if d.is_main:
            out.write_text(json.dumps(res))
    _in_group(rank, world, store, run)


@pytest.mark.parametrize("train_layers", ["output", "pln"])
def test_sharded_evaluation_equals_one_process(tmp_path, train_layers):
    _spawn(_eval_worker, 2, tmp_path, tmp_path / "two.json", train_layers)
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads(json.dumps(_evaluate(EVAL, None, train_layers)))
    for n in one:
        for part in ("search", "final"):
            a, b = dict(two[n][part]), dict(one[n][part])
            a.pop("seconds", None), b.pop("seconds", None)
            assert a == b, (n, part)


# -- the command line, as users launch it ------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    from anml_fast.data.cache import _write_cache

    path = tmp_path_factory.mktemp("d") / "synthetic.safetensors"
    _write_cache(path, _data(), "synthetic")
    return path


def _env():
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _torchrun(*launch, cmd):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *launch, "-m", "anml_fast", *cmd],
                          capture_output=True, text=True, env=_env(), timeout=600)


def _cli(*cmd):
    return subprocess.run([sys.executable, "-m", "anml_fast", *cmd], capture_output=True, text=True,
                          env=_env(), timeout=600)


TRAIN_FLAGS = ["--device", "cpu", "--nm-channels", "4", "--pln-channels", "6", "--steps", "3", "--tasks", "2",
               "--traj-len", "4", "--remember", "6", "--eval-every", "0", "--log-every", "1",
               "--checkpoint-every", "1", "--quiet", "--backend", "torch"]


def test_torchrun_two_processes_meta_train(cli_data, tmp_path):
    res = _torchrun("--nproc_per_node=2", f"--master_port={_free_port()}",
                    cmd=["meta-train", "--data", str(cli_data), "--out", str(tmp_path / "two"), *TRAIN_FLAGS])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x 2 processes (1 tasks each)" in res.stderr
    single = _cli("meta-train", "--data", str(cli_data), "--out", str(tmp_path / "one"), *TRAIN_FLAGS)
    assert single.returncode == 0, single.stderr[-3000:]
    two = [json.loads(l) for l in (tmp_path / "two" / METRICS_FILE).read_text().splitlines()]
    one = [json.loads(l) for l in (tmp_path / "one" / METRICS_FILE).read_text().splitlines()]
    # float32: equal up to the all-reduce's summation order (exactness: the float64 tests above)
    for a, b in zip(two, one, strict=True):
        assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-3)
    # and a resume with two processes of the single-process run
    res = _torchrun("--nproc_per_node=2", f"--master_port={_free_port()}",
                    cmd=["meta-train", "--data", str(cli_data), "--out", str(tmp_path / "one"), "--resume",
                         *[f if f != "3" else "4" for f in TRAIN_FLAGS]])
    assert res.returncode == 0, res.stderr[-3000:]
    assert [json.loads(l)["step"] for l in (tmp_path / "one" / METRICS_FILE).read_text().splitlines()] == [1, 2, 3, 4]


EVAL_FLAGS = ["--device", "cpu", "--classes", "3", "--lrs", "0.001,0.0003", "--search-draws", "2", "--runs", "3",
              "--scratch", "--quiet", "--backend", "torch"]


def test_two_node_launch_on_loopback_evaluates_like_one_process(cli_data, tmp_path):
    port = _free_port()
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1",
         "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "anml_fast", "evaluate", "--data",
         str(cli_data), "--out", str(tmp_path / "two"), *EVAL_FLAGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in launchers]
    for p, (_, err) in zip(launchers, outs):
        assert p.returncode == 0, err[-3000:]
    single = _cli("evaluate", "--data", str(cli_data), "--out", str(tmp_path / "one"), *EVAL_FLAGS)
    assert single.returncode == 0, single.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["results"][0]["class_counts"]["3"]
    one = json.loads((tmp_path / "one" / "results.json").read_text())["results"][0]["class_counts"]["3"]
    assert two["search"] == one["search"] and two["final"] == one["final"]


def _drift_worker(rank, world, store, out):
    def run(d):
        params = {"w": torch.ones(3) + (1e-7 if d.rank == 1 else 0.0)}
        try:
            d.check_identical(params)
            msg = "no error"
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            msg = str(e)
        (out / f"rank{d.rank}.txt").write_text(msg)
    _in_group(rank, world, store, run)


def test_drifting_weights_are_an_error_on_every_rank(tmp_path):
    _spawn(_drift_worker, 2, tmp_path, tmp_path)
    for r in (0, 1):
        assert "weights differ between processes" in (tmp_path / f"rank{r}.txt").read_text()
