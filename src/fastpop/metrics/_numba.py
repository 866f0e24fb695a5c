"""numba kernels on packed correctness words, uint64 [T, P, W] (W = R / 8), for records above the numpy path's size.

Private: the public functions of this package validate inputs and call these. Each kernel is serial, cached
(`cache=True`: a checkout compiles it once, later processes load it) and releases the GIL; `run_sliced` runs it on
contiguous slices of networks (or checkpoints) in threads, each writing only its own slice of the output, so
results do not depend on the thread count. (Cached kernels with `parallel=True` have crashed elsewhere when the
thread count changed; serial kernels in threads avoid the question.)
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from ._bits import FLUSH, popcount, swar_add, swar_flush

_ONE = np.uint64(1)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


def threads() -> int:
    """NUMBA_NUM_THREADS when set, else the cores this process may run on."""
    env = os.environ.get("NUMBA_NUM_THREADS")
    return int(env) if env else len(os.sched_getaffinity(0))


def run_sliced(kernel, total: int, *args, triangle: bool = False) -> None:
    """kernel(*args, lo, hi) on contiguous slices of range(total), one per thread; with `triangle`, row i costs
    total - i (an upper triangle), and the slices are cut to equal areas."""
    k = max(1, min(threads(), total))
    f = np.linspace(0, 1, k + 1)
    bounds = np.rint(total * ((1 - np.sqrt(1 - f)) if triangle else f)).astype(np.int64)
    if k == 1:
        kernel(*args, 0, total)
        return
    with ThreadPoolExecutor(k) as pool:
        for f in [pool.submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(k)]:
            f.result()


def counts_out(rows: int, n: int, most: int) -> np.ndarray:
    """A zeroed [rows, N] output for counts up to `most`: uint16 when they fit (half the bytes of int32), touched
    here in one thread. First-touch page faults taken inside the threaded kernels cost more than the counting: a
    40 MB int32 output took 16 ms to fill in a 2-thread numba loop against 7 ms for all of speed counts' adds."""
    out = np.empty((rows, n), counts_dtype(most))
    out.fill(0)
    return out


def counts_dtype(most: int):
    return np.uint16 if most < 1 << 16 else np.int32


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


@njit(cache=True, nogil=True)
def tpa_counts(words, out, lo, hi):
    """out [T, N] (int32, zeroed) for checkpoints lo..hi-1: how many networks are right on example n."""
    for t in range(lo, hi):
        _sum_rows(words, t, -1, out[t])


@njit(cache=True, nogil=True)
def speed_counts(words, out, lo, hi):
    """out [P, N] (zeroed) for networks lo..hi-1: at how many checkpoints network p is right on example n."""
    for p in range(lo, hi):
        _sum_rows(words, -1, p, out[p])


@njit(cache=True, nogil=True)
def learned_at(words, out, lo, hi):
    """out [P, N] (zeroed) = the first checkpoint from which network p stays right on example n (T when never):
    T minus the number of trailing checkpoints at which it is right."""
    t_, _, w_ = words.shape
    n = out.shape[1]
    for p in range(lo, hi):
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


@njit(cache=True, nogil=True)
def forgetting(words, events, never, lo, hi):
    """events [P, N] (zeroed) += right at checkpoint t-1 and wrong at t; never [P, N] = never right."""
    t_, _, w_ = words.shape
    n = events.shape[1]
    for p in range(lo, hi):
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


@njit(cache=True, nogil=True)
def right_counts(words, out, lo, hi):
    """out [T, P] (int64) for networks lo..hi-1: examples each network gets right (a popcount of its row)."""
    t_, _, w_ = words.shape
    for t in range(t_):
        for p in range(lo, hi):
            c = np.uint64(0)
            for w in range(w_):
                c += popcount(words[t, p, w])
            out[t, p] = c


@njit(cache=True, nogil=True)
def both_correct(words, out, lo, hi):
    """out [P, P] (int64) rows lo..hi-1, upper triangle: examples both networks get right, from words [P, W]."""
    p_, w_ = words.shape
    for i in range(lo, hi):
        for j in range(i, p_):
            c = np.uint64(0)
            for w in range(w_):
                c += popcount(words[i, w] & words[j, w])
            out[i, j] = c


@njit(cache=True, nogil=True)
def poisson_binomial(q):
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
