"""A grid-wide barrier for Triton kernels whose programs are all resident at once.

A kernel that must finish one pass over the whole grid before any program starts the next (a
softmax over outputs that different programs computed, then work that needs it) would otherwise
be two launches, and whatever the first pass held in registers would be read from memory again.
With every program resident (a cooperative launch, or a grid no larger than the card runs at
once), the programs can instead wait for each other in the kernel.

The barrier takes two int32 words of kernels/_counters.py's zeroed counters and, like every user
of those, leaves them at zero. Word 0 counts arrivals over the whole launch: at its k-th barrier
(k = 1, 2, ...) a program counts itself in (acq_rel: its stores are visible before the count says
it is there) and waits until the count reaches k * n_programs (acquire: it then sees everyone's
stores). Word 1 counts programs done with barriers (`grid_exit`, each program's last act): the
last of them zeroes both words, when no program can read word 0 again. Reads of data another
program wrote before a barrier must skip L1 (cache_modifier=".cg").

Never run it under Triton's interpreter: that runs the programs one after another, and the first
would wait forever for the rest. Kernels that use it take a constexpr that splits them into
separate launches there (see kernels/gated_head_step.py).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grid_sync(Bar_ptr, n_programs, k: tl.constexpr):
    """The launch's k-th barrier (k from 1): every program waits until all have arrived."""
    tl.debug_barrier()  # every thread's stores are issued before the count says they are there
    arrived = tl.atomic_add(Bar_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while arrived < k * n_programs:
        arrived = tl.atomic_add(Bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def grid_exit(Bar_ptr, n_programs):
    """After a program's last barrier: the last program through leaves both words at zero."""
    if tl.atomic_add(Bar_ptr + 1, 1, sem="acq_rel", scope="gpu") == n_programs - 1:
        tl.atomic_xchg(Bar_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(Bar_ptr + 1, 0, sem="relaxed", scope="gpu")
