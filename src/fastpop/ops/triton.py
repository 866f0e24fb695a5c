"""The Triton backend's op set: the kernels of `fastpop.kernels.triton` behind autograd functions with the
signatures and semantics of `reference`. Used on CUDA by default (--backend auto), and on the CPU under
TRITON_INTERPRET=1 (tests).

Every op of every spec of the grammar is a Triton launch: conv blocks (any odd K, stride 1 or 2, the 2x2 max or
average pool fused), BatchNorm convs (the plain conv, then one normalize pass with the ReLU and pool fused) and
residual blocks (the skip, identity or projection, added in the second BatchNorm's normalize pass), standalone 2x2
pools, global average pool, flatten, dense layers (ReLU or not), cross-entropy, the fused head (global average
pool + classifier + loss, and the evaluation bits) and the optimizer step (SGD, Nesterov, Adam(W): one launch for
all networks, a grid's groups each with their own scalars). The first layer,
whatever it is, reads its images from the resident data set by batch index, augmented inside that read when
training asks for it: `gather_images` returns a `Gathered` marker (with each example's augmentation draws, a few
bytes), not a batch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from fastpop.kernels.triton import augment as _augment, conv as _conv, dense as _dense, head as _head, loss as _loss
from fastpop.kernels.triton import batchnorm as _batchnorm, optim as _optim, pool as _pool

from ..archs import BN_EPS, BN_MOMENTUM


# Networks are grid axis 1 of most kernels, which CUDA caps at 65,535: the chain runs no more in one op.
MAX_NETWORKS = 65535


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class Gathered:
    """The first layer's input, left in the data set: read by index inside that layer's kernel."""

    x: torch.Tensor  # [N, C, H, W] stored dtype
    idx: torch.Tensor  # int64 [P, B]
    mean: torch.Tensor  # fp32 [C]
    std: torch.Tensor  # fp32 [C]
    flat: bool  # read as [P, B, C*H*W] (a dense layer's input) rather than [P, B, H, W, C]
    aug: tuple | None = None  # (draws int32 [P, B, 5], cutout side): the kernels' augmentation, or None

    @property
    def parts(self):
        return self.x, self.idx, self.mean, self.std, self.aug


def gather_images(x, idx, mean, std, flat, aug=None):
    """The first layer's input: images x [N, C, H, W] of batches idx [P, B], normalized by mean and std [C], and
    augmented by aug (an AugmentBatch: its transform, the networks' order seeds [P] and the epoch) when given,
    as `reference.gather_images`; read inside the first layer's kernels."""
    idx = idx.contiguous()
    draws = None
    if aug is not None:
        draws = (_augment.draws(aug.augment, aug.seeds, aug.epoch, idx, *x.shape[2:], _interpret()),
                 aug.augment.cutout)
    return Gathered(x.contiguous(), idx, mean.float().contiguous(), std.float().contiguous(), flat, draws)


def _input(h):
    """(x, idx, mean, std, aug) for a kernel launch from an activation or a Gathered input."""
    if isinstance(h, Gathered):
        return h.parts
    return h.contiguous(), None, None, None, None


class _ConvBlock(torch.autograd.Function):
    """A conv block (bias, ReLU, an optional pool; any stride), or with relu False and no bias the plain conv a
    BatchNorm takes."""

    @staticmethod
    def forward(ctx, x, idx, mean, std, aug, w, b, pool, stride=1, relu=True):
        gather = idx is not None
        w, b = w.contiguous(), None if b is None else b.contiguous()
        out, arg = _conv.conv_fwd(x, idx, mean, std, w, b, pool, gather, _interpret(), aug, stride, relu)
        ctx.save_for_backward(x, idx, mean, std, w, out, arg)
        ctx.pool, ctx.gather, ctx.aug, ctx.stride, ctx.relu, ctx.bias = pool, gather, aug, stride, relu, b is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, idx, mean, std, w, out, arg = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0] and not ctx.gather
        dx, dw, db = _conv.conv_bwd(x, idx, mean, std, w, out, arg, dout.contiguous(), ctx.pool, ctx.gather,
                                    need_dx, _interpret(), aug=ctx.aug, stride=ctx.stride, bias=ctx.bias,
                                    relu=ctx.relu)
        return dx, None, None, None, None, dw, db, None, None, None


