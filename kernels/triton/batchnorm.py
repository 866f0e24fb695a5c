"""Population BatchNorm over a plain conv's output (conv.py, relu=False), with the ReLU, a 2x2 pool and a residual
block's skip (the block's input, or its projection's own BatchNorm) fused into the normalize pass; forward and
backward, training (each network's batch statistics, its running statistics updated) and evaluation (its running
statistics).

Layout: y [P, B, HC, WC, C] contiguous, so the statistics of (network p, channel c) run over N = B*HC*WC rows.
Every reduction is per-program partial sums over fixed slices of a network's rows, summed by reduce.py in split
order: network k's statistics and gradients depend on its own shapes only, never on P (no atomics).

Training forward: partial sums -> mean; partial centered squares -> biased variance (two passes, as the reference:
no E[y^2] - E[y]^2 cancellation); one finalize launch for 1/sqrt(var + eps) and the running statistics; one
normalize pass that reads y once and writes the block's output once. Backward: the two reductions (sum of the
gradient at the normalization's output, and of it times x-hat) in one pass, then one elementwise pass for the
input's gradient.
"""

import triton
import triton.language as tl

from .conv import POOLS, load_dpre, load_input, pick, pixel, pool_start
from .reduce import rows_per_split, sum_splits

SKIPS = {None: 0, "identity": 1, "projection": 2}  # the SKIP constexpr of _bn_apply_kernel


