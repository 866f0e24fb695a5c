"""Population dense layer: out = x @ w.T + b, ReLU optional, as one batched GEMM with networks on grid axis 1, forward
and backward; and the flatten that feeds it from conv activations.

The first layer of an mlp reads the flattened images straight from the resident data set [N, C, H, W] by batch
index, normalizes them on the fly (GATHER) and augments them (AUG): flattening [C, H, W] is the data set's own
memory order. Weight and bias gradients are per-program partial sums over slices of the batch, reduced afterwards
in a fixed order: no atomics, reproducible bit for bit.
"""

import triton
import triton.language as tl

from .augment import apply_draws
from .reduce import rows_per_split, sum_splits


@triton.jit
def _load_x(x_ptr, idx_ptr, mean_ptr, std_ptr, aug_ptr, p, b, f, ok, B, FIN, S, W, CUT, GATHER: tl.constexpr,
            AUG: tl.constexpr):
    """Input feature f of example b of network p, fp32; 0 where not ok. GATHER: feature f of the flattened
    image, whose channel is f // S (S = H * W pixels, rows of W); AUG: of the image transformed by the example's
    draws (augment.py)."""
    if GATHER:
        n = tl.load(idx_ptr + p * B + b, mask=b < B, other=0)  # int64 example index
        if AUG:
            sy, sx, keep = apply_draws(aug_ptr, p, b, (f % S) // W, f % W, ok, B, S // W, W, CUT)
            src = (f // S) * S + sy * W + sx
        else:
            src, keep = f, ok
        raw = tl.load(x_ptr + n * FIN + src, mask=keep, other=0).to(tl.float32)
        mean = tl.load(mean_ptr + f // S, mask=keep, other=0.0)
        std = tl.load(std_ptr + f // S, mask=keep, other=1.0)
        val = tl.where(keep, (raw - mean) / std, 0.0)
    else:
        val = tl.load(x_ptr + (p * B + b) * FIN + f, mask=ok, other=0.0)
    return val


@triton.jit
def _load_dpre(dout_ptr, out_ptr, p, b, o, ok, B, FOUT, RELU: tl.constexpr):
    """Gradient at the pre-activation: dout, masked by the ReLU (out > 0) when RELU."""
    off = (p * B + b) * FOUT + o
    g = tl.load(dout_ptr + off, mask=ok, other=0.0)
    if RELU:
        g = tl.where(tl.load(out_ptr + off, mask=ok, other=0.0) > 0, g, 0.0)
    return g


@triton.jit
def _dense_fwd_kernel(x_ptr,  # fp32 [P, B, FIN], or the data set [N, C, H, W] (FIN = C*H*W) with GATHER
                      idx_ptr,  # int64 [P, B] batch indices (GATHER)
                      mean_ptr, std_ptr,  # fp32 [C] normalization (GATHER)
                      aug_ptr,  # int32 [P, B, 5] augmentation draws (AUG, with GATHER)
                      w_ptr,  # fp32 [P, FOUT, FIN]
                      b_ptr,  # fp32 [P, FOUT]
                      out_ptr,  # fp32 [P, B, FOUT]
                      B, FIN, FOUT, S, W, CUT,  # S, W: pixels and columns of an image (GATHER); CUT (AUG)
                      GATHER: tl.constexpr, AUG: tl.constexpr, RELU: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    p = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(FOUT, BLOCK_N)
    b = (tl.program_id(0) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    b_ok, o_ok = b < B, o < FOUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, FIN, BLOCK_K):
        f = k0 + tl.arange(0, BLOCK_K)
        xv = _load_x(x_ptr, idx_ptr, mean_ptr, std_ptr, aug_ptr, p, b[:, None], f[None, :],
                     b_ok[:, None] & (f < FIN)[None, :],
                     B, FIN, S, W, CUT, GATHER, AUG)
        wv = tl.load(w_ptr + (p * FOUT + o[None, :]) * FIN + f[:, None], mask=(f < FIN)[:, None] & o_ok[None, :],
                     other=0.0)
        acc += tl.dot(xv, wv, input_precision="ieee")
    acc += tl.load(b_ptr + p * FOUT + o, mask=o_ok, other=0.0)[None, :]
    if RELU:
        acc = tl.where(acc > 0, acc, tl.where(acc != acc, acc, 0.0))  # NaN stays NaN, as torch.relu
    tl.store(out_ptr + (p * B + b[:, None]) * FOUT + o[None, :], acc, mask=b_ok[:, None] & o_ok[None, :])


@triton.jit
def _dense_bwd_input_kernel(dout_ptr,  # fp32 [P, B, FOUT] gradient of the output
                            out_ptr,  # fp32 [P, B, FOUT] the output (ReLU mask)
                            w_ptr,  # fp32 [P, FOUT, FIN]
                            dx_ptr,  # fp32 [P, B, FIN]
                            B, FIN, FOUT,
                            RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    p = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(FIN, BLOCK_N)
    b = (tl.program_id(0) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    f = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    b_ok, f_ok = b < B, f < FIN
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, FOUT, BLOCK_K):
        o = k0 + tl.arange(0, BLOCK_K)
        d = _load_dpre(dout_ptr, out_ptr, p, b[:, None], o[None, :], b_ok[:, None] & (o < FOUT)[None, :], B, FOUT,
                       RELU)
        wv = tl.load(w_ptr + (p * FOUT + o[:, None]) * FIN + f[None, :], mask=(o < FOUT)[:, None] & f_ok[None, :],
                     other=0.0)
        acc += tl.dot(d, wv, input_precision="ieee")
    tl.store(dx_ptr + (p * B + b[:, None]) * FIN + f[None, :], acc, mask=b_ok[:, None] & f_ok[None, :])


@triton.jit
def _dense_bwd_weight_kernel(x_ptr, idx_ptr, mean_ptr, std_ptr, aug_ptr,  # the input, as in _dense_fwd_kernel
                             dout_ptr, out_ptr,  # as in _dense_bwd_input_kernel
                             dw_ptr,  # fp32 [P, SPLITS, FOUT, FIN] partial weight gradients
                             db_ptr,  # fp32 [P, SPLITS, FOUT] partial bias gradients
                             B, FIN, FOUT, S, W, CUT, ROWS_PER_SPLIT, SPLITS,
                             GATHER: tl.constexpr, AUG: tl.constexpr, RELU: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (tile, p, split): a BLOCK_N x BLOCK_K tile of dw [FOUT, FIN] over its slice of the batch."""
    p = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    tiles_k = tl.cdiv(FIN, BLOCK_K)
    o = (tl.program_id(0) // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    f = (tl.program_id(0) % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    o_ok, f_ok = o < FOUT, f < FIN
    lo = split * ROWS_PER_SPLIT
    hi = tl.minimum(lo + ROWS_PER_SPLIT, B)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    db = tl.zeros((BLOCK_N,), tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        b = m0 + tl.arange(0, BLOCK_M)
        b_ok = b < hi
        d = _load_dpre(dout_ptr, out_ptr, p, b[:, None], o[None, :], b_ok[:, None] & o_ok[None, :], B, FOUT, RELU)
        xv = _load_x(x_ptr, idx_ptr, mean_ptr, std_ptr, aug_ptr, p, b[:, None], f[None, :],
                     b_ok[:, None] & f_ok[None, :],
                     B, FIN, S, W, CUT, GATHER, AUG)
        acc += tl.dot(tl.trans(d), xv, input_precision="ieee")
        db += tl.sum(d, axis=0)
    base = p * SPLITS + split
    tl.store(dw_ptr + (base * FOUT + o[:, None]) * FIN + f[None, :], acc, mask=o_ok[:, None] & f_ok[None, :])
    if tl.program_id(0) % tiles_k == 0:  # one column of tiles writes the bias
        tl.store(db_ptr + base * FOUT + o, db, mask=o_ok)


@triton.jit
def _flatten_kernel(src_ptr,  # fp32 [P*B, S, C] channels last (TO_FLAT), or [P*B, C*S] (not TO_FLAT)
                    dst_ptr,  # the other layout
                    n, S, C,
                    TO_FLAT: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # element of the channels-last tensor
    ok = e < n
    row, s, c = e // (S * C), (e % (S * C)) // C, e % C
    flat = row * (S * C) + c * S + s  # nn.Flatten's (C, H, W) order
    if TO_FLAT:
        tl.store(dst_ptr + flat, tl.load(src_ptr + e, mask=ok), mask=ok)
    else:
        tl.store(dst_ptr + e, tl.load(src_ptr + flat, mask=ok), mask=ok)


def _blocks(m: int, k: int, n: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_N), each >= 16 for tl.dot on a GPU; the interpreter pays per program, so it gets
    whole layers in one program where they fit."""
    cap_m, cap_k, cap_n = (1024, 512, 512) if interpret else (32, 32, 64)
    return tuple(max(16, min(cap, triton.next_power_of_2(v))) for cap, v in ((cap_m, m), (cap_k, k), (cap_n, n)))


def _input(x, idx, gather):
    """(B, FIN, S, W) of the input: [P, B, FIN], or with gather the data set [N, C, H, W] read by idx."""
    if gather:
        return idx.shape[1], x.shape[1] * x.shape[2] * x.shape[3], x.shape[2] * x.shape[3], x.shape[3]
    return x.shape[1], x.shape[2], 1, 1


def dense_fwd(x, idx, mean, std, w, b, relu, gather, interpret, aug=None):
    """x [P, B, FIN] (or the data set with gather, then idx [P, B], mean, std [C], and aug None or (draws int32
    [P, B, 5], cutout side)); w [P, FOUT, FIN]; b [P, FOUT].
    Returns [P, B, FOUT]."""
    import torch

    p, fout, fin = w.shape
    bsz, _, s, wd = _input(x, idx, gather)
    out = torch.empty(p, bsz, fout, device=w.device, dtype=torch.float32)
    bm, bk, bn = _blocks(bsz, fin, fout, interpret)
    dummy = w
    _dense_fwd_kernel[(triton.cdiv(bsz, bm) * triton.cdiv(fout, bn), p)](
        x, idx if gather else dummy, mean if gather else dummy, std if gather else dummy, aug[0] if aug else dummy,
        w, b, out, bsz, fin, fout, s, wd, aug[1] if aug else 0, GATHER=gather, AUG=aug is not None, RELU=relu,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn)
    return out


def dense_bwd(x, idx, mean, std, w, out, dout, relu, gather, need_dx, interpret, splits=None, aug=None):
    """(dx [P, B, FIN] or None, dw [P, FOUT, FIN], db [P, FOUT])."""
    import torch

    p, fout, fin = w.shape
    bsz, _, s, wd = _input(x, idx, gather)
    dummy = w
    dx = None
    if need_dx:
        dx = torch.empty(p, bsz, fin, device=w.device, dtype=torch.float32)
        bm, bk, bn = _blocks(bsz, fout, fin, interpret)
        _dense_bwd_input_kernel[(triton.cdiv(bsz, bm) * triton.cdiv(fin, bn), p)](
            dout, out, w, dx, bsz, fin, fout, RELU=relu, BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn)
    bm, bk, bn = _blocks(bsz, fin, fout, interpret)
    tiles = triton.cdiv(fout, bn) * triton.cdiv(fin, bk)
    if splits is None:  # 256 examples per program on a GPU: one at B <= 256
        per_split = rows_per_split(bsz, bm, interpret, 256)
    else:
        per_split = triton.cdiv(triton.cdiv(bsz, splits), bm) * bm
    splits = triton.cdiv(bsz, per_split)
    dw_part = torch.empty(p, splits, fout, fin, device=w.device, dtype=torch.float32)
    db_part = torch.empty(p, splits, fout, device=w.device, dtype=torch.float32)
    _dense_bwd_weight_kernel[(tiles, p, splits)](
        x, idx if gather else dummy, mean if gather else dummy, std if gather else dummy, aug[0] if aug else dummy,
        dout, out, dw_part, db_part, bsz, fin, fout, s, wd, aug[1] if aug else 0, per_split, splits, GATHER=gather,
        AUG=aug is not None, RELU=relu, BLOCK_M=bm, BLOCK_K=bk,
        BLOCK_N=bn)
    return dx, sum_splits(dw_part, interpret), sum_splits(db_part, interpret)


def flatten_fwd(h, interpret):
    """[P, B, H, W, C] -> [P, B, C*H*W] in nn.Flatten's (C, H, W) order."""
    import torch

    p, bsz, hh, w, c = h.shape
    dst = torch.empty(p, bsz, c * hh * w, device=h.device, dtype=torch.float32)
    _flatten(h, dst, (p, bsz, hh, w, c), True, interpret)
    return dst


def flatten_bwd(dflat, shape, interpret):
    """The gradient [P, B, C*H*W] back to the channels-last shape (P, B, H, W, C)."""
    import torch

    dst = torch.empty(shape, device=dflat.device, dtype=torch.float32)
    _flatten(dflat, dst, shape, False, interpret)
    return dst


def _flatten(src, dst, shape, to_flat, interpret):
    p, bsz, hh, w, c = shape
    n = p * bsz * hh * w * c
    block = 1 << 16 if interpret else 1024
    _flatten_kernel[(triton.cdiv(n, block),)](src, dst, n, hh * w, c, TO_FLAT=to_flat, BLOCK=block)
