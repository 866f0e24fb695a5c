"""Population K x K convolution (padding K // 2, K odd, stride 1 or 2) with bias, ReLU and an optional 2x2 max or
average pool fused, forward and backward; or the plain conv (no bias, no ReLU) whose output a BatchNorm takes
(batchnorm.py).

Layout: activations [P, B, H, W, C] contiguous, channels last within each network, so the C inputs of one pixel
are one contiguous run (coalesced loads along K of the implicit GEMM). Networks are grid axis 1: one launch
serves all P. The first layer reads its images straight from the resident data set [N, C, H, W] through the
batch indices [P, B] and normalizes them on the fly (GATHER), so no [P, B, C, H, W] batch is ever built.

Pooling saves one int8 per pooled output: with a max pool, which of the 4 window positions won (the first maximum,
as nn.MaxPool2d); with an average pool, a 4-bit mask of the positions whose ReLU let the gradient through.
Backward rebuilds the gradient at the pre-activation from it (and, for max, the pooled value's sign) inside the
loads of the input-gradient and weight-gradient kernels. Weight gradients are per-program partial sums over slices
of the B*H*W output pixels, reduced afterwards in a fixed order: no atomics, reproducible bit for bit.
"""

import triton
import triton.language as tl

from .augment import apply_draws
from .reduce import rows_per_split, sum_splits

POOLS = {None: 0, "max": 1, "avg": 2}  # the POOL constexpr of the kernels here and in pool.py


@triton.jit
def load_input(x_ptr, idx_ptr, mean_ptr, std_ptr, aug_ptr, p, b, hi, wi, ci, ok, B, H, W, CIN, CUT,
               GATHER: tl.constexpr, AUG: tl.constexpr):
    """x at (network p, example b, pixel hi/wi, channel ci) as fp32; 0 where not ok (zero padding). GATHER reads
    the data set's image by index, normalized; AUG then transforms it by the example's draws (augment.py)."""
    if GATHER:  # one return for both branches: the compiler types every return, constexpr or not
        n = tl.load(idx_ptr + p * B + b, mask=b < B, other=0)  # int64 example index
        if AUG:
            sy, sx, keep = apply_draws(aug_ptr, p, b, hi, wi, ok, B, H, W, CUT)
        else:
            sy, sx, keep = hi, wi, ok
        raw = tl.load(x_ptr + n * (CIN * H * W) + ci * (H * W) + (sy * W + sx), mask=keep, other=0).to(tl.float32)
        mean = tl.load(mean_ptr + ci, mask=keep, other=0.0)
        std = tl.load(std_ptr + ci, mask=keep, other=1.0)
        val = tl.where(keep, (raw - mean) / std, 0.0)
    else:
        val = tl.load(x_ptr + (((p * B + b) * H + hi) * W + wi) * CIN + ci, mask=ok, other=0.0).to(tl.float32)
    return val


@triton.jit
def pool_start(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, POOL: tl.constexpr):
    """The (best, code) that `pick` folds a pool window into: -inf for max, 0 for avg (and for no pool)."""
    if POOL == 1:
        best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
    else:
        best = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    return best, tl.zeros((BLOCK_M, BLOCK_N), tl.int32)


@triton.jit
def pick(val, best, code, sub, POOL: tl.constexpr):
    """Fold window position `sub`'s value into the pool: max keeps the first maximum (a NaN wins and stays, as
    in nn.MaxPool2d) and its position; avg sums, and code collects the positions whose value is > 0."""
    if POOL == 1:
        won = (val > best) | (val != val)
        best = tl.where(won, val, best)
        code = tl.where(won, sub, code)
    elif POOL == 2:
        best = best + val
        code = code | ((val > 0).to(tl.int32) << sub)
    else:
        best = val
    return best, code


