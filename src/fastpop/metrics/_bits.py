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


_M32 = np.uint64(0x00000000FFFFFFFF)
_M16 = np.uint64(0x0000FFFF0000FFFF)
_M8 = np.uint64(0x00FF00FF00FF00FF)


@njit(inline="always")
def _swap(r, i, j, shift, mask):
    t = ((r[i] >> shift) ^ r[j]) & mask
    r[j] ^= t
    r[i] ^= t << shift


@njit(inline="always")
def swar_flush(acc, out, n):
    """Add the byte counters into out[N] (int32) and zero them. acc[k, w] byte j counts example 64w + 8j + k;
    an 8x8 byte transpose (three rounds of masked swaps) turns the 8 words of w into words whose bytes count
    consecutive examples, so the widening add into out is one contiguous, vectorizable pass."""
    w_ = acc.shape[1]
    ordered = np.empty(w_ * 8, np.uint64)
    r = np.empty(8, np.uint64)
    for w in range(w_):
        for k in range(8):
            r[k] = acc[k, w]
        for i in range(4):
            _swap(r, i, i + 4, np.uint64(32), _M32)
        for i in (0, 1, 4, 5):
            _swap(r, i, i + 2, np.uint64(16), _M16)
        for i in (0, 2, 4, 6):
            _swap(r, i, i + 1, np.uint64(8), _M8)
        for j in range(8):
            ordered[w * 8 + j] = r[j]
    counts = ordered.view(np.uint8)
    for i in range(n):
        out[i] += counts[i]
    acc[:] = 0
