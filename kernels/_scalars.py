"""Host-side scalars for the Triton launchers.

Doubles passed to kernels exactly: Triton's float arguments are float32, so a double travels as
two float32s, hi + lo, which the kernel adds back in its own dtype (exact in float64). And the
integer helpers the launchers size their grids with."""
import struct

import triton
import triton.language as tl


def split_double(x: float) -> tuple[float, float]:
    """(hi, lo): hi is x rounded to float32, lo the rest."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


@triton.jit
def join_double(hi, lo, dt: tl.constexpr):
    """The double split_double split, in dtype dt."""
    return tl.cast(hi, dt) + tl.cast(lo, dt)


# Host-side integer helpers for the launchers. Triton's own (triton.cdiv, triton.next_power_of_2)
# are ConstexprFunctions in recent Triton: called from Python they take a slow path that was a
# third of an eager conv_valid call's host time (cProfile, Triton 3.8). Same arithmetic, plain
# Python (SymInts pass through too).
def cdiv(a, b):
    return (a + b - 1) // b


def next_pow2(n):
    n -= 1
    n |= n >> 1
    n |= n >> 2
    n |= n >> 4
    n |= n >> 8
    n |= n >> 16
    n |= n >> 32
    return n + 1
