"""On the GPU at the real sizes: the evaluator's fast path against the twins, same seeds.

The fast path stacks trajectories on the fused Triton output-layer step replayed from CUDA graphs;
the twins run the same stacked trajectories in plain PyTorch. In float32 the two sums round
differently, so a handful of borderline images may flip: accuracies agree to a few images.
"""
import pytest
import torch

from anml_fast import ops
from anml_fast.data.tasks import MetaTestSet
from anml_fast.evaluation.protocol import EvalConfig, Evaluator
from anml_fast.evaluation.trajectories import FeatureBank, Trajectory, run_output_layer
from anml_fast.models import ModelConfig, build

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def full_size(synthetic_data):
    net = build(ModelConfig())
    params = net.init_params(torch.Generator("cuda").manual_seed(0), "cuda")
    return net, params, MetaTestSet(synthetic_data, "cuda")


def _run(net, params, test_set, backend, trajs):
    with ops.use_backend(backend):
        bank = FeatureBank(net, params, test_set)
        return run_output_layer(bank, net, trajs, "adam", False, torch.Generator("cuda").manual_seed(5))


def test_600_class_trajectories_fast_equal_twins(full_size):
    net, params, test_set = full_size
    g = torch.Generator("cuda").manual_seed(3)
    trajs = [Trajectory(test_set.draw_classes(g, 600), lr) for lr in (1e-3, 3e-4, 1e-4)]
    fast = _run(net, params, test_set, "auto", trajs)
    twin = _run(net, params, test_set, "torch", trajs)
    for (f_tr, f_te), (t_tr, t_te) in zip(fast, twin):
        assert f_tr == pytest.approx(t_tr, abs=10 / 9000)
        assert f_te == pytest.approx(t_te, abs=10 / 3000)


def test_protocol_fast_equals_twins(full_size, tmp_path):
    net, params, test_set = full_size
    cfg = EvalConfig(class_counts=[50], lrs=[1e-3, 1e-4], search_draws=2, final_runs=3)
    results = {}
    for backend in ("auto", "torch"):
        with ops.use_backend(backend):
            ev = Evaluator(net, params, test_set, cfg, out_dir=tmp_path / backend, progress=False,
                           log=lambda m: None)
            results[backend] = ev.run()
    a, b = (results[k]["class_counts"]["50"]["final"] for k in ("auto", "torch"))
    assert a["lr"] == b["lr"]
    for k in ("train_mean", "test_mean"):
        assert a[k] == pytest.approx(b[k], abs=0.01)
