"""Meta-testing: batched trajectories against one-by-one autograd runs, the protocol, its outputs."""
import json

import pytest
import torch
import torch.nn.functional as F

from anml_fast.data.tasks import MetaTestSet, as_rgb
from anml_fast.errors import AnmlFastError
from anml_fast.evaluation.protocol import EvalConfig, Evaluator
from anml_fast.evaluation.trajectories import FeatureBank, Trajectory, run_finetune, run_output_layer
from anml_fast.models import build
from conftest import TINY


@pytest.fixture(scope="module")
def setup(synthetic_data):
    net = build(TINY)
    params = net.init_params(torch.Generator().manual_seed(0))
    return net, params, MetaTestSet(synthetic_data, "cpu")


def _one_by_one(net, params, test_set, tr, optimizer, iid, g):
    """Independent twin: a real nn.Linear, autograd and torch.optim, one image at a time."""
    head = torch.nn.Linear(params["pln.fc.weight"].shape[1], 1000)
    torch.nn.init.kaiming_normal_(head.weight, generator=g)
    torch.nn.init.zeros_(head.bias)
    n = len(tr.classes)
    order = torch.randperm(n * 15, generator=g) if iid else torch.arange(n * 15)
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(head.parameters(), lr=tr.lr)
    with torch.no_grad():
        ftr = net.features(params, as_rgb(test_set.train[tr.classes].flatten(0, 1)))
        fte = net.features(params, as_rgb(test_set.test[tr.classes].flatten(0, 1)))
    ytr, yte = tr.classes.repeat_interleave(15), tr.classes.repeat_interleave(5)
    for i in order.tolist():
        opt.zero_grad()
        F.cross_entropy(head(ftr[i:i + 1]), ytr[i:i + 1]).backward()
        opt.step()
    with torch.no_grad():
        return ((head(ftr).argmax(1) == ytr).float().mean().item(),
                (head(fte).argmax(1) == yte).float().mean().item(), head.weight.detach().clone())


@pytest.mark.parametrize("optimizer, iid", [("adam", False), ("adam", True), ("sgd", False)])
def test_batched_output_layer_equals_one_by_one(setup, optimizer, iid):
    net, params, test_set = setup
    g = torch.Generator().manual_seed(7)
    trajs = [Trajectory(test_set.draw_classes(g, 6), lr) for lr in (1e-3, 3e-4, 1e-4)]
    bank = FeatureBank(net, params, test_set)
    batched = run_output_layer(bank, net, trajs, optimizer, iid, torch.Generator().manual_seed(9))
    g2 = torch.Generator().manual_seed(9)
    # the batched run draws every trajectory's weights and order first, in trajectory order
    for tr, (tr_acc, te_acc) in zip(trajs, batched):
        ref_tr, ref_te, _ = _one_by_one(net, params, test_set, tr, optimizer, iid, g2)
        assert tr_acc == pytest.approx(ref_tr, abs=1 / 90 + 1e-6)
        assert te_acc == pytest.approx(ref_te, abs=1 / 30 + 1e-6)


def test_finetune_path_matches_output_layer_path(setup):
    net, params, test_set = setup
    g = torch.Generator().manual_seed(3)
    trajs = [Trajectory(test_set.draw_classes(g, 4), 1e-3)]
    fast = run_output_layer(FeatureBank(net, params, test_set), net, trajs, "adam", False,
                            torch.Generator().manual_seed(1))
    slow = run_finetune(net, params, test_set, trajs, ["pln.fc"], "adam", False, torch.Generator().manual_seed(1))
    assert fast[0] == pytest.approx(slow[0], abs=1 / 60 + 1e-6)


def test_whole_pln_finetune_runs_and_leaves_model_untouched(setup):
    net, params, test_set = setup
    before = {k: v.clone() for k, v in params.items()}
    trajs = [Trajectory(test_set.draw_classes(torch.Generator().manual_seed(0), 3), 1e-3)]
    (acc,) = run_finetune(net, params, test_set, trajs, ["pln"], "adam", False, torch.Generator().manual_seed(0))
    assert 0 <= acc[0] <= 1 and 0 <= acc[1] <= 1
    assert all(torch.equal(before[k], params[k]) for k in params)


def test_draws_are_sorted_distinct_and_from_the_pool(setup):
    _, _, test_set = setup
    c = test_set.draw_classes(torch.Generator().manual_seed(0), 600)
    assert torch.equal(c, c.sort().values) and len(c.unique()) == 600 and c.max() < 650


