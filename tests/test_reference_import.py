"""Importing checkpoints of the authors' ANML/OML code, and refusing pickles that carry code.

The original `Learner` cannot be imported here, so the tests build an imitation of it: same module
path (`model.learner`), same attribute layout (`vars`, `vars_bn` ParameterLists, a config list, a
Neuromodulation flag, `learn` flags on the parameters) and a forward that computes the way the
original does (batch norm in training mode on one image at a time, NM gate times PLN features).
The imitation is removed from sys.modules before importing, so the loader cannot lean on it.

Each whole-module round trip runs in both of torch's formats: the zip one of torch >= 1.6 and the
legacy one the authors' torch 1.4 wrote (`_use_new_zipfile_serialization=False` still writes it).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import struct
import sys
import types
import warnings
import zipfile
from collections import OrderedDict

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


LEGACY_HEAD = b"\x80\x02\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
FORMATS = ["zip", "legacy"]


def save_learner(learner: Learner, path, fmt: str = "zip") -> None:
    with reference_module(), warnings.catch_warnings():
        # The legacy writer warns that it cannot find the source of a class defined in a test.
        warnings.simplefilter("ignore")
        torch.save(learner, path, _use_new_zipfile_serialization=fmt == "zip")
    assert "model.learner" not in sys.modules
    if fmt == "zip":
        with zipfile.ZipFile(path) as z:
            pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    else:
        pkl = path.read_bytes()
        assert pkl.startswith(LEGACY_HEAD) and not zipfile.is_zipfile(path)
        assert b"X\x06\x00\x00\x00module" in pkl  # the ('module', cls, file, source) record
    # The pickle must name the class where the reference keeps it, as the authors' files do.
    assert b"cmodel.learner\nLearner\n" in pkl


def save_legacy(obj, path) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes().startswith(LEGACY_HEAD)


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

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("nm,pln,outputs", [(8, 12, 20), (112, 256, 1000)], ids=["small", "protocol"])
def test_anml_logits_match_the_reference(tmp_path, nm, pln, outputs, fmt):
    torch.manual_seed(1)
    learner = Learner(anml_layers(nm, pln, outputs), neuromodulation=True)
    randomise(learner, 2)
    mark_learn_flags(learner, frozen=7)
    path = tmp_path / "Neuromodulation_Model.net"
    save_learner(learner, path, fmt)

    ckpt = import_reference(path)

    assert ckpt.config == ModelConfig(kind="anml", nm_channels=nm, pln_channels=pln, num_outputs=outputs)
    x = images(4)
    with torch.no_grad():
        expected = learner(x)
        got = build(ckpt.config).forward(ckpt.params, x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert all(type(t) is torch.Tensor and not t.requires_grad for t in ckpt.params.values())


@pytest.mark.parametrize("fmt", FORMATS)
def test_oml_logits_match_the_reference(tmp_path, fmt):
    torch.manual_seed(3)
    learner = Learner(oml_layers(16, 24, 30), neuromodulation=False)
    randomise(learner, 4)
    mark_learn_flags(learner, frozen=6)
    path = tmp_path / "OML.net"
    save_learner(learner, path, fmt)

    ckpt = import_reference(path)

    # the original code's images: the reference scaling, whatever the kind
    assert ckpt.config == ModelConfig(kind="oml", pln_channels=16, oml_hidden=24, num_outputs=30,
                                      input_norm="reference")
    x = images(3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(build(ckpt.config).forward(ckpt.params, x), learner(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_anml_checkpoint_survives_our_own_save_and_load(tmp_path, fmt):
    from anml_fast import checkpoint

    learner = Learner(anml_layers(4, 6, 10))
    save_learner(learner, tmp_path / "ref.net", fmt)
    ckpt = import_reference(tmp_path / "ref.net")
    checkpoint.save(tmp_path / "ours.safetensors", ckpt)
    back = checkpoint.load(tmp_path / "ours.safetensors")
    assert back.config == ckpt.config
    for name, t in ckpt.params.items():
        assert torch.equal(back.params[name], t)


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_and_tensor_list_are_accepted(tmp_path, fmt):
    learner = Learner(anml_layers(4, 6, 10))
    randomise(learner, 7)
    save = torch.save if fmt == "zip" else save_legacy
    save(learner.state_dict(), tmp_path / "sd.pt")
    save([p.detach() for p in learner.vars], tmp_path / "list.pt")
    a, b = import_reference(tmp_path / "sd.pt"), import_reference(tmp_path / "list.pt")
    assert a.config == b.config == ModelConfig(kind="anml", nm_channels=4, pln_channels=6, num_outputs=10)
    for name, ref in zip(a.params, learner.vars):
        assert torch.equal(a.params[name], ref.detach()) and torch.equal(b.params[name], ref.detach())


# --- the legacy format in detail ----------------------------------------------------------------

class StorageRecord:
    """Pickles as the persistent id torch's legacy writer gives a storage."""

    def __init__(self, storage_type, key: str, location: str, numel: int, view=None):
        self.pid = ("storage", storage_type, key, location, numel, view)


