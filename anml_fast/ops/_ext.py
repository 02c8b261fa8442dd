"""The compiled extension `anml_fast._C`, loaded on first request, and why it is missing if it is.

Importing `anml_fast._C` only loads the shared library: its static initialisers define the ops in
`torch.ops.anml_fast` (schemas in csrc/ops.cpp, kernels per device beside them). The package must
work without it (plain-PyTorch twins), so a failed load is remembered, not raised.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Callable

import torch

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


class DeviceSelfTest:
    """Whether a compiled op works, per device type, by running it once (the answer is remembered).

    `check(device_type)` runs the op against its twin and returns None, or why it failed.
    """

    def __init__(self, check: Callable[[str], str | None]):
        def guarded(device_type: str) -> str | None:
            if load() is None:
                return f"extension not loaded: {error()}"
            try:
                # the first call may come from inside no_grad or inference_mode (an evaluation);
                # the check differentiates the op, and its answer is remembered for every later call
                with torch.inference_mode(False), torch.enable_grad():
                    return check(device_type)
            except Exception as e:  # no kernel for this device, a driver or architecture mismatch, ...
                return f"{type(e).__name__}: {e}"
        self._check = functools.cache(guarded)

    @staticmethod
    def _types(device) -> list[str]:
        if device is not None:
            return [torch.device(device).type]
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    def available(self, device: str | torch.device | None = None) -> bool:
        """Whether the op runs, and agrees with its twin, on `device` (default: the CPU and, if
        present, the GPU)."""
        return all(self._check(t) is None for t in self._types(device))

    def unavailable_reason(self, device: str | torch.device | None = None) -> str | None:
        """Why `available(device)` is False (None when it is True)."""
        for t in self._types(device):
            reason = self._check(t)
            if reason is not None:
                return f"{t}: {reason}"
        return None
