"""Evaluation checkpoints: every network on a whole split, reduced to packed correctness bits and per-network
loss and accuracy, in the record's layout."""

from __future__ import annotations

import numpy as np
import torch

from .archs import Arch
from .data import Split
from .population import Population, forward
from .rundir import bytes_per_row

EVAL_FLOATS = 1 << 24  # activation floats per evaluation chunk (64 MiB of the largest layer)

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
    """Examples per evaluation chunk, so that the largest activation of all P networks stays near EVAL_FLOATS."""
    return max(1, EVAL_FLOATS // (p * arch.activations_per_example()))


@torch.no_grad()
def evaluate(arch: Arch, backend, pop: Population, split: Split, mean: torch.Tensor, std: torch.Tensor,
             chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correctness bool [P, N] (argmax == label; ties go to the lowest class index, as torch.argmax), each
    network's mean cross-entropy [P] over the examples with a label in its classes (NaN when there are none), and
    the predicted class index int64 [P, N]; `chunk` networks at a time. A diverged network is wrong on every
    example, its loss is NaN and its predictions 0."""
    p, n = pop.p, len(split)
    correct = torch.empty(p, n, dtype=torch.bool, device=split.y.device)
    pred = torch.empty(p, n, dtype=torch.int64, device=split.y.device)
    labelled = split.y >= 0
    loss = torch.zeros(p, dtype=torch.float64, device=split.y.device)
    params = pop.views(pop.params)
    chunk = chunk or p
    for plo in range(0, p, chunk):
        phi = min(p, plo + chunk)
        step = eval_chunk(arch, phi - plo)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            idx = torch.arange(lo, hi, device=split.y.device).expand(phi - plo, -1)  # all see the same examples
            logits = forward(arch, backend, [v[plo:phi] for v in params], split.x, idx, mean, std)
            y, known = split.y[lo:hi], labelled[lo:hi]
            pred[plo:phi, lo:hi] = logits.argmax(-1)
            correct[plo:phi, lo:hi] = pred[plo:phi, lo:hi] == y  # y = -1 (unseen class) is never matched
            if known.any():
                loss[plo:phi] += backend.cross_entropy(logits[:, known], y[known]).double() * int(known.sum())
    dead = pop.diverged_at >= 0
    correct[dead] = False
    pred[dead] = 0
    loss = loss / labelled.sum() if labelled.any() else torch.full_like(loss, float("nan"))
    loss[dead] = float("nan")
    return correct, loss.float(), pred


def record(correct: torch.Tensor, loss: torch.Tensor, pred: torch.Tensor | None = None,
           class_ids: list[int] | None = None) -> dict[str, np.ndarray]:
    """One split's checkpoint row as numpy: packed bits, loss, accuracy, and, when asked, the predicted labels
    as original class ids (uint8)."""
    rows = {"bits": pack_bits(correct), "loss": loss.cpu().numpy(), "acc": correct.float().mean(1).cpu().numpy()}
    if pred is not None:
        rows["pred"] = torch.tensor(class_ids, dtype=torch.uint8, device=pred.device)[pred].cpu().numpy()
    return rows
