"""The Triton backend: the kernels of `fastpop.kernels` behind autograd functions with the signatures of
`reference`. Used on CUDA by default (--backend auto), and on the CPU under TRITON_INTERPRET=1 (tests).

Conv blocks, the head (global average pool + linear + cross-entropy, and the evaluation bits) and the optimizer
step are Triton launches. The mlp architecture and any dense layers other than the head take the torch path
(`reference.dense`, batched GEMMs), as do their losses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastpop.kernels.triton import conv as _conv, head as _head, optim as _optim

from . import reference
from .reference import (cross_entropy, dense, flatten, global_avg_pool, pool2x2,  # noqa: F401 (torch path)
                        score_logits)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class Gathered:
    """The first layer's input, left in the data set: read by index inside the conv kernel."""

    x: torch.Tensor  # [N, C, H, W] stored dtype
    idx: torch.Tensor  # int64 [P, B]
    mean: torch.Tensor  # fp32 [C]
    std: torch.Tensor  # fp32 [C]


def gather_images(x, idx, mean, std, flat):
    if flat:
        return reference.gather_images(x, idx, mean, std, flat)
    return Gathered(x, idx.contiguous(), mean.float().contiguous(), std.float().contiguous())


class _ConvBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, mean, std, w, b, pool):
        gather = idx is not None
        w, b = w.contiguous(), b.contiguous()
        out, arg = _conv.conv_fwd(x, idx, mean, std, w, b, pool, gather, _interpret())
        ctx.save_for_backward(x, idx, mean, std, w, out, arg)
        ctx.pool, ctx.gather = pool, gather
        return out

    @staticmethod
    def backward(ctx, dout):
        x, idx, mean, std, w, out, arg = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0] and not ctx.gather
        dx, dw, db = _conv.conv_bwd(x, idx, mean, std, w, out, arg, dout.contiguous(), ctx.pool, ctx.gather,
                                    need_dx, _interpret())
        return dx, None, None, None, dw, db, None


def conv_block(h, w, b, pool):
    if w.shape[-1] != 3 or pool == "avg":  # the kernels are 3x3 with a fused max-pool: the torch path
        if isinstance(h, Gathered):
            h = reference.gather_images(h.x, h.idx, h.mean, h.std, False)
        return reference.conv_block(h, w, b, pool)
    if isinstance(h, Gathered):
        return _ConvBlock.apply(h.x, h.idx, h.mean, h.std, w, b, pool == "max")
    return _ConvBlock.apply(h.contiguous(), None, None, None, w, b, pool == "max")


class _Head(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, y):
        loss, g, logits = _head.head_fwd(h.contiguous(), w.contiguous(), b.contiguous(), y.contiguous(),
                                         _interpret())
        ctx.save_for_backward(g, logits, y.contiguous(), w.contiguous())
        ctx.h_shape = h.shape
        return loss

    @staticmethod
    def backward(ctx, dloss):
        g, logits, y, w = ctx.saved_tensors
        dh, dw, db = _head.head_bwd(g, logits, y, w, dloss, ctx.h_shape, _interpret())
        return dh, dw, db, None


def head_loss(h, w, b, y):
    return _Head.apply(h, w, b, y)


@torch.no_grad()
def head_score(h, w, b, y, bits, bit_offset):
    return _head.head_fwd(h.contiguous(), w.contiguous(), b.contiguous(), y.contiguous(), _interpret(),
                          bits=bits, bit_offset=bit_offset)


@torch.no_grad()
def sgd_step(params, grads, momentum_buf, lr, momentum, weight_decay, frozen=None):
    _optim.sgd(params, grads, momentum_buf, lr, momentum, weight_decay, frozen, _interpret())
