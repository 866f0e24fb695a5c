"""In which order networks learn examples: accessibility, per-network speed, the checkpoint each example is
learned at, forgetting events, and how consistent the order is within and across populations."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from ..errors import UsageError
from .kernels import _forgetting_kernel, _learned_at_kernel, _speed_counts_kernel, counts_out
from .record import words_of


def speed_counts(src, n: int | None = None, split: str = "test") -> np.ndarray:
    """[P, N] (uint16; int32 from T = 65,536 on): at how many checkpoints network p is right on example n.
    Speed s = counts / T."""
    words, n = words_of(src, n, split)
    return _speed_counts_kernel(words, counts_out(words.shape[1], n, words.shape[0]))


def accessibility(src, n: int | None = None, split: str = "test") -> np.ndarray:
    """float64 [N]: mean over checkpoints and networks of correctness: how early and widely an example is learned."""
    words, n = words_of(src, n, split)
    t, p = words.shape[:2]
    return speed_counts(words.view(np.uint8), n).sum(0, dtype=np.int64) / (t * p)


def learned_at(src, n: int | None = None, split: str = "test") -> np.ndarray:
    """[P, N] (uint16; int32 from T = 65,536 on): first checkpoint from which network p stays right on example n;
    T when it never does."""
    words, n = words_of(src, n, split)
    return _learned_at_kernel(words, counts_out(words.shape[1], n, words.shape[0]))


def forgetting(src, n: int | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """([P, N] forgetting events (uint16; int32 from T = 65,536 on), bool [P, N] never learned). An event is right
    at checkpoint t-1 and wrong at t; an example a network never gets right has zero events and is flagged in the
    second array instead."""
    words, n = words_of(src, n, split)
    events = counts_out(words.shape[1], n, words.shape[0])
    never = np.empty(events.shape, np.bool_)
    never.fill(False)
    _forgetting_kernel(words, events, never)
    return events, never


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def split_half(speed: np.ndarray, seed: int = 0) -> dict:
    """Spearman of accessibility computed from two disjoint random halves of the networks, and its
    Spearman-Brown correction 2r / (1 + r) for the full population. speed: counts [P, N]."""
    p = len(speed)
    if p < 2:
        raise UsageError("split-half needs at least 2 networks")
    perm = np.random.default_rng(seed).permutation(p)
    r = spearman(speed[perm[: p // 2]].sum(0), speed[perm[p // 2:]].sum(0))
    return {"r": r, "spearman_brown": 2 * r / (1 + r) if r > -1 else float("nan")}


def pairwise_spearman(speed: np.ndarray, max_pairs: int = 2000, seed: int = 0) -> dict:
    """Spearman between per-network speeds s[i, :] and s[j, :] over network pairs: all pairs when there are at
    most max_pairs, else max_pairs distinct random pairs."""
    p = len(speed)
    if p < 2:
        raise UsageError("pairwise Spearman needs at least 2 networks")
    i, j = np.triu_indices(p, 1)
    if len(i) > max_pairs:
        pick = np.random.default_rng(seed).choice(len(i), max_pairs, replace=False)
        i, j = i[pick], j[pick]
    ranks = rankdata(speed, axis=1)
    z = ranks - ranks.mean(1, keepdims=True)
    norm = np.sqrt((z * z).sum(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (z[i] * z[j]).sum(1) / (norm[i] * norm[j])
    return {"mean": float(np.nanmean(r)) if np.isfinite(r).any() else float("nan"), "pairs": int(len(r))}


def containment(final_tpa_a: np.ndarray, final_tpa_b: np.ndarray, threshold: float = 0.5) -> dict:
    """Of the examples population A learns (final TPA >= threshold), the fraction B learns too, and the reverse.
    With A the weaker population, a_in_b near 1 says the stronger one learns what the weaker learns, and more."""
    if final_tpa_a.shape != final_tpa_b.shape:
        raise UsageError("containment needs the same examples in both populations")
    la, lb = final_tpa_a >= threshold, final_tpa_b >= threshold
    frac = lambda x, y: float((x & y).sum() / x.sum()) if x.any() else float("nan")  # noqa: E731
    return {"a_in_b": frac(la, lb), "b_in_a": frac(lb, la), "learned_a": int(la.sum()), "learned_b": int(lb.sum())}


def cscore(correct_words: np.ndarray, member_words: np.ndarray, n: int) -> np.ndarray:
    """float64 [N]: the accuracy, on each example, of the networks that did not train on it (NaN where every
    network did). correct_words, member_words: uint64 [P, W], the final checkpoint's bits and the membership."""
    from .kernels import _tpa_counts_kernel

    valid = np.zeros(member_words.shape[1], np.uint64)
    full, rest = divmod(n, 64)
    valid[:full] = np.uint64(0xFFFFFFFFFFFFFFFF)
    if rest:
        valid[full] = np.uint64((1 << rest) - 1)
    held_out = ~member_words & valid
    right = _tpa_counts_kernel((correct_words & held_out)[None], n)[0]
    total = _tpa_counts_kernel(held_out[None], n)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, right / np.maximum(total, 1), np.nan)
