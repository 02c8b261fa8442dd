"""The prepared cache: every drawing decoded and resized once, stored as one safetensors file.

Images are kept as uint8 28x28 (the exact input of the reference's ToTensor), 25 MB for all 32,460;
normalisation happens on the run's device. The file name carries a hash of the settings and the data
root; its metadata carries a digest of the file listing and of the image bytes, both checked on load,
so a stale or corrupt cache is rebuilt with a message instead of being trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import DataError
from . import omniglot

CACHE_FORMAT = 1


@dataclass
class OmniglotImages:
    """All classes in canonical order: `images[c, d]` is drawing d+1 of class c (uint8 28x28)."""

    images: torch.Tensor  # uint8 [1623, 20, 28, 28]
    class_names: list[str]  # "images_background/<Alphabet>/characterNN"
    num_background: int

    @property
    def background(self) -> torch.Tensor:
        return self.images[: self.num_background]

    @property
    def evaluation(self) -> torch.Tensor:
        return self.images[self.num_background :]


def default_cache_dir() -> Path:
    env = os.environ.get("ANML_FAST_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "anml_fast"


def _settings(root: Path) -> dict:
    return {
        "format": CACHE_FORMAT,
        "root": str(root.resolve()),
        "image_size": omniglot.IMAGE_SIZE,
        "resize": "PIL.LANCZOS from grey",
    }


def cache_path(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    settings = json.dumps(_settings(Path(root)), sort_keys=True)
    key = hashlib.sha256(settings.encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"omniglot-{key}.safetensors"


def _images_digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def load_omniglot(
    root: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    progress: bool = True,
    log=None,
) -> OmniglotImages:
    """The images from the cache, (re)building it from the PNGs when missing, stale or corrupt."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    root = Path(root).expanduser()
    if root.is_file():
        return read_cache_file(root)
    if not omniglot.has_layout(root):
        if download:
            log(f"downloading Omniglot into {root} ...")
            omniglot.download(root)
        omniglot.check_layout(root)  # raises the error that names the path and layout
    classes = omniglot.list_classes(root)
    listing = omniglot.listing_digest(classes)
    path = cache_path(root, cache_dir)
    if path.exists():
        try:
            return _read_cache(path, listing)
        except _StaleCache as e:
            log(f"rebuilding the Omniglot cache {path}: {e}")
    data = _decode(classes, progress)
    _write_cache(path, data, listing)
    return data


class _StaleCache(Exception):
    pass


def read_cache_file(path: str | os.PathLike) -> OmniglotImages:
    """A prepared cache given on its own (no PNGs beside it to rebuild from): verified, or an error."""
    try:
        return _read_cache(Path(path), listing=None)
    except _StaleCache as e:
        raise DataError(f"{path}: not a usable Omniglot cache: {e}") from None


def export_cache(root: str | os.PathLike, cache_dir, dest: str | os.PathLike) -> Path:
    """Copy the verified cache of `root` to `dest`, a single file usable as --data elsewhere."""
    import shutil

    src = cache_path(Path(root).expanduser(), cache_dir)
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dest)


def _read_cache(path: Path, listing: str | None) -> OmniglotImages:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _StaleCache(f"it cannot be read ({e})") from None
    images = tensors.get("images")
    try:
        names = json.loads(meta["class_names"])
        num_background = int(meta["num_background"])
        stored_listing, stored_digest = meta["listing"], meta["images_sha256"]
    except (KeyError, ValueError) as e:
        raise _StaleCache(f"its metadata is incomplete ({e})") from None
    if images is None or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] != len(names):
        raise _StaleCache("its tensors do not have the expected shape")
    if listing is not None and stored_listing != listing:
        raise _StaleCache("the files under the data root changed since it was written")
    if _images_digest(images) != stored_digest:
        raise _StaleCache("its image bytes do not match their checksum (corrupt file)")
    return OmniglotImages(images, names, num_background)


def _decode(classes: list[omniglot.ClassFolder], progress: bool) -> OmniglotImages:
    from tqdm import tqdm

    size = omniglot.IMAGE_SIZE
    out = np.empty((len(classes), omniglot.DRAWINGS_PER_CLASS, size, size), dtype=np.uint8)
    bar = tqdm(total=out.shape[0] * out.shape[1], desc="decoding Omniglot", unit="img",
               disable=not progress, leave=False)
    for ci, c in enumerate(classes):
        for di, f in enumerate(c.files):
            out[ci, di] = omniglot.load_image(f, size)
        bar.update(len(c.files))
    bar.close()
    names = [f"{c.set_name}/{c.name}" for c in classes]
    num_background = sum(c.set_name == "images_background" for c in classes)
    return OmniglotImages(torch.from_numpy(out), names, num_background)


def _write_cache(path: Path, data: OmniglotImages, listing: str) -> None:
    from safetensors.torch import save_file

    meta = {
        "class_names": json.dumps(data.class_names),
        "num_background": str(data.num_background),
        "listing": listing,
        "images_sha256": _images_digest(data.images),
    }
    try:
        with atomic_path(path) as tmp:
            save_file({"images": data.images.contiguous()}, str(tmp), metadata=meta)
    except OSError as e:
        raise DataError(f"cannot write the Omniglot cache {path}: {e} (set --cache-dir "
                        f"or ANML_FAST_CACHE to a writable folder)") from None
