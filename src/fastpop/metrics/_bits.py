"""Bit-level numba building blocks: an LLVM popcount intrinsic (numba 0.68 has no np.bitwise_count), and SWAR
vertical counters that sum 0/1 bits across many rows of words.

A SWAR counter keeps 64 counters of one word in 8 uint64s of 8 byte lanes each: adding a row costs 8 shift-mask-add
operations per word, with no branches, vectorized across words. Byte lanes are flushed into int32 counts every
255 rows. (A ripple-carry bit-sliced counter measured 8-15x the memory-read floor here: its data-dependent loop
does not vectorize; this one ~1.5-3x, see bench/RESULTS.md.)
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


LANES = np.uint64(0x0101010101010101)  # bit 0 of each byte
FLUSH = 255  # additions a byte counter holds before it must be flushed


@njit(inline="always")
def swar_add(acc, row):
    """Add a row of words (one 0/1 per bit) to byte counters: acc[k, w] byte j counts bit 8j + k of word w.
    Branch-free with the word index innermost, so LLVM vectorizes it (8 words per AVX-512 op)."""
    for k in range(8):
        shift = np.uint64(k)
        for w in range(row.shape[0]):
            acc[k, w] += (row[w] >> shift) & LANES


@njit(inline="always")
def swar_flush(acc, out, n):
    """Add the byte counters into out[N] (int32) and zero them. Viewed as bytes, acc8[k, m] counts example
    8m + k (little-endian words), so the flush is a transpose-add of an [8, 8W] byte matrix."""
    acc8 = acc.view(np.uint8)
    full = n // 8
    for m in range(full):
        for k in range(8):
            out[8 * m + k] += acc8[k, m]
    for k in range(n - 8 * full):
        out[8 * full + k] += acc8[k, full]
    acc[:] = 0


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
