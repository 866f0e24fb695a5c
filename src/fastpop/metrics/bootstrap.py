"""Seeded percentile-bootstrap intervals for the headline numbers, and the chance baselines they are read against.

Two units are resampled, each with replacement:
- networks (seeds): would another draw of P seeds give the same number? Networks are resampled in G = min(P, 1000)
  random groups of equal size (one network per group up to 1,000), every statistic computed from the groups' sums,
  so a draw costs one [G] x [G, N] product whatever P. A network drawn twice agrees with itself; rho and kappa
  count that: the independent-error variance of a draw is sum_p w_p^2 a_p (1 - a_p) / P^2 and kappa's pairs
  leave out pairs of copies of one network (with weights 1 both are the plain estimators). The masses at TPA 0
  and 1 would be inflated by the copies (fewer distinct networks agree more often), so theirs are over examples.
- examples: would another draw of N examples from the same distribution give the same number? The masses, rho and
  kappa are functions of means over examples, each draw one vector of multiplicities [N].

Resampling networks also adds noise to a mean over networks (accessibility, final TPA), which pulls a Spearman
or a containment of those means below the observed value (by about one spread at P = 30); their intervals over
networks are the draws' percentiles re-centred on the observed value (median of the draws moved onto it), the
others plain percentiles. Everything is vectorized over draws (chunks of draws bounded in memory); the same seed
gives the same intervals.
"""

from __future__ import annotations

import numpy as np

from .stats import percentile_interval, rank

DRAWS, LEVEL, SEED = 1000, 0.95, 0
MAX_GROUPS = 1000
CHUNK_CELLS = 1 << 22  # draws x examples per chunk: [chunk, N] float64 arrays of 32 MB


