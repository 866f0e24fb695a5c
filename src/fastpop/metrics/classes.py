"""Agreement beyond what the classes explain: the class-conditional independent-error null, and over-dispersion
and Fleiss' kappa measured within classes.

Networks that err independently but share class-level effects (one class is hard for all; a population that
collapses onto a few classes is right only on those) agree more than the binomial and Poisson-binomial nulls
allow. The class-conditional null keeps each network's accuracy on each class: within class c, the count of
networks right is Poisson-binomial with network p right with probability a[p, c]; the null is the mixture over
classes weighted by their share of the examples. Within-class rho and kappa measure the agreement left after the
class effects: about 0 for networks that err independently at given per-class accuracies.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from .stats import poisson_binomial_pmfs


def class_index(labels, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes [C], index [N] of each example's class in `classes`) of integer labels [N]."""
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(f"labels must be an integer array [N] with N = {n}, got {labels.dtype} {labels.shape}")
    classes, index = np.unique(labels, return_inverse=True)
    return classes, index.reshape(-1)


def class_accuracy(correct: np.ndarray, index: np.ndarray, classes: int) -> np.ndarray:
    """float64 [P, C]: each network's accuracy on each class's examples. correct bool [P, N]."""
    right = np.zeros((len(correct), classes))
    for c in range(classes):  # a boolean column pick per class: no [P, N] float copy of the record
        right[:, c] = correct[:, index == c].sum(1)
    return right / np.bincount(index, minlength=classes)


def class_conditional_summary(counts: np.ndarray, class_acc: np.ndarray, index: np.ndarray) -> dict:
    """Scalars of one checkpoint against the class-conditional null, from the TPA counts [N], every network's
    per-class accuracy [P, C] (class_accuracy) and each example's class [N] (class_index).

    mass0/mass1 under the null: sum_c w_c prod_p (1 - a[p, c]) and sum_c w_c prod_p a[p, c], w_c = N_c / N;
    tv: total-variation distance between the observed TPA histogram and the null;
    rho_within: sum_c N_c (Var_{n in c} TPA - v0_c) / sum_c N_c (pbar_c (1 - pbar_c) - v0_c), v0_c =
    sum_p a[p, c] (1 - a[p, c]) / P^2: over-dispersion measured within classes (1: identical networks; about 0:
    independent errors at the given per-class accuracies; NaN when undefined);
    kappa_within: Fleiss' kappa with the chance agreement taken per class, (Po - Pe) / (1 - Pe), Po the mean over
    examples of the fraction of network pairs that agree, Pe = sum_c w_c (pbar_c^2 + (1 - pbar_c)^2).
    """
    p, n = class_acc.shape[0], len(counts)
    sizes = np.bincount(index, minlength=class_acc.shape[1])
    w = sizes / n
    pmf = (w[:, None] * poisson_binomial_pmfs(class_acc.T)).sum(0)
    hist = np.bincount(counts, minlength=p + 1) / n
    tpa = counts / p
    mean_c = np.bincount(index, tpa, len(sizes)) / sizes
    var_c = np.bincount(index, tpa * tpa, len(sizes)) / sizes - mean_c**2
    v0_c = (class_acc * (1 - class_acc)).sum(0) / p**2
    den = float((sizes * (mean_c * (1 - mean_c) - v0_c)).sum())
    rho = float((sizes * (var_c - v0_c)).sum()) / den if den > 1e-12 * n else float("nan")
    kappa = float("nan")
    if p > 1:
        k = counts.astype(np.float64)
        po = float(((k * (k - 1) + (p - k) * (p - k - 1)) / (p * (p - 1))).mean())
        pe = float((w * (mean_c**2 + (1 - mean_c) ** 2)).sum())
        kappa = (po - pe) / (1 - pe) if pe < 1 - 1e-12 else float("nan")
    return {"classes": int(len(sizes)), "mass0_class_conditional": float(pmf[0]),
            "mass1_class_conditional": float(pmf[p]), "tv_class_conditional": float(0.5 * np.abs(hist - pmf).sum()),
            "rho_within_class": rho, "kappa_within_class": kappa}


def class_conditional(correct, labels) -> dict:
    """class_conditional_summary of a bool record [P, N] with integer labels [N]."""
    correct = np.asarray(correct)
    if correct.dtype != np.bool_ or correct.ndim != 2 or min(correct.shape) == 0:
        raise UsageError(f"correctness must be bool [P, N], got {correct.dtype} {correct.shape}")
    classes, index = class_index(labels, correct.shape[1])
    return class_conditional_summary(correct.sum(0, dtype=np.int64), class_accuracy(correct, index, len(classes)),
                                     index)
