"""Population cross-entropy on logits [P, B, K], forward and backward; in evaluation the same launch writes
argmax == label as packed correctness bits in the record's layout, and the predictions. The helpers here are
shared with the fused head (head.py), so both score alike.

One program per network walks its whole batch, so each network's loss is reduced inside one program: deterministic,
no atomics. Labels < 0 (classes the network was not trained on) count as wrong and are left out of the loss.
"""

import triton
import triton.language as tl


@triton.jit
def row_loss(logits, y, k, k_ok, b_ok, K, smoothing):
    """Cross-entropy of each row of logits [BLOCK_B, BLOCK_K] (padded classes at -inf) against labels y, with
    F.cross_entropy's label smoothing (target (1 - smoothing) one-hot + smoothing / K); 0 for padded rows and
    labels < 0. Returns (loss, labelled as fp32)."""
    top = tl.max(logits, axis=1)
    lse = top + tl.log(tl.sum(tl.exp(logits - top[:, None]), axis=1))
    picked = tl.sum(tl.where(k[None, :] == y[:, None], logits, 0.0), axis=1)
    mean = tl.sum(tl.where(k_ok[None, :], logits, 0.0), axis=1) / K
    labelled = b_ok & (y >= 0)
    return tl.where(labelled, lse - (1.0 - smoothing) * picked - smoothing * mean, 0.0), labelled.to(tl.float32)


