"""Loading the Triton kernel modules (kernels/, installed as anml_fast.kernels), failures remembered."""
from __future__ import annotations

import importlib
from types import ModuleType


def import_kernels(name: str) -> tuple[ModuleType | None, str | None]:
    """(the kernel module, None), or (None, why it did not import: no Triton, say).

    Called when an op module is imported, not on first use: torch.compile cannot trace an import
    inside an op.
    """
    try:
        try:
            return importlib.import_module(f"anml_fast.kernels.{name}"), None
        except ModuleNotFoundError as e:
            if e.name != "anml_fast.kernels":
                raise
            # A source checkout run without installing (PYTHONPATH=.): setup.py maps kernels/ to
            # anml_fast.kernels only at install time. Only one of the two names is ever imported,
            # so the ops are registered once.
            return importlib.import_module(f"kernels.{name}"), None
    except Exception as e:  # anything at all means "these kernels are not here"
        return None, f"{type(e).__name__}: {e}"
