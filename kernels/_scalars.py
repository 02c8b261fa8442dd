"""Host doubles passed to Triton kernels exactly: Triton's float arguments are float32, so a double
travels as two float32s, hi + lo, which the kernel adds back in its own dtype (exact in float64)."""
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