@triton.jit
def store_bits(bits_ptr, pred_ptr, p, b0, bb, b_ok, logits, y, B, ROW_BYTES, BIT_OFFSET, BLOCK_B: tl.constexpr):
    """Predictions (the first maximum, as torch.argmax) of rows bb = b0 + arange(BLOCK_B) into pred [P, B], and
    pred == y as bit n of byte n // 8 of bits [P, ROW_BYTES] from bit BIT_OFFSET (a multiple of 8)."""
    pred = tl.argmax(logits, axis=1)
    tl.store(pred_ptr + p * B + bb, pred.to(tl.int64), mask=b_ok)
    right = (b_ok & (pred == y)).to(tl.int32)
    weights = 1 << tl.arange(0, 8)
    byte = tl.sum(tl.reshape(right, (BLOCK_B // 8, 8)) * weights[None, :], axis=1)
    nb = b0 // 8 + tl.arange(0, BLOCK_B // 8)
    tl.store(bits_ptr + p * ROW_BYTES + BIT_OFFSET // 8 + nb, byte.to(tl.uint8), mask=nb * 8 < B)


@triton.jit
def store_per_example(margin_ptr, xent_ptr, p, bb, b_ok, logits, y, k, loss, B):
    """Each row's true-class logit minus the largest other logit, and its cross-entropy `loss`, into margin and
    xent [P, B] (NaN for labels < 0)."""
    is_y = k[None, :] == y[:, None]
    picked = tl.sum(tl.where(is_y, logits, 0.0), axis=1)
    other = tl.max(tl.where(is_y, float("-inf"), logits), axis=1)
    labelled = y >= 0
    tl.store(margin_ptr + p * B + bb, tl.where(labelled, picked - other, float("nan")), mask=b_ok)
    tl.store(xent_ptr + p * B + bb, tl.where(labelled, loss, float("nan")), mask=b_ok)


@triton.jit
def score_rows(logits, y, k, k_ok, b_ok, K, smoothing, p, b0, bb, B, bits_ptr, pred_ptr, margin_ptr, xent_ptr,
               ROW_BYTES, BIT_OFFSET, EVAL: tl.constexpr, PER_EXAMPLE: tl.constexpr, BLOCK_B: tl.constexpr):
    """row_loss of a block of rows; in evaluation also their bits and predictions (store_bits) and, with
    PER_EXAMPLE, their margins and losses (store_per_example). Returns (loss, labelled)."""
    loss, labelled = row_loss(logits, y, k, k_ok, b_ok, K, smoothing)
    if EVAL:
        store_bits(bits_ptr, pred_ptr, p, b0, bb, b_ok, logits, y, B, ROW_BYTES, BIT_OFFSET, BLOCK_B)
        if PER_EXAMPLE:
            store_per_example(margin_ptr, xent_ptr, p, bb, b_ok, logits, y, k, loss, B)
    return loss, labelled


@triton.jit
def dlogits(logits, y, k, k_ok, b_ok, scale, K, smoothing):
    """(softmax - target) * scale for labelled rows, 0 elsewhere, the target as in row_loss; logits
    [BLOCK_B, BLOCK_K], padded at -inf."""
    top = tl.max(logits, axis=1)
    e = tl.exp(logits - top[:, None])
    soft = e / tl.sum(e, axis=1)[:, None]
    target = (k[None, :] == y[:, None]).to(tl.float32) * (1.0 - smoothing) + smoothing / K
    labelled = b_ok & (y >= 0)
    return tl.where(labelled[:, None] & k_ok[None, :], (soft - target) * scale, 0.0)


@triton.jit
def labelled_count(y_ptr, p, B, BLOCK_B: tl.constexpr):
    """How many of network p's B labels are >= 0, as fp32 (at least 1: a mean over none stays 0)."""
    count = tl.zeros((BLOCK_B,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        y = tl.load(y_ptr + p * B + bb, mask=bb < B, other=-1)
        count += ((bb < B) & (y >= 0)).to(tl.float32)
    return tl.maximum(tl.sum(count, axis=0), 1.0)


@triton.jit
def _ce_fwd_kernel(logits_ptr,  # fp32 [P, B, K]
                   y_ptr,  # int64 [P, B] labels, -1 outside the network's classes
                   loss_ptr,  # fp32 [P] mean loss over labelled examples; with EVAL their summed loss
                   bits_ptr,  # uint8 [P, ROW_BYTES] correctness bits (EVAL)
                   pred_ptr,  # int64 [P, B] argmax (EVAL)
                   margin_ptr, xent_ptr,  # fp32 [P, B] per-example margin and loss (PER_EXAMPLE)
                   B, K, ROW_BYTES, BIT_OFFSET, smoothing,
                   EVAL: tl.constexpr, PER_EXAMPLE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    total = tl.zeros((BLOCK_B,), tl.float32)
    count = tl.zeros((BLOCK_B,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        b_ok = bb < B
        logits = tl.load(logits_ptr + (p * B + bb[:, None]) * K + k[None, :], mask=b_ok[:, None] & k_ok[None, :],
                         other=0.0)
        logits = tl.where(k_ok[None, :], logits, float("-inf"))
        y = tl.load(y_ptr + p * B + bb, mask=b_ok, other=-1)
        loss, labelled = score_rows(logits, y, k, k_ok, b_ok, K, smoothing, p, b0, bb, B, bits_ptr, pred_ptr,
                                    margin_ptr, xent_ptr, ROW_BYTES, BIT_OFFSET, EVAL, PER_EXAMPLE, BLOCK_B)
        total += loss
        count += labelled
    if EVAL:
        tl.store(loss_ptr + p, tl.sum(total, axis=0))
    else:
        tl.store(loss_ptr + p, tl.sum(total, axis=0) / tl.maximum(tl.sum(count, axis=0), 1.0))


@triton.jit
def _ce_bwd_kernel(logits_ptr,  # fp32 [P, B, K]
                   y_ptr,  # int64 [P, B]
                   dloss_ptr,  # fp32 [P] gradient of each network's mean loss
                   dlogits_ptr,  # fp32 [P, B, K]
                   B, K, smoothing,
                   BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    scale = tl.load(dloss_ptr + p) / labelled_count(y_ptr, p, B, BLOCK_B)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        b_ok = bb < B
        ok = b_ok[:, None] & k_ok[None, :]
        logits = tl.load(logits_ptr + (p * B + bb[:, None]) * K + k[None, :], mask=ok, other=0.0)
        logits = tl.where(k_ok[None, :], logits, float("-inf"))
        y = tl.load(y_ptr + p * B + bb, mask=b_ok, other=-1)
        d = dlogits(logits, y, k, k_ok, b_ok, scale, K, smoothing)
        tl.store(dlogits_ptr + (p * B + bb[:, None]) * K + k[None, :], d, mask=ok)


def blocks(b: int, k: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_K): BLOCK_B a multiple of 8 (whole bytes of bits) and, like BLOCK_K, >= 16 for tl.dot."""
    return min(1024 if interpret else 64, max(16, triton.next_power_of_2(b))), max(16, triton.next_power_of_2(k))


def ce_fwd(logits, y, interpret, smoothing=0.0, bits=None, bit_offset=0, per_example=None):
    """logits [P, B, K]; y int64 [P, B]. Training: each network's mean loss [P], label-smoothed by `smoothing`.
    With `bits` (uint8 [P, R], evaluation): writes the batch's bits at bit_offset (a multiple of 8), and with
    per_example ((margin, xent) fp32 [P, B], contiguous) each example's margin and loss; returns (summed loss [P],
    predictions int64 [P, B])."""
    import torch

    p, bsz, k = logits.shape
    bb, bk = blocks(bsz, k, interpret)
    loss = torch.empty(p, device=logits.device, dtype=torch.float32)
    if bits is None:
        _ce_fwd_kernel[(p,)](logits, y, loss, logits, logits, logits, logits, bsz, k, 0, 0, float(smoothing),
                             EVAL=False, PER_EXAMPLE=False, BLOCK_B=bb, BLOCK_K=bk)
        return loss
    assert bit_offset % 8 == 0
    pred = torch.empty(p, bsz, device=logits.device, dtype=torch.int64)
    margin, xent = per_example if per_example is not None else (logits, logits)
    _ce_fwd_kernel[(p,)](logits, y, loss, bits, pred, margin, xent, bsz, k, bits.shape[1], bit_offset,
                         float(smoothing), EVAL=True, PER_EXAMPLE=per_example is not None, BLOCK_B=bb, BLOCK_K=bk)
    return loss, pred


def ce_bwd(logits, y, dloss, interpret, smoothing=0.0):
    """The gradient of the logits [P, B, K] from dloss [P], the gradient of each network's mean loss."""
    import torch

    p, bsz, k = logits.shape
    bb, bk = blocks(bsz, k, interpret)
    dlog = torch.empty_like(logits)
    _ce_bwd_kernel[(p,)](logits, y, dloss.contiguous(), dlog, bsz, k, float(smoothing), BLOCK_B=bb, BLOCK_K=bk)
    return dlog
