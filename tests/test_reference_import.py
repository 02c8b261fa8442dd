"""Importing checkpoints of the authors' ANML/OML code, and refusing pickles that carry code.

The original `Learner` cannot be imported here, so the tests build an imitation of it: same module
path (`model.learner`), same attribute layout (`vars`, `vars_bn` ParameterLists, a config list, a
Neuromodulation flag, `learn` flags on the parameters) and a forward that computes the way the
original does (batch norm in training mode on one image at a time, NM gate times PLN features).
The imitation is removed from sys.modules before importing, so the loader cannot lean on it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anml_fast.errors import CheckpointError
from anml_fast.models import ModelConfig, build
from anml_fast.reference_import import import_reference


# --- an imitation of the reference's model/learner.py ------------------------------------------

def anml_layers(nm: int, pln: int, outputs: int) -> list:
    """The reference's ANML layer list (its modelfactory), with the channel counts as arguments."""
    return [("conv1_nm", [nm, 3, 3, 3, 1, 0]), ("bn1_nm", [nm]),
            ("conv2_nm", [nm, nm, 3, 3, 1, 0]), ("bn2_nm", [nm]),
            ("conv3_nm", [nm, nm, 3, 3, 1, 0]), ("bn3_nm", [nm]),
            ("nm_to_fc", [pln * 9, nm * 9]),
            ("conv1", [pln, 3, 3, 3, 1, 0]), ("bn1", [pln]),
            ("conv2", [pln, pln, 3, 3, 1, 0]), ("bn2", [pln]),
            ("conv3", [pln, pln, 3, 3, 1, 0]), ("bn3", [pln]),
            ("fc", [outputs, pln * 9])]


def oml_layers(channels: int, hidden: int, outputs: int) -> list:
    layers = []
    for i, stride in enumerate((1, 1, 1, 2, 1, 2)):
        layers += [("conv2d", [channels, 3 if i == 0 else channels, 3, 3, stride, 0]), ("relu", [True])]
    return layers + [("flatten", []), ("rep", []), ("linear", [hidden, channels * 9]), ("relu", [True]),
                     ("linear", [outputs, hidden])]


class Learner(nn.Module):
    def __init__(self, config, neuromodulation=True):
        super().__init__()
        self.config = config
        self.Neuromodulation = neuromodulation
        self.vars = nn.ParameterList()
        self.vars_bn = nn.ParameterList()
        for name, shape in config:
            if "conv" in name:
                w = nn.Parameter(torch.ones(*shape[:4]))
                nn.init.kaiming_normal_(w)
                self.vars.append(w)
                self.vars.append(nn.Parameter(torch.zeros(shape[0])))
            elif "linear" in name or "nm_to" in name or name == "fc":
                w = nn.Parameter(torch.ones(*shape))
                nn.init.kaiming_normal_(w)
                self.vars.append(w)
                self.vars.append(nn.Parameter(torch.zeros(shape[0])))
            elif "bn" in name:
                self.vars.append(nn.Parameter(torch.ones(shape[0])))
                self.vars.append(nn.Parameter(torch.zeros(shape[0])))
                self.vars_bn.extend([nn.Parameter(torch.zeros(shape[0]), requires_grad=False),
                                     nn.Parameter(torch.ones(shape[0]), requires_grad=False)])

    def _trunk(self, x, first, first_bn):
        # conv, training-mode batch norm on this single image, relu, pool after the first two blocks
        v = self.vars
        for block in range(3):
            i, j = first + 4 * block, first_bn + 2 * block
            x = F.conv2d(x, v[i], v[i + 1])
            x = F.batch_norm(x, self.vars_bn[j], self.vars_bn[j + 1], weight=v[i + 2], bias=v[i + 3],
                             training=True)
            x = F.relu(x)
            if block < 2:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
        return x.reshape(x.size(0), -1)

    def forward(self, x):
        v = self.vars
        if self.Neuromodulation:
            rows = []
            for i in range(x.size(0)):
                image = x[i].view(1, 3, 28, 28)
                gate = torch.sigmoid(F.linear(self._trunk(image, 0, 0), v[12], v[13]))
                rows.append(F.linear(self._trunk(image, 14, 6) * gate, v[26], v[27]))
            return torch.cat(rows)
        idx = 0
        for name, p in self.config:
            if name == "conv2d":
                x = F.conv2d(x, v[idx], v[idx + 1], stride=p[4], padding=p[5])
                idx += 2
            elif name == "linear":
                x = F.linear(x, v[idx], v[idx + 1])
                idx += 2
            elif name == "relu":
                x = F.relu(x)
            elif name == "flatten":
                x = x.view(x.size(0), -1)
        return x