def network_groups(p: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(order [P], starts [G]): networks order[starts[g]:starts[g + 1]] form group g; G = min(P, MAX_GROUPS)."""
    g = min(p, MAX_GROUPS)
    order = np.arange(p) if g == p else np.random.default_rng(seed).permutation(p)
    return order, np.linspace(0, p, g + 1).astype(np.int64)[:-1]


def group_sums(x: np.ndarray, order: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """float64 [G, ...]: x [P, ...] summed over each group's networks."""
    return np.add.reduceat(np.asarray(x, np.float64)[order] if len(starts) < len(x) else np.asarray(x, np.float64),
                           starts, axis=0)


# Products below this many multiply-adds take einsum's loop instead of BLAS: on 2 cores busy with other work,
# waking OpenBLAS's threads cost 25-45 ms per small product ([200, 12] x [12, 250]) against 0.1 ms in one thread.
SMALL_PRODUCT = 1 << 22


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for a [d, K] and b [K] or [K, M]."""
    if a.shape[0] * a.shape[1] * (b.shape[1] if b.ndim == 2 else 1) > SMALL_PRODUCT:
        return a @ b
    return np.einsum("ij,j->i" if b.ndim == 1 else "ij,jk->ik", a, b)


def multiplicities(rng: np.random.Generator, size: int, draws: int) -> np.ndarray:
    """float64 [draws, size]: how often each of `size` items is drawn in each of `draws` resamples of `size`
    (uniform indices counted with one bincount: 50x faster than numpy's multinomial at 1000 x 1438)."""
    idx = rng.integers(0, size, (draws, size)) + size * np.arange(draws)[:, None]
    return np.bincount(idx.ravel(), minlength=draws * size).reshape(draws, size).astype(np.float64)


def example_weights(n: int, draws: int, seed: int) -> np.ndarray:
    """float64 [draws, N]: how often each example is drawn (multinomial, N draws)."""
    return multiplicities(np.random.default_rng(seed), n, draws)


def _chunks(draws: int, n: int):
    step = max(1, CHUNK_CELLS // max(n, 1))
    return [slice(i, min(i + step, draws)) for i in range(0, draws, step)]


def _rho(var, pbar, v0):
    den = pbar * (1 - pbar) - v0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 1e-12, (var - v0) / den, np.nan)


def _kappa(po, pe):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pe < 1 - 1e-12, (po - pe) / (1 - pe), np.nan)


def agreement_intervals(correct: np.ndarray, index: np.ndarray | None = None, draws: int = DRAWS,
                        seed: int = SEED, level: float = LEVEL) -> dict:
    """Percentile intervals of one checkpoint's agreement scalars. correct bool [P, N]; index [N] each example's
    class (metrics.classes.class_index) for the within-class rho and kappa, or None. Returns {"networks": {rho,
    fleiss_kappa[, rho_within_class, kappa_within_class]: [lo, hi]}, "examples": {mass0, mass1, rho, fleiss_kappa
    [, ...within]: [lo, hi]}, draws, seed, level}."""
    correct = np.asarray(correct, bool)
    p, n = correct.shape
    counts = correct.sum(0, dtype=np.int64).astype(np.float64)
    acc = correct.mean(1)
    onehot = None
    if index is not None:
        onehot = np.zeros((n, index.max() + 1))
        onehot[np.arange(n), index] = 1.0
    out = {"draws": draws, "seed": seed, "level": level}
    draws_n = _network_draws(correct, acc, onehot, draws, seed)
    draws_e = _example_draws(correct, counts, acc, onehot, draws, seed + 1)
    out["networks"] = {k: percentile_interval(v, level) for k, v in draws_n.items()}
    out["examples"] = {k: percentile_interval(v, level) for k, v in draws_e.items()}
    return out


def _network_draws(correct, acc, onehot, draws, seed) -> dict:
    p, n = correct.shape
    order, starts = network_groups(p, seed)
    gc = group_sums(correct, order, starts).astype(np.float32)  # [G, N], exact below 2^24 networks
    size = group_sums(np.ones(p), order, starts)
    v = group_sums(acc * (1 - acc), order, starts)
    if onehot is not None:
        class_acc = _mm(correct.astype(np.float64), onehot) / onehot.sum(0)  # [P, C]
        vc = group_sums(class_acc * (1 - class_acc), order, starts)  # [G, C]
    rng = np.random.default_rng(seed)
    res = {k: np.empty(draws) for k in ("rho", "fleiss_kappa")}
    if onehot is not None:
        res.update(rho_within_class=np.empty(draws), kappa_within_class=np.empty(draws))
    for sl in _chunks(draws, n):
        w = multiplicities(rng, len(starts), sl.stop - sl.start)
        pb, qb = _mm(w, size), _mm(w * w, size)  # networks drawn, and sum of squared weights per draw
        k = _mm(w.astype(np.float32), gc).astype(np.float64)  # [d, N] networks right, copies counted
        s = _mm((w * w).astype(np.float32), gc).astype(np.float64)
        tpa = k / pb[:, None]
        pbar = tpa.mean(1)
        v0 = _mm(w * w, v) / pb**2
        res["rho"][sl] = _rho(tpa.var(1), pbar, v0)
        pairs = pb**2 - qb  # 0 when a draw holds copies of one network alone: kappa undefined (NaN)
        with np.errstate(divide="ignore", invalid="ignore"):
            po = ((k * k - s + (pb[:, None] - k) ** 2 - (qb[:, None] - s)) / pairs[:, None]).mean(1)
        res["fleiss_kappa"][sl] = _kappa(po, pbar**2 + (1 - pbar) ** 2)
        if onehot is not None:
            rho_w, kap_w = _within(tpa, onehot.sum(0)[None], _mm(tpa, onehot), _mm(tpa * tpa, onehot),
                                   _mm(w * w, vc) / pb[:, None] ** 2, po, n)
            res["rho_within_class"][sl], res["kappa_within_class"][sl] = rho_w, kap_w
    return res


def _within(tpa, sizes, sum_c, sum2_c, v0_c, po, n):
    """Within-class rho and kappa of each draw from per-class sizes, sums of TPA and of TPA^2 [d, C]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_c = np.where(sizes > 0, sum_c / sizes, 0.0)
        var_c = np.where(sizes > 0, sum2_c / sizes - mean_c**2, 0.0)
        num = (sizes * (var_c - v0_c)).sum(1)
        den = (sizes * (mean_c * (1 - mean_c) - v0_c)).sum(1)
        rho = np.where(den > 1e-12 * n, num / den, np.nan)
    pe = ((sizes / n) * (mean_c**2 + (1 - mean_c) ** 2)).sum(1)
    return rho, _kappa(po, pe)


# Above this many multiply-adds (draws x N x P) the examples bootstrap holds each network's accuracy at its
# full-sample value instead of recomputing it per draw: rho's v0 then misses a variation of order 1/(P sqrt(N)).
EXACT_ACCURACY_MAX_MACS = 1 << 31


def _example_draws(correct, counts, acc, onehot, draws, seed) -> dict:
    p, n = correct.shape
    tpa = counts / p
    agree = (counts * (counts - 1) + (p - counts) * (p - counts - 1)) / (p * (p - 1)) if p > 1 else np.ones(n)
    exact = draws * n * p <= EXACT_ACCURACY_MAX_MACS
    cf = correct.T.astype(np.float32) if exact else None
    v0_full = float((acc * (1 - acc)).sum()) / p**2
    if onehot is not None:
        class_acc = _mm(correct.astype(np.float64), onehot) / onehot.sum(0)
        v0_c = ((class_acc * (1 - class_acc)).sum(0) / p**2)[None]
    rng = np.random.default_rng(seed)
    names = ["mass0", "mass1", "rho", "fleiss_kappa"] + (["rho_within_class", "kappa_within_class"]
                                                          if onehot is not None else [])
    res = {k: np.empty(draws) for k in names}
    for sl in _chunks(draws, n):
        m = multiplicities(rng, n, sl.stop - sl.start)
        res["mass0"][sl] = _mm(m, (counts == 0).astype(np.float64)) / n
        res["mass1"][sl] = _mm(m, (counts == p).astype(np.float64)) / n
        pbar = _mm(m, tpa) / n
        var = _mm(m, tpa * tpa) / n - pbar**2
        if exact:
            a = _mm(m.astype(np.float32), cf).astype(np.float64) / n  # [d, P]
            v0 = (a * (1 - a)).sum(1) / p**2
        else:
            v0 = v0_full
        res["rho"][sl] = _rho(var, pbar, v0)
        po = _mm(m, agree) / n
        res["fleiss_kappa"][sl] = _kappa(po, pbar**2 + (1 - pbar) ** 2) if p > 1 else np.nan
        if onehot is not None:
            rho_w, kap_w = _within(tpa, _mm(m, onehot), _mm(m, onehot * tpa[:, None]),
                                   _mm(m, onehot * (tpa**2)[:, None]), v0_c, po, n)
            res["rho_within_class"][sl] = rho_w
            res["kappa_within_class"][sl] = kap_w if p > 1 else np.nan
    return res


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 [d]: Spearman's rank correlation of each row pair of a, b [d, N] (NaN where a row is constant)."""
    ra, rb = rank(a, axis=-1), rank(b, axis=-1)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    den = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (ra * rb).sum(-1) / den, np.nan)


