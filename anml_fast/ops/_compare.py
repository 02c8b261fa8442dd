"""How the ops' self-tests compare a compiled result with its plain-PyTorch twin."""
from __future__ import annotations

from typing import Iterable

import torch


def first_mismatch(pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]], device, atol: float,
                   rtol: float) -> str | None:
    """None if every (name, compiled, twin) pair agrees to the tolerance, else what differs first."""
    for name, got, want in pairs:
        if not torch.allclose(got, want, atol=atol, rtol=rtol):
            return (f"{name} differs from the plain-PyTorch twin on {device} "
                    f"(max |diff| {(got - want).abs().max().item():.3g})")
    return None
