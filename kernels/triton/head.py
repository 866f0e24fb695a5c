"""Population head: global average pool + linear + cross-entropy, forward and backward; in evaluation the same
launch emits argmax == label as packed correctness bits in the record's layout, and the predictions (the scoring
helpers of loss.py, shared with the cross-entropy after dense layers).

One program per network walks its whole batch, so each network's loss, weight and bias gradients are reduced
inside one program: deterministic, no atomics. Labels < 0 (classes the network was not trained on) count as
wrong and are left out of the loss.
"""

import triton
import triton.language as tl

from .loss import blocks as _loss_blocks, dlogits, labelled_count, score_rows


@triton.jit
def _head_fwd_kernel(h_ptr,  # fp32 [P, B, S, C] last conv output, S = H*W pixels
                     w_ptr,  # fp32 [P, K, C]
                     b_ptr,  # fp32 [P, K]
                     y_ptr,  # int64 [P, B] labels, -1 outside the network's classes
                     g_ptr,  # fp32 [P, B, C] pooled features (saved for backward)
                     logits_ptr,  # fp32 [P, B, K] (saved for backward)
                     loss_ptr,  # fp32 [P] mean loss over labelled examples; with EVAL their summed loss
                     bits_ptr,  # uint8 [P, ROW_BYTES] correctness bits, bit n of byte n // 8 (EVAL)
                     pred_ptr,  # int64 [P, B] argmax (EVAL)
                     margin_ptr, xent_ptr,  # fp32 [P, B] per-example margin and loss (PER_EXAMPLE)
                     B, S, C, K, ROW_BYTES, BIT_OFFSET, smoothing,
                     EVAL: tl.constexpr, PER_EXAMPLE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    k = tl.arange(0, BLOCK_K)
    c_ok, k_ok = c < C, k < K
    wt = tl.load(w_ptr + (p * K + k[None, :]) * C + c[:, None], mask=c_ok[:, None] & k_ok[None, :], other=0.0)
    bias = tl.load(b_ptr + p * K + k, mask=k_ok, other=0.0)
    total = tl.zeros((BLOCK_B,), tl.float32)
    count = tl.zeros((BLOCK_B,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        b_ok = bb < B
        g = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
        for s in range(0, S):
            g += tl.load(h_ptr + ((p * B + bb[:, None]) * S + s) * C + c[None, :],
                         mask=b_ok[:, None] & c_ok[None, :], other=0.0)
        g = g / S
        logits = tl.dot(g, wt, input_precision="ieee") + bias[None, :]
        logits = tl.where(k_ok[None, :], logits, float("-inf"))
        y = tl.load(y_ptr + p * B + bb, mask=b_ok, other=-1)
        loss, labelled = score_rows(logits, y, k, k_ok, b_ok, K, smoothing, p, b0, bb, B, bits_ptr, pred_ptr,
                                    margin_ptr, xent_ptr, ROW_BYTES, BIT_OFFSET, EVAL, PER_EXAMPLE, BLOCK_B)
        total += loss
        count += labelled
        if not EVAL:
            tl.store(g_ptr + (p * B + bb[:, None]) * C + c[None, :], g, mask=b_ok[:, None] & c_ok[None, :])
            tl.store(logits_ptr + (p * B + bb[:, None]) * K + k[None, :], logits,
                     mask=b_ok[:, None] & k_ok[None, :])
    if EVAL:
        tl.store(loss_ptr + p, tl.sum(total, axis=0))
    else:
        tl.store(loss_ptr + p, tl.sum(total, axis=0) / tl.maximum(tl.sum(count, axis=0), 1.0))


@triton.jit
def _head_bwd_kernel(g_ptr, logits_ptr, y_ptr,  # saved by the forward: [P, B, C], [P, B, K], int64 [P, B]
                     w_ptr,  # fp32 [P, K, C]
                     dloss_ptr,  # fp32 [P] gradient of each network's mean loss
                     dh_ptr,  # fp32 [P, B, S, C]
                     dw_ptr,  # fp32 [P, K, C]
                     db_ptr,  # fp32 [P, K]
                     B, S, C, K, smoothing,
                     BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    k = tl.arange(0, BLOCK_K)
    c_ok, k_ok = c < C, k < K
    w = tl.load(w_ptr + (p * K + k[:, None]) * C + c[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
    scale = tl.load(dloss_ptr + p) / labelled_count(y_ptr, p, B, BLOCK_B)
    dw = tl.zeros((BLOCK_K, BLOCK_C), tl.float32)
    db = tl.zeros((BLOCK_K,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        b_ok = bb < B
        y = tl.load(y_ptr + p * B + bb, mask=b_ok, other=-1)
        logits = tl.load(logits_ptr + (p * B + bb[:, None]) * K + k[None, :], mask=b_ok[:, None] & k_ok[None, :],
                         other=0.0)
        logits = tl.where(k_ok[None, :], logits, float("-inf"))  # padded classes; padded rows stay finite
        d = dlogits(logits, y, k, k_ok, b_ok, scale, K, smoothing)
        g = tl.load(g_ptr + (p * B + bb[:, None]) * C + c[None, :], mask=b_ok[:, None] & c_ok[None, :], other=0.0)
        dw += tl.dot(tl.trans(d), g, input_precision="ieee")
        db += tl.sum(d, axis=0)
        dg = tl.dot(d, w, input_precision="ieee") / S
        for s in range(0, S):
            tl.store(dh_ptr + ((p * B + bb[:, None]) * S + s) * C + c[None, :], dg,
                     mask=b_ok[:, None] & c_ok[None, :])
    tl.store(dw_ptr + (p * K + k[:, None]) * C + c[None, :], dw, mask=k_ok[:, None] & c_ok[None, :])
    tl.store(db_ptr + p * K + k, db, mask=k_ok)


def _blocks(b: int, c: int, k: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_C, BLOCK_K): BLOCK_B as in loss.blocks, every side >= 16 for tl.dot."""
    block_b, block_k = _loss_blocks(b, k, interpret)
    return block_b, max(16, triton.next_power_of_2(c)), block_k


def head_fwd(h, w, b, y, interpret, smoothing=0.0, bits=None, bit_offset=0, per_example=None):
    """h [P, B, H, W, C]; w [P, K, C]; b [P, K]; y int64 [P, B]. Training: (loss [P] label-smoothed by
    `smoothing`, g, logits). With `bits` (uint8 [P, R], evaluation): writes the batch's bits at bit_offset (a
    multiple of 8), and with per_example ((margin, xent) fp32 [P, B], contiguous) each example's margin and loss;
    returns (summed loss [P], predictions int64 [P, B])."""
    import torch

    p, bsz = h.shape[:2]
    s, c, k = h.shape[2] * h.shape[3], h.shape[4], w.shape[1]
    bb, bc, bk = _blocks(bsz, c, k, interpret)
    loss = torch.empty(p, device=h.device, dtype=torch.float32)
    evaluating = bits is not None
    if evaluating:
        assert bit_offset % 8 == 0
        pred = torch.empty(p, bsz, device=h.device, dtype=torch.int64)
        margin, xent = per_example if per_example is not None else (h, h)
        _head_fwd_kernel[(p,)](h, w, b, y, h, h, loss, bits, pred, margin, xent, bsz, s, c, k, bits.shape[1],
                               bit_offset, 0.0, EVAL=True, PER_EXAMPLE=per_example is not None, BLOCK_B=bb,
                               BLOCK_C=bc, BLOCK_K=bk)
        return loss, pred
    g = torch.empty(p, bsz, c, device=h.device, dtype=torch.float32)
    logits = torch.empty(p, bsz, k, device=h.device, dtype=torch.float32)
    _head_fwd_kernel[(p,)](h, w, b, y, g, logits, loss, h, h, h, h, bsz, s, c, k, 0, 0, float(smoothing),
                           EVAL=False, PER_EXAMPLE=False, BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk)
    return loss, g, logits


def head_bwd(g, logits, y, w, dloss, h_shape, interpret, smoothing=0.0):
    """(dh [P, B, H, W, C], dw [P, K, C], db [P, K])."""
    import torch

    p, bsz, c = g.shape
    k = w.shape[1]
    s = h_shape[2] * h_shape[3]
    bb, bc, bk = _blocks(bsz, c, k, interpret)
    dh = torch.empty(h_shape, device=g.device, dtype=torch.float32)
    dw = torch.empty_like(w)
    db = torch.empty(p, k, device=g.device, dtype=torch.float32)
    _head_bwd_kernel[(p,)](g, logits, y, w, dloss.contiguous(), dh, dw, db, bsz, s, c, k, float(smoothing),
                           BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk)
    return dh, dw, db
