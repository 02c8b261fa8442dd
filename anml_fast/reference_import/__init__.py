"""Import a model saved by the authors' ANML code (or the OML code it derives from).

The reference saves its whole `Learner` module with `torch.save(maml.net, path)`: a pickle, which
would run arbitrary code if loaded the ordinary way. Here the file is read by torch's weights-only
unpickler, which builds nothing but tensors, parameters and plain containers; the few reference
classes the file names (`model.learner.Learner`, torch's `ParameterList`) are mapped to inert stubs
that merely keep their pickled state. Anything else the pickle names (`posix.system`, ...) is
refused before it could be called, and reported as a one-line CheckpointError.

The authors ran PyTorch 1.4, whose `torch.save` wrote the legacy (pre-1.6, non-zip) format. torch's
weights-only reader refuses a whole module in that format (its records carry the module's class
and source), so such files are read here by our own parser of that layout, with an unpickler that
admits the same few names and builds tensors by our code, not torch's rebuild functions.

What we take from the Learner: its `vars` list, whose order is our `param_specs()` order (28 tensors
for ANML, NM first; 16 for OML). Its `vars_bn` running statistics are ignored: the reference
normalises in training mode, so they never influence its outputs.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, check_params
from ..errors import CheckpointError
from ..models import ModelConfig, build
from .legacy import _is_legacy_format, _legacy_load
from .stubs import (LEARNER_NAMES, PARAMETER_LIST_NAME, _MAX_EXTRA_LEARNER_NAMES, _first_line,
                    _LearnerStub, _ParameterListStub, _refusal_message)

COUNTS = {28: "anml", 16: "oml"}


def import_reference(path: str | os.PathLike, kind: str | None = None) -> Checkpoint:
    """Read a reference checkpoint (whole pickled Learner, its state_dict, or a list of its tensors).

    `kind` ("anml" or "oml") overrides the guess made from the number of tensors (28 or 16).
    Every problem, including a file that tries to name a non-allowlisted global, is a
    CheckpointError naming the file.
    """
    path = Path(path)
    source = str(path)
    if kind is not None and kind not in COUNTS.values():
        raise CheckpointError(f"{source}: unknown model kind {kind!r}; expected one of {sorted(COUNTS.values())}")
    if not path.is_file():
        raise CheckpointError(f"{source}: no such reference checkpoint file")
    obj = _restricted_load(path)
    tensors, neuromodulation = _reference_tensors(obj, source)
    config, params = _to_params(tensors, kind, neuromodulation, source)
    info = {"imported_from": source, "imported_kind": config.kind}
    return Checkpoint(config=config, params=params, info=info)


def _restricted_load(path: Path):
    if _is_legacy_format(path):
        return _legacy_load(path)
    learner_names = list(LEARNER_NAMES)
    for _ in range(_MAX_EXTRA_LEARNER_NAMES + 1):
        allow = [(_LearnerStub, n) for n in learner_names] + [(_ParameterListStub, PARAMETER_LIST_NAME)]
        try:
            with torch.serialization.safe_globals(allow):
                # weights_only=True passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot
                # override an explicit argument, so the environment cannot make this load unsafe.
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            refused = _refused_global(str(e))
            # A fork that keeps its Learner elsewhere is still the same inert record, so such a
            # name may be mapped to the stub too; nothing else is ever admitted.
            if refused and refused.rpartition(".")[2] == "Learner" and refused not in learner_names \
                    and re.fullmatch(r"[A-Za-z_][\w.]*", refused):
                learner_names.append(refused)
                continue
            raise CheckpointError(_unpickling_message(path, str(e), refused)) from None
        except Exception as e:  # noqa: BLE001 - a weights-only load only reads, so any failure is a bad file
            detail = _first_line(str(e)) if str(e).strip() else "the file ends too early"
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or not "
                                  f"written by torch.save; {type(e).__name__}: {detail})") from None
    raise CheckpointError(f"{path}: names too many different Learner classes ({learner_names})")


def _refused_global(message: str) -> str | None:
    for pattern in (r"GLOBAL (\S+) was not an allowed global", r"Unsupported global: GLOBAL (\S+)",
                    r"unsupported GLOBAL (\S+) whose module"):
        m = re.search(pattern, message)
        if m:
            return m.group(1)
    return None


def _unpickling_message(path: Path, message: str, refused: str | None) -> str:
    if refused:
        return _refusal_message(path, refused)
    # torch prefixes the unpickler's own message with a long multi-line explanation; keep its core.
    m = re.search(r"WeightsUnpickler error:\s*(.*)", message)
    detail = _first_line(m.group(1) if m else message)
    return f"{path}: not a readable reference checkpoint (the weights-only reader stopped at: {detail})"



def _reference_tensors(obj, source: str) -> tuple[list, bool | None]:
    """The Learner's `vars` in order, and its Neuromodulation flag when the file records it."""
    if isinstance(obj, _LearnerStub):
        state = obj.recorded_state
        modules = state.get("_modules")
        plist = modules.get("vars") if isinstance(modules, dict) else None
        if not isinstance(plist, _ParameterListStub):
            raise CheckpointError(f"{source}: the pickled Learner has no `vars` parameter list")
        flag = state.get("Neuromodulation")
        return _parameter_list(plist, source), flag if isinstance(flag, bool) else None
    if isinstance(obj, _ParameterListStub):
        return _parameter_list(obj, source), None
    if isinstance(obj, (list, tuple)):
        return list(obj), None
    if isinstance(obj, dict):
        return _from_dict(obj, source), None
    raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a reference Learner, "
                          f"state_dict or list of tensors")


