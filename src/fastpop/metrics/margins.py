"""Per-example scores from recorded margins and losses (`fastpop run --record margin,loss`): dataset cartography,
area under the margin, an EL2N-style error and margin-based forgetting. Definitions and sources: docs/metrics.md.

Inputs are float arrays [T, P, N] (or [P, N] for one checkpoint): margin = true-class logit minus the largest other
logit, xent = per-example cross-entropy, so p(true class) = exp(-xent); or a Run that recorded them. NaN entries
(a diverged network's checkpoints) are left out of the means over networks, and count as wrong (margin -inf) in
forgetting. Arrays are read in blocks of networks, so a memory-mapped float16 record never sits in memory whole.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .record import DEFAULT_SPLIT, as_record, is_run

BLOCK_CELLS = 1 << 22  # cells converted to float32 at a time (16 MB)


@dataclass(frozen=True)
class Cartography:
    """Per example, over networks: confidence = mean p(true class) over checkpoints, variability = its std over
    checkpoints, correctness = fraction of checkpoints right (None without a correctness record), all float64 [N].
    `networks` [N]: how many networks had finite losses at every checkpoint."""
    split: str
    confidence: np.ndarray
    variability: np.ndarray
    correctness: np.ndarray | None
    networks: np.ndarray


@dataclass(frozen=True)
class AUM:
    """values float64 [N]: area under the margin, the mean margin over checkpoints, averaged over networks."""
    split: str
    values: np.ndarray


@dataclass(frozen=True)
class EL2N:
    """values float64 [N]: mean over networks of 1 - p(true class) at one checkpoint (see el2n)."""
    split: str
    checkpoint: int
    values: np.ndarray


@dataclass(frozen=True)
class MarginForgetting:
    """events [P, N] (uint16; int32 from T = 65,536 on): times network p forgot example n (its margin fell to
    <= -delta after exceeding delta); never bool [P, N]: its margin never exceeded delta."""
    split: str
    delta: float
    events: np.ndarray
    never: np.ndarray


def _values(src, split: str, kind: str) -> np.ndarray:
    """float [T, P, N] margins or losses from an array or a Run."""
    if is_run(src):
        getter = {"margin": "margins", "loss": "example_losses"}[kind]
        arr = getattr(src, getter)(split)
        if arr is None:
            raise UsageError(f"{src.path} recorded no per-example {kind} on its {split} split "
                             f"(fastpop run --record {kind})")
    else:
        arr = np.asarray(src)
        if not np.issubdtype(arr.dtype, np.floating):
            raise UsageError(f"{kind} values must be a float array [T, P, N] or [P, N], got {arr.dtype}")
    arr = arr[None] if arr.ndim == 2 else arr
    if arr.ndim != 3 or min(arr.shape) == 0:
        raise UsageError(f"{kind} values must be [T, P, N] or [P, N] with no empty axis, got {arr.shape}")
    return arr


def _blocks(arr: np.ndarray):
    """(lo, hi, float32 block [T, hi - lo, N]) over networks. float32 holds float16 records exactly, and numpy
    converts to it and takes its exp 6x and 30x faster than float64 (sums still accumulate in float64)."""
    t, p, n = arr.shape
    step = max(1, BLOCK_CELLS // (t * n))
    for lo in range(0, p, step):
        yield lo, min(p, lo + step), np.asarray(arr[:, lo: lo + step], np.float32)


def _nanmean0(x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # an example whose networks all diverged is meant to give NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, 0)


def cartography(src, split: str = DEFAULT_SPLIT, correct=None, n: int | None = None) -> Cartography:
    """Dataset cartography (Swayamdipta et al. 2020) per network over checkpoints, averaged over networks.
    src: losses float [T, P, N] (or a Run that recorded them; its bits give the correctness); correct: optional
    bool [T, P, N] or packed record with n."""
    xent = _values(src, split, "loss")
    t, p, n_ = xent.shape
    conf = np.zeros(n_)
    var = np.zeros(n_)
    nets = np.zeros(n_, np.int64)
    for _, _, block in _blocks(xent):
        prob = np.exp(-block)  # [T, b, N]
        ok = np.isfinite(prob).all(0)
        conf += np.where(ok, prob.mean(0, dtype=np.float64), 0).sum(0)
        var += np.where(ok, prob.std(0, dtype=np.float64), 0).sum(0)
        nets += ok.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf, var = conf / nets, var / nets
    if is_run(src):
        correct = src
    correctness = None
    if correct is not None:
        from .order import accessibility

        rec = as_record(correct, n, split)
        if (rec.t, rec.p, rec.n) != (t, p, n_):
            raise UsageError(f"correctness {rec.t, rec.p, rec.n} and losses {xent.shape} differ in shape")
        correctness = accessibility(rec).values
    return Cartography(split, conf, var, correctness, nets)


def aum(src, split: str = DEFAULT_SPLIT) -> AUM:
    """Area under the margin (Pleiss et al. 2020): each network's mean margin over checkpoints, averaged over the
    networks. src: margins float [T, P, N], or a Run that recorded them."""
    margin = _values(src, split, "margin")
    total = np.zeros(margin.shape[2])
    nets = np.zeros(margin.shape[2], np.int64)
    for _, _, block in _blocks(margin):
        per_net = block.mean(0, dtype=np.float64)  # [b, N]
        ok = np.isfinite(per_net)
        total += np.where(ok, per_net, 0).sum(0)
        nets += ok.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return AUM(split, total / nets)


def el2n(src, split: str = DEFAULT_SPLIT, checkpoint: int = 0) -> EL2N:
    """EL2N-style error (after Paul et al. 2021) at one checkpoint, early in training by default (the first):
    the mean over networks of 1 - p(true class) = 1 - exp(-xent). The original score is the L2 norm of
    softmax - one-hot, which needs the whole softmax; ours is that vector's true-class coordinate, and with C
    classes the original lies between sqrt(C / (C - 1)) and sqrt(2) times it, so both rank examples alike where
    the wrong-class mass is spread alike. src: losses float [T, P, N], or a Run that recorded them."""
    xent = _values(src, split, "loss")
    if not -len(xent) <= checkpoint < len(xent):
        raise UsageError(f"checkpoint {checkpoint} out of range: the record has {len(xent)}")
    t = checkpoint % len(xent)
    err = 1 - np.exp(-np.asarray(xent[t], np.float32)).astype(np.float64)  # [P, N]
    return EL2N(split, t, _nanmean0(err))


def margin_forgetting(src, split: str = DEFAULT_SPLIT, delta: float = 0.0) -> MarginForgetting:
    """Forgetting events (Toneva et al. 2019) read from margins with a hysteresis of `delta` >= 0: an example
    counts as learned once its margin exceeds delta and as forgotten (one event) when it then falls to -delta or
    below. delta = 0 is the correctness definition (margin > 0 is right), except that an exact tie counts as wrong
    here; delta > 0 ignores flips of examples that sit on the decision boundary. src: margins [T, P, N] or a Run."""
    if not delta >= 0:
        raise UsageError(f"delta must be >= 0, got {delta}")
    margin = _values(src, split, "margin")
    t, p, n = margin.shape
    events = np.zeros((p, n), np.uint16 if t < 1 << 16 else np.int32)
    never = np.zeros((p, n), bool)
    # float32 thresholds that decide exactly as the real delta would for float32 margins: m > delta iff m > (delta
    # rounded down), and m <= -delta iff m <= -(delta rounded up)
    d32 = np.float32(delta)
    above = np.nextafter(d32, np.float32(-np.inf)) if float(d32) > delta else d32
    below = -(np.nextafter(d32, np.float32(np.inf)) if float(d32) < delta else d32)
    for lo, hi, block in _blocks(margin):
        block = np.nan_to_num(block, nan=-np.inf)
        learned = block[0] > above
        ever = learned.copy()
        for m in block[1:]:
            lost = learned & (m <= below)
            events[lo:hi] += lost
            learned = (learned & ~lost) | (m > above)
            ever |= learned
        never[lo:hi] = ~ever
    return MarginForgetting(split, float(delta), events, never)
