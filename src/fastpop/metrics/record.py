"""A correctness record from whatever the caller has: a bool array [T, P, N] or [P, N] (any trainer's), the packed
record uint8 [T, P, R] with its N (fastpop's layout), or a Run (duck-typed, so this package needs no torch).

A Record converts lazily to what a metric's path needs: dense bool for the numpy path (small records, where
starting numba would cost more than the whole computation), packed uint64 words for the numba kernels.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError

# Records of at most this many cells (T * P * N) take the numpy path. The slowest numpy metric (learned-at) takes
# ~60 ms at 10^7 cells on 2 cores, against about a second to load numba and the cached kernels in a fresh process
# (12 s to compile them in a fresh checkout); warm, numba wins from ~10^6-10^7 cells (bench/RESULTS.md).
NUMPY_MAX_CELLS = 1 << 24
DEFAULT_SPLIT = "test"


def row_bytes(n: int) -> int:
    """R = 8 * ceil(N / 64): a packed row is whole uint64 words."""
    return 8 * -(-n // 64)


def pack(correct) -> np.ndarray:
    """bool [..., N] -> the packed record layout uint8 [..., R]: little bit order, zero padding to whole words."""
    correct = np.asarray(correct)
    if correct.dtype != np.bool_ or correct.ndim < 1 or correct.shape[-1] < 1:
        raise UsageError(f"pack takes a bool array [..., N], got {correct.dtype} {correct.shape}")
    n = correct.shape[-1]
    out = np.zeros(correct.shape[:-1] + (row_bytes(n),), np.uint8)
    out[..., : -(-n // 8)] = np.packbits(correct, axis=-1, bitorder="little")
    return out


def unpack(bits: np.ndarray, n: int) -> np.ndarray:
    """uint8 [..., R] -> bool [..., N] (the inverse of pack)."""
    return np.unpackbits(bits, axis=-1, count=n, bitorder="little").view(np.bool_)


def is_run(src) -> bool:
    return hasattr(src, "bits") and hasattr(src, "n") and hasattr(src, "path")


class Record:
    """Correctness of P networks on N examples at T checkpoints of one split."""

    def __init__(self, split: str, n: int, dense: np.ndarray | None = None, packed: np.ndarray | None = None):
        self.split, self.n = split, n
        self._dense, self._packed = dense, packed  # bool [T, P, N] / uint8 [T, P, R]
        self.t, self.p = (dense if dense is not None else packed).shape[:2]

    @property
    def cells(self) -> int:
        return self.t * self.p * self.n

    @property
    def small(self) -> bool:
        """Whether the numpy path serves this record (see NUMPY_MAX_CELLS)."""
        return self.cells <= NUMPY_MAX_CELLS

    def dense(self) -> np.ndarray:
        """bool [T, P, N]."""
        if self._dense is None:
            self._dense = unpack(self._packed, self.n)
        return self._dense

    def packed(self) -> np.ndarray:
        """uint8 [T, P, R], C-contiguous."""
        if self._packed is None:
            self._packed = pack(self._dense)
        self._packed = np.ascontiguousarray(self._packed)
        return self._packed

    def words(self) -> np.ndarray:
        """uint64 [T, P, W], W = R / 8."""
        return self.packed().view(np.uint64)

    def checkpoint(self, t: int) -> "Record":
        """The record of checkpoint t alone ([1, P, ...]); negative t counts from the end."""
        if not -self.t <= t < self.t:
            raise UsageError(f"checkpoint {t} out of range: the record has {self.t}")
        t %= self.t
        if self._packed is not None:
            return Record(self.split, self.n, packed=self._packed[t: t + 1])
        return Record(self.split, self.n, dense=self._dense[t: t + 1])

    def networks(self, idx: np.ndarray) -> "Record":
        if self._packed is not None:
            return Record(self.split, self.n, packed=np.asarray(self._packed)[:, idx])
        return Record(self.split, self.n, dense=self._dense[:, idx])


def as_record(src, n: int | None = None, split: str = DEFAULT_SPLIT) -> Record:
    """A Record from a Run (its `split`), a bool array [T, P, N] / [P, N], or a packed uint8 array [T, P, R] /
    [P, R] with n. With an array, `split` is only a label, echoed in the results."""
    if isinstance(src, Record):
        return src
    if is_run(src):
        bits = src.bits(split)
        if len(bits) == 0:
            raise UsageError(f"{src.path} has no completed checkpoint")
        return _packed_record(bits, src.n(split), split)
    arr = np.asarray(src)
    if arr.dtype == np.bool_:
        arr = arr[None] if arr.ndim == 2 else arr
        if arr.ndim != 3 or min(arr.shape) == 0:
            raise UsageError(f"correctness must be bool [T, P, N] or [P, N] with no empty axis, got {arr.shape}")
        if n is not None and n != arr.shape[-1]:
            raise UsageError(f"n = {n} but the bool record has N = {arr.shape[-1]} examples")
        return Record(split, arr.shape[-1], dense=arr)
    if arr.dtype == np.uint8:
        if n is None:
            raise UsageError("a packed uint8 record [T, P, R] needs n, the number of examples in the split "
                             "(a bool [T, P, N] array needs none)")
        return _packed_record(arr[None] if arr.ndim == 2 else arr, n, split)
    raise UsageError("correctness must be a bool array [T, P, N] or [P, N], a packed uint8 record [T, P, R] with "
                     f"n, or a Run; got {arr.dtype} {arr.shape}")


def _packed_record(bits: np.ndarray, n: int, split: str) -> Record:
    if bits.ndim != 3:
        raise UsageError(f"a packed record is uint8 [T, P, R] or [P, R], got shape {bits.shape}")
    if min(bits.shape[:2]) == 0 or n < 1:
        raise UsageError(f"empty record: shape {bits.shape}, N = {n}")
    r = row_bytes(n)
    if bits.shape[-1] != r:
        raise UsageError(f"packed rows have {bits.shape[-1]} bytes; N = {n} needs R = {r}")
    tail = n % 64
    if tail:  # the last word of every row: its bits past N must be zero
        last = np.ascontiguousarray(bits[..., r - 8:]).view(np.uint64)
        if (last >> np.uint64(tail)).any():
            raise UsageError("packed record has nonzero padding past N: not a fastpop record, or the wrong n")
    return Record(split, n, packed=bits)
