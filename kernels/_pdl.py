"""Programmatic dependent launch (PDL, Hopper and later) for the package's Triton kernels.

At batch 1 each kernel runs a few microseconds, and the card sits idle between two of them while
the next launch is set up and its programs are placed (about 0.8 us a boundary in the inner step's
CUDA graph on an H200: 12 of its 97 us). With PDL a kernel may start while the one before it is
still finishing: its programs are placed, then wait (`griddepcontrol.wait`) until the previous
kernel has completed and its writes are visible. Every kernel here waits as its first act, before
touching memory, so no kernel ever reads or writes before its predecessors are done: the results
are the same bits with PDL or without. Only then does it let its own successor launch
(`griddepcontrol.launch_dependents`), so at most two kernels' programs are resident at a time;
a kernel whose programs leave few SMs free while they run (conv_valid's direct kernel) lets its
successor launch only at its end instead (`pdl_wait` ... `pdl_launch_dependents`).

The package's CUDA kernels do the same (csrc/cuda/pdl.cuh), under the same switch:
ANML_FAST_PDL=0 in the environment turns PDL off for both (read at each launch).

A launch asks for PDL only where it can work and where a tracer would not understand it: a real
CUDA tensor on a device of compute capability 9.0 or more (the instructions do not exist before),
not under Triton's interpreter, torch.compile or opcheck's fake and functional tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_GDC = True
except ImportError:  # a Triton before 3.4: no PDL
    HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """A kernel's first statement: wait for the previous kernel, then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """A kernel's first statement where its successor should launch only at its end
    (`pdl_launch_dependents` as its last): the successor's programs are then placed on SMs this
    kernel has left, not crowded onto the few it leaves idle while running."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_launch_dependents(PDL: tl.constexpr):
    """The last statement of a kernel that began with `pdl_wait`."""
    if PDL:
        gdc_launch_dependents()


_CAPABLE: dict[int, bool] = {}
# Triton decides at import whether its kernels run in the interpreter, which knows no launch options.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def enabled() -> bool:
    """The switch shared with the CUDA kernels: on unless ANML_FAST_PDL=0."""
    return os.environ.get("ANML_FAST_PDL", "1") != "0"


def launch_args(like: torch.Tensor) -> dict:
    """The keyword arguments that make a launch writing `like` use PDL (PDL=True, the kernel's
    constexpr, and launch_pdl=True, Triton's launch option), or PDL=False alone."""
    if not (HAS_GDC and not _INTERPRETED and type(like) is torch.Tensor and like.is_cuda and enabled()
            and not torch.compiler.is_compiling()):
        return {"PDL": False}
    index = like.device.index if like.device.index is not None else torch.cuda.current_device()
    capable = _CAPABLE.get(index)
    if capable is None:
        capable = _CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return {"PDL": True, "launch_pdl": True} if capable else {"PDL": False}
