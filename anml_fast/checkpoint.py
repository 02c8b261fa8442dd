"""Checkpoints: safetensors files holding parameters (and optionally training state) plus JSON config.

Nothing is unpickled: the tensors are plain safetensors and the configuration is JSON in the
file's metadata, with a SHA-256 of all tensor bytes that is checked on load.

Keys: model parameters under their flat names (`pln.conv2.weight`); training state, when present,
under `state.` (Adam moments, RNG states), which model-only loads ignore.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_path
from .errors import CheckpointError
from .models import ModelConfig, build

FORMAT = "anml_fast.checkpoint/1"
STATE_PREFIX = "state."


@dataclass
class Checkpoint:
    config: ModelConfig
    params: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # without the "state." prefix
    info: dict = field(default_factory=dict)  # JSON-able: training settings, step, ...


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    """Write atomically: the old file stays intact until the new one is complete."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt.params.items()}
    tensors.update({STATE_PREFIX + k: v.detach().cpu().contiguous() for k, v in ckpt.state.items()})
    header = {"format": FORMAT, "model": ckpt.config.to_dict(), "info": ckpt.info,
              "sha256": digest(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"anml_fast": json.dumps(header)})


def load(path: str | os.PathLike, device="cpu", with_state: bool = True) -> Checkpoint:
    """Read and verify a checkpoint; every problem is a CheckpointError naming the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable anml_fast checkpoint ({e})") from None
    try:
        header = json.loads(meta["anml_fast"])
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
        config = ModelConfig.from_dict(header["model"])
        stored_digest = header["sha256"]
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: missing or bad anml_fast metadata ({e})") from None
    if digest(tensors) != stored_digest:
        raise CheckpointError(f"{path}: tensor bytes do not match the stored SHA-256 (corrupt file)")
    params = {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}
    check_params(config, params, str(path))
    state = {k[len(STATE_PREFIX):]: v.to(device) for k, v in tensors.items()
             if with_state and k.startswith(STATE_PREFIX)}
    params = {s.name: params[s.name].to(device) for s in build(config).param_specs()}
    return Checkpoint(config, params, state, header.get("info", {}))


def check_params(config: ModelConfig, params: dict[str, torch.Tensor], source: str) -> None:
    """The parameters are exactly the model's, with the model's shapes."""
    specs = build(config).param_specs()
    expected = {s.name: s.shape for s in specs}
    missing = [n for n in expected if n not in params]
    extra = [n for n in params if n not in expected]
    if missing or extra:
        raise CheckpointError(f"{source}: parameters do not match a {config.kind} model "
                              f"(missing {missing[:4]}, unexpected {extra[:4]})")
    for n, shape in expected.items():
        if tuple(params[n].shape) != tuple(shape):
            raise CheckpointError(f"{source}: {n} has shape {tuple(params[n].shape)}, expected {tuple(shape)}")
