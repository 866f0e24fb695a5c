"""numba kernels on packed correctness words, uint64 [T, P, W] (W = R / 8). Private: the public functions in
this package validate inputs and call these. Each parallel loop writes only its own slice of the output, so
results do not depend on the thread count."""

import numpy as np
from numba import njit, prange

from ._bits import FLUSH, popcount, swar_add, swar_flush

_ONE = np.uint64(1)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


@njit(inline="always")
def _sum_rows(words, t, p, out):
    """out[N] += the bits of words[t, :] summed over networks (p = -1) or of words[:, p] summed over checkpoints
    (t = -1). Rows are taken one by one from the 3-d array so each stays a contiguous 1-d view: a strided 2-d
    slice made numba's adds 1.4x slower (speed counts 12.6 -> 17.5 ms, bench/bench_metrics.py)."""
    m = words.shape[1] if p < 0 else words.shape[0]
    acc = np.zeros((8, words.shape[2]), np.uint64)
    for i in range(m):
        if p < 0:
            swar_add(acc, words[t, i])
        else:
            swar_add(acc, words[i, p])
        if i % FLUSH == FLUSH - 1:
            swar_flush(acc, out, out.shape[0])
    swar_flush(acc, out, out.shape[0])


@njit(parallel=True, cache=False)
def _tpa_counts_kernel(words, n):
    """int32 [T, N]: how many networks are right on example n at checkpoint t."""
    out = np.zeros((words.shape[0], n), np.int32)
    for t in prange(words.shape[0]):
        _sum_rows(words, t, -1, out[t])
    return out


def counts_out(rows: int, n: int, most: int) -> np.ndarray:
    """A zeroed [rows, N] output for counts up to `most`: uint16 when they fit (half the bytes of int32), touched
    here in one thread. First-touch page faults taken inside a parallel kernel cost more than the counting: a
    40 MB int32 output took 16 ms to fill in a 2-thread numba loop against 7 ms for all of speed counts' adds."""
    out = np.empty((rows, n), np.uint16 if most < 1 << 16 else np.int32)
    out.fill(0)
    return out


@njit(parallel=True, cache=False)
def _speed_counts_kernel(words, out):
    """out [P, N] += at how many checkpoints network p is right on example n."""
    for p in prange(words.shape[1]):
        _sum_rows(words, -1, p, out[p])
    return out


@njit(parallel=True, cache=False)
def _learned_at_kernel(words, out):
    """out [P, N] (zeroed) = the first checkpoint from which network p stays right on example n (T when never):
    T minus the number of trailing checkpoints at which it is right."""
    t_, p_, w_ = words.shape
    n = out.shape[1]
    for p in prange(p_):
        acc = np.zeros((8, w_), np.uint64)
        stay = np.full(w_, _ALL)
        for i, t in enumerate(range(t_ - 1, -1, -1)):
            for w in range(w_):
                stay[w] &= words[t, p, w]
            swar_add(acc, stay)
            if i % FLUSH == FLUSH - 1:
                swar_flush(acc, out[p], n)
        swar_flush(acc, out[p], n)
        for j in range(n):
            out[p, j] = t_ - out[p, j]
    return out


@njit(parallel=True, cache=False)
def _forgetting_kernel(words, events, never):
    """events [P, N] (zeroed) += right at checkpoint t-1 and wrong at t; never [P, N] = never right."""
    t_, p_, w_ = words.shape
    n = events.shape[1]
    for p in prange(p_):
        acc = np.zeros((8, w_), np.uint64)
        seen = words[0, p].copy()
        lost = np.empty(w_, np.uint64)
        for t in range(1, t_):
            for w in range(w_):
                lost[w] = words[t - 1, p, w] & ~words[t, p, w]
                seen[w] |= words[t, p, w]
            swar_add(acc, lost)
            if t % FLUSH == FLUSH - 1:
                swar_flush(acc, events[p], n)
        swar_flush(acc, events[p], n)
        for w in range(w_):
            base, word = w * 64, seen[w]
            for b in range(min(64, n - base)):
                never[p, base + b] = ((word >> np.uint64(b)) & _ONE) == 0
    return events, never


@njit(parallel=True, cache=False)
def _right_counts_kernel(words):
    """int64 [T, P]: examples each network gets right at each checkpoint (a popcount of its row)."""
    t_, p_, w_ = words.shape
    out = np.zeros((t_, p_), np.int64)
    for tp in prange(t_ * p_):
        t, p = tp // p_, tp % p_
        c = np.uint64(0)
        for w in range(w_):
            c += popcount(words[t, p, w])
        out[t, p] = c
    return out


@njit(parallel=True, cache=False)
def _both_correct_kernel(words):
    """int64 [P, P]: examples that both networks get right, from words [P, W] at one checkpoint."""
    p_, w_ = words.shape
    out = np.zeros((p_, p_), np.int64)
    for i in prange(p_):
        for j in range(i, p_):
            c = np.uint64(0)
            for w in range(w_):
                c += popcount(words[i, w] & words[j, w])
            out[i, j] = c
    for i in range(p_):
        for j in range(i):
            out[i, j] = out[j, i]
    return out


@njit(cache=True)
def _poisson_binomial_kernel(q):
    """PMF of a sum of independent Bernoulli(q[i]): the DP pmf'[k] = pmf[k](1 - q) + pmf[k-1] q, a convex
    combination at every step, so it stays stable (no cancellation) for P up to 10^5 and beyond."""
    pmf = np.zeros(len(q) + 1)
    pmf[0] = 1.0
    for i in range(len(q)):
        qi = q[i]
        for k in range(i + 1, 0, -1):
            pmf[k] = pmf[k] * (1.0 - qi) + pmf[k - 1] * qi
        pmf[0] *= 1.0 - qi
    return pmf