@triton.jit
def load_dpre(dout_ptr, out_ptr, arg_ptr, p, b, h, w, co, ok, B, HC, WC, HO, WO, COUT, POOL: tl.constexpr,
              RELU: tl.constexpr):
    """Gradient at the pre-activation of conv output (b, h, w, co) ([HC, WC] pixels), fp32: the ReLU mask and, with a
    pool, the route back through it (max: only the window position that won; avg: a quarter to each position).
    Without RELU (a plain conv, never pooled) the output's gradient as it is."""
    if POOL != 0:
        ho = h // 2
        wo = w // 2
        ok = ok & (ho < HO) & (wo < WO)
        off = (((p * B + b) * HO + ho) * WO + wo) * COUT + co
        code = tl.load(arg_ptr + off, mask=ok, other=0).to(tl.int32)
        sub = (h % 2) * 2 + (w % 2)
        if POOL == 1:
            alive = (code == sub) & (tl.load(out_ptr + off, mask=ok, other=0.0) > 0)
            g = tl.where(alive & ok, tl.load(dout_ptr + off, mask=ok, other=0.0), 0.0)
        else:
            alive = ((code >> sub) & 1) != 0
            g = tl.where(alive & ok, tl.load(dout_ptr + off, mask=ok, other=0.0) * 0.25, 0.0)
    else:
        off = (((p * B + b) * HC + h) * WC + w) * COUT + co
        g = tl.load(dout_ptr + off, mask=ok, other=0.0)
        if RELU:
            g = tl.where(tl.load(out_ptr + off, mask=ok, other=0.0) > 0, g, 0.0)
    return g


@triton.jit
def pixel(rows, H, W):
    """(b, h, w) of pixels numbered rows = (b * H + h) * W + w."""
    return rows // (H * W), (rows % (H * W)) // W, rows % W


@triton.jit
def _dpre_rows(dout_ptr, out_ptr, arg_ptr, p, rows, row_ok, co, co_ok, B, HC, WC, HO, WO, COUT, POOL: tl.constexpr,
               RELU: tl.constexpr):
    """load_dpre for a block of conv-output pixels numbered rows = (b * HC + h) * WC + w; also returns b, h, w."""
    b, h, w = pixel(rows, HC, WC)
    d = load_dpre(dout_ptr, out_ptr, arg_ptr, p, b[:, None], h[:, None], w[:, None], co[None, :],
                   row_ok[:, None] & co_ok[None, :], B, HC, WC, HO, WO, COUT, POOL, RELU)
    return d, b, h, w


