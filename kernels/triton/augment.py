"""Augmentation draws for the first layer's gather: each network's and example's flip, crop offsets and cutout
center from (the network's order seed, the epoch, the example's index), by the counter-based hash of
`fastpop.data.augment` (31-bit lanes of int64, products below 2^62: the same integers as torch's `augment.draws`).

The draws are [P, B, 5] int32, a few bytes per example; the gathering kernels read them with the batch index and
apply the transform in their loads (`apply_draws`), so no augmented batch is ever built.
"""

import triton
import triton.language as tl


@triton.jit
def _mix(h):
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0x7FFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0x7FFFFFFF
    return h ^ (h >> 16)


@triton.jit
def _hash(n, k, e, s):
    """Draw k of example n for epoch hash e and seed s (int64), as augment.hash5."""
    h = _mix(((n * 8 + k) & 0x7FFFFFFF) ^ e)
    h = _mix(h ^ ((s >> 31) & 0x7FFFFFFF))
    return _mix(h ^ (s & 0x7FFFFFFF))


@triton.jit
def _draws_kernel(seeds_ptr,  # int64 [P] the networks' order seeds
                  idx_ptr,  # int64 [P, B] batch indices
                  draws_ptr,  # int32 [P, B, 5] flip, dy, dx, cutout center row, column
                  B, epoch, CROP, H, W,
                  FLIP: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(1).to(tl.int64)
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = b < B
    s = tl.load(seeds_ptr + p + tl.zeros((BLOCK,), tl.int64))
    n = tl.load(idx_ptr + p * B + b, mask=ok, other=0)
    e = _mix((tl.zeros((BLOCK,), tl.int64) + epoch) & 0x7FFFFFFF)
    span = 2 * CROP + 1
    base = draws_ptr + (p * B + b) * 5
    if FLIP:
        tl.store(base, (_hash(n, 0, e, s) & 1).to(tl.int32), mask=ok)
    else:
        tl.store(base, tl.zeros((BLOCK,), tl.int32), mask=ok)
    tl.store(base + 1, (_hash(n, 1, e, s) % span - CROP).to(tl.int32), mask=ok)
    tl.store(base + 2, (_hash(n, 2, e, s) % span - CROP).to(tl.int32), mask=ok)
    tl.store(base + 3, (_hash(n, 3, e, s) % H).to(tl.int32), mask=ok)
    tl.store(base + 4, (_hash(n, 4, e, s) % W).to(tl.int32), mask=ok)


@triton.jit
def apply_draws(aug_ptr, p, b, hi, wi, ok, B, H, W, CUT):
    """(source row, source column, keep) of output pixel (hi, wi) of example b of network p under its draws:
    crop (translate, zero padding), then flip, then a CUT x CUT cutout square (none when CUT = 0); keep is False
    where the pixel is zero (outside the image, in the cutout square, or not ok)."""
    d = aug_ptr + (p * B + b) * 5
    b_ok = b < B
    flip = tl.load(d, mask=b_ok, other=0)
    sy = hi + tl.load(d + 1, mask=b_ok, other=0)
    sx = tl.where(flip != 0, W - 1 - wi, wi) + tl.load(d + 2, mask=b_ok, other=0)
    top = tl.load(d + 3, mask=b_ok, other=0) - CUT // 2
    left = tl.load(d + 4, mask=b_ok, other=0) - CUT // 2
    cut = (hi >= top) & (hi < top + CUT) & (wi >= left) & (wi < left + CUT)
    keep = ok & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W) & (cut == 0)
    return sy, sx, keep


def draws(augment, seeds, epoch, idx, h, w, interpret):
    """int32 [P, B, 5] on idx's device: `fastpop.data.augment.draws` for augment (an Augment), seeds int64 [P],
    the epoch and batch indices idx int64 [P, B] of h x w images."""
    import torch

    p, bsz = idx.shape
    out = torch.empty(p, bsz, 5, dtype=torch.int32, device=idx.device)
    block = triton.next_power_of_2(max(bsz, 1)) if interpret else 128
    _draws_kernel[(triton.cdiv(bsz, block), p)](seeds.to(idx.device, torch.int64).contiguous(), idx.contiguous(),
                                                 out, bsz, epoch, augment.crop, h, w, FLIP=augment.flip, BLOCK=block)
    return out
