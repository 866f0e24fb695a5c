"""How much networks agree, example by example: TP-agreement against the independent-error nulls, Fleiss' kappa,
and pairwise error consistency."""

from __future__ import annotations

import numpy as np
from scipy.stats import binom

from ..errors import UsageError
from .kernels import _both_correct_kernel, _poisson_binomial_kernel, _right_counts_kernel, _tpa_counts_kernel
from .record import words_of


def tpa_counts(src, n: int | None = None, split: str = "test") -> np.ndarray:
    """int32 [T, N]: networks right on example n at checkpoint t. TPA = counts / P."""
    words, n = words_of(src, n, split)
    return _tpa_counts_kernel(words, n)


def accuracy(src, n: int | None = None, split: str = "test") -> np.ndarray:
    """float64 [T, P]: each network's accuracy at each checkpoint (a popcount of its row)."""
    words, n = words_of(src, n, split)
    return _right_counts_kernel(words) / n


def binomial_pmf(p: int, mean_accuracy: float) -> np.ndarray:
    """float64 [P + 1]: Binomial(P, mean accuracy), the null of P identical, independent networks."""
    return binom.pmf(np.arange(p + 1), p, mean_accuracy)


def poisson_binomial_pmf(q: np.ndarray) -> np.ndarray:
    """float64 [P + 1]: the count of successes of independent Bernoulli(q_p), each network with its own accuracy."""
    q = np.asarray(q, np.float64)
    if q.ndim != 1 or not np.all((q >= 0) & (q <= 1)):
        raise UsageError("probabilities must be a 1-d array in [0, 1]")
    return _poisson_binomial_kernel(q)


def agreement_summary(counts: np.ndarray, acc: np.ndarray) -> dict:
    """Scalars of one checkpoint from its TPA counts [N] and the networks' accuracies [P].

    mass0/mass1: fraction of examples that no / every network gets right, observed and under both nulls;
    tv_binomial/tv_poisson_binomial: total-variation distance between the observed TPA histogram and each null;
    rho: over-dispersion (Var_n TPA - v0) / (pbar (1 - pbar) - v0), v0 = sum_p a_p (1 - a_p) / P^2 the
    Poisson-binomial variance of TPA: 1 when the networks are identical, about 0 when they err independently
    (NaN when undefined: P = 1, or pbar in {0, 1});
    fleiss_kappa: networks as raters of correct/incorrect (NaN for P = 1 or a constant record).
    """
    p, n = len(acc), len(counts)
    hist = np.bincount(counts, minlength=p + 1) / n
    pbar = float(np.mean(acc))
    nulls = {"binomial": binomial_pmf(p, pbar), "poisson_binomial": poisson_binomial_pmf(acc)}
    tpa = counts / p
    v0 = float(np.sum(acc * (1 - acc))) / p**2
    denom = pbar * (1 - pbar) - v0
    rho = (float(tpa.var()) - v0) / denom if denom > 1e-12 else float("nan")
    out = {"P": p, "N": n, "mean_accuracy": pbar, "mass0": hist[0], "mass1": hist[p], "rho": rho,
           "fleiss_kappa": fleiss_kappa(counts, p)}
    for name, pmf in nulls.items():
        out[f"mass0_{name}"] = float(pmf[0])
        out[f"mass1_{name}"] = float(pmf[p])
        out[f"tv_{name}"] = float(0.5 * np.abs(hist - pmf).sum())
    return {k: float(v) if k not in ("P", "N") else int(v) for k, v in out.items()}


def fleiss_kappa(counts: np.ndarray, p: int) -> float:
    """Fleiss' kappa for N subjects rated correct/incorrect by P raters; counts [N] = raters saying correct."""
    if p < 2:
        return float("nan")
    k = np.asarray(counts, np.float64)
    agree = (k * (k - 1) + (p - k) * (p - k - 1)) / (p * (p - 1))
    p1 = k.sum() / (len(k) * p)
    pe = p1**2 + (1 - p1) ** 2
    return float((agree.mean() - pe) / (1 - pe)) if pe < 1 - 1e-12 else float("nan")


def error_consistency(src, n: int | None = None, split: str = "test", t: int = -1) -> np.ndarray:
    """float64 [P, P]: kappa_ij = (c_obs - c_exp) / (1 - c_exp) at checkpoint t, where c_obs is the fraction of
    examples on which networks i and j are both right or both wrong and c_exp = a_i a_j + (1 - a_i)(1 - a_j);
    kappa = 1 where c_obs = 1. Both-right counts come from popcounts of ANDed words."""
    words, n = words_of(src, n, split)
    if not -len(words) <= t < len(words):
        raise UsageError(f"checkpoint {t} out of range: the record has {len(words)}")
    both = _both_correct_kernel(np.ascontiguousarray(words[t]))
    right = np.diag(both).astype(np.float64)
    both_wrong = n - right[:, None] - right[None, :] + both
    c_obs = (both + both_wrong) / n
    a = right / n
    c_exp = np.outer(a, a) + np.outer(1 - a, 1 - a)
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = (c_obs - c_exp) / (1 - c_exp)
    kappa[c_obs >= 1] = 1.0
    return kappa


def kappa_summary(kappa: np.ndarray) -> dict:
    """Mean, median, std, min and max of the off-diagonal pairs (NaN when P = 1)."""
    iu = np.triu_indices(len(kappa), 1)
    v = kappa[iu]
    if v.size == 0:
        return {k: float("nan") for k in ("mean", "median", "std", "min", "max")}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
            "min": float(v.min()), "max": float(v.max())}