def mark_learn_flags(learner: Learner, frozen: int) -> None:
    """What the reference's utils.freeze_layers leaves on the parameters it saves."""
    for i, p in enumerate(learner.vars):
        p.learn = i >= 2 * frozen


@contextlib.contextmanager
def reference_module():
    """`model.learner` in sys.modules only while saving (pickle looks the class up by its path)."""
    saved = {k: sys.modules.get(k) for k in ("model", "model.learner")}
    pkg, mod = types.ModuleType("model"), types.ModuleType("model.learner")
    pkg.learner = mod
    mod.Learner = Learner
    old_module, old_qualname = Learner.__module__, Learner.__qualname__
    Learner.__module__, Learner.__qualname__ = "model.learner", "Learner"
    sys.modules.update({"model": pkg, "model.learner": mod})
    try:
        yield
    finally:
        Learner.__module__, Learner.__qualname__ = old_module, old_qualname
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def save_learner(learner: Learner, path, **kwargs) -> None:
    with reference_module():
        torch.save(learner, path, **kwargs)
    assert "model.learner" not in sys.modules
    if zipfile.is_zipfile(path):
        # The pickle must name the class where the reference keeps it, as the authors' files do.
        with zipfile.ZipFile(path) as z:
            pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
        assert b"cmodel.learner\nLearner\n" in pkl


