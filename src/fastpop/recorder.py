"""Evaluation checkpoints: every network on a whole split, reduced to packed correctness bits and per-network
loss and accuracy, in the record's layout."""

from __future__ import annotations

import numpy as np
import torch

from .archs import Arch
from .data import Split
from .population import Population, score
from .rundir import bytes_per_row

# Activation floats per evaluation chunk (16 MiB of the largest layer). Same CPU, P = 1000 in chunks of 100
# networks, the digits train split: 2^24 floats 134k net-images/s, 2^22 285k, 2^20 289k.
EVAL_FLOATS = 1 << 22

_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.int32)


def pack_bits(correct: torch.Tensor) -> np.ndarray:
    """bool [P, N] -> uint8 [P, R], R = 8 * ceil(N / 64), little bit order, padding bits zero:
    the same bytes as np.packbits(c, axis=-1, bitorder="little") padded with zero bytes to R."""
    p, n = correct.shape
    r = bytes_per_row(n)
    padded = torch.zeros(p, r * 8, dtype=torch.int32, device=correct.device)
    padded[:, :n] = correct
    packed = (padded.view(p, r, 8) * _BIT_WEIGHTS.to(correct.device)).sum(-1)
    return packed.to(torch.uint8).cpu().numpy()


def eval_chunk(arch: Arch, p: int) -> int:
    """Examples per evaluation chunk: a multiple of 64 (chunks start on whole words of the bit rows), sized so
    that the largest activation of `p` networks stays near EVAL_FLOATS."""
    return max(64, EVAL_FLOATS // (p * arch.activations_per_example()) // 64 * 64)


@torch.no_grad()
def evaluate(arch: Arch, backend, pop: Population, split: Split, mean: torch.Tensor, std: torch.Tensor,
             chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every network on the whole split, `chunk` networks at a time: (correctness bits uint8 [P, R] in the
    record's layout, argmax == label with ties to the lowest class index; each network's mean cross-entropy [P]
    over the examples with a label in its classes, NaN when there are none; predicted class index int64 [P, N]).
    A diverged network is wrong on every example, its loss is NaN and its predictions 0."""
    p, n = pop.p, len(split)
    device = split.y.device
    bits = torch.zeros(p, bytes_per_row(n), dtype=torch.uint8, device=device)
    pred = torch.empty(p, n, dtype=torch.int64, device=device)
    loss = torch.zeros(p, dtype=torch.float64, device=device)
    params = pop.views(pop.params)
    chunk = chunk or p
    for plo in range(0, p, chunk):
        phi = min(p, plo + chunk)
        step = eval_chunk(arch, phi - plo)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            idx = torch.arange(lo, hi, device=device).expand(phi - plo, -1).contiguous()  # the same examples
            summed, pred[plo:phi, lo:hi] = score(arch, backend, [v[plo:phi] for v in params], split.x, idx,
                                                 split.y[idx], mean, std, bits[plo:phi], lo)
            loss[plo:phi] += summed.double()
    labelled = int((split.y >= 0).sum())
    loss = loss / labelled if labelled else torch.full_like(loss, float("nan"))
    dead = pop.diverged_at >= 0
    bits[dead] = 0
    pred[dead] = 0
    loss[dead] = float("nan")
    return bits, loss.float(), pred


def record(bits: torch.Tensor, loss: torch.Tensor, n: int, pred: torch.Tensor | None = None,
           class_ids: list[int] | None = None) -> dict[str, np.ndarray]:
    """One split's checkpoint row as numpy: packed bits, loss, accuracy, and, when asked, the predicted labels
    as original class ids (uint8)."""
    packed = bits.cpu().numpy()
    rows = {"bits": packed, "loss": loss.cpu().numpy(),
            "acc": (np.bitwise_count(packed).sum(1) / n).astype(np.float32)}
    if pred is not None:
        rows["pred"] = torch.tensor(class_ids, dtype=torch.uint8, device=pred.device)[pred].cpu().numpy()
    return rows