def resample_examples(arrays: list[np.ndarray], draws: int, seed: int):
    """Yield (slice of draws, [each array [N] taken at the drawn examples: [d, N]]), the same draws for all
    arrays (paired), in chunks."""
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    for sl in _chunks(draws, n):
        idx = rng.integers(0, n, (sl.stop - sl.start, n))
        yield sl, [x[idx] for x in arrays]


def spearman_intervals(speed_a: np.ndarray, speed_b: np.ndarray, draws: int = DRAWS, seed: int = SEED,
                       level: float = LEVEL) -> dict:
    """Intervals of the Spearman between two populations' accessibilities, from their speed counts [P_a, N] and
    [P_b, N]: over networks (each population's resampled on its own) and over examples (paired)."""
    mean_a, mean_b = speed_a.mean(0), speed_b.mean(0)
    rs = np.empty(draws)
    for sl, (xa, xb) in resample_examples([mean_a, mean_b], draws, seed):
        rs[sl] = rowwise_spearman(xa, xb)
    rn = np.empty(draws)
    sides = []
    for i, s in enumerate((speed_a, speed_b)):
        order, starts = network_groups(len(s), seed + i)
        sides.append((group_sums(s, order, starts), np.random.default_rng(seed + 10 + i)))
    for sl in _chunks(draws, len(mean_a)):
        a, b = (_mm(multiplicities(rng, len(g), sl.stop - sl.start), g) for g, rng in sides)
        rn[sl] = rowwise_spearman(a, b)
    obs = float(rowwise_spearman(mean_a[None], mean_b[None])[0])
    return {"networks": percentile_interval(rn, level, obs, (-1.0, 1.0)), "examples": percentile_interval(rs, level),
            "draws": draws, "seed": seed, "level": level}


def permutation_null(a: np.ndarray, b: np.ndarray, index: np.ndarray | None = None, draws: int = DRAWS,
                     seed: int = SEED) -> dict:
    """Spearman of a and b [N] against its permutation null: b's examples shuffled (within each class when
    index [N] is given: what the classes' difficulty alone gives). Returns observed, the null's mean and
    97.5th percentile, and the one-sided p-value (1 + draws at or above the observed) / (1 + draws)."""
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    if den == 0:
        return {"observed": float("nan"), "null_mean": float("nan"), "null_q975": float("nan"),
                "p_value": float("nan"), "draws": draws, "within_class": index is not None}
    n = len(a)
    rng = np.random.default_rng(seed)
    null = np.empty(draws)
    group = np.zeros(n, np.int64) if index is None else np.asarray(index)
    base = np.argsort(group, kind="stable")
    for sl in _chunks(draws, n):
        key = group[base][None] + rng.random((sl.stop - sl.start, n))  # sorted by class, random within it
        perm = np.empty((sl.stop - sl.start, n), np.int64)
        perm[:, base] = base[np.argsort(key, axis=1)]
        null[sl] = (ra[None] * rb[perm]).sum(1) / den
    obs = float((ra * rb).sum() / den)
    return {"observed": obs, "null_mean": float(null.mean()), "null_q975": float(np.percentile(null, 97.5)),
            "p_value": float((1 + (null >= obs - 1e-12).sum()) / (1 + draws)), "draws": draws,
            "within_class": index is not None}


