"""Getting packed correctness words out of whatever the caller has: a Run (duck-typed, so this package needs no
torch) or a uint8 array [T, P, R] with its N."""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ._bits import as_words


def words_of(src, n: int | None = None, split: str = "test") -> tuple[np.ndarray, int]:
    """(uint64 [T, P, W], N) from a Run (its `split`) or from packed bits uint8 [T, P, R] and n."""
    if hasattr(src, "bits") and hasattr(src, "n"):
        bits, n = src.bits(split), src.n(split)
        if len(bits) == 0:
            raise UsageError(f"{src.path} has no completed checkpoint")
    else:
        bits = src
        if n is None:
            raise UsageError("n (examples in the split) is required with a bare bits array")
    bits = np.asarray(bits)
    if bits.ndim != 3:
        raise UsageError(f"bits must be [T, P, R], got shape {bits.shape}")
    if min(bits.shape[:2]) == 0 or n < 1:
        raise UsageError(f"empty record: shape {bits.shape}, N = {n}")
    return as_words(bits, n), n
