"""Agreement of predicted labels (for out-of-sample tests, where correctness is undefined)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .record import DEFAULT_SPLIT, is_run


@dataclass(frozen=True)
class Consensus:
    """agreement float64 [T, N]: fraction of networks whose predicted label is the example's plurality label."""
    split: str
    agreement: np.ndarray
    networks: int


def consensus_agreement(labels, split: str = DEFAULT_SPLIT) -> Consensus:
    """labels: uint8 or uint16 [T, P, N] (or [P, N]) predicted class ids, or a Run that recorded predictions.
    (Which label wins a tie does not change the fraction.)"""
    if is_run(labels):
        run, labels = labels, labels.predictions(split)
        if labels is None:
            raise UsageError(f"{run.path} recorded no predictions on its {split} split")
    labels = np.asarray(labels)
    labels = labels[None] if labels.ndim == 2 else labels
    if labels.ndim != 3 or labels.dtype not in (np.uint8, np.uint16) or min(labels.shape) == 0:
        raise UsageError(f"predicted labels must be uint8 or uint16 [T, P, N], got {labels.dtype} {labels.shape}")
    p = labels.shape[1]
    s = np.sort(labels, axis=1)  # equal labels are now runs along the network axis
    idx = np.arange(p)[None, :, None]
    new = np.ones(s.shape, bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    run_start = np.maximum.accumulate(np.where(new, idx, 0), axis=1)
    longest = (idx - run_start + 1).max(1)
    return Consensus(split, longest / p, p)


def chance_agreement(classes: int, networks: int, draws: int = 4000, seed: int = 0) -> float:
    """The mean plurality agreement of `networks` independent uniform guesses among `classes` labels (Monte Carlo
    with a fixed seed): the level consensus_agreement shows when networks agree only by chance."""
    if classes < 1 or networks < 1:
        raise UsageError("chance agreement needs at least one class and one network")
    guesses = np.random.default_rng(seed).integers(0, classes, (draws, networks))
    counts = np.zeros((draws, classes), np.int64)
    np.add.at(counts, (np.arange(draws)[:, None], guesses), 1)
    return float(counts.max(1).mean() / networks)


def chance_agreement_own(labels, draws: int = 2000, seed: int = 0) -> float:
    """The mean plurality agreement of networks that guess independently, each from its own frequencies of
    predicted labels on this split (labels: [P, N] class ids): chance for populations that collapse onto a few
    classes, where uniform guesses (chance_agreement) set the bar too low. Monte Carlo with a fixed seed
    (standard error below 0.01 at the default draws)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or min(labels.shape) == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(f"predicted labels must be integer [P, N], got {labels.dtype} {labels.shape}")
    classes, index = np.unique(labels, return_inverse=True)
    p, k = labels.shape[0], len(classes)
    freq = np.zeros((p, k))
    np.add.at(freq, (np.repeat(np.arange(p), labels.shape[1]), index.reshape(-1)), 1.0)
    cum = np.cumsum(freq / labels.shape[1], 1)
    cum[:, -1] = 1.0
    u = np.random.default_rng(seed).random((draws, p))
    guess = np.empty((draws, p), np.int64)
    for j in range(p):  # inverse CDF of network j's frequencies
        guess[:, j] = np.searchsorted(cum[j], u[:, j], side="right")
    counts = np.zeros((draws, k), np.int64)
    np.add.at(counts, (np.arange(draws)[:, None], guess), 1)
    return float(counts.max(1).mean() / p)
