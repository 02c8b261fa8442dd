"""The `anml-fast` command line, run as a user would: outputs, resume, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from anml_fast import checkpoint
from anml_fast.models import build
from conftest import REPO, TINY


def run_cli(*args, env_extra=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "anml_fast", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=REPO)


def assert_one_line_error(res, *fragments):
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def cache_file(omniglot_root, omniglot_cache_dir, omniglot, tmp_path_factory):
    """The real data as one prepared cache file (what users carry to a GPU machine)."""
    from anml_fast.data.cache import export_cache

    return export_cache(omniglot_root, omniglot_cache_dir, tmp_path_factory.mktemp("c") / "omniglot.safetensors")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    net = build(TINY)
    checkpoint.save(path, checkpoint.Checkpoint(TINY, net.init_params(torch.Generator().manual_seed(0))))
    return path


def test_help_explains_commands():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("prepare-data", "meta-train", "evaluate", "import-reference", "demo"):
        assert cmd in res.stdout
    res = run_cli("meta-train", "--help")
    assert "--second-order" in res.stdout and "20000" in res.stdout


def test_missing_data_is_one_line(tmp_path):
    res = run_cli("prepare-data", "--data", tmp_path / "nowhere")
    assert_one_line_error(res, "nowhere/omniglot-py/images_background", "expected the layout")


def test_corrupt_cache_file_is_one_line(cache_file, tmp_path):
    bad = tmp_path / "bad.safetensors"
    raw = bytearray(cache_file.read_bytes())
    raw[-5000] ^= 0x55
    bad.write_bytes(bytes(raw))
    assert_one_line_error(run_cli("prepare-data", "--data", bad), "bad.safetensors", "corrupt")


def test_corrupt_checkpoint_is_one_line(cache_file, tiny_model, tmp_path):
    bad = tmp_path / "model.safetensors"
    raw = bytearray(tiny_model.read_bytes())
    raw[-10] ^= 0xFF
    bad.write_bytes(bytes(raw))
    res = run_cli("evaluate", bad, "--data", cache_file, "--device", "cpu", "--out", tmp_path / "o")
    assert_one_line_error(res, "model.safetensors", "SHA-256")
    bad.write_bytes(b"\x00" * 50)
    res = run_cli("evaluate", bad, "--data", cache_file, "--device", "cpu", "--out", tmp_path / "o")
    assert_one_line_error(res, "not a readable anml_fast checkpoint")


@pytest.mark.parametrize("args, fragment", [
    (["meta-train", "--stepz", "3"], "unrecognized arguments: --stepz"),
    (["meta-train", "--steps", "many"], "--steps: invalid int value"),
    (["evaluate", "--classes", "10,x", "--scratch"], "--classes"),
    (["meta-train", "--steps", "0", "--data", "/nonexistent"], "--steps must be at least 1"),
    (["evaluate", "--scratch", "--device", "tpu"], "--device 'tpu'"),
])
def test_bad_flags_are_one_line(args, fragment):
    assert_one_line_error(run_cli(*args), fragment)


def test_evaluate_writes_outputs_and_resumes(cache_file, tiny_model, tmp_path):
    out = tmp_path / "eval"
    base = ["evaluate", tiny_model, "--data", cache_file, "--device", "cpu", "--out", out, "--quiet",
            "--lrs", "0.001,0.0001", "--search-draws", "1", "--runs", "2"]
    res = run_cli(*base, "--classes", "3")
    assert res.returncode == 0, res.stderr
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).exists()
    first = json.loads((out / "results.json").read_text())["results"][0]["class_counts"]["3"]
    # "interrupted" after 3 classes: resuming with the full list only runs what is missing
    res = run_cli(*base, "--classes", "3,5", "--resume")
    assert res.returncode == 0, res.stderr
    assert "3 classes: done already, skipped" in res.stderr
    after = json.loads((out / "results.json").read_text())["results"][0]["class_counts"]
    assert after["3"] == first and "5" in after
    assert "| 5 |" in res.stdout
    # without --resume an existing result is not overwritten
    assert_one_line_error(run_cli(*base, "--classes", "3"), "--resume")


def test_meta_train_then_evaluate_run_folder(cache_file, tmp_path):
    out = tmp_path / "run"
    res = run_cli("meta-train", "--data", cache_file, "--device", "cpu", "--out", out, "--quiet",
                  "--steps", "3", "--nm-channels", "4", "--pln-channels", "6", "--traj-len", "4",
                  "--eval-every", "2", "--eval-classes", "3", "--checkpoint-every", "2")
    assert res.returncode == 0, res.stderr
    assert (out / "model.safetensors").exists()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("heldout_test_acc" in r for r in rows)
    res = run_cli("meta-train", "--data", cache_file, "--device", "cpu", "--out", out, "--quiet",
                  "--steps", "5", "--resume", "--inner-lr", "0.5")
    assert_one_line_error(res, "--inner-lr 0.5 differs")
    res = run_cli("meta-train", "--data", cache_file, "--device", "cpu", "--out", out, "--quiet",
                  "--steps", "4", "--resume")
    assert res.returncode == 0, res.stderr
    assert checkpoint.load(out / "model.safetensors").info["step"] == 4
    res = run_cli("evaluate", out, "--data", cache_file, "--device", "cpu", "--quiet", "--out", tmp_path / "e",
                  "--classes", "2", "--lrs", "0.001", "--runs", "1")
    assert res.returncode == 0, res.stderr


def test_import_reference_cli(tmp_path):
    net = build(TINY)
    params = net.init_params(torch.Generator().manual_seed(0))
    src = tmp_path / "ref.net"
    torch.save([torch.nn.Parameter(p) for p in params.values()], src)
    res = run_cli("import-reference", src, "--out", tmp_path / "ours.safetensors")
    assert res.returncode == 0, res.stderr
    ck = checkpoint.load(tmp_path / "ours.safetensors")
    assert all(torch.equal(ck.params[k], params[k]) for k in params)
