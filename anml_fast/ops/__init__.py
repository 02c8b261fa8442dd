"""The ops the models and trainers call, and the one place that decides which implementation runs.

Today every op runs its plain-PyTorch twin (`anml_fast.ops.reference`); compiled backends register
here when they are built, and `backend="torch"` forces the twins.
"""
from __future__ import annotations

from . import reference
from .reference import adam_update_, conv_block, gated_head, sgd_update

BACKENDS = ("torch",)

__all__ = ["adam_update_", "conv_block", "gated_head", "sgd_update", "reference", "available"]


def available() -> dict[str, bool]:
    """Which backends are built and work here (the twins always do)."""
    return {"torch": True}