def _parameter_list(plist: _ParameterListStub, source: str) -> list:
    params = plist.recorded_state.get("_parameters")
    if not isinstance(params, dict):
        raise CheckpointError(f"{source}: the pickled `vars` list holds no parameters")
    return _by_index({str(k): v for k, v in params.items()}, source, "`vars`")


def _by_index(indexed: dict[str, object], source: str, what: str) -> list:
    """Values of a {"0": t0, "1": t1, ...} mapping in index order; the indices must be 0..n-1."""
    try:
        order = sorted(indexed, key=int)
    except ValueError:
        raise CheckpointError(f"{source}: {what} has non-numeric keys {sorted(indexed)[:4]}") from None
    if [int(k) for k in order] != list(range(len(order))):
        raise CheckpointError(f"{source}: {what} indices are not 0..{len(order) - 1}")
    return [indexed[k] for k in order]


def _from_dict(d: dict, source: str) -> list:
    keys = [k for k in d if isinstance(k, str)]
    if len(keys) != len(d):
        raise CheckpointError(f"{source}: a dict with non-string keys is not a state_dict")
    # Our own flat names (e.g. a dict someone exported): put them in param_specs order.
    for k in COUNTS.values():
        names = [s.name for s in build(ModelConfig(kind=k)).param_specs()]
        if set(names) == set(keys):
            return [d[n] for n in names]
    # A Learner's state_dict, possibly from a wrapper (`net.vars.3`); `vars_bn.*` is ignored.
    indexed = {}
    for key in keys:
        m = re.fullmatch(r"(?:.*\.)?vars\.(\d+)", key)
        if m:
            indexed[m.group(1)] = d[key]
        elif not re.fullmatch(r"(?:.*\.)?vars_bn\.\d+", key):
            raise CheckpointError(f"{source}: unexpected state_dict key {key!r} "
                                  f"(expected vars.N, vars_bn.N or anml_fast parameter names)")
    if not indexed:
        raise CheckpointError(f"{source}: the state_dict holds no `vars.N` tensors")
    return _by_index(indexed, source, "the state_dict's `vars`")


def _dim(t: torch.Tensor, i: int, source: str, index: int) -> int:
    if t.dim() <= i:
        raise CheckpointError(f"{source}: tensor {index} has shape {tuple(t.shape)}, too few dimensions")
    return int(t.shape[i])


def _to_params(tensors: list, kind: str | None, neuromodulation: bool | None,
               source: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{source}: item {i} of the parameter list is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor {i} has dtype {t.dtype}, expected floating point")
        # A file may describe storage-less (meta) or sparse tensors; neither is a usable weight.
        if t.device.type != "cpu" or t.layout != torch.strided:
            raise CheckpointError(f"{source}: tensor {i} is a {t.layout} tensor on {t.device}, "
                                  f"expected a dense one with data")
    guessed = COUNTS.get(len(tensors))
    if kind is None:
        if guessed is None:
            raise CheckpointError(f"{source}: holds {len(tensors)} parameter tensors; a reference ANML "
                                  f"model has 28 and an OML model 16")
        kind = guessed
    expected = {v: k for k, v in COUNTS.items()}[kind]
    if len(tensors) != expected:
        raise CheckpointError(f"{source}: holds {len(tensors)} parameter tensors; kind {kind!r} has {expected}")
    if neuromodulation is not None and neuromodulation != (kind == "anml"):
        raise CheckpointError(f"{source}: the Learner says Neuromodulation={neuromodulation}, "
                              f"which does not fit kind {kind!r}")
    if kind == "anml":
        # the original code's images, whatever the kind: the reference's scaling
        config = ModelConfig(kind="anml", input_norm="reference", nm_channels=_dim(tensors[0], 0, source, 0),
                             pln_channels=_dim(tensors[14], 0, source, 14),
                             num_outputs=_dim(tensors[26], 0, source, 26))
    else:
        config = ModelConfig(kind="oml", input_norm="reference", pln_channels=_dim(tensors[0], 0, source, 0),
                             oml_hidden=_dim(tensors[12], 0, source, 12),
                             num_outputs=_dim(tensors[14], 0, source, 14))
    names = [s.name for s in build(config).param_specs()]
    # Plain tensors, not the file's Parameters (they carry requires_grad and the reference's `learn`
    # flags); float32 because the reference trains in it and our trainers assume it.
    # copy=True: a file may lay several tensors over one storage, and our safetensors checkpoints
    # refuse tensors that share memory.
    params = {n: t.detach().to(torch.float32, copy=True).contiguous() for n, t in zip(names, tensors)}
    check_params(config, params, source)
    bad = [n for n, t in params.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{source}: non-finite values in {bad[:4]} (a diverged run?)")
    return config, params


__all__ = ["import_reference", "LEARNER_NAMES"]
