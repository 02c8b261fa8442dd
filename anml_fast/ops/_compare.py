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
        before = cudnn.allow_tf32
    except RuntimeError:  # conv and RNN set apart through the fp32_precision API: restore those
        before = (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)
    cudnn.allow_tf32 = False
    try:
        yield
    finally:
        if isinstance(before, bool):
            cudnn.allow_tf32 = before
        else:
            cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = before
