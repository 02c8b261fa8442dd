"""`anml-fast compare`: several evaluations in one table, seeds folded into mean and spread."""
import json

import pytest

from anml_fast.cli import main
from anml_fast.evaluation.compare import fold


def _system(name, test, train, lr=0.001):
    return {"system": name, "class_counts": {"10": {"classes": 10, "final": {
        "lr": lr, "test_acc": [test], "train_acc": [train], "test_mean": test, "train_mean": train,
        "test_std": 0.0, "train_std": 0.0}}}}


def test_fold_means_and_spreads_over_evaluations():
    out = fold([("anml", _system("s1", 0.6, 0.9)), ("anml", _system("s2", 0.8, 0.7, 0.002)),
                ("scratch", _system("x", 0.2, 0.5))])
    assert [s["system"] for s in out] == ["anml", "scratch"]
    f = out[0]["class_counts"]["10"]["final"]
    assert f["test_mean"] == pytest.approx(0.7) and f["test_std"] == pytest.approx(0.1)
    assert f["train_mean"] == pytest.approx(0.8) and out[0]["members"] == 2
    assert out[1]["class_counts"]["10"]["final"]["test_mean"] == 0.2 and "members" not in out[1]


def test_cli_writes_table_plot_and_json(tmp_path, capsys):
    paths = []
    for i, (t, tr) in enumerate([(0.6, 0.9), (0.8, 0.7), (0.2, 0.5)]):
        d = tmp_path / f"ev{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"results": [_system(f"s{i}", t, tr)]}))
        paths.append(str(d))
    assert main(["compare", *paths, "--as", "anml,anml,scratch", "--out", str(tmp_path / "c")]) == 0
    md = (tmp_path / "c" / "results.md").read_text()
    assert "| 10 | 0.700 ± 0.100 | 0.800 ± 0.100 |" in md and "anml (2 evaluations)" in md
    assert (tmp_path / "c" / "results.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "c" / "results.json").read_text())["results"]) == 2


def test_cli_errors_name_the_input(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["compare", str(tmp_path / "bad.json"), "--out", str(tmp_path / "c")]) == 2
    assert "not an anml-fast results file" in capsys.readouterr().err