def randomise(learner: Learner, seed: int) -> None:
    """Move norms and biases off their init so a mix-up of tensors cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.vars:
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.mean() > 0.5 else 0.0))


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


# --- ANML / OML round trips ---------------------------------------------------------------------

@pytest.mark.parametrize("nm,pln,outputs", [(8, 12, 20), (112, 256, 1000)], ids=["small", "protocol"])
def test_anml_logits_match_the_reference(tmp_path, nm, pln, outputs):
    torch.manual_seed(1)
    learner = Learner(anml_layers(nm, pln, outputs), neuromodulation=True)
    randomise(learner, 2)
    mark_learn_flags(learner, frozen=7)
    path = tmp_path / "Neuromodulation_Model.net"
    save_learner(learner, path)

    ckpt = import_reference(path)

    assert ckpt.config == ModelConfig(kind="anml", nm_channels=nm, pln_channels=pln, num_outputs=outputs)
    x = images(4)
    with torch.no_grad():
        expected = learner(x)
        got = build(ckpt.config).forward(ckpt.params, x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert all(type(t) is torch.Tensor and not t.requires_grad for t in ckpt.params.values())


def test_oml_logits_match_the_reference(tmp_path):
    torch.manual_seed(3)
    learner = Learner(oml_layers(16, 24, 30), neuromodulation=False)
    randomise(learner, 4)
    mark_learn_flags(learner, frozen=6)
    path = tmp_path / "OML.net"
    save_learner(learner, path)

    ckpt = import_reference(path)

    assert ckpt.config == ModelConfig(kind="oml", pln_channels=16, oml_hidden=24, num_outputs=30)
    x = images(3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(build(ckpt.config).forward(ckpt.params, x), learner(x), rtol=1e-4, atol=1e-4)


def test_anml_checkpoint_survives_our_own_save_and_load(tmp_path):
    from anml_fast import checkpoint

    learner = Learner(anml_layers(4, 6, 10))
    save_learner(learner, tmp_path / "ref.net")
    ckpt = import_reference(tmp_path / "ref.net")
    checkpoint.save(tmp_path / "ours.safetensors", ckpt)
    back = checkpoint.load(tmp_path / "ours.safetensors")
    assert back.config == ckpt.config
    for name, t in ckpt.params.items():
        assert torch.equal(back.params[name], t)


def test_state_dict_and_tensor_list_are_accepted(tmp_path):
    learner = Learner(anml_layers(4, 6, 10))
    randomise(learner, 7)
    torch.save(learner.state_dict(), tmp_path / "sd.pt")
    torch.save([p.detach() for p in learner.vars], tmp_path / "list.pt")
    a, b = import_reference(tmp_path / "sd.pt"), import_reference(tmp_path / "list.pt")
    assert a.config == b.config == ModelConfig(kind="anml", nm_channels=4, pln_channels=6, num_outputs=10)
    for name, ref in zip(a.params, learner.vars):
        assert torch.equal(a.params[name], ref.detach()) and torch.equal(b.params[name], ref.detach())


def test_legacy_format(tmp_path):
    # torch < 1.6 (the reference's README pins 1.4) wrote a non-zip format. Tensors in it load;
    # a whole pickled module does not, and the error says what to do instead.
    learner = Learner(anml_layers(4, 6, 10))
    torch.save([p.detach() for p in learner.vars], tmp_path / "list.pt", _use_new_zipfile_serialization=False)
    assert import_reference(tmp_path / "list.pt").config.nm_channels == 4
    with warnings.catch_warnings():  # torch may warn that it cannot find the imitation's source
        warnings.simplefilter("ignore")
        save_learner(learner, tmp_path / "module.net", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy .*list\\(net.vars\\)"):
        import_reference(tmp_path / "module.net")


def test_learner_under_another_module_path_is_still_inert(tmp_path):
    # A fork that moved the Learner: its name maps to the same inert record.
    learner = Learner(anml_layers(4, 6, 10))
    mod = types.ModuleType("anml_fork_learner")
    mod.Learner = Learner
    old = Learner.__module__, Learner.__qualname__
    Learner.__module__, Learner.__qualname__ = "anml_fork_learner", "Learner"
    sys.modules["anml_fork_learner"] = mod
    try:
        torch.save(learner, tmp_path / "fork.net")
    finally:
        Learner.__module__, Learner.__qualname__ = old
        del sys.modules["anml_fork_learner"]
    assert import_reference(tmp_path / "fork.net").config.kind == "anml"


def test_kind_and_count_mismatches_are_errors(tmp_path):
    learner = Learner(anml_layers(4, 6, 10))
    save_learner(learner, tmp_path / "anml.net")
    with pytest.raises(CheckpointError, match="kind 'oml' has 16"):
        import_reference(tmp_path / "anml.net", kind="oml")
    torch.save([torch.zeros(3)] * 5, tmp_path / "five.pt")
    with pytest.raises(CheckpointError, match="holds 5 parameter tensors"):
        import_reference(tmp_path / "five.pt")
    bad = [p.detach().clone() for p in learner.vars]
    bad[14] = torch.zeros(6, 5, 3, 3)  # the PLN's first conv reading 5 channels instead of 3
    torch.save(bad, tmp_path / "badshape.pt")
    with pytest.raises(CheckpointError, match="pln.conv1.weight has shape"):
        import_reference(tmp_path / "badshape.pt")


# --- refusing code ------------------------------------------------------------------------------

class RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("inside_learner", [False, True], ids=["bare", "inside-learner"])
def test_pickled_code_is_refused_and_not_run(tmp_path, inside_learner):
    marker = tmp_path / "pwned"
    payload = RunsCommand(f"touch {marker}")
    path = tmp_path / "evil.net"
    if inside_learner:
        # Even wrapped in an otherwise genuine Learner, mapping the Learner to a stub admits nothing else.
        learner = Learner(anml_layers(4, 6, 10))
        learner.payload = payload
        save_learner(learner, path)
    else:
        torch.save({"vars.0": payload}, path)
    assert not marker.exists()

    with pytest.raises(CheckpointError) as err:
        import_reference(path)

    message = str(err.value)
    assert f"{os.system.__module__}.system" in message and str(path) in message
    assert "\n" not in message
    assert not marker.exists()


def test_builtin_eval_is_refused(tmp_path):
    class Evaluates:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    torch.save([Evaluates()], tmp_path / "eval.net")
    with pytest.raises(CheckpointError, match="eval"):
        import_reference(tmp_path / "eval.net")


# --- unreadable files ---------------------------------------------------------------------------

def test_truncated_random_and_missing_files_are_errors(tmp_path):
    learner = Learner(anml_layers(4, 6, 10))
    full = tmp_path / "full.net"
    save_learner(learner, full)
    data = full.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        truncated = tmp_path / f"cut{cut}.net"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=str(truncated)) as err:
            import_reference(truncated)
        assert "\n" not in str(err.value)

    noise = tmp_path / "noise.net"
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="noise.net"):
        import_reference(noise)

    empty = tmp_path / "empty.net"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.net"):
        import_reference(empty)

    with pytest.raises(CheckpointError, match="no such"):
        import_reference(tmp_path / "missing.net")
    with pytest.raises(CheckpointError, match="no such"):
        import_reference(tmp_path)