def conv_block(h, w, b, pool):
    return _ConvBlock.apply(*_input(h), w, b, pool)


def conv_stride_block(h, w, b, stride, training, pool):
    """As `reference.conv_stride_block`: the conv block's kernels with a stride."""
    return _ConvBlock.apply(*_input(h), w, b, pool, stride)


def conv(h, w, b=None, stride=1):
    """As `reference.conv`, the conv alone (no ReLU; no bias when b is None), as a BatchNorm takes it:
    [P, B, ceil(H / stride), ceil(W / stride), COUT]."""
    return _ConvBlock.apply(*_input(h), w, b, None, stride, False)


class _BatchNorm(torch.autograd.Function):
    """BatchNorm of a plain conv's output y [P, B, H, W, C] with gamma, beta [P, C], then (relu) ReLU and a 2x2
    pool, with a residual block's skip added before the ReLU in the same pass: `skip` (an activation [P, B, H, W,
    C]), `gathered` (the block's input images, read by index), or the projection's plain conv output yp with its
    own gamma and beta (gp, bp). running: the running mean and variance [P, C] of y (and of yp), updated in place
    in training, used in evaluation."""

    @staticmethod
    def forward(ctx, y, gamma, beta, skip, yp, gp, bp, gathered, running, training, relu, pool):
        interpret = _interpret()
        y, gamma, beta = y.contiguous(), gamma.contiguous(), beta.contiguous()
        mean, invstd = _bn_stats(y, *running[:2], training, interpret)
        proj = skip_parts = None
        if yp is not None:
            yp, gp, bp = yp.contiguous(), gp.contiguous(), bp.contiguous()
            proj = (yp, *_bn_stats(yp, *running[2:4], training, interpret), gp, bp)
        elif skip is not None:
            skip_parts = (skip.contiguous(), None, None, None, None)
        elif gathered is not None:
            skip_parts = gathered.parts
        out, arg = _batchnorm.bn_apply(y, mean, invstd, gamma, beta, relu, pool, interpret, skip_parts, proj)
        saved = (y, mean, invstd, gamma, out, arg) + (proj[:4] if proj else (None,) * 4)
        ctx.save_for_backward(*saved)
        ctx.training, ctx.relu, ctx.pool, ctx.skip = training, relu, pool, skip is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        y, mean, invstd, gamma, out, arg, yp, meanp, invstdp, gp = ctx.saved_tensors
        dout, interpret = dout.contiguous(), _interpret()
        skip_grad = ctx.skip and ctx.needs_input_grad[3]
        dy, dgamma, dbeta, dskip = _batchnorm.bn_bwd(dout, out, arg, y, mean, invstd, gamma, ctx.relu, ctx.pool,
                                                     ctx.training, interpret, skip_grad)
        dyp = dgp = dbp = None
        if yp is not None:
            dyp, dgp, dbp, _ = _batchnorm.bn_bwd(dout, out, arg, yp, meanp, invstdp, gp, ctx.relu, ctx.pool,
                                                 ctx.training, interpret)
        return dy, dgamma, dbeta, dskip, dyp, dgp, dbp, None, None, None, None, None


def _bn_stats(y, running_mean, running_var, training, interpret):
    """The kernels' statistics, the running ones updated in place (through contiguous stand-ins for views that
    are not: the kernels index them as [P, C] rows)."""
    rm, rv = running_mean.contiguous(), running_var.contiguous()
    out = _batchnorm.bn_stats(y, rm, rv, training, BN_MOMENTUM, BN_EPS, interpret)
    for view, written in ((running_mean, rm), (running_var, rv)):
        if written is not view:
            view.copy_(written)
    return out