def containment_expected(learned_a: np.ndarray, learned_b: np.ndarray, index: np.ndarray | None = None) -> dict:
    """Containment's value under independent overlap of the two learned sets [N] (bool): of A's learned examples,
    B holds the fraction |B| / N when the sets are independent; within classes, sum_c |A_c| |B_c| / N_c over |A|
    (what the classes' difficulty alone gives)."""
    la, lb = np.asarray(learned_a, bool), np.asarray(learned_b, bool)
    n = len(la)
    frac = lambda k, m: float(k / m) if m else float("nan")  # noqa: E731
    out = {"a_in_b": frac(lb.sum(), n), "b_in_a": frac(la.sum(), n)}
    if index is not None:
        sizes = np.bincount(index)
        ca, cb = np.bincount(index, la, len(sizes)), np.bincount(index, lb, len(sizes))
        both = float((ca * cb / np.maximum(sizes, 1)).sum())
        out.update(a_in_b_within_class=frac(both, la.sum()), b_in_a_within_class=frac(both, lb.sum()))
    return out


def containment_intervals(final_a: np.ndarray, final_b: np.ndarray, threshold: float, draws: int = DRAWS,
                          seed: int = SEED, level: float = LEVEL) -> dict:
    """Intervals of containment (a_in_b, b_in_a) from each population's final correctness bool [P, N]: over
    networks (each population resampled on its own, learned = resampled final TPA >= threshold) and over
    examples (paired)."""
    def fractions(la, lb):
        both = (la & lb).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return both / la.sum(-1), both / lb.sum(-1)

    n = final_a.shape[1]
    la, lb = final_a.mean(0) >= threshold, final_b.mean(0) >= threshold
    ex = np.empty((2, draws))
    for sl, (xa, xb) in resample_examples([la, lb], draws, seed):
        ex[0, sl], ex[1, sl] = fractions(xa, xb)
    nets = np.empty((2, draws))
    sides = []
    for i, c in enumerate((final_a, final_b)):
        order, starts = network_groups(len(c), seed + i)
        sides.append((group_sums(c, order, starts), group_sums(np.ones(len(c)), order, starts),
                      np.random.default_rng(seed + 10 + i)))
    for sl in _chunks(draws, n):
        ws = [multiplicities(rng, len(size), sl.stop - sl.start) for _, size, rng in sides]
        learned = [_mm(w, g) / _mm(w, size)[:, None] >= threshold for w, (g, size, _) in zip(ws, sides)]
        nets[0, sl], nets[1, sl] = fractions(*learned)
    obs = fractions(la, lb)
    return {"networks": {"a_in_b": percentile_interval(nets[0], level, obs[0], (0.0, 1.0)),
                         "b_in_a": percentile_interval(nets[1], level, obs[1], (0.0, 1.0))},
            "examples": {"a_in_b": percentile_interval(ex[0], level), "b_in_a": percentile_interval(ex[1], level)},
            "draws": draws, "seed": seed, "level": level}


def split_half_interval(halves: np.ndarray, draws: int = DRAWS, seed: int = SEED, level: float = LEVEL) -> list:
    """Interval of the Spearman-Brown split-half over examples: draw b resamples the examples and takes split
    b mod K of halves [K, 2, N] (each half's summed speed counts), so it carries both the split's and the
    examples' variation."""
    k = len(halves)
    sb = np.empty(draws)
    n = halves.shape[-1]
    rng = np.random.default_rng(seed)
    for sl in _chunks(draws, n):
        pick = np.arange(sl.start, sl.stop) % k
        idx = rng.integers(0, n, (sl.stop - sl.start, n))
        r = rowwise_spearman(np.take_along_axis(halves[pick, 0], idx, 1), np.take_along_axis(halves[pick, 1], idx, 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            sb[sl] = np.where(r > -1, 2 * r / (1 + r), np.nan)
    return percentile_interval(sb, level)
