"""Statistics on plain arrays, in numpy alone (scipy.stats alone takes ~0.7 s to import): the binomial and
Poisson-binomial nulls (one, or one per row for the class-conditional null), average ranks, Spearman's rank
correlation, Fleiss' kappa, and percentile intervals."""

from __future__ import annotations

import numpy as np

from ..errors import UsageError

# Above this many networks the O(P^2) Poisson-binomial DP runs in numba (numpy's per-network loop is ~10 us a step).
POISSON_BINOMIAL_NUMPY_MAX = 4000


def binomial_pmf(p: int, mean_accuracy: float) -> np.ndarray:
    """float64 [P + 1]: Binomial(P, mean accuracy), the null of P identical, independent networks."""
    k = np.arange(p + 1)
    q = float(mean_accuracy)
    if q <= 0 or q >= 1:
        return (k == (p if q >= 1 else 0)).astype(np.float64)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, p + 1)))])
    log_pmf = log_fact[p] - log_fact[k] - log_fact[p - k] + k * np.log(q) + (p - k) * np.log1p(-q)
    return np.exp(log_pmf)


def poisson_binomial_pmf(q) -> np.ndarray:
    """float64 [P + 1]: the count of successes of independent Bernoulli(q_p), each network with its own accuracy.
    The DP pmf'[k] = pmf[k](1 - q) + pmf[k-1] q is a convex combination at every step: stable for P up to 10^5."""
    q = np.asarray(q, np.float64)
    if q.ndim != 1 or not np.all((q >= 0) & (q <= 1)):
        raise UsageError("probabilities must be a 1-d array in [0, 1]")
    if len(q) > POISSON_BINOMIAL_NUMPY_MAX:
        from ._numba import poisson_binomial

        return poisson_binomial(q)
    pmf = np.zeros(len(q) + 1)
    pmf[0] = 1.0
    for i, qi in enumerate(q):
        pmf[1: i + 2] = pmf[1: i + 2] * (1.0 - qi) + pmf[: i + 1] * qi
        pmf[0] *= 1.0 - qi
    return pmf


def poisson_binomial_pmfs(q) -> np.ndarray:
    """float64 [C, P + 1]: the Poisson-binomial pmf of each row of q [C, P]. Up to POISSON_BINOMIAL_NUMPY_MAX
    networks the DP of poisson_binomial_pmf runs over all rows at once; above, a product tree of polynomial
    products by FFT (O(P log^2 P): P = 100,000 in well under a second), whose rounding (~1e-16 absolute) is
    clipped at 0; the two tails pmf[0] and pmf[P] are then set from their exact log-products."""
    q = np.asarray(q, np.float64)
    if q.ndim != 2 or q.shape[1] < 1 or not np.all((q >= 0) & (q <= 1)):
        raise UsageError("probabilities must be a 2-d array [C, P] in [0, 1] with P >= 1")
    c, p = q.shape
    if p <= POISSON_BINOMIAL_NUMPY_MAX:
        return _dp_rows(q)
    blocks = -(-p // 64)  # the DP within blocks of 64 networks (q = 0 pads: the factor 1), FFT products above
    qb = np.zeros((c, blocks * 64))
    qb[:, :p] = q
    polys = _dp_rows(qb.reshape(c * blocks, 64)).reshape(c, blocks, 65)
    while polys.shape[1] > 1:
        if polys.shape[1] % 2:  # pad with the polynomial 1
            one = np.zeros((c, 1, polys.shape[2]))
            one[:, :, 0] = 1.0
            polys = np.concatenate([polys, one], 1)
        size = 2 * polys.shape[2] - 1
        fast = 1 << (size - 1).bit_length()  # a power of two: sizes like 257 (prime) take Bluestein's slow path
        spec = np.fft.rfft(polys[:, 0::2], fast) * np.fft.rfft(polys[:, 1::2], fast)
        polys = np.fft.irfft(spec, fast)[..., :size]
    pmf = np.clip(polys[:, 0, : p + 1], 0.0, None)
    with np.errstate(divide="ignore"):
        pmf[:, 0] = np.exp(np.log1p(-q).sum(1))
        pmf[:, p] = np.exp(np.log(q).sum(1))
    return pmf / pmf.sum(1, keepdims=True)


def _dp_rows(q: np.ndarray) -> np.ndarray:
    """The DP of poisson_binomial_pmf over every row of q [C, P] at once."""
    c, p = q.shape
    pmf = np.zeros((c, p + 1))
    pmf[:, 0] = 1.0
    for i in range(p):
        qi = q[:, i: i + 1]
        pmf[:, 1: i + 2] = pmf[:, 1: i + 2] * (1.0 - qi) + pmf[:, : i + 1] * qi
        pmf[:, 0] *= 1.0 - qi[:, 0]
    return pmf


def percentile_interval(values, level: float = 0.95, observed: float | None = None,
                        bounds: tuple[float, float] = (-np.inf, np.inf)) -> list[float]:
    """[lo, hi]: the central `level` percentile interval of bootstrap draws, NaN draws left out ([NaN, NaN] when
    fewer than half of them are finite). With `observed`, the draws are first shifted so that their median is
    the observed value: the interval keeps their spread but not a shift that the resampling itself adds (drawing
    networks with replacement adds noise to a mean over networks, which pulls a Spearman or a containment of such
    means below the observed value), and the interval is clipped to the statistic's `bounds`."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if 2 * len(v) < np.size(values) or len(v) == 0:
        return [float("nan"), float("nan")]
    if observed is not None and np.isfinite(observed):
        v = v - np.median(v) + observed
    lo, hi = np.clip(np.percentile(v, [50 * (1 - level), 50 * (1 + level)]), *bounds)
    return [float(lo), float(hi)]


def rank(x, axis: int = -1) -> np.ndarray:
    """float64 average ranks (1-based, ties share their mean rank) along `axis`, as scipy.stats.rankdata."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    n = x.shape[-1]
    order = np.argsort(x, axis=-1, kind="stable")
    s = np.take_along_axis(x, order, -1)
    idx = np.broadcast_to(np.arange(n), s.shape)
    first = np.ones(s.shape, bool)
    first[..., 1:] = s[..., 1:] != s[..., :-1]
    last = np.ones(s.shape, bool)
    last[..., :-1] = first[..., 1:]
    start = np.maximum.accumulate(np.where(first, idx, 0), axis=-1)
    end = np.flip(np.minimum.accumulate(np.flip(np.where(last, idx, n - 1), -1), axis=-1), -1)
    ranks = np.empty(s.shape)
    np.put_along_axis(ranks, order, (start + end) / 2 + 1, -1)
    return np.moveaxis(ranks, -1, axis)


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def fleiss_kappa(counts, p: int) -> float:
    """Fleiss' kappa for N subjects rated correct/incorrect by P raters; counts [N] = raters saying correct."""
    if p < 2:
        return float("nan")
    k = np.asarray(counts, np.float64)
    agree = (k * (k - 1) + (p - k) * (p - k - 1)) / (p * (p - 1))
    p1 = k.sum() / (len(k) * p)
    pe = p1**2 + (1 - p1) ** 2
    return float((agree.mean() - pe) / (1 - pe)) if pe < 1 - 1e-12 else float("nan")