def conv_bn_block(h, w, gamma, beta, running_mean, running_var, stride, training, pool):
    """As `reference.conv_bn_block`: the plain conv, then BatchNorm + ReLU + the pool in one normalize pass."""
    return _BatchNorm.apply(conv(h, w, None, stride), gamma, beta, None, None, None, None, None,
                            (running_mean, running_var), training, True, pool)


def residual_block(h, params, stats, stride, training):
    """As `reference.residual_block`: conv + BN + ReLU, then the second conv, whose normalize pass also adds the
    skip (the block's input, or the projection's 1x1 conv normalized in the same pass) and applies the ReLU."""
    w1, g1, b1, w2, g2, b2, *proj = params
    mid = conv_bn_block(h, w1, g1, b1, stats[0], stats[1], stride, training, None)
    y2 = conv(mid, w2)
    if proj:
        wp, gp, bp = proj
        return _BatchNorm.apply(y2, g2, b2, None, conv(h, wp, None, stride), gp, bp, None, tuple(stats[2:6]),
                                training, True, None)
    gathered = h if isinstance(h, Gathered) else None
    return _BatchNorm.apply(y2, g2, b2, None if gathered else h, None, None, None, gathered, tuple(stats[2:4]),
                            training, True, None)


class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, mean, std, aug, kind):
        gather = idx is not None
        out, arg = _pool.pool_fwd(x, idx, mean, std, kind, gather, _interpret(), aug)
        ctx.save_for_backward(arg)
        ctx.kind, ctx.in_shape = kind, None if gather else x.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        dx = None
        if ctx.needs_input_grad[0]:  # never for the images of a Gathered input
            dx = _pool.pool_bwd(dout.contiguous(), ctx.saved_tensors[0], ctx.kind, ctx.in_shape, _interpret())
        return dx, None, None, None, None, None


def pool2x2(h, kind):
    return _Pool.apply(*_input(h), kind)


class _GlobalAvgPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, mean, std, aug):
        ctx.in_shape = None if idx is not None else x.shape
        return _pool.gap_fwd(x, idx, mean, std, idx is not None, _interpret(), aug)

    @staticmethod
    def backward(ctx, dout):
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _pool.gap_bwd(dout.contiguous(), ctx.in_shape, _interpret())
        return dx, None, None, None, None


def global_avg_pool(h):
    return _GlobalAvgPool.apply(*_input(h))


class _Flatten(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.in_shape = h.shape
        return _dense.flatten_fwd(h.contiguous(), _interpret())

    @staticmethod
    def backward(ctx, dout):
        return _dense.flatten_bwd(dout.contiguous(), ctx.in_shape, _interpret())


def flatten(h):
    if isinstance(h, Gathered):  # the images flattened are the data set's own rows: the dense kernel reads them
        return dataclasses.replace(h, flat=True)
    return _Flatten.apply(h)


class _Dense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, mean, std, aug, w, b, relu):
        gather = idx is not None
        w, b = w.contiguous(), b.contiguous()
        out = _dense.dense_fwd(x, idx, mean, std, w, b, relu, gather, _interpret(), aug)
        ctx.save_for_backward(x, idx, mean, std, w, out)
        ctx.relu, ctx.gather, ctx.aug = relu, gather, aug
        return out

    @staticmethod
    def backward(ctx, dout):
        x, idx, mean, std, w, out = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0] and not ctx.gather
        dx, dw, db = _dense.dense_bwd(x, idx, mean, std, w, out, dout.contiguous(), ctx.relu, ctx.gather, need_dx,
                                      _interpret(), aug=ctx.aug)
        return dx, None, None, None, None, dw, db, None


def dense(h, w, b, relu):
    if isinstance(h, Gathered) and not h.flat:
        raise ValueError("a dense layer reads the images flattened: gather_images(..., flat=True) or flatten")
    return _Dense.apply(*_input(h), w, b, relu)


