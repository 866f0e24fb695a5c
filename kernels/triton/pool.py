"""Population pools that do not follow a conv (a conv's pool is fused into conv.py): the 2x2 max or average pool (stride
2, floor) and the global average pool, forward and backward, on activations [P, B, H, W, C] or, as the first layer,
on the images of the resident data set [N, C, H, W] read by batch index (GATHER, augmented with AUG; no backward: the
images need no gradient). Networks are grid axis 1. The max pool keeps the winning window position (int8) for its
backward, as the fused conv pool does.
"""

import triton
import triton.language as tl

from .conv import POOLS, load_input, pick, pixel, pool_start


@triton.jit
def _pool_fwd_kernel(x_ptr,  # [P, B, H, W, C] fp32, or the data set [N, C, H, W] with GATHER
                     idx_ptr,  # int64 [P, B] batch indices (GATHER)
                     mean_ptr, std_ptr,  # fp32 [C] normalization (GATHER)
                     aug_ptr,  # int32 [P, B, 5] augmentation draws (AUG, with GATHER)
                     out_ptr,  # fp32 [P, B, HO, WO, C], HO = H // 2, WO = W // 2
                     arg_ptr,  # int8 [P, B, HO, WO, C] winning window position (POOL == 1, max)
                     B, H, W, HO, WO, C, CUT,  # CUT: the cutout's side (AUG)
                     GATHER: tl.constexpr, AUG: tl.constexpr, POOL: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    p = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B * HO * WO
    b, ho, wo = pixel(rows, HO, WO)
    c = tl.arange(0, BLOCK_C)
    ok = row_ok[:, None] & (c < C)[None, :]
    best, code = pool_start(BLOCK_M, BLOCK_C, POOL)
    for sub in tl.static_range(4):
        val = load_input(x_ptr, idx_ptr, mean_ptr, std_ptr, aug_ptr, p, b[:, None], (ho * 2 + sub // 2)[:, None],
                         (wo * 2 + sub % 2)[:, None], c[None, :], ok, B, H, W, C, CUT, GATHER, AUG)
        best, code = pick(val, best, code, sub, POOL)
    if POOL == 2:
        best = best * 0.25
    off = (((p * B + b) * HO + ho) * WO + wo)[:, None] * C + c[None, :]
    tl.store(out_ptr + off, best, mask=ok)
    if POOL == 1:
        tl.store(arg_ptr + off, code.to(tl.int8), mask=ok)


@triton.jit
def _pool_bwd_kernel(dout_ptr,  # fp32 [P, B, HO, WO, C]
                     arg_ptr,  # int8 [P, B, HO, WO, C] (POOL == 1, max)
                     dx_ptr,  # fp32 [P, B, H, W, C]; 0 on the row and column the floor drops
                     B, H, W, HO, WO, C,
                     POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixels
    row_ok = rows < B * H * W
    b, h, w = pixel(rows, H, W)
    c = tl.arange(0, BLOCK_C)
    ho, wo = h // 2, w // 2
    ok = (row_ok & (ho < HO) & (wo < WO))[:, None] & (c < C)[None, :]
    off = (((p * B + b) * HO + ho) * WO + wo)[:, None] * C + c[None, :]
    g = tl.load(dout_ptr + off, mask=ok, other=0.0)
    if POOL == 1:
        won = tl.load(arg_ptr + off, mask=ok, other=-1).to(tl.int32) == ((h % 2) * 2 + (w % 2))[:, None]
        g = tl.where(won, g, 0.0)
    else:
        g = g * 0.25
    tl.store(dx_ptr + (((p * B + b) * H + h) * W + w)[:, None] * C + c[None, :], g,
             mask=row_ok[:, None] & (c < C)[None, :])


@triton.jit
def _gap_fwd_kernel(x_ptr, idx_ptr, mean_ptr, std_ptr, aug_ptr,  # as in _pool_fwd_kernel
                    out_ptr,  # fp32 [P, B, C]
                    B, H, W, C, CUT,
                    GATHER: tl.constexpr, AUG: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(1).to(tl.int64)
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    c = tl.arange(0, BLOCK_C)
    ok = (b < B)[:, None] & (c < C)[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
    for s in range(0, H * W):  # pixels in order: a fixed summation order
        acc += load_input(x_ptr, idx_ptr, mean_ptr, std_ptr, aug_ptr, p, b[:, None], s // W, s % W, c[None, :], ok,
                          B, H, W, C, CUT, GATHER, AUG)
    tl.store(out_ptr + (p * B + b[:, None]) * C + c[None, :], acc / (H * W), mask=ok)


@triton.jit
def _gap_bwd_kernel(dout_ptr,  # fp32 [P, B, C]
                    dx_ptr,  # fp32 [P, B, S, C], S = H * W pixels
                    B, S, C,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (b, s) pairs
    c = tl.arange(0, BLOCK_C)
    ok = (rows < B * S)[:, None] & (c < C)[None, :]
    g = tl.load(dout_ptr + (p * B + rows[:, None] // S) * C + c[None, :], mask=ok, other=0.0)
    tl.store(dx_ptr + (p * (B * S) + rows[:, None]) * C + c[None, :], g / S, mask=ok)


def _rows_block(rows: int, interpret: bool) -> int:
    """Few, large programs under the interpreter (it pays per program); 128 rows of pixels on a GPU."""
    return min(4096, triton.next_power_of_2(rows)) if interpret else 128


def _input(x, idx, gather):
    """(P, B, H, W, C) of an input: activations [P, B, H, W, C], or the data set [N, C, H, W] read by idx."""
    if gather:
        return (*idx.shape, x.shape[2], x.shape[3], x.shape[1])
    return tuple(x.shape)


def pool_fwd(x, idx, mean, std, kind, gather, interpret, aug=None):
    """2x2 pool ("max" or "avg"), stride 2, floor. x as in _input; aug as in conv.conv_fwd. Returns (out [P, B,
    H//2, W//2, C], the winning positions int8 for max, else None)."""
    import torch

    p, bsz, h, w, c = _input(x, idx, gather)
    ho, wo = h // 2, w // 2
    out = torch.empty(p, bsz, ho, wo, c, device=x.device, dtype=torch.float32)
    arg = torch.empty(out.shape, device=x.device, dtype=torch.int8) if kind == "max" else out
    bm = _rows_block(bsz * ho * wo, interpret)
    dummy = out
    _pool_fwd_kernel[(triton.cdiv(bsz * ho * wo, bm), p)](
        x, idx if gather else dummy, mean if gather else dummy, std if gather else dummy, aug[0] if aug else dummy,
        out, arg, bsz, h, w, ho, wo, c, aug[1] if aug else 0, GATHER=gather, AUG=aug is not None,
        POOL=POOLS[kind], BLOCK_M=bm, BLOCK_C=triton.next_power_of_2(c))
    return out, (arg if kind == "max" else None)


def pool_bwd(dout, arg, kind, in_shape, interpret):
    """Gradient of the input [P, B, H, W, C] (in_shape) from dout [P, B, H//2, W//2, C]."""
    import torch

    p, bsz, h, w, c = in_shape
    dx = torch.empty(in_shape, device=dout.device, dtype=torch.float32)
    bm = _rows_block(bsz * h * w, interpret)
    _pool_bwd_kernel[(triton.cdiv(bsz * h * w, bm), p)](
        dout, arg if kind == "max" else dout, dx, bsz, h, w, h // 2, w // 2, c, POOL=POOLS[kind], BLOCK_M=bm,
        BLOCK_C=triton.next_power_of_2(c))
    return dx


def gap_fwd(x, idx, mean, std, gather, interpret, aug=None):
    """Global average pool: x as in _input (aug as in conv.conv_fwd) -> [P, B, C]."""
    import torch

    p, bsz, h, w, c = _input(x, idx, gather)
    out = torch.empty(p, bsz, c, device=x.device, dtype=torch.float32)
    bb = min(1024 if interpret else 32, triton.next_power_of_2(bsz))
    dummy = out
    _gap_fwd_kernel[(triton.cdiv(bsz, bb), p)](
        x, idx if gather else dummy, mean if gather else dummy, std if gather else dummy, aug[0] if aug else dummy,
        out, bsz, h, w, c, aug[1] if aug else 0, GATHER=gather, AUG=aug is not None, BLOCK_B=bb,
        BLOCK_C=triton.next_power_of_2(c))
    return out


def gap_bwd(dout, in_shape, interpret):
    """Gradient of the input [P, B, H, W, C] (in_shape) from dout [P, B, C]: dout / (H * W) at every pixel."""
    import torch

    p, bsz, h, w, c = in_shape
    dx = torch.empty(in_shape, device=dout.device, dtype=torch.float32)
    bm = _rows_block(bsz * h * w, interpret)
    _gap_bwd_kernel[(triton.cdiv(bsz * h * w, bm), p)](dout, dx, bsz, h * w, c, BLOCK_M=bm,
                                                       BLOCK_C=triton.next_power_of_2(c))
    return dx
