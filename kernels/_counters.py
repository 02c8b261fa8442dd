"""Arrival counters for kernels whose last program to finish completes the work of the others.

A launch whose programs each produce a partial result (a split reduction, one block of a softmax)
can finish in the same launch: each program stores its partial, then counts itself in on an
int32 counter with an acq_rel atomic at GPU scope; the program that sees the count reach the
total is the last, reads every partial (the acquire makes them visible), completes the result in
a fixed order (the same bits whichever program is last) and resets the counter to zero. That
saves the second launch that would otherwise combine the partials.

Where the zeroed counters come from:
- eagerly, one buffer per device and stream: launches on one stream run one after the other, and
  each leaves its counters at zero;
- under CUDA-graph capture, counters of the launch's own, from a reserve zeroed outside any
  capture: a graph keeps the counters it captured and may replay beside other graphs (all
  captured on torch's one default capture stream), so none may be shared, and a memset node per
  launch would cost what the fusion saves. A used-up reserve falls back to zeros made in the graph;
- traced (torch.compile, fake tensors): fresh zeros, which the compiled graph allocates.

In a kernel: `if last_to_arrive(Count_ptr + i, n): ...finish...; reset(Count_ptr + i)`.
"""
from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from ._plan import persistent

MAX_TILES = 1024  # counters of an eager launch; more than this get fresh zeros of their own
RESERVE_COUNTERS = 1 << 20  # 4 MiB a device: about a thousand captured launches
_EAGER: dict = {}
_RESERVE: dict = {}  # device -> [zeroed int32 tensor, first unused index]
_LOCK = threading.Lock()


@triton.jit
def last_to_arrive(Count_ptr, arrivals):
    """Counts this program in on the counter; whether it is the last of `arrivals` programs. Call
    it after the program's partial results are stored: the barrier issues every thread's stores
    before the count (a release at GPU scope) says they are there, and the last program's acquire
    makes all of them visible to it (read them with cache_modifier=".cg", past L1)."""
    tl.debug_barrier()
    return tl.atomic_add(Count_ptr, 1, sem="acq_rel", scope="gpu") == arrivals - 1


@triton.jit
def reset(Count_ptr):
    """The last program leaves the counter at zero for the next launch on its stream."""
    tl.atomic_xchg(Count_ptr, 0, sem="relaxed", scope="gpu")


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def counters(like: torch.Tensor, tiles: int) -> torch.Tensor:
    """At least `tiles` zeroed int32 counters for a launch writing `like` (see above); the kernel
    must leave them at zero."""
    dev = like.device
    if type(like) is not torch.Tensor or torch.compiler.is_compiling() or tiles > MAX_TILES:
        return torch.zeros(tiles, dtype=torch.int32, device=dev)
    with _LOCK:
        if capturing(dev):
            reserve = _RESERVE.get(dev)
            if reserve is None or reserve[1] + tiles > reserve[0].numel():
                return torch.zeros(tiles, dtype=torch.int32, device=dev)
            start = reserve[1]
            reserve[1] += tiles
            return reserve[0][start:start + tiles]
        if dev not in _RESERVE:
            _RESERVE[dev] = [torch.zeros(RESERVE_COUNTERS, dtype=torch.int32, device=dev), 0]
            if dev.type == "cuda":  # zero before a capture on any stream reads it
                torch.cuda.current_stream(dev).synchronize()
        # the raw stream handle: torch.cuda.current_stream() builds a Stream object each call
        key = (dev, torch._C._cuda_getCurrentRawStream(dev.index if dev.index is not None
                                                        else torch.cuda.current_device())
               if dev.type == "cuda" else 0)
        if key not in _EAGER:
            # persistent: a recorded call's plan (kernels/_plan.py) may point its launches at it
            _EAGER[key] = persistent(torch.zeros(MAX_TILES, dtype=torch.int32, device=dev))
        return _EAGER[key]
