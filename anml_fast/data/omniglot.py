"""Reading Omniglot from its standard folder layout, in an order that is the same on every machine.

Classes are ordered by set (background first), then sorted alphabet, then sorted character folder;
drawings by their number (the `nn` of `<id>_<nn>.png`). torchvision's own `Omniglot` class orders
by `os.listdir`, which differs between file systems, so it is only used to download.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

SETS = ("images_background", "images_evaluation")
NUM_CLASSES = {"images_background": 964, "images_evaluation": 659}
DRAWINGS_PER_CLASS = 20
IMAGE_SIZE = 28
LAYOUT = "ROOT/omniglot-py/images_background|images_evaluation/<Alphabet>/characterNN/<id>_<nn>.png"
_DRAWING_RE = re.compile(r"^\d+_(\d+)\.png$")

# The reference normalisation (odd constants kept for faithfulness; see anml-protocol.md).
NORM_MEAN = 0.92206 * 256
NORM_STD = 0.08426 * 256 * 256
# What those constants evidently meant: Omniglot's pixel mean and standard deviation in [0, 1].
STANDARD_MEAN = 0.92206
STANDARD_STD = 0.08426


@dataclass(frozen=True)
class ClassFolder:
    """One character: its folder and its drawings' files in drawing-number order."""

    set_name: str
    name: str  # "<Alphabet>/characterNN"
    files: tuple[Path, ...]


def omniglot_dir(root: str | os.PathLike) -> Path:
    return Path(root).expanduser() / "omniglot-py"


def has_layout(root: str | os.PathLike) -> bool:
    base = omniglot_dir(root)
    return all((base / s).is_dir() for s in SETS)


def check_layout(root: str | os.PathLike) -> Path:
    base = omniglot_dir(root)
    missing = [s for s in SETS if not (base / s).is_dir()]
    if missing:
        raise DataError(
            f"Omniglot not found: looked for {', '.join(str(base / s) for s in missing)}; "
            f"expected the layout {LAYOUT} (pass --data ROOT or set ANML_FAST_DATA; "
            f"--download fetches it)"
        )
    return base


def list_classes(root: str | os.PathLike) -> list[ClassFolder]:
    """All 1,623 classes in canonical order, each with its 20 drawings; errors name the bad folder."""
    base = check_layout(root)
    classes: list[ClassFolder] = []
    for set_name in SETS:
        set_dir = base / set_name
        found = []
        for alphabet in sorted(p for p in os.listdir(set_dir) if (set_dir / p).is_dir()):
            alpha_dir = set_dir / alphabet
            for char in sorted(p for p in os.listdir(alpha_dir) if (alpha_dir / p).is_dir()):
                found.append(_read_class(set_name, alpha_dir / char, f"{alphabet}/{char}"))
        if len(found) != NUM_CLASSES[set_name]:
            raise DataError(
                f"{set_dir}: found {len(found)} character folders, expected {NUM_CLASSES[set_name]}"
            )
        classes.extend(found)
    return classes


def _read_class(set_name: str, folder: Path, name: str) -> ClassFolder:
    by_number: dict[int, Path] = {}
    for fname in os.listdir(folder):
        m = _DRAWING_RE.match(fname)
        if m is None:
            continue
        by_number[int(m.group(1))] = folder / fname
    expected = set(range(1, DRAWINGS_PER_CLASS + 1))
    if set(by_number) != expected:
        raise DataError(
            f"{folder}: found drawings {sorted(by_number)}, expected exactly one "
            f"<id>_<nn>.png for each nn in 01..{DRAWINGS_PER_CLASS}"
        )
    return ClassFolder(set_name, name, tuple(by_number[i] for i in sorted(by_number)))


def listing_digest(classes: list[ClassFolder]) -> str:
    """A digest of every file's path, size and mtime: it changes when the data on disk changes."""
    h = hashlib.sha256()
    for c in classes:
        for f in c.files:
            st = f.stat()
            h.update(f"{c.set_name}/{c.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_image(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """One drawing as the reference sees it before ToTensor: grey, resized with LANCZOS, uint8.

    The reference converts to RGB first; its three channels are identical and PIL resizes each
    channel alone, so resizing the grey image gives the same bytes at a third of the cost.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L").resize((size, size), Image.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path}: cannot read this PNG ({e})") from None


def download(root: str | os.PathLike) -> None:
    """Fetch both sets with torchvision's downloader (only when the user passes --download)."""
    from torchvision.datasets import Omniglot

    for background in (True, False):
        try:
            Omniglot(str(root), background=background, download=True)
        except Exception as e:  # network errors come in many types
            raise DataError(f"downloading Omniglot into {root} failed: {e}") from None
