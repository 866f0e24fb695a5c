"""Agreement of predicted labels (for out-of-sample tests, where correctness is undefined)."""

from __future__ import annotations

import numpy as np

from ..errors import UsageError


def consensus_agreement(labels: np.ndarray) -> np.ndarray:
    """float64 [T, N]: fraction of networks whose predicted label equals the plurality label of the example.
    labels: uint8 [T, P, N]. (Which label wins a tie does not change the fraction.)"""
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.dtype != np.uint8:
        raise UsageError(f"predicted labels must be uint8 [T, P, N], got {labels.dtype} {labels.shape}")
    t, p, n = labels.shape
    counts = np.zeros((t, 256, n), np.int32)
    for k in range(p):  # one pass over networks; memory stays [T, 256, N]
        np.add.at(counts, (np.arange(t)[:, None], labels[:, k], np.arange(n)[None, :]), 1)
    return counts.max(1) / p
