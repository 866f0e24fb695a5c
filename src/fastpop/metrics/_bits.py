"""Bit-level numba building blocks: LLVM popcount and count-trailing-zeros intrinsics (numba 0.68 has no
np.bitwise_count), and bit-sliced vertical counters.

A bit-sliced counter keeps 64 counters in `planes[j]`, bit b of plane j being bit j of counter b. Adding a word
(one 0/1 per counter) is a ripple-carry add over the planes: about two word operations per added word on
average, instead of 64 bit extractions.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ..errors import UsageError


@intrinsic
def popcount(typingctx, x):
    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, args)

    return types.uint64(types.uint64), codegen


@intrinsic
def trailing_zeros(typingctx, x):
    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.cttz", [ir.IntType(64), ir.IntType(1)])
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 0)])

    return types.uint64(types.uint64), codegen


@njit(inline="always")
def add_word(planes, w, x):
    """Add the 64 bits of x to the 64 bit-sliced counters planes[w, :]."""
    j = 0
    while x:
        carry = planes[w, j] & x
        planes[w, j] ^= x
        x = carry
        j += 1


@njit(inline="always")
def extract(planes, w, nplanes, out, base, n):
    """Write counters planes[w, :] into out[base : base + 64], stopping at n."""
    for b in range(min(64, n - base)):
        c = np.uint64(0)
        for j in range(nplanes):
            c |= ((planes[w, j] >> np.uint64(b)) & np.uint64(1)) << np.uint64(j)
        out[base + b] = c


def as_words(bits: np.ndarray, n: int) -> np.ndarray:
    """Validate a packed record (uint8 [..., R], R = 8 * ceil(N / 64), padding zero) and view it as uint64."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint8:
        raise UsageError(f"bits must be uint8, got {bits.dtype}")
    r = 8 * -(-n // 64)
    if bits.shape[-1] != r:
        raise UsageError(f"bits rows have {bits.shape[-1]} bytes; N = {n} needs R = {r}")
    words = np.ascontiguousarray(bits).view(np.uint64)
    if n % 64 and words.size and (words[..., -1] >> np.uint64(n % 64)).any():
        raise UsageError("bits have nonzero padding past N: not a fastpop record, or the wrong N")
    return words