def _evaluator(setup, tmp_path, **kw):
    net, params, test_set = setup
    cfg = EvalConfig(**{"class_counts": [3, 5], "lrs": [1e-3, 1e-4], "search_draws": 2, "final_runs": 2, **kw})
    return Evaluator(net, params, test_set, cfg, tmp_path, system="tiny", source={"id": 1},
                     progress=False, log=lambda m: None)


def test_protocol_outputs_and_rate_selection(setup, tmp_path):
    res = _evaluator(setup, tmp_path).run()
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    rec = res["class_counts"]["5"]
    s = rec["search"]
    # each draw's best rate is its best on train accuracy; the winner is the most frequent
    for row, best in zip(s["train_acc"], s["best_lr_per_draw"]):
        assert row[s["lrs"].index(best)] == max(row)
    assert s["chosen_lr"] == max(s["lrs"], key=lambda r: (s["best_lr_per_draw"].count(r), -s["lrs"].index(r)))
    assert rec["final"]["lr"] == s["chosen_lr"] and len(rec["final"]["test_acc"]) == 2
    assert "| 5 |" in (tmp_path / "results.md").read_text()


def test_select_on_test_uses_test_accuracy(setup, tmp_path):
    s = _evaluator(setup, tmp_path, select_on="test").run()["class_counts"]["3"]["search"]
    for row, best in zip(s["test_acc"], s["best_lr_per_draw"]):
        assert row[s["lrs"].index(best)] == max(row)


def test_resume_skips_finished_class_counts(setup, tmp_path):
    ev = _evaluator(setup, tmp_path)
    calls = []
    real = ev.class_count

    def interrupted(n):
        if n == 5:
            raise KeyboardInterrupt
        calls.append(n)
        return real(n)
    ev.class_count = interrupted
    with pytest.raises(KeyboardInterrupt):
        ev.run()
    first = json.loads((tmp_path / "results.json").read_text())["results"][0]["class_counts"]
    assert list(first) == ["3"]
    ev2 = _evaluator(setup, tmp_path)
    calls2 = []
    real2 = ev2.class_count
    ev2.class_count = lambda n: calls2.append(n) or real2(n)
    with pytest.raises(AnmlFastError, match="--resume"):
        ev2.run()
    res = ev2.run(resume=True)
    assert calls2 == [5]
    assert res["class_counts"]["3"] == first["3"]
    # an uninterrupted run gives the same numbers (each class count has its own RNG stream)
    full = _evaluator(setup, tmp_path / "full").run()
    assert full["class_counts"]["5"]["final"] == res["class_counts"]["5"]["final"]


def test_resume_refuses_other_settings(setup, tmp_path):
    _evaluator(setup, tmp_path, class_counts=[3]).run()
    with pytest.raises(AnmlFastError, match="another model or settings"):
        _evaluator(setup, tmp_path, class_counts=[3], final_runs=3).run(resume=True)


def test_resume_may_add_class_counts(setup, tmp_path):
    _evaluator(setup, tmp_path, class_counts=[3]).run()
    res = _evaluator(setup, tmp_path, class_counts=[3, 5]).run(resume=True)
    assert sorted(res["class_counts"]) == ["3", "5"]


@pytest.mark.parametrize("n, chunk", [(250, 100), (201, 100), (101, 100), (100, 100), (7, 3), (1, 100)])
def test_run_steps_replays_chunks_and_counts_every_step(monkeypatch, n, chunk):
    """run_steps' CUDA path, with the CUDA graph faked: a capture records the calls instead of
    running them, a replay runs the recorded ones. Every step runs exactly once, in order, and
    progress adds up to n."""
    from anml_fast.evaluation import trajectories as tj

    state = {"capturing": None, "done": 0}

    class FakeGraph:
        def __init__(self):
            self.calls = []

        def replay(self):
            for fn in self.calls:
                fn(replaying=True)

    class Capture:
        def __init__(self, graph):
            self.graph = graph

        def __enter__(self):
            state["capturing"] = self.graph

        def __exit__(self, *exc):
            state["capturing"] = None

    class FakeStream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, other):
            pass

    class NoContext:
        def __init__(self, *a):
            pass

        def __enter__(self):
            pass

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", NoContext)
    monkeypatch.setattr(torch.cuda, "device", NoContext)

    def step(replaying=False):
        if state["capturing"] is not None and not replaying:
            state["capturing"].calls.append(step)
            return
        state["done"] += 1

    counts = []
    tj.run_steps(step, n, torch.device("cuda"), counts.append, chunk=chunk)
    assert state["done"] == n
    assert sum(counts) == n
