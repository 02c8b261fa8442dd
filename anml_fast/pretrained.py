"""Meta-trained models shipped inside the package, and the sharded folder format they ship in.

A shipped model is a folder (anml_fast/pretrained/<name>/, or any folder `export` wrote) holding
  manifest.json          the model config, where the model came from (command, seed, card, time,
                         results), and per shard its file name, size and SHA-256
  <name>-<i>.safetensors the parameters, split so that no file exceeds SHARD_BYTES (the GPU
                         machine returns files of at most 16 MiB, and small files travel better)
Loading checks every shard's SHA-256 before reading it, then that the shards together hold exactly
the model's parameters. Nothing is unpickled. `anml-fast evaluate pretrained:anml` names one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .atomic import write_json
from .checkpoint import Checkpoint, check_params, digest
from .errors import CheckpointError
from .models import ModelConfig, build

FORMAT = "anml_fast.pretrained/1"
MANIFEST = "manifest.json"
SHARD_BYTES = 15 * 2 ** 20
PACKAGE_DIR = Path(__file__).resolve().parent / "pretrained"
PREFIX = "pretrained:"


def shipped() -> list[str]:
    """Names of the models shipped with this installation."""
    if not PACKAGE_DIR.is_dir():
        return []
    return sorted(p.name for p in PACKAGE_DIR.iterdir() if (p / MANIFEST).is_file())


def resolve(spec: str | os.PathLike) -> Path | None:
    """The folder of `pretrained:NAME` or of a folder holding a manifest; None for anything else."""
    s = str(spec)
    if s.startswith(PREFIX):
        name = s[len(PREFIX):]
        if name not in shipped():
            raise CheckpointError(f"{s}: no such shipped model; this installation has "
                                  f"{', '.join(PREFIX + n for n in shipped()) or 'none'}")
        return PACKAGE_DIR / name
    p = Path(s)
    return p if (p / MANIFEST).is_file() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export(ckpt: Checkpoint, out_dir: str | os.PathLike, provenance: dict | None = None,
           shard_bytes: int = SHARD_BYTES) -> Path:
    """Write `ckpt`'s parameters (not its training state) as a shipped-model folder."""
    from safetensors.torch import save_file

    from .atomic import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for spec in build(ckpt.config).param_specs():  # model order, so a shard holds whole layers
        t = ckpt.params[spec.name].detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes > shard_bytes:
            raise CheckpointError(f"{spec.name} alone ({nbytes} bytes) exceeds the shard size {shard_bytes}")
        if size + nbytes > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][spec.name] = t
        size += nbytes
    entries = []
    for i, tensors in enumerate(shards):
        path = out / f"{out.name}-{i}.safetensors"
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        entries.append({"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path),
                        "tensors": list(tensors)})
    all_params = {k: v for s in shards for k, v in s.items()}
    write_json(out / MANIFEST, {"format": FORMAT, "model": ckpt.config.to_dict(),
                                "params_sha256": digest(all_params), "shards": entries,
                                "provenance": provenance or ckpt.info})
    return out


def manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    try:
        m = json.loads(path.read_text())
        if m.get("format") != FORMAT:
            raise ValueError(f"format {m.get('format')!r}, expected {FORMAT!r}")
        return m
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a shipped-model manifest ({e})") from None


def load(folder: str | os.PathLike, device="cpu") -> Checkpoint:
    """Read and verify a shipped-model folder; every problem is a CheckpointError naming the file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    m = manifest(folder)
    params: dict[str, torch.Tensor] = {}
    for entry in m["shards"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise CheckpointError(f"{path}: shard missing (the manifest lists it)")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 differs from {folder / MANIFEST} (corrupt or altered file)")
        params.update(load_file(str(path)))
    config = ModelConfig.from_dict(m["model"])
    check_params(config, params, str(folder))
    if digest(params) != m["params_sha256"]:
        raise CheckpointError(f"{folder}: parameters do not match the manifest's params_sha256")
    params = {s.name: params[s.name].to(device) for s in build(config).param_specs()}
    return Checkpoint(config, params, {}, m.get("provenance", {}))
