"""ANML/OML models: names, sizes, and the forward against an independent formulation."""
import pytest
import torch
import torch.nn.functional as F

from anml_fast.models import FunctionalModel, ModelConfig, build
from conftest import TINY, assert_close


def test_protocol_sizes_and_names():
    anml = build(ModelConfig())
    specs = anml.param_specs()
    assert len(specs) == 28
    assert [s.name for s in specs[:4]] == ["nm.conv1.weight", "nm.conv1.bias", "nm.norm1.weight", "nm.norm1.bias"]
    assert specs[12].name == "nm.fc.weight" and specs[12].shape == (2304, 1008)
    assert specs[-2].name == "pln.fc.weight" and specs[-2].shape == (1000, 2304)
    nm = sum(torch.Size(s.shape).numel() for s in specs if s.name.startswith("nm."))
    pln = sum(torch.Size(s.shape).numel() for s in specs if s.name.startswith("pln."))
    assert 2.5e6 < nm < 2.7e6 and 3.4e6 < pln < 3.6e6
    oml = build(ModelConfig(kind="oml"))
    assert len(oml.param_specs()) == 16
    assert oml.forward(oml.init_params(), torch.randn(2, 3, 28, 28)).shape == (2, 1000)


def test_init_is_kaiming_normal_with_zero_bias_and_unit_norm():
    p = build(ModelConfig()).init_params(torch.Generator().manual_seed(0))
    w = p["pln.conv2.weight"]
    assert w.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.02)
    assert p["pln.conv2.bias"].abs().sum() == 0
    assert torch.all(p["nm.norm1.weight"] == 1) and torch.all(p["nm.norm1.bias"] == 0)


def _batch_norm_reference(p, x):
    """The reference's formulation: batch norm in training mode, one image at a time."""
    def trunk(prefix, img):
        for i in (1, 2, 3):
            img = F.conv2d(img, p[f"{prefix}.conv{i}.weight"], p[f"{prefix}.conv{i}.bias"])
            img = F.batch_norm(img, None, None, p[f"{prefix}.norm{i}.weight"], p[f"{prefix}.norm{i}.bias"],
                               training=True, eps=1e-5)
            img = F.relu(img)
            if i < 3:
                img = F.max_pool2d(img, 2)
        return img.reshape(1, -1)
    out = []
    for b in range(x.shape[0]):
        img = x[b:b + 1]
        gate = torch.sigmoid(F.linear(trunk("nm", img), p["nm.fc.weight"], p["nm.fc.bias"]))
        out.append(F.linear(trunk("pln", img) * gate, p["pln.fc.weight"], p["pln.fc.bias"]))
    return torch.cat(out)


@pytest.mark.parametrize("config", [ModelConfig(), TINY])
def test_anml_forward_equals_batch1_batch_norm(config):
    net = build(config)
    p = net.init_params(torch.Generator().manual_seed(3))
    # non-trivial norm affine parameters, so that they are exercised
    for k in p:
        if ".norm" in k:
            p[k] = p[k] + 0.3 * torch.randn_like(p[k])
    x = torch.randn(5, 3, 28, 28)
    assert_close(net.forward(p, x), _batch_norm_reference(p, x), atol=1e-4, rtol=1e-4, what="logits")


def test_gate_reuse_and_features_agree():
    net = build(TINY)
    p = net.init_params()
    x = torch.randn(3, 3, 28, 28)
    gate = net.gate(p, x)
    assert torch.equal(net.forward(p, x, gate), net.forward(p, x))
    logits = F.linear(net.features(p, x), p["pln.fc.weight"], p["pln.fc.bias"])
    assert_close(logits, net.forward(p, x), atol=1e-5, rtol=1e-5)


def test_module_face_matches_functional():
    m = FunctionalModel(TINY, generator=torch.Generator().manual_seed(0))
    names = [s.name for s in build(TINY).param_specs()]
    assert list(m.state_dict()) == names
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(m(x), m.net.forward(dict(m.named_parameters()), x))
    m(x).sum().backward()
    assert m.pln.conv1.weight.grad is not None


def test_reset_output_rows_only_touches_those_rows():
    net = build(TINY)
    p = net.init_params()
    before = p["pln.fc.weight"].clone()
    net.reset_output_rows(p, torch.tensor([3, 7]), torch.Generator().manual_seed(1))
    changed = (p["pln.fc.weight"] != before).any(1).nonzero().flatten().tolist()
    assert changed == [3, 7]


def test_bad_kind_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        ModelConfig(kind="resnet")


def test_input_norm_defaults_by_kind_and_old_configs_stay_faithful():
    from anml_fast.models import ModelConfig

    assert ModelConfig().input_norm == "reference"
    assert ModelConfig(kind="oml").input_norm == "standard"
    assert ModelConfig(kind="oml", input_norm="reference").input_norm == "reference"
    # configs written before the field existed (the shipped faithful model's) read as before
    old = {"kind": "anml", "nm_channels": 112, "pln_channels": 256, "num_outputs": 1000, "oml_hidden": 1024}
    assert ModelConfig.from_dict(old).input_norm == "reference"
    assert ModelConfig.from_dict({**old, "kind": "oml"}).input_norm == "reference"  # old OML runs too
    assert ModelConfig.from_dict(ModelConfig(kind="oml").to_dict()).input_norm == "standard"
    with pytest.raises(ValueError, match="input normalisation 'zscore'"):
        ModelConfig(input_norm="zscore")


def test_standard_input_norm_gives_unit_scale_images(synthetic_data):
    from anml_fast.data.tasks import MetaTestSet, normalize

    u8 = torch.tensor([[0, 255]], dtype=torch.uint8)
    assert torch.allclose(normalize(u8, input_norm="standard").flatten(),
                          (torch.tensor([0.0, 1.0]) - 0.92206) / 0.08426)
    ref = MetaTestSet(synthetic_data, "cpu")
    std = MetaTestSet(synthetic_data, "cpu", input_norm="standard")
    assert ref.train.std() < 1e-3 < 1 < std.train.std()
    # the same images, scaled differently: one is an affine map of the other
    a = (std.train.flatten() - std.train.mean()) / std.train.std()
    b = (ref.train.flatten() - ref.train.mean()) / ref.train.std()
    assert torch.allclose(a, b, atol=1e-2)
    with pytest.raises(ValueError, match="input normalisation 'raw'"):
        normalize(u8, input_norm="raw")
