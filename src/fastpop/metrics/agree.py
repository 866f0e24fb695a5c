"""How much networks agree, example by example: TP-agreement against the independent-error nulls, Fleiss' kappa,
and pairwise error consistency. Small records take numpy, large ones the numba kernels on packed words."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .record import DEFAULT_SPLIT, as_record
from .stats import binomial_pmf, fleiss_kappa, poisson_binomial_pmf

# All-pairs kappa takes numpy's float32 GEMM (exact: counts below 2^24) up to this many multiply-adds (P^2 N):
# ~0.15 s on 2 cores at the limit, less than loading numba and its kernels in a fresh process (~1 s).
KAPPA_NUMPY_MAX_MACS = 1 << 33


@dataclass(frozen=True)
class TPA:
    """counts int32 [T, N]: networks right on example n at checkpoint t, of `networks` P."""
    split: str
    counts: np.ndarray
    networks: int

    @property
    def tpa(self) -> np.ndarray:
        """float64 [T, N]: TP-agreement, the fraction of networks right."""
        return self.counts / self.networks


@dataclass(frozen=True)
class Accuracy:
    """values float64 [T, P]: each network's accuracy at each checkpoint."""
    split: str
    values: np.ndarray


@dataclass(frozen=True)
class Agreement:
    """Scalars of one checkpoint (see `agreement_summary`)."""
    split: str
    checkpoint: int
    summary: dict


@dataclass(frozen=True)
class ErrorConsistency:
    """kappa float64 [P, P] at one checkpoint; `summary` over the off-diagonal pairs."""
    split: str
    checkpoint: int
    kappa: np.ndarray

    @property
    def summary(self) -> dict:
        return kappa_summary(self.kappa)


def tpa_counts(src, n: int | None = None, split: str = DEFAULT_SPLIT) -> TPA:
    """How many networks are right on each example at each checkpoint. src: bool [T, P, N] / [P, N], packed
    uint8 [T, P, R] with n, or a Run (its `split`)."""
    rec = as_record(src, n, split)
    if rec.small:
        counts = rec.dense().sum(1, dtype=np.int32)
    else:
        from . import _numba

        counts = np.zeros((rec.t, rec.n), np.int32)
        _numba.run_sliced(_numba.tpa_counts, rec.t, rec.words(), counts)
    return TPA(rec.split, counts, rec.p)


def accuracy(src, n: int | None = None, split: str = DEFAULT_SPLIT) -> Accuracy:
    """Each network's accuracy at each checkpoint: a popcount of its row."""
    rec = as_record(src, n, split)
    if rec.small:
        right = rec.dense().sum(-1, dtype=np.int64)
    else:
        from . import _numba

        right = np.zeros((rec.t, rec.p), np.int64)
        _numba.run_sliced(_numba.right_counts, rec.p, rec.words(), right)
    return Accuracy(rec.split, right / rec.n)


def agreement(src, n: int | None = None, split: str = DEFAULT_SPLIT, checkpoint: int = -1) -> Agreement:
    """The agreement scalars of one checkpoint (default the last) of a record."""
    full = as_record(src, n, split)
    rec = full.checkpoint(checkpoint)
    summary = agreement_summary(tpa_counts(rec).counts[0], accuracy(rec).values[0])
    return Agreement(rec.split, checkpoint % full.t, summary)


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
    out["count0"], out["count1"] = int(round(hist[0] * n)), int(round(hist[p] * n))
    for name, pmf in nulls.items():
        out[f"mass0_{name}"] = float(pmf[0])
        out[f"mass1_{name}"] = float(pmf[p])
        out[f"tv_{name}"] = float(0.5 * np.abs(hist - pmf).sum())
    return {k: int(v) if k in ("P", "N", "count0", "count1") else float(v) for k, v in out.items()}


def error_consistency(src, n: int | None = None, split: str = DEFAULT_SPLIT, t: int = -1) -> ErrorConsistency:
    """kappa_ij = (c_obs - c_exp) / (1 - c_exp) at checkpoint t, where c_obs is the fraction of examples on which
    networks i and j are both right or both wrong and c_exp = a_i a_j + (1 - a_i)(1 - a_j); kappa = 1 where
    c_obs = 1. Both-right counts: a float GEMM on small records, popcounts of ANDed words on large ones."""
    full = as_record(src, n, split)
    rec = full.checkpoint(t)
    n, p = rec.n, rec.p
    if p * p * n <= KAPPA_NUMPY_MAX_MACS and n < 1 << 24:
        c = rec.dense()[0].astype(np.float32)
        both = (c @ c.T).astype(np.int64)
    else:
        from . import _numba

        both = np.zeros((p, p), np.int64)
        _numba.run_sliced(_numba.both_correct, p, rec.words()[0], both, triangle=True)
        both = np.triu(both) + np.triu(both, 1).T
    right = np.diag(both).astype(np.float64)
    both_wrong = n - right[:, None] - right[None, :] + both
    c_obs = (both + both_wrong) / n
    a = right / n
    c_exp = np.outer(a, a) + np.outer(1 - a, 1 - a)
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = (c_obs - c_exp) / (1 - c_exp)
    kappa[c_obs >= 1] = 1.0
    return ErrorConsistency(rec.split, t % full.t, kappa)


def kappa_summary(kappa: np.ndarray) -> dict:
    """Mean, median, std, min and max of the off-diagonal pairs (NaN when P = 1), and the number of pairs."""
    iu = np.triu_indices(len(kappa), 1)
    v = kappa[iu]
    if v.size == 0:
        return {**{k: float("nan") for k in ("mean", "median", "std", "min", "max")}, "pairs": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
            "min": float(v.min()), "max": float(v.max()), "pairs": int(v.size)}
