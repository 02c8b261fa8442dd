"""Batched whole-PLN meta-test fine-tuning against the one-by-one reference (run_finetune)."""
import pytest
import torch

from anml_fast import ops
from anml_fast.data.tasks import MetaTestSet
from anml_fast.evaluation.finetune_batched import run_finetune_batched
from anml_fast.evaluation.trajectories import Trajectory, run_finetune
from anml_fast.models import build
from conftest import TINY, TINY_OML


@pytest.mark.parametrize("config,optimizer,iid,prefixes", [
    (TINY, "adam", False, ["pln"]), (TINY, "sgd", True, ["pln"]), (TINY, "adam", True, ["nm", "pln"]),
    (TINY_OML, "adam", True, ["pln"]), (TINY_OML, "adam", False, ["rln.conv6", "pln"]),
], ids=["anml-adam-pln", "anml-sgd-iid-pln", "anml-adam-iid-nm-and-pln", "oml-adam-iid-pln", "oml-adam-conv6-pln"])
def test_equals_one_by_one_in_float64(synthetic_data, config, optimizer, iid, prefixes):
    """float64: in float32 the faithful preprocessing's cancellation lets the two summation orders
    (grouped convolution, plain convolution) drift apart over Adam steps (see test_backends)."""
    net = build(config)
    params = net.init_params(torch.Generator().manual_seed(5), dtype=torch.float64)
    test_set = MetaTestSet(synthetic_data, "cpu", dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    trajs = [Trajectory(test_set.draw_classes(g, 2), lr) for lr in (1e-3, 3e-4, 1e-2)]
    with ops.use_backend("torch"):
        want = run_finetune(net, params, test_set, trajs, prefixes, optimizer, iid, torch.Generator().manual_seed(9))
        got = run_finetune_batched(net, params, test_set, trajs, prefixes, optimizer, iid,
                                   torch.Generator().manual_seed(9))
        # one process's share of a distributed run: the same numbers for the trajectories it keeps
        share = run_finetune_batched(net, params, test_set, trajs, prefixes, optimizer, iid,
                                     torch.Generator().manual_seed(9), keep=[False, True, True])
    assert got == want
    assert share == want[1:]


def test_progress_counts_every_update(synthetic_data):
    net = build(TINY)
    params = net.init_params(torch.Generator().manual_seed(5))
    test_set = MetaTestSet(synthetic_data, "cpu")
    trajs = [Trajectory(test_set.draw_classes(torch.Generator().manual_seed(1), 2), 1e-3)] * 4
    counted = []
    run_finetune_batched(net, params, test_set, trajs, ["pln"], "adam", False, torch.Generator().manual_seed(0),
                         counted.append)
    assert sum(counted) == 4 * 2 * 15


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [(16, 32), None], ids=["small", "full-size"])
def test_equals_one_by_one_on_the_gpu_in_float64(synthetic_data, channels):
    """The batched trajectories (batched Triton Adam on CUDA) against the one-by-one twins; at
    full size (ANML's 112/256 channels) too."""
    from anml_fast.models import ModelConfig

    net = build(ModelConfig() if channels is None else ModelConfig(nm_channels=channels[0], pln_channels=channels[1]))
    params = net.init_params(torch.Generator("cuda").manual_seed(5), "cuda", torch.float64)
    test_set = MetaTestSet(synthetic_data, "cuda", dtype=torch.float64)
    g = torch.Generator("cuda").manual_seed(3)
    trajs = [Trajectory(test_set.draw_classes(g, 3), lr) for lr in (1e-3, 3e-4)]
    with ops.use_backend("torch"):
        want = run_finetune(net, params, test_set, trajs, ["pln"], "adam", True, torch.Generator("cuda").manual_seed(9))
    got = run_finetune_batched(net, params, test_set, trajs, ["pln"], "adam", True, torch.Generator("cuda").manual_seed(9))
    assert got == pytest.approx(want, abs=1e-9)
