"""Evaluation checkpoints: every network on a whole split, reduced to packed correctness bits and per-network
loss and accuracy, in the record's layout."""

from __future__ import annotations

import numpy as np
import torch

from .archs import Arch
from .data import Split
from .ops.reference import pack_into
from .population import Population
from .rundir import bytes_per_row, pred_dtype

# Evaluation runs EVAL_EXAMPLES examples at a time (fixed, so that each network's loss is summed over the same
# partition of the split whatever P is: bit-identical alone or in company) for as many networks as keep the
# largest activation near EVAL_FLOATS. Same CPU, small-cnn, P = 1000, digits train split: 64 examples x 100
# networks 221k net-images/s, 256 x 50 243k, 256 x 25 220k, 512 x 100 149k; one chunk of 2^24 floats 115k.
EVAL_EXAMPLES = 256
EVAL_FLOATS = 1 << 22

def pack_bits(correct: torch.Tensor) -> np.ndarray:
    """bool [P, N] -> uint8 [P, R], R = 8 * ceil(N / 64), little bit order, padding bits zero:
    the same bytes as np.packbits(c, axis=-1, bitorder="little") padded with zero bytes to R."""
    bits = torch.zeros(correct.shape[0], bytes_per_row(correct.shape[1]), dtype=torch.uint8, device=correct.device)
    pack_into(bits, correct, 0)
    return bits.cpu().numpy()


@torch.no_grad()
def evaluate(arch: Arch, backend, pop: Population, split: Split, mean: torch.Tensor, std: torch.Tensor,
             chunk: int | None = None, per_example: tuple[torch.Tensor, torch.Tensor] | None = None,
             predictions: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every network on the whole split, `chunk` networks at a time: (correctness bits uint8 [P, R] in the
    record's layout, argmax == label with ties to the lowest class index; each network's mean cross-entropy [P]
    over the examples with a label in its classes, NaN when there are none; predicted class index int32 [P, N], or None unless `predictions`).
    per_example: (margin, xent) float32 [P, N] filled in the same pass (`Backend.score`). A diverged network is
    wrong on every example, its loss, margins and losses are NaN and its predictions 0."""
    p, n = pop.p, len(split)
    device = split.y.device
    bits = torch.zeros(p, bytes_per_row(n), dtype=torch.uint8, device=device)
    # int32, and only when asked: the predictions of P = 20,000 networks on 1,438 examples take 115 MB
    pred = torch.empty(p, n, dtype=torch.int32, device=device) if predictions else None
    loss = torch.zeros(p, dtype=torch.float64, device=device)
    params, stats = pop.views(pop.params), pop.stat_views()
    chunk = min(chunk or p, max(1, EVAL_FLOATS // (EVAL_EXAMPLES * backend.eval_floats(arch))))
    for plo in range(0, p, chunk):
        phi = min(p, plo + chunk)
        for lo in range(0, n, EVAL_EXAMPLES):
            hi = min(n, lo + EVAL_EXAMPLES)
            idx = torch.arange(lo, hi, device=device).expand(phi - plo, -1).contiguous()  # the same examples
            extra = None if per_example is None else tuple(t[plo:phi, lo:hi] for t in per_example)
            summed, block = backend.score(arch, [v[plo:phi] for v in params], split.x, idx, split.y[idx], mean,
                                          std, bits[plo:phi], lo, extra, [v[plo:phi] for v in stats])
            if pred is not None:
                pred[plo:phi, lo:hi] = block
            loss[plo:phi] += summed.double()
    labelled = int((split.y >= 0).sum())
    loss = loss / labelled if labelled else torch.full_like(loss, float("nan"))
    dead = pop.diverged_at >= 0
    bits[dead] = 0
    if pred is not None:
        pred[dead] = 0
    loss[dead] = float("nan")
    for t in per_example or ():
        t[dead] = float("nan")
    return bits, loss.float(), pred


def record(bits: torch.Tensor, loss: torch.Tensor, n: int, pred: torch.Tensor | None = None,
           class_ids: list[int] | None = None, margin: torch.Tensor | None = None, xent: torch.Tensor | None = None
           ) -> dict[str, np.ndarray]:
    """One split's checkpoint row as numpy: packed bits, loss, accuracy, and, when asked, the predicted labels
    as original class ids (`rundir.pred_dtype`), and the per-example margins and cross-entropies as float16."""
    packed = bits.cpu().numpy()
    rows = {"bits": packed, "loss": loss.cpu().numpy(),
            "acc": (np.bitwise_count(packed).sum(1) / n).astype(np.float32)}
    if pred is not None:
        rows["pred"] = np.asarray(class_ids, pred_dtype(class_ids))[pred.cpu().numpy()]
    for kind, values in (("margin", margin), ("xent", xent)):
        if values is not None:
            rows[kind] = values.cpu().numpy().astype(np.float16)
    return rows
