"""In which order networks learn examples: accessibility, per-network speed, the checkpoint each example is
learned at, forgetting events, and how consistent the order is within and across populations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .record import DEFAULT_SPLIT, as_record, is_run, pack, row_bytes
from .stats import rank, spearman


@dataclass(frozen=True)
class Speed:
    """counts [P, N] (uint16; int32 from T = 65,536 on): at how many of the `checkpoints` T network p is right on
    example n. Speed = counts / T."""
    split: str
    counts: np.ndarray
    checkpoints: int


@dataclass(frozen=True)
class Accessibility:
    """values float64 [N]: mean correctness over checkpoints and networks."""
    split: str
    values: np.ndarray


@dataclass(frozen=True)
class LearnedAt:
    """checkpoint float32 [P, N]: the first checkpoint (0-based) from which network p stays right on example n;
    NaN when it is wrong at the last of the `checkpoints` (T). NaN, not a number like T: it cannot index a
    checkpoint, and a mean over it has to say how it treats the unlearned (np.nanmean)."""
    split: str
    checkpoint: np.ndarray
    checkpoints: int


@dataclass(frozen=True)
class Forgetting:
    """events [P, N] (uint16; int32 from T = 65,536 on): right at checkpoint t-1 and wrong at t; never bool [P, N]:
    never right (those have zero events and are counted here instead, as Toneva et al. do)."""
    split: str
    events: np.ndarray
    never: np.ndarray


@dataclass(frozen=True)
class CScore:
    """values float64 [N]: accuracy on each example of the networks that did not train on it (NaN where every
    network did); held_out int64 [N]: how many networks that is."""
    split: str
    values: np.ndarray
    held_out: np.ndarray


def _counts_dtype(t: int):
    return np.uint16 if t < 1 << 16 else np.int32


def speed_counts(src, n: int | None = None, split: str = DEFAULT_SPLIT) -> Speed:
    """At how many checkpoints each network is right on each example."""
    rec = as_record(src, n, split)
    if rec.small:
        counts = rec.dense().sum(0, dtype=_counts_dtype(rec.t))
    else:
        from . import _numba

        counts = _numba.counts_out(rec.p, rec.n, rec.t)
        _numba.run_sliced(_numba.speed_counts, rec.p, rec.words(), counts)
    return Speed(rec.split, counts, rec.t)


def accessibility(src, n: int | None = None, split: str = DEFAULT_SPLIT) -> Accessibility:
    """How early and widely each example is learned: mean correctness over checkpoints and networks."""
    speed = speed_counts(src, n, split)
    p = len(speed.counts)
    return Accessibility(speed.split, speed.counts.sum(0, dtype=np.int64) / (speed.checkpoints * p))


def learned_at(src, n: int | None = None, split: str = DEFAULT_SPLIT) -> LearnedAt:
    """The first checkpoint from which each network stays right on each example (NaN when it is not right at the
    last)."""
    rec = as_record(src, n, split)
    if rec.small:
        stays = np.logical_and.accumulate(rec.dense()[::-1], axis=0)  # right at every checkpoint from here on
        out = (rec.t - stays.sum(0)).astype(_counts_dtype(rec.t))
    else:
        from . import _numba

        out = _numba.counts_out(rec.p, rec.n, rec.t)
        _numba.run_sliced(_numba.learned_at, rec.p, rec.words(), out)
    at = out.astype(np.float32)  # exact below T = 2^24
    at[out == rec.t] = np.nan  # T: not learned by the last checkpoint
    return LearnedAt(rec.split, at, rec.t)


def forgetting(src, n: int | None = None, split: str = DEFAULT_SPLIT) -> Forgetting:
    """Forgetting events (right at checkpoint t-1, wrong at t) per network and example, and never-learned flags."""
    rec = as_record(src, n, split)
    if rec.small:
        c = rec.dense()
        events = (c[:-1] & ~c[1:]).sum(0, dtype=_counts_dtype(rec.t))
        never = ~c.any(0)
    else:
        from . import _numba

        events = _numba.counts_out(rec.p, rec.n, rec.t)
        never = np.empty(events.shape, np.bool_)
        never.fill(False)
        _numba.run_sliced(_numba.forgetting, rec.p, rec.words(), events, never)
    return Forgetting(rec.split, events, never)


def _speed_of(src, n: int | None, split: str) -> Speed:
    """A Speed from a Speed, from its counts (an integer array [P, N] other than uint8), or from any record."""
    if isinstance(src, Speed):
        return src
    if not is_run(src):
        arr = np.asarray(src)
        if arr.dtype not in (np.bool_, np.uint8):
            if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
                raise UsageError(f"speed counts must be an integer array [P, N], got {arr.dtype} {arr.shape}")
            return Speed(split, arr, 0)
    return speed_counts(src, n, split)


SPLITS = 20  # random splits split-half averages over: one split's r varies by ~0.02 between splits on digits


def split_half(src, n: int | None = None, split: str = DEFAULT_SPLIT, seed: int = 0, splits: int = SPLITS,
               draws: int = 0) -> dict:
    """Spearman of accessibility computed from two disjoint random halves of the networks, and its
    Spearman-Brown correction 2r / (1 + r) for the full population, averaged over `splits` random splits (the
    k-th from the k-th permutation of one generator seeded with `seed`), with their spread (std, min, max over
    splits); with draws > 0 also a 95% bootstrap interval over examples of the Spearman-Brown value (each draw one
    split and one resample of the examples). src: any record, a Speed, or speed counts."""
    speed = _speed_of(src, n, split)
    counts = speed.counts
    p = len(counts)
    if p < 2:
        raise UsageError("split-half needs at least 2 networks")
    if splits < 1:
        raise UsageError("split-half needs at least 1 split")
    rng = np.random.default_rng(seed)
    halves = np.empty((splits, 2, counts.shape[1]), np.int64)
    for k in range(splits):
        perm = rng.permutation(p)
        halves[k, 0] = counts[perm[: p // 2]].sum(0, dtype=np.int64)
        halves[k, 1] = counts[perm[p // 2:]].sum(0, dtype=np.int64)
    from .bootstrap import rowwise_spearman, split_half_interval

    r = rowwise_spearman(halves[:, 0].astype(np.float64), halves[:, 1].astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        sb = np.where(r > -1, 2 * r / (1 + r), np.nan)
    finite = lambda f, x: float(f(x[np.isfinite(x)])) if np.isfinite(x).any() else float("nan")  # noqa: E731
    out = {"split": speed.split, "r": finite(np.mean, r), "spearman_brown": finite(np.mean, sb),
           "r_std": finite(np.std, r), "spearman_brown_std": finite(np.std, sb),
           "spearman_brown_min": finite(np.min, sb), "spearman_brown_max": finite(np.max, sb), "splits": splits,
           "halves": [p // 2, p - p // 2]}
    if draws:
        out["spearman_brown_interval"] = split_half_interval(halves.astype(np.float64), draws, seed)
    return out


def pairwise_spearman(src, n: int | None = None, split: str = DEFAULT_SPLIT, max_pairs: int = 2000,
                      seed: int = 0) -> dict:
    """Spearman between per-network speeds s[i, :] and s[j, :] over network pairs: all pairs when there are at
    most max_pairs, else max_pairs distinct random pairs. src: any record, a Speed, or speed counts."""
    speed = _speed_of(src, n, split)
    counts = speed.counts
    p = len(counts)
    if p < 2:
        raise UsageError("pairwise Spearman needs at least 2 networks")
    i, j = np.triu_indices(p, 1)
    if len(i) > max_pairs:
        pick = np.random.default_rng(seed).choice(len(i), max_pairs, replace=False)
        i, j = i[pick], j[pick]
    used, inverse = np.unique(np.concatenate([i, j]), return_inverse=True)  # rank only the networks in a pair
    i, j = inverse[: len(i)], inverse[len(i):]
    ranks = rank(counts[used], axis=1)
    z = ranks - ranks.mean(1, keepdims=True)
    norm = np.sqrt((z * z).sum(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (z[i] * z[j]).sum(1) / (norm[i] * norm[j])
    finite = np.isfinite(r)
    return {"split": speed.split, "mean": float(r[finite].mean()) if finite.any() else float("nan"),
            "pairs": int(len(r)), "defined_pairs": int(finite.sum())}


def containment(final_tpa_a: np.ndarray, final_tpa_b: np.ndarray, threshold: float = 0.5) -> dict:
    """Of the examples population A learns (final TPA >= threshold), the fraction B learns too, and the reverse,
    with the counts behind both. With A the weaker population, a_in_b near 1 says the stronger one learns what
    the weaker learns, and more."""
    if np.shape(final_tpa_a) != np.shape(final_tpa_b):
        raise UsageError("containment needs the same examples in both populations")
    la, lb = np.asarray(final_tpa_a) >= threshold, np.asarray(final_tpa_b) >= threshold
    both = int((la & lb).sum())
    frac = lambda k, m: k / m if m else float("nan")  # noqa: E731
    return {"a_in_b": frac(both, int(la.sum())), "b_in_a": frac(both, int(lb.sum())), "learned_a": int(la.sum()),
            "learned_b": int(lb.sum()), "learned_both": both, "examples": int(la.size)}


def cscore(correct, member=None, n: int | None = None, split: str = "train") -> CScore:
    """The C-score estimate of each example from one population: the accuracy of the networks that did not train
    on it. correct and member: bool [P, N], or packed uint8 [P, R] (or their uint64 words [P, W]) with n; or a
    Run trained with --subset-fraction (its last train checkpoint and membership record)."""
    if is_run(correct):
        run = correct
        member = run.member_bits()
        if member is None:
            raise UsageError(f"{run.path} was trained without --subset-fraction: it has no membership record")
        if len(run.bits(split)) == 0:
            raise UsageError(f"{run.path} has no completed checkpoint")
        correct, n = run.bits(split)[-1], run.n(split)
    if n is None and np.asarray(correct).dtype == np.bool_:
        n = np.asarray(correct).shape[-1]
    c, m = (_as_packed_rows(x, n, name) for x, name in ((correct, "correct"), (member, "member")))
    if c.shape != m.shape:
        raise UsageError(f"correct {c.shape} and member {m.shape} must have the same shape")
    from .agree import tpa_counts

    held = pack(np.ones(n, bool)) & ~m  # padding stays zero
    right = tpa_counts(c & held, n).counts[0]
    total = tpa_counts(held, n).counts[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(total > 0, right / np.maximum(total, 1), np.nan)
    return CScore(split, values, total.astype(np.int64))


def _as_packed_rows(x, n: int | None, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.uint64:
        x = x.view(np.uint8)
    if x.dtype == np.bool_:
        return pack(x)
    if x.dtype != np.uint8 or x.ndim != 2:
        raise UsageError(f"{name} must be bool [P, N], or packed uint8 [P, R] with n; got {x.dtype} {x.shape}")
    if n is None:
        raise UsageError(f"packed {name} rows need n, the number of examples")
    if x.shape[-1] != row_bytes(n):
        raise UsageError(f"packed {name} rows have {x.shape[-1]} bytes; N = {n} needs R = {row_bytes(n)}")
    return x
