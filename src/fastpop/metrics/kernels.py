"""numba kernels on packed correctness words, uint64 [T, P, W] (W = R / 8). Private: the public functions in
this package validate inputs and call these. Each parallel loop writes only its own slice of the output, so
results do not depend on the thread count."""

import numpy as np
from numba import njit, prange

from ._bits import add_word, extract, popcount, trailing_zeros

_ONE = np.uint64(1)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


@njit(parallel=True, cache=False)
def _tpa_counts_kernel(words, n):
    """int32 [T, N]: how many networks are right on example n at checkpoint t."""
    t_, p_, w_ = words.shape
    nplanes = 1
    while (1 << nplanes) <= p_:
        nplanes += 1
    out = np.zeros((t_, n), np.int32)
    for t in prange(t_):
        planes = np.zeros((w_, nplanes), np.uint64)
        for p in range(p_):
            for w in range(w_):
                add_word(planes, w, words[t, p, w])
        for w in range(w_):
            extract(planes, w, nplanes, out[t], w * 64, n)
    return out


@njit(parallel=True, cache=False)
def _speed_counts_kernel(words, n):
    """int32 [P, N]: at how many checkpoints network p is right on example n."""
    t_, p_, w_ = words.shape
    nplanes = 1
    while (1 << nplanes) <= t_:
        nplanes += 1
    out = np.zeros((p_, n), np.int32)
    for p in prange(p_):
        planes = np.zeros((w_, nplanes), np.uint64)
        for t in range(t_):
            for w in range(w_):
                add_word(planes, w, words[t, p, w])
        for w in range(w_):
            extract(planes, w, nplanes, out[p], w * 64, n)
    return out


@njit(parallel=True, cache=False)
def _learned_at_kernel(words, n):
    """int32 [P, N]: the first checkpoint from which network p stays right on example n (T when never)."""
    t_, p_, w_ = words.shape
    out = np.empty((p_, w_ * 64), np.int32)
    for p in prange(p_):
        for w in range(w_):
            stay = _ALL  # bits right at every checkpoint from t on
            for t in range(t_ - 1, -2, -1):
                now = words[t, p, w] & stay if t >= 0 else np.uint64(0)
                dropped = stay & ~now
                while dropped:
                    b = trailing_zeros(dropped)
                    out[p, w * 64 + b] = t + 1
                    dropped &= dropped - _ONE
                stay = now
                if stay == 0:
                    break
    return out[:, :n]


@njit(parallel=True, cache=False)
def _forgetting_kernel(words, n):
    """(int32 [P, N] forgetting events: right at t-1 and wrong at t; bool [P, N] never right at any checkpoint)."""
    t_, p_, w_ = words.shape
    nplanes = 1
    while (1 << nplanes) <= t_:
        nplanes += 1
    events = np.zeros((p_, n), np.int32)
    never = np.zeros((p_, w_ * 64), np.bool_)
    for p in prange(p_):
        planes = np.zeros((w_, nplanes), np.uint64)
        for w in range(w_):
            seen = words[0, p, w]
            for t in range(1, t_):
                add_word(planes, w, words[t - 1, p, w] & ~words[t, p, w])
                seen |= words[t, p, w]
            for b in range(64):
                never[p, w * 64 + b] = ((seen >> np.uint64(b)) & _ONE) == 0
            extract(planes, w, nplanes, events[p], w * 64, n)
    return events, never[:, :n]


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