@triton.jit
def _bn_partial_kernel(y_ptr,  # fp32 [P, N, C] a plain conv's output, N = B*HC*WC rows
                       sum_ptr,  # fp32 [P, C] the rows' sums (CENTER)
                       part_ptr,  # fp32 [P, SPLITS, C] partial sums of y, or of (y - mean)^2 with CENTER
                       N, C, ROWS_PER_SPLIT, SPLITS,
                       CENTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    split = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    lo = split * ROWS_PER_SPLIT
    hi = tl.minimum(lo + ROWS_PER_SPLIT, N)
    if CENTER:
        mean = tl.load(sum_ptr + p * C + c, mask=c_ok, other=0.0) / N
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for m0 in range(lo, hi, BLOCK_M):  # the split's rows in order: a fixed summation order
        rows = m0 + tl.arange(0, BLOCK_M)
        ok = (rows < hi)[:, None] & c_ok[None, :]
        v = tl.load(y_ptr + (p * N + rows[:, None]) * C + c[None, :], mask=ok, other=0.0)
        if CENTER:
            v = tl.where(ok, v - mean[None, :], 0.0)
            v = v * v
        acc += tl.sum(v, axis=0)
    tl.store(part_ptr + (p * SPLITS + split) * C + c, acc, mask=c_ok)


@triton.jit
def _bn_finalize_kernel(sum_ptr, sq_ptr,  # fp32 [P, C] sums of y and of (y - mean)^2 over the N rows (TRAIN)
                        rm_ptr, rv_ptr,  # fp32 [P, C] running mean and variance: updated with TRAIN, else read
                        mean_ptr, invstd_ptr,  # fp32 [P, C] the statistics the normalization uses
                        C, N, unbias, momentum, eps,  # unbias: N / (N - 1), the running variance's correction
                        TRAIN: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(1).to(tl.int64)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = c < C
    off = p * C + c
    rm = tl.load(rm_ptr + off, mask=ok, other=0.0)
    rv = tl.load(rv_ptr + off, mask=ok, other=1.0)
    if TRAIN:
        mean = tl.load(sum_ptr + off, mask=ok, other=0.0) / N
        var = tl.load(sq_ptr + off, mask=ok, other=0.0) / N
        tl.store(rm_ptr + off, rm * (1 - momentum) + mean * momentum, mask=ok)
        tl.store(rv_ptr + off, rv * (1 - momentum) + (var * unbias) * momentum, mask=ok)
    else:
        mean = rm
        var = rv
    tl.store(mean_ptr + off, mean, mask=ok)
    tl.store(invstd_ptr + off, 1.0 / tl.sqrt(var + eps), mask=ok)


@triton.jit
def _normalized(y_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, p, pix, c, ok, C):
    """gamma * (y - mean) * invstd + beta at pixels pix ([M, 1], numbered within network p) and channels c."""
    mean = tl.load(mean_ptr + p * C + c, mask=c < C, other=0.0)
    invstd = tl.load(invstd_ptr + p * C + c, mask=c < C, other=0.0)
    gamma = tl.load(gamma_ptr + p * C + c, mask=c < C, other=0.0)
    beta = tl.load(beta_ptr + p * C + c, mask=c < C, other=0.0)
    y = tl.load(y_ptr + pix * C + c, mask=ok, other=0.0)
    return (y - mean) * invstd * gamma + beta


@triton.jit
def _bn_apply_kernel(y_ptr,  # fp32 [P, B, HC, WC, C] a plain conv's output
                     mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,  # fp32 [P, C]
                     x_ptr, idx_ptr, xmean_ptr, xstd_ptr, aug_ptr,  # the identity skip, as conv.load_input reads it
                     yp_ptr, meanp_ptr, invstdp_ptr, gammap_ptr, betap_ptr,  # the projection skip and its BN
                     out_ptr,  # fp32 [P, B, HO, WO, C]; HO, WO = HC//2, WC//2 with a pool, else HC, WC
                     arg_ptr,  # int8 [P, B, HO, WO, C] max: winning position; avg: ReLU mask (POOL)
                     B, HC, WC, HO, WO, C, CUT,
                     SKIP: tl.constexpr, GATHER: tl.constexpr, AUG: tl.constexpr, RELU: tl.constexpr,
                     POOL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B * HO * WO
    b, ho, wo = pixel(rows, HO, WO)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = row_ok[:, None] & (c < C)[None, :]
    best, code = pool_start(BLOCK_M, BLOCK_C, POOL)
    for sub in range(WINDOW):  # the 4 positions of the pool window, or the pixel itself
        if POOL != 0:
            h = ho * 2 + sub // 2
            w = wo * 2 + sub % 2
        else:
            h = ho
            w = wo
        pix = ((p * B + b) * HC + h) * WC + w
        val = _normalized(y_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, p, pix[:, None], c[None, :], ok, C)
        if SKIP == 1:
            val += load_input(x_ptr, idx_ptr, xmean_ptr, xstd_ptr, aug_ptr, p, b[:, None], h[:, None], w[:, None],
                              c[None, :], ok, B, HC, WC, C, CUT, GATHER, AUG)
        elif SKIP == 2:
            val += _normalized(yp_ptr, meanp_ptr, invstdp_ptr, gammap_ptr, betap_ptr, p, pix[:, None], c[None, :], ok,
                               C)
        if RELU:
            val = tl.where(val > 0, val, tl.where(val != val, val, 0.0))  # NaN stays NaN, as torch.relu
        best, code = pick(val, best, code, sub, POOL)
    if POOL == 2:
        best = best * 0.25
    off = (((p * B + b) * HO + ho) * WO + wo)[:, None] * C + c[None, :]
    tl.store(out_ptr + off, best, mask=ok)
    if POOL != 0:
        tl.store(arg_ptr + off, code.to(tl.int8), mask=ok)


@triton.jit
def _dnorm_rows(dout_ptr, out_ptr, arg_ptr, y_ptr, mean_ptr, invstd_ptr, p, rows, row_ok, c, c_ok, B, HC, WC, HO,
                WO, C, POOL: tl.constexpr, RELU: tl.constexpr):
    """For BN pixels numbered rows = (b * HC + h) * WC + w: the gradient at the normalization's output (through the
    ReLU and pool), x-hat, and the mask."""
    b, h, w = pixel(rows, HC, WC)
    ok = row_ok[:, None] & c_ok[None, :]
    d = load_dpre(dout_ptr, out_ptr, arg_ptr, p, b[:, None], h[:, None], w[:, None], c[None, :], ok, B, HC, WC, HO,
                   WO, C, POOL, RELU)
    mean = tl.load(mean_ptr + p * C + c, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + p * C + c, mask=c_ok, other=0.0)
    y = tl.load(y_ptr + (p * (B * HC * WC) + rows[:, None]) * C + c[None, :], mask=ok, other=0.0)
    xhat = tl.where(ok, (y - mean[None, :]) * invstd[None, :], 0.0)
    return d, xhat, ok


@triton.jit
def _bn_bwd_partial_kernel(dout_ptr,  # fp32 [P, B, HO, WO, C] gradient of the normalize pass's output
                           out_ptr,  # fp32 [P, B, HO, WO, C] its output (the ReLU mask; RELU)
                           arg_ptr,  # int8 [P, B, HO, WO, C] (POOL)
                           y_ptr,  # fp32 [P, B, HC, WC, C] the normalized conv output
                           mean_ptr, invstd_ptr,  # fp32 [P, C]
                           part_ptr,  # fp32 [P, SPLITS, 2, C] partial sums of d (beta's gradient), d * x-hat (gamma's)
                           B, HC, WC, HO, WO, C, ROWS_PER_SPLIT, SPLITS,
                           POOL: tl.constexpr, RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    split = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    lo = split * ROWS_PER_SPLIT
    hi = tl.minimum(lo + ROWS_PER_SPLIT, B * HC * WC)
    acc_b = tl.zeros((BLOCK_C,), tl.float32)  # 1-D: [BLOCK_M, BLOCK_C] accumulators crashed LLVM (Triton 3.9)
    acc_g = tl.zeros((BLOCK_C,), tl.float32)
    for m0 in range(lo, hi, BLOCK_M):  # the split's rows in order: a fixed summation order
        rows = m0 + tl.arange(0, BLOCK_M)
        d, xhat, ok = _dnorm_rows(dout_ptr, out_ptr, arg_ptr, y_ptr, mean_ptr, invstd_ptr, p, rows, rows < hi, c,
                                  c_ok, B, HC, WC, HO, WO, C, POOL, RELU)
        acc_b += tl.sum(d, axis=0)
        acc_g += tl.sum(d * xhat, axis=0)
    base = (p * SPLITS + split) * 2 * C
    tl.store(part_ptr + base + c, acc_b, mask=c_ok)
    tl.store(part_ptr + base + C + c, acc_g, mask=c_ok)


@triton.jit
def _bn_bwd_apply_kernel(dout_ptr, out_ptr, arg_ptr, y_ptr, mean_ptr, invstd_ptr,  # as in _bn_bwd_partial_kernel
                         gamma_ptr,  # fp32 [P, C]
                         dgb_ptr,  # fp32 [P, 2, C] beta's and gamma's gradients
                         dy_ptr,  # fp32 [P, B, HC, WC, C] the conv output's gradient
                         dskip_ptr,  # fp32 [P, B, HC, WC, C] the identity skip's gradient (SKIP_GRAD)
                         B, HC, WC, HO, WO, C,
                         TRAIN: tl.constexpr, POOL: tl.constexpr, RELU: tl.constexpr, SKIP_GRAD: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    d, xhat, ok = _dnorm_rows(dout_ptr, out_ptr, arg_ptr, y_ptr, mean_ptr, invstd_ptr, p, rows,
                              rows < B * HC * WC, c, c_ok, B, HC, WC, HO, WO, C, POOL, RELU)
    gamma = tl.load(gamma_ptr + p * C + c, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + p * C + c, mask=c_ok, other=0.0)
    if TRAIN:  # the batch statistics depend on every row: the reference's closed form
        n = B * HC * WC
        dbeta = tl.load(dgb_ptr + p * 2 * C + c, mask=c_ok, other=0.0)
        dgamma = tl.load(dgb_ptr + p * 2 * C + C + c, mask=c_ok, other=0.0)
        scale = gamma * invstd / n
        dy = scale[None, :] * (n * d - dbeta[None, :] - xhat * dgamma[None, :])
    else:  # running statistics are constants
        dy = d * (gamma * invstd)[None, :]
    off = (p * (B * HC * WC) + rows[:, None]) * C + c[None, :]
    tl.store(dy_ptr + off, dy, mask=ok)
    if SKIP_GRAD:
        tl.store(dskip_ptr + off, d, mask=ok)


def _blocks(rows: int, c: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C): about 4096 elements a program on a GPU; the interpreter pays per program, so all
    channels and up to 16384 rows."""
    if interpret:
        block_c = triton.next_power_of_2(c)
        return max(1, min(triton.next_power_of_2(rows), max(1, 16384 // block_c))), block_c
    block_c = min(64, triton.next_power_of_2(c))
    return max(16, 4096 // block_c), block_c


def _splits(rows: int, block_m: int, interpret: bool) -> tuple[int, int]:
    """(rows per split, splits): about 8192 rows a program on a GPU whatever P is, so network k's sums do not
    depend on its company."""
    per_split = rows_per_split(rows, block_m, interpret, 8192)
    return per_split, triton.cdiv(rows, per_split)


def bn_stats(y, running_mean, running_var, training, momentum, eps, interpret):
    """Each network's batch statistics of y [P, B, HC, WC, C] (training; the running statistics [P, C] updated in
    place) or its running statistics (evaluation). Returns (mean, 1 / sqrt(var + eps)), [P, C] each."""
    import torch

    p, c = y.shape[0], y.shape[-1]
    n = y[0].numel() // c
    mean = torch.empty(p, c, device=y.device, dtype=torch.float32)
    invstd = torch.empty(p, c, device=y.device, dtype=torch.float32)
    sums = squares = mean
    if training:
        bm, bc = _blocks(n, c, interpret)
        per_split, splits = _splits(n, bm, interpret)
        grid = (splits, p, triton.cdiv(c, bc))
        part = torch.empty(p, splits, c, device=y.device, dtype=torch.float32)
        _bn_partial_kernel[grid](y, part, part, n, c, per_split, splits, CENTER=False, BLOCK_M=bm, BLOCK_C=bc)
        sums = sum_splits(part, interpret)
        _bn_partial_kernel[grid](y, sums, part, n, c, per_split, splits, CENTER=True, BLOCK_M=bm, BLOCK_C=bc)
        squares = sum_splits(part, interpret)
    block = triton.next_power_of_2(c) if interpret else min(256, triton.next_power_of_2(c))
    _bn_finalize_kernel[(triton.cdiv(c, block), p)](sums, squares, running_mean, running_var, mean, invstd, c, n,
                                                    n / max(n - 1, 1), momentum, eps, TRAIN=training, BLOCK_C=block)
    return mean, invstd


def bn_apply(y, mean, invstd, gamma, beta, relu, pool, interpret, skip=None, proj=None):
    """The normalize pass: gamma * (y - mean) * invstd + beta, plus a residual skip, then ReLU (relu) and a 2x2
    pool (pool None, "max" or "avg"). skip: the identity skip as (x, idx, mean, std, aug), conv.conv_fwd's input
    (activations [P, B, HC, WC, C] with idx None, or the data set read by index); proj: the projection skip's
    (yp, mean, invstd, gamma, beta), normalized in the same pass. Returns (out [P, B, HO, WO, C], the pool's int8
    record or None)."""
    import torch

    if pool and not relu:
        raise ValueError("a pool is fused only after the ReLU")
    p, bsz, hc, wc, c = y.shape
    ho, wo = (hc // 2, wc // 2) if pool else (hc, wc)
    out = torch.empty(p, bsz, ho, wo, c, device=y.device, dtype=torch.float32)
    arg = torch.empty(out.shape, device=y.device, dtype=torch.int8) if pool else out
    x, idx, xmean, xstd, aug = skip if skip is not None else (y, None, None, None, None)
    yp, meanp, invstdp, gammap, betap = proj if proj is not None else (y, mean, invstd, gamma, beta)
    gather = idx is not None
    kind = "identity" if skip is not None else "projection" if proj is not None else None
    bm, bc = _blocks(bsz * ho * wo, c, interpret)
    _bn_apply_kernel[(triton.cdiv(bsz * ho * wo, bm), p, triton.cdiv(c, bc))](
        y, mean, invstd, gamma, beta, x, idx if gather else y, xmean if gather else y, xstd if gather else y,
        aug[0] if aug else y, yp, meanp, invstdp, gammap, betap, out, arg, bsz, hc, wc, ho, wo, c,
        aug[1] if aug else 0, SKIP=SKIPS[kind], GATHER=gather, AUG=aug is not None, RELU=relu, POOL=POOLS[pool],
        WINDOW=4 if pool else 1, BLOCK_M=bm, BLOCK_C=bc)
    return out, (arg if pool else None)


def bn_bwd(dout, out, arg, y, mean, invstd, gamma, relu, pool, training, interpret, skip_grad=False):
    """The normalize pass's backward for one BatchNorm: (dy [P, B, HC, WC, C], dgamma, dbeta [P, C], and the
    gradient of an identity skip (the gradient after the ReLU) when skip_grad, else None). dout, out [P, B, HO,
    WO, C] and arg as bn_apply returned them; y, mean, invstd, gamma as it took them."""
    import torch

    p, bsz, hc, wc, c = y.shape
    ho, wo = out.shape[2:4]
    arg = arg if pool else out
    n = bsz * hc * wc
    bm, bc = _blocks(n, c, interpret)
    per_split, splits = _splits(n, bm, interpret)
    part = torch.empty(p, splits, 2, c, device=y.device, dtype=torch.float32)
    _bn_bwd_partial_kernel[(splits, p, triton.cdiv(c, bc))](
        dout, out, arg, y, mean, invstd, part, bsz, hc, wc, ho, wo, c, per_split, splits, POOL=POOLS[pool],
        RELU=relu, BLOCK_M=bm, BLOCK_C=bc)
    dgb = sum_splits(part, interpret)  # [P, 2, C]
    dy = torch.empty(y.shape, device=y.device, dtype=torch.float32)
    dskip = torch.empty(y.shape, device=y.device, dtype=torch.float32) if skip_grad else dy
    _bn_bwd_apply_kernel[(triton.cdiv(n, bm), p, triton.cdiv(c, bc))](
        dout, out, arg, y, mean, invstd, gamma, dgb, dy, dskip, bsz, hc, wc, ho, wo, c, TRAIN=training,
        POOL=POOLS[pool], RELU=relu, SKIP_GRAD=skip_grad, BLOCK_M=bm, BLOCK_C=bc)
    return dy, dgb[:, 1], dgb[:, 0], (dskip if skip_grad else None)