@triton.jit
def _conv_fwd_kernel(x_ptr,  # [P, B, H, W, CIN] fp32, or the data set [N, CIN, H, W] with GATHER
                     idx_ptr,  # int64 [P, B] batch indices (GATHER)
                     mean_ptr, std_ptr,  # fp32 [CIN] normalization (GATHER)
                     aug_ptr,  # int32 [P, B, 5] augmentation draws (AUG, with GATHER)
                     w_ptr,  # fp32 [P, COUT, CIN, KS, KS]
                     b_ptr,  # fp32 [P, COUT] (BIAS)
                     out_ptr,  # fp32 [P, B, HO, WO, COUT]; HO, WO = HC//2, WC//2 with a pool, else HC, WC
                     arg_ptr,  # int8 [P, B, HO, WO, COUT] max: winning position; avg: ReLU mask (POOL)
                     B, H, W, HC, WC, HO, WO, CIN, COUT, CUT,  # HC, WC = ceil(H / STRIDE), ...; CUT: cutout (AUG)
                     GATHER: tl.constexpr, AUG: tl.constexpr, POOL: tl.constexpr, KS: tl.constexpr,
                     STRIDE: tl.constexpr, BIAS: tl.constexpr, RELU: tl.constexpr, WINDOW: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    p = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B * HO * WO
    b, ho, wo = pixel(rows, HO, WO)
    co = tl.arange(0, BLOCK_N)
    co_ok = co < COUT
    if BIAS:
        bias = tl.load(b_ptr + p * COUT + co, mask=co_ok, other=0.0)
    else:
        bias = tl.zeros((BLOCK_N,), tl.float32)
    best, code = pool_start(BLOCK_M, BLOCK_N, POOL)
    for sub in range(WINDOW):  # the 4 positions of the pool window, or the pixel itself
        if POOL != 0:
            h0 = ho * 2 + sub // 2
            w0 = wo * 2 + sub % 2
        else:
            h0 = ho
            w0 = wo
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for tap in range(KS * KS):  # a loop, not unrolled: 25-100 unrolled GEMM tiles took minutes to compile
            hi = h0 * STRIDE + tap // KS - KS // 2
            wi = w0 * STRIDE + tap % KS - KS // 2
            pix_ok = row_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            for k0 in range(0, CIN, BLOCK_K):
                ci = k0 + tl.arange(0, BLOCK_K)
                ok = pix_ok[:, None] & (ci < CIN)[None, :]
                xv = load_input(x_ptr, idx_ptr, mean_ptr, std_ptr, aug_ptr, p, b[:, None], hi[:, None], wi[:, None],
                                ci[None, :], ok, B, H, W, CIN, CUT, GATHER,
                                AUG)
                wv = tl.load(w_ptr + ((p * COUT + co[None, :]) * CIN + ci[:, None]) * (KS * KS) + tap,
                             mask=(ci < CIN)[:, None] & co_ok[None, :], other=0.0)
                acc += tl.dot(xv, wv, input_precision="ieee")
        pre = acc + bias[None, :]
        if RELU:
            val = tl.where(pre > 0, pre, tl.where(pre != pre, pre, 0.0))  # NaN stays NaN, as torch.relu
        else:
            val = pre
        best, code = pick(val, best, code, sub, POOL)
    if POOL == 2:
        best = best * 0.25
    off = (((p * B + b) * HO + ho) * WO + wo)[:, None] * COUT + co[None, :]
    ok = row_ok[:, None] & co_ok[None, :]
    tl.store(out_ptr + off, best, mask=ok)
    if POOL != 0:
        tl.store(arg_ptr + off, code.to(tl.int8), mask=ok)


@triton.jit
def _conv_bwd_input_kernel(dout_ptr,  # fp32 [P, B, HO, WO, COUT] gradient of the block's output
                           out_ptr,  # fp32 [P, B, HO, WO, COUT] the block's output (ReLU mask)
                           arg_ptr,  # int8 [P, B, HO, WO, COUT] (POOL)
                           w_ptr,  # fp32 [P, COUT, CIN, KS, KS]
                           dx_ptr,  # fp32 [P, B, H, W, CIN] gradient of the block's input
                           B, H, W, HC, WC, HO, WO, CIN, COUT,
                           POOL: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr, RELU: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    p = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixels
    row_ok = rows < B * H * W
    b, h, w = pixel(rows, H, W)
    ci = tl.arange(0, BLOCK_N)
    ci_ok = ci < CIN
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for tap in range(KS * KS):  # a loop, not unrolled: 25-100 unrolled GEMM tiles took minutes to compile
        hs = h - (tap // KS - KS // 2)  # STRIDE x the output pixel that saw this input through this tap
        ws = w - (tap % KS - KS // 2)
        pix_ok = row_ok & (hs >= 0) & (ws >= 0)
        if STRIDE != 1:  # only every STRIDE-th position is an output pixel
            pix_ok = pix_ok & (hs % STRIDE == 0) & (ws % STRIDE == 0)
        hq = hs // STRIDE
        wq = ws // STRIDE
        pix_ok = pix_ok & (hq < HC) & (wq < WC)
        for k0 in range(0, COUT, BLOCK_K):
            co = k0 + tl.arange(0, BLOCK_K)
            ok = pix_ok[:, None] & (co < COUT)[None, :]
            d = load_dpre(dout_ptr, out_ptr, arg_ptr, p, b[:, None], hq[:, None], wq[:, None], co[None, :], ok,
                           B, HC, WC, HO, WO, COUT, POOL, RELU)
            wv = tl.load(w_ptr + ((p * COUT + co[:, None]) * CIN + ci[None, :]) * (KS * KS) + tap,
                         mask=(co < COUT)[:, None] & ci_ok[None, :], other=0.0)
            acc += tl.dot(d, wv, input_precision="ieee")
    off = (((p * B + b) * H + h) * W + w)[:, None] * CIN + ci[None, :]
    tl.store(dx_ptr + off, acc, mask=row_ok[:, None] & ci_ok[None, :])


@triton.jit
def _conv_bwd_weight_kernel(x_ptr, idx_ptr, mean_ptr, std_ptr, aug_ptr,  # the input, as in _conv_fwd_kernel
                            dout_ptr, out_ptr, arg_ptr,  # as in _conv_bwd_input_kernel
                            dw_ptr,  # fp32 [P, SPLITS, KS * KS, CIN, COUT] partial weight gradients
                            db_ptr,  # fp32 [P, SPLITS, COUT] partial bias gradients (BIAS)
                            B, H, W, HC, WC, HO, WO, CIN, COUT, CUT, ROWS_PER_SPLIT, SPLITS,
                            GATHER: tl.constexpr, AUG: tl.constexpr, POOL: tl.constexpr, KS: tl.constexpr,
                            STRIDE: tl.constexpr, BIAS: tl.constexpr, RELU: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    lo = split * ROWS_PER_SPLIT  # conv-output pixels (b * HC + h) * WC + w
    hi_rows = tl.minimum(lo + ROWS_PER_SPLIT, B * HC * WC)
    co = tl.arange(0, BLOCK_N)
    co_ok = co < COUT
    base = (p * SPLITS + split)
    if BIAS:
        db = tl.zeros((BLOCK_N,), tl.float32)
        for m0 in range(lo, hi_rows, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            d, b, h, w = _dpre_rows(dout_ptr, out_ptr, arg_ptr, p, rows, rows < hi_rows, co, co_ok, B, HC, WC, HO,
                                    WO, COUT, POOL, RELU)
            db += tl.sum(d, axis=0)
        tl.store(db_ptr + base * COUT + co, db, mask=co_ok)
    for tap in range(KS * KS):  # a loop, not unrolled: 25-100 unrolled GEMM tiles took minutes to compile
        for k0 in range(0, CIN, BLOCK_K):
            ci = k0 + tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
            for m0 in range(lo, hi_rows, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                row_ok = rows < hi_rows
                d, b, h, w = _dpre_rows(dout_ptr, out_ptr, arg_ptr, p, rows, row_ok, co, co_ok, B, HC, WC, HO, WO,
                                        COUT, POOL, RELU)
                hi = h * STRIDE + tap // KS - KS // 2
                wi = w * STRIDE + tap % KS - KS // 2
                pix_ok = row_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
                xv = load_input(x_ptr, idx_ptr, mean_ptr, std_ptr, aug_ptr, p, b[:, None], hi[:, None], wi[:, None],
                                ci[None, :], pix_ok[:, None] & (ci < CIN)[None, :], B, H, W, CIN, CUT, GATHER, AUG)
                acc += tl.dot(tl.trans(xv), d, input_precision="ieee")
            off = ((base * (KS * KS) + tap) * CIN + ci[:, None]) * COUT + co[None, :]
            tl.store(dw_ptr + off, acc, mask=(ci < CIN)[:, None] & co_ok[None, :])


def _blocks(k: int, n: int, rows: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_N). tl.dot wants every side >= 16 on a GPU. The interpreter pays per program, so
    it gets few, large row blocks (64-row blocks 28 s, 1024-row blocks 1.6 s on one conv, 2-core CPU)."""
    block_m = min(1024, triton.next_power_of_2(rows)) if interpret else 64
    return max(16, block_m), max(16, min(32, triton.next_power_of_2(k))), max(16, triton.next_power_of_2(n))


def _input_shape(x, idx, gather):
    """(B, H, W) of a block's input: activations [P, B, H, W, C], or the data set [N, C, H, W] read by idx."""
    if gather:
        return idx.shape[1], x.shape[2], x.shape[3]
    return x.shape[1], x.shape[2], x.shape[3]


def _check_variant(pool, relu):
    if pool and not relu:
        raise ValueError("a pool is fused only after the ReLU: a plain conv (relu=False) takes no pool")


def conv_fwd(x, idx, mean, std, w, b, pool, gather, interpret, aug=None, stride=1, relu=True):
    """Launch the forward. x: activations [P, B, H, W, CIN], or the data set [N, CIN, H, W] with gather (then
    idx [P, B], mean, std [CIN], and aug None or (draws int32 [P, B, 5], cutout side)); w [P, COUT, CIN, K, K];
    b [P, COUT] or None (no bias); pool None, "max" or "avg"; stride 1 or 2; relu False: the plain conv, for a
    BatchNorm. Returns (out [P, B, HO, WO, COUT], the pool's int8 record or None)."""
    import torch

    _check_variant(pool, relu)
    p, cout, cin, ks = w.shape[:4]
    bsz, h, wd = _input_shape(x, idx, gather)
    hc, wc = -(-h // stride), -(-wd // stride)
    ho, wo = (hc // 2, wc // 2) if pool else (hc, wc)
    out = torch.empty(p, bsz, ho, wo, cout, device=w.device, dtype=torch.float32)
    arg = torch.empty(out.shape, device=w.device, dtype=torch.int8) if pool else out
    bm, bk, bn = _blocks(cin, cout, bsz * ho * wo, interpret)
    dummy = w
    grid = (triton.cdiv(bsz * ho * wo, bm), p)
    _conv_fwd_kernel[grid](x, idx if gather else dummy, mean if gather else dummy, std if gather else dummy,
                           aug[0] if aug else dummy, w, dummy if b is None else b, out, arg, bsz, h, wd, hc, wc, ho,
                           wo, cin, cout, aug[1] if aug else 0, GATHER=gather, AUG=aug is not None,
                           POOL=POOLS[pool], KS=ks, STRIDE=stride, BIAS=b is not None, RELU=relu,
                           WINDOW=4 if pool else 1, BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn)
    return out, (arg if pool else None)


def conv_bwd(x, idx, mean, std, w, out, arg, dout, pool, gather, need_dx, interpret, splits=None, aug=None,
             stride=1, bias=True, relu=True):
    """Launch the backward: (dx [P, B, H, W, CIN] or None, dw [P, COUT, CIN, K, K], db [P, COUT] or None without
    bias). out: the forward's output (its ReLU mask; only its shape without relu)."""
    import torch

    _check_variant(pool, relu)
    p, cout, cin, ks = w.shape[:4]
    bsz, h, wd = _input_shape(x, idx, gather)
    hc, wc = -(-h // stride), -(-wd // stride)
    ho, wo = out.shape[2:4]
    arg = arg if pool else out
    dummy = w
    dx = None
    if need_dx:
        dx = torch.empty(p, bsz, h, wd, cin, device=w.device, dtype=torch.float32)
        bm, bk, bn = _blocks(cout, cin, bsz * h * wd, interpret)
        _conv_bwd_input_kernel[(triton.cdiv(bsz * h * wd, bm), p)](
            dout, out, arg, w, dx, bsz, h, wd, hc, wc, ho, wo, cin, cout, POOL=POOLS[pool], KS=ks, STRIDE=stride,
            RELU=relu, BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn)
    rows = bsz * hc * wc
    bm, bk, bn = _blocks(cin, cout, rows, interpret)
    if splits is None:  # 1024 rows per program on a GPU: 32 programs per network at B = 32 on 32x32 images
        per_split = rows_per_split(rows, bm, interpret, 1024)
    else:
        per_split = triton.cdiv(triton.cdiv(rows, splits), bm) * bm
    splits = triton.cdiv(rows, per_split)
    dw_part = torch.empty(p, splits, ks * ks, cin, cout, device=w.device, dtype=torch.float32)
    db_part = torch.empty(p, splits, cout, device=w.device, dtype=torch.float32) if bias else dw_part
    _conv_bwd_weight_kernel[(splits, p)](
        x, idx if gather else dummy, mean if gather else dummy, std if gather else dummy, aug[0] if aug else dummy,
        dout, out, arg, dw_part, db_part, bsz, h, wd, hc, wc, ho, wo, cin, cout, aug[1] if aug else 0, per_split,
        splits, GATHER=gather, AUG=aug is not None, POOL=POOLS[pool], KS=ks, STRIDE=stride, BIAS=bias, RELU=relu,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn)
    dw = sum_splits(dw_part, interpret).view(p, ks, ks, cin, cout).permute(0, 4, 3, 1, 2).contiguous()
    return dx, dw, sum_splits(db_part, interpret) if bias else None