class TensorRecord:
    """Pickles as torch pickles a tensor: a call of _rebuild_tensor_v2 over a storage record."""

    def __init__(self, storage: StorageRecord, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class Calls:
    """Pickles as a call of `func` (an admitted one) with `args`."""

    def __init__(self, func, args: tuple):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def write_legacy(path, obj, storages: dict[str, torch.Tensor], big_endian_saver: bool = False) -> None:
    """A legacy-format file laid out by hand, for records today's torch no longer writes.

    `big_endian_saver`: the element counts as torch <= 1.4 on a big-endian machine wrote them (in its
    own byte order; the data itself it always wrote little-endian).
    """
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            return o.pid if isinstance(o, StorageRecord) else None

    sys_info = {"protocol_version": 1001, "little_endian": not big_endian_saver,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    with open(path, "wb") as f:
        for header in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, sys_info):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(obj)
        pickle.dump(sorted(storages), f, protocol=2)
        for key in sorted(storages):
            f.write(struct.pack(">q" if big_endian_saver else "<q", storages[key].numel()))
            f.write(storages[key].numpy().tobytes())


def test_handwritten_legacy_records_read_as_torch_reads_them(tmp_path):
    # Storage views (written by torch < 1.0, still read by its legacy loader), GPU storages and a
    # transposed stride; torch's own (unrestricted) reader of our file vouches for the layout.
    learner = Learner(anml_layers(4, 6, 10))
    randomise(learner, 11)
    tensors = [p.detach().clone() for p in learner.vars]
    pad, records, storages = 3, [], {}
    for i, t in enumerate(tensors):
        transposed = t.dim() == 2
        body = t.t().contiguous() if transposed else t
        stride = (1, t.shape[0]) if transposed else t.stride()
        key = f"9400{i}"
        storages[key] = torch.cat([torch.full((pad,), 7.0), body.reshape(-1), torch.full((pad,), -7.0)])
        if i % 2:
            storage, offset = StorageRecord(torch.cuda.FloatStorage, key, "cuda:0", storages[key].numel()), pad
        else:
            view = (f"view{i}", pad, t.numel())
            storage, offset = StorageRecord(torch.FloatStorage, key, "cpu", storages[key].numel(), view), 0
        records.append(TensorRecord(storage, offset, tuple(t.shape), tuple(stride)))
    path = tmp_path / "handmade.net"
    write_legacy(path, records, storages)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.load(path, map_location="cpu", weights_only=False)
    ckpt = import_reference(path)

    for ref, t, ours in zip(tensors, theirs, ckpt.params.values()):
        assert torch.equal(t, ref) and torch.equal(ours, ref)

    write_legacy(tmp_path / "big_endian.net", records, storages, big_endian_saver=True)
    for ref, ours in zip(tensors, import_reference(tmp_path / "big_endian.net").params.values()):
        assert torch.equal(ours, ref)


def test_legacy_records_that_do_not_fit_are_errors(tmp_path):
    data = torch.arange(6.0)

    def attempt(name, records, storages, match):
        path = tmp_path / name
        write_legacy(path, records, storages)
        with pytest.raises(CheckpointError, match=match) as err:
            import_reference(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)

    whole = StorageRecord(torch.FloatStorage, "1", "cpu", 6)
    attempt("past.net", [TensorRecord(whole, 2, (5,), (1,))], {"1": data}, "past its storage")
    attempt("strided.net", [TensorRecord(whole, 0, (3, 2), (2, 2))], {"1": data}, "past its storage")
    view = StorageRecord(torch.FloatStorage, "1", "cpu", 6, ("v", 4, 3))
    attempt("view.net", [TensorRecord(view, 0, (1,), (1,))], {"1": data}, "view outside")
    attempt("negative.net", [TensorRecord(whole, 0, (3,), (-1,))], {"1": data}, "malformed")
    # A stride of 0 would let 24 bytes stand for a tensor of 4 GiB.
    attempt("expanded.net", [TensorRecord(whole, 0, (1 << 30,), (0,))], {"1": data}, "larger than its storage")
    attempt("set.net", [Calls(set, (TensorRecord(whole, 0, (6,), (1,)),))], {"1": data}, "calls set with")
    attempt("dict.net", [Calls(OrderedDict, ([("a", 1)],))], {}, "calls OrderedDict with")
    # More elements claimed than the file holds: refused before anything is allocated for them.
    huge = StorageRecord(torch.FloatStorage, "1", "cpu", 1 << 40)
    attempt("huge.net", [TensorRecord(huge, 0, (1,), (1,))], {"1": data}, "claim more than")
    attempt("unlisted.net", [TensorRecord(whole, 0, (6,), (1,))], {}, "do not match")
    attempt("count.net", [TensorRecord(whole, 0, (5,), (1,))], {"1": data[:5]}, "holds 5 elements")
    as_double = StorageRecord(torch.DoubleStorage, "1", "cpu", 6)
    attempt("mixed.net", [TensorRecord(whole, 0, (6,), (1,)), TensorRecord(as_double, 0, (6,), (1,))],
            {"1": data}, "described as both")
    attempt("storage.net", [StorageRecord(torch.FloatStorage, "1", "cpu", 6)], {"1": data}, "not a tensor")
    # A module record may name only a class that maps to a stub, whatever else is admitted.
    not_a_module = StorageRecord(None, "", "", 0)
    not_a_module.pid = ("module", OrderedDict, None, None)
    attempt("module.net", [not_a_module], {}, "module record for something other")


def test_legacy_module_source_is_never_run(tmp_path, monkeypatch):
    # The legacy writer stores each module class's source text; a forged one stays text.
    marker = tmp_path / "pwned"
    evil = [f"import os\nos.system('touch {marker}')\n"]
    monkeypatch.setattr(torch.serialization, "get_source_lines_and_file", lambda obj: (evil, 0, "evil.py"))
    learner = Learner(anml_layers(4, 6, 10))
    save_learner(learner, tmp_path / "forged.net", "legacy")
    assert f"touch {marker}".encode() in (tmp_path / "forged.net").read_bytes()

    assert import_reference(tmp_path / "forged.net").config.kind == "anml"
    assert not marker.exists()


def test_legacy_module_of_another_class_is_refused(tmp_path):
    # Only the Learner and its ParameterLists are admitted as module records.
    learner = Learner(anml_layers(4, 6, 10))
    learner.head = nn.Linear(2, 2)
    save_learner(learner, tmp_path / "extra.net", "legacy")
    with pytest.raises(CheckpointError, match="global torch.nn.modules.linear.Linear"):
        import_reference(tmp_path / "extra.net")


def test_truncated_legacy_files_are_errors(tmp_path):
    learner = Learner(anml_layers(2, 2, 3))
    full = tmp_path / "full.net"
    save_learner(learner, full, "legacy")
    data = full.read_bytes()
    assert import_reference(full).config.nm_channels == 2
    # Every kind of place: headers, the main pickle, the key list, counts and storage bytes.
    cuts = sorted(set(range(0, len(data), max(1, len(data) // 300))) | {1, 20, len(data) - 1, len(data) - 8})
    for cut in cuts:
        truncated = tmp_path / "cut.net"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=str(truncated)) as err:
            import_reference(truncated)
        assert "\n" not in str(err.value), cut


@pytest.mark.parametrize("fmt", FORMATS)
def test_learner_under_another_module_path_is_still_inert(tmp_path, fmt):
    # A fork that moved the Learner: its name maps to the same inert record.
    learner = Learner(anml_layers(4, 6, 10))
    mod = types.ModuleType("anml_fork_learner")
    mod.Learner = Learner
    old = Learner.__module__, Learner.__qualname__
    Learner.__module__, Learner.__qualname__ = "anml_fork_learner", "Learner"
    sys.modules["anml_fork_learner"] = mod
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(learner, tmp_path / "fork.net", _use_new_zipfile_serialization=fmt == "zip")
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


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("inside_learner", [False, True], ids=["bare", "inside-learner"])
def test_pickled_code_is_refused_and_not_run(tmp_path, inside_learner, fmt):
    marker = tmp_path / "pwned"
    payload = RunsCommand(f"touch {marker}")
    path = tmp_path / "evil.net"
    if inside_learner:
        # Even wrapped in an otherwise genuine Learner, mapping the Learner to a stub admits nothing else.
        learner = Learner(anml_layers(4, 6, 10))
        learner.payload = payload
        save_learner(learner, path, fmt)
    else:
        torch.save({"vars.0": payload}, path, _use_new_zipfile_serialization=fmt == "zip")
    assert b"system" in path.read_bytes()  # the payload really is in the file
    assert not marker.exists()

    with pytest.raises(CheckpointError) as err:
        import_reference(path)

    message = str(err.value)
    assert f"{os.system.__module__}.system" in message and str(path) in message
    assert "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_builtin_eval_is_refused(tmp_path, fmt):
    class Evaluates:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    torch.save([Evaluates()], tmp_path / "eval.net", _use_new_zipfile_serialization=fmt == "zip")
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