def _labels(y, p, bsz):
    return y.expand(p, bsz).contiguous()


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, y, smoothing):
        logits = logits.contiguous()
        ctx.save_for_backward(logits, y)
        ctx.smoothing = smoothing
        return _loss.ce_fwd(logits, y, _interpret(), smoothing)

    @staticmethod
    def backward(ctx, dloss):
        logits, y = ctx.saved_tensors
        return _loss.ce_bwd(logits, y, dloss, _interpret(), ctx.smoothing), None, None


def cross_entropy(logits, y, smoothing=0.0):
    p, bsz, _ = logits.shape
    return _CrossEntropy.apply(logits, _labels(y, p, bsz), smoothing)


@torch.no_grad()
def score_logits(logits, y, bits, bit_offset, per_example=None):
    p, bsz, _ = logits.shape
    out = _contiguous(per_example)
    scored = _loss.ce_fwd(logits.contiguous(), _labels(y, p, bsz), _interpret(), bits=bits, bit_offset=bit_offset,
                          per_example=out)
    _copy_back(per_example, out)
    return scored


class _Head(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, y, smoothing):
        loss, g, logits = _head.head_fwd(h.contiguous(), w.contiguous(), b.contiguous(), y.contiguous(),
                                         _interpret(), smoothing)
        ctx.save_for_backward(g, logits, y.contiguous(), w.contiguous())
        ctx.h_shape, ctx.smoothing = h.shape, smoothing
        return loss

    @staticmethod
    def backward(ctx, dloss):
        g, logits, y, w = ctx.saved_tensors
        dh, dw, db = _head.head_bwd(g, logits, y, w, dloss, ctx.h_shape, _interpret(), ctx.smoothing)
        return dh, dw, db, None, None


def head_loss(h, w, b, y, smoothing=0.0):
    return _Head.apply(h, w, b, _labels(y, *h.shape[:2]), smoothing)


@torch.no_grad()
def head_score(h, w, b, y, bits, bit_offset, per_example=None):
    out = _contiguous(per_example)
    scored = _head.head_fwd(h.contiguous(), w.contiguous(), b.contiguous(), _labels(y, *h.shape[:2]), _interpret(),
                            bits=bits, bit_offset=bit_offset, per_example=out)
    _copy_back(per_example, out)
    return scored


def _contiguous(per_example):
    """The kernels write [P, B] rows: contiguous stand-ins for views into the record's [P, N] arrays."""
    return None if per_example is None else tuple(t.contiguous() for t in per_example)


def _copy_back(per_example, out) -> None:
    for view, written in zip(per_example or (), out or ()):
        if written is not view:
            view.copy_(written)


@torch.no_grad()
def optimizer_step(pop, groups, frozen, step: int) -> None:
    """The whole population's update in one launch, each group's entries with its own scalars (groups: [(lo, hi,
    config, lr)]): `reference.sgd_step` bit for bit (Nesterov too), or `reference.adam_step` within fp32
    rounding. With one group of all networks, lr may be a one-element device tensor (the CUDA-graph path)."""
    blocks, owners = pop.group_blocks(groups)
    blocks = None if blocks is None else torch.tensor(blocks, dtype=torch.int64)
    config = groups[0][2]
    if blocks is None:
        lr, wd = groups[0][3], config.weight_decay
    else:
        lr, wd = [float(groups[g][3]) for g in owners], [groups[g][2].weight_decay for g in owners]
    if config.optimizer == "sgd":
        mo = config.momentum if blocks is None else [groups[g][2].momentum for g in owners]
        _optim.sgd(pop.params, pop.grads, pop.momentum, lr, mo, wd, frozen, _interpret(), config.nesterov, blocks)
    else:
        _optim.adam(pop.params, pop.grads, pop.momentum, pop.second, float(lr) if blocks is None else lr,
                    config.betas, config.eps, wd, config.optimizer == "adamw", step, frozen, _interpret(), blocks)
