"""Data augmentation drawn per network, per example and per epoch from (the network's order seed, the epoch, the
example's index) alone, by a counter-based hash: runs stay bit-reproducible, resumable, and independent of P and of
the batch an example falls in. Every backend applies it inside its gather of the first layer's input; `apply` is
the pure-torch reference of that gather.

For output pixel (y, x) of an H x W image the transforms compose as RandomCrop(padding) -> RandomHorizontalFlip ->
Cutout: the pixel is 0 inside the cutout square; else it reads the source pixel (y + dy, x' + dx) with
x' = W - 1 - x when flipped (else x), and 0 outside the image. Zeros are in normalized units (the channel mean):
what the first conv's own zero padding sees. dy, dx are uniform in [-crop, crop]; the cutout square's center is a
uniform pixel, its side `cutout` pixels, clipped at the edges (as in DeVries & Taylor 2017).

The hash works on 31-bit lanes of int64 (products below 2^62), so torch, numba and Triton compute the same
integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:  # imported where tensors are made, so validating a Config does not load torch
    import torch

M31 = 0x7FFFFFFF
MIX = 0x45D9F3B
FLIP, DY, DX, CY, CX = range(5)  # the draws, in the order of `draws`' last axis


@dataclass(frozen=True)
class Augment:
    flip: bool = False
    crop: int = 0  # zero padding of the random crop (translation by up to this many pixels)
    cutout: int = 0  # side of the cutout square

    def __bool__(self) -> bool:
        return self.flip or self.crop > 0 or self.cutout > 0

    def __str__(self) -> str:
        parts = ["flip"] if self.flip else []
        parts += [f"crop:{self.crop}"] if self.crop else []
        parts += [f"cutout:{self.cutout}"] if self.cutout else []
        return ",".join(parts)

    @classmethod
    def parse(cls, text: str) -> "Augment":
        """"flip,crop:4,cutout:8" (any subset, any order; "" or "none" for none)."""
        if not isinstance(text, str):
            raise UsageError(f"augment must be a string such as flip,crop:4,cutout:8, got {type(text).__name__}")
        fields = {}
        for tok in (t.strip() for t in text.split(",")):
            if tok in ("", "none"):
                continue
            name, _, value = tok.partition(":")
            if name in fields:
                raise UsageError(f"augment: {name} given twice")
            if name == "flip" and not value:
                fields["flip"] = True
            elif name in ("crop", "cutout") and value.isdigit() and value.isascii() and 1 <= int(value) <= 64:
                fields[name] = int(value)
            else:
                raise UsageError(f"augment: unknown or malformed {tok!r}; valid: flip, crop:N, cutout:N "
                                 "(N = 1 to 64 pixels)")
        return cls(**fields)

    def check(self, h: int, w: int) -> None:
        if self.crop >= max(h, w):
            raise UsageError(f"augment: crop:{self.crop} pads as much as the {h}x{w} image itself; use less than "
                             f"{max(h, w)}")
        if self.cutout > max(h, w):
            raise UsageError(f"augment: cutout:{self.cutout} is larger than the {h}x{w} image")


@dataclass
class AugmentBatch:
    """The augmentation of one training step: what the kernels need to draw each example's transform."""

    augment: Augment
    seeds: torch.Tensor  # int64 [P], each network's order seed
    epoch: int


def _mix(h: torch.Tensor) -> torch.Tensor:
    h = ((h ^ (h >> 16)) * MIX) & M31
    h = ((h ^ (h >> 16)) * MIX) & M31
    return h ^ (h >> 16)


def hash5(seeds: torch.Tensor, epoch: int, idx: torch.Tensor) -> torch.Tensor:
    """Five 31-bit draws per (network, example): seeds int64 [P], idx int64 [P, B] -> int64 [P, B, 5]."""
    import torch

    s = seeds.to(torch.int64).view(-1, 1, 1)
    n = idx.to(torch.int64).unsqueeze(-1) * 8 + torch.arange(5, device=idx.device)
    h = _mix((n & M31) ^ _mix(torch.tensor(epoch & M31, device=idx.device)))
    h = _mix(h ^ ((s >> 31) & M31))
    return _mix(h ^ (s & M31))


def draws(aug: Augment, seeds: torch.Tensor, epoch: int, idx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """int64 [P, B, 5]: flip (0/1), dy, dx, cutout center row and column, for each network's batch idx [P, B]."""
    import torch

    r = hash5(seeds, epoch, idx)
    span = 2 * aug.crop + 1
    out = torch.stack([r[..., FLIP] & 1 if aug.flip else torch.zeros_like(r[..., 0]),
                       r[..., DY] % span - aug.crop, r[..., DX] % span - aug.crop,
                       r[..., CY] % h, r[..., CX] % w], -1)
    return out


def apply(aug: Augment, batch: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The reference transform of normalized images batch [P, B, C, H, W] by draws d [P, B, 5]."""
    import torch

    p, b, c, h, w = batch.shape
    ys = torch.arange(h, device=batch.device)
    xs = torch.arange(w, device=batch.device)
    yy = ys + d[..., DY, None]  # [P, B, H]
    xx = torch.where(d[..., FLIP, None] == 1, w - 1 - xs, xs) + d[..., DX, None]  # [P, B, W]
    inside = ((yy >= 0) & (yy < h))[..., :, None] & ((xx >= 0) & (xx < w))[..., None, :]  # [P, B, H, W]
    src = yy.clamp(0, h - 1)[..., :, None] * w + xx.clamp(0, w - 1)[..., None, :]
    out = batch.flatten(3).gather(3, src.flatten(2).unsqueeze(2).expand(p, b, c, h * w)).view(p, b, c, h, w)
    keep = inside
    if aug.cutout:
        top = d[..., CY, None] - aug.cutout // 2
        left = d[..., CX, None] - aug.cutout // 2
        in_rows = (ys >= top) & (ys < top + aug.cutout)  # [P, B, H]
        in_cols = (xs >= left) & (xs < left + aug.cutout)
        keep = keep & ~(in_rows[..., :, None] & in_cols[..., None, :])
    return torch.where(keep.unsqueeze(2), out, torch.zeros((), dtype=out.dtype, device=out.device))
