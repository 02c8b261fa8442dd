"""The compiled extension `anml_fast._C`, loaded on first request, and why it is missing if it is.

Importing `anml_fast._C` only loads the shared library: its static initialisers define the ops in
`torch.ops.anml_fast` (schemas in csrc/ops.cpp, kernels per device beside them). The package must
work without it (plain-PyTorch twins), so a failed load is remembered, not raised.
"""
from __future__ import annotations

import importlib
from types import ModuleType

_module: ModuleType | None = None
_error: str | None = None
_tried = False


def load() -> ModuleType | None:
    """The extension module, or None when it is not built or does not load here."""
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            _module = importlib.import_module("anml_fast._C")
        except Exception as e:  # ImportError, or an OSError from an ABI/driver mismatch
            _error = f"{type(e).__name__}: {e}"
    return _module


def error() -> str | None:
    """Why `load()` returned None (None when it has not been tried or it worked)."""
    return _error


def with_cuda() -> bool:
    """Whether the extension holds CUDA kernels (it was built against a CUDA toolkit)."""
    module = load()
    return bool(module is not None and getattr(module, "WITH_CUDA", 0))
