"""How the ops' self-tests compare a compiled result with its plain-PyTorch twin."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


def first_mismatch(pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]], device, atol: float,
                   rtol: float) -> str | None:
    """None if every (name, compiled, twin) pair agrees to the tolerance, else what differs first."""
    for name, got, want in pairs:
        if not torch.allclose(got, want, atol=atol, rtol=rtol):
            return (f"{name} differs from the plain-PyTorch twin on {device} "
                    f"(max |diff| {(got - want).abs().max().item():.3g})")
    return None


@contextlib.contextmanager
def ieee_convolutions() -> Iterator[None]:
    """float32 convolutions in IEEE float32 inside the block (cuDNN's, and the Triton ones, which
    follow the same flag): a self-test checks the kernels, not TF32's rounding, which is on by
    default and would differ between the two sides."""
    cudnn = torch.backends.cudnn
    try:
        legacy = cudnn.allow_tf32
    except RuntimeError:  # it and the fp32_precision API's settings disagree
        legacy = None
    before = (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)
    # the legacy switch alone leaves conv at "none", which inherits a global "tf32" of the new API
    cudnn.allow_tf32 = False
    cudnn.conv.fp32_precision = cudnn.rnn.fp32_precision = "ieee"
    try:
        yield
    finally:
        if legacy is not None:
            cudnn.allow_tf32 = legacy
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = before
