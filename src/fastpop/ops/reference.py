"""The pure-torch population op set: all P networks in one call per layer. The ops of `--backend torch` (on any
device, chained by `chain`), and the reference that every kernel is tested against.

Layouts (private to this backend; the population code only chains them): conv activations [P, B, H, W, C]
(channels last within each network), dense activations [P, B, F].

Convolutions are im2col + one batched GEMM (torch.bmm) over all networks, not grouped F.conv2d: oneDNN picks
different grouped-conv algorithms for different group counts, so network k's result changed in the last bits
with P (seen on this 2-core AVX-512 CPU, torch 2.13). bmm computes each network's product the same way for any
P for the presets' shapes, which makes network k bit-identical alone or in any population there
(tests/test_independence.py); not for every shape: with an odd output width (5 or 10 columns from 5 or 7 rows),
MKL's batched GEMM rounds a lone network's product differently. The numba backend is bit-identical for any spec.
The bias rides in the GEMM as a column of ones, so its gradient comes from the same GEMM rather than a reduction
whose threading, and so rounding, could depend on P.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..archs import BN_EPS, BN_MOMENTUM
from ..data import augment


def gather_images(x: torch.Tensor, idx: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, flat: bool,
                  aug=None) -> torch.Tensor:
    """Normalized batches, augmented when `aug` (an AugmentBatch) is given. x [N, C, H, W] stored dtype; idx int64
    [P, B], row k is network k's batch. Returns [P, B, H, W, C] for convs, or [P, B, C*H*W] (nn.Flatten's order)
    when `flat`."""
    batch = (x[idx].float() - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)  # [P, B, C, H, W]
    if aug is not None:
        batch = augment.apply(aug.augment, batch,
                              augment.draws(aug.augment, aug.seeds, aug.epoch, idx, *batch.shape[3:]))
    return batch.flatten(2) if flat else batch.permute(0, 1, 3, 4, 2).contiguous()


class _Conv(torch.autograd.Function):
    """K x K convolution, padding K // 2, stride s, of every network at once. x [P, B, H, W, C];
    w [P, Cout, C, K, K]; b [P, Cout] or None (no bias) -> [P, B, H', W', Cout], H' = ceil(H / s)."""

    @staticmethod
    def forward(ctx, x, w, b, stride=1):
        p, bsz = x.shape[:2]
        k, c = w.shape[-1], x.shape[-1]
        cols = im2col(x, k, stride, b is not None)  # [P, B*H'*W', K*K*C (+ 1)]
        wmat = w.permute(0, 3, 4, 2, 1).reshape(p, k * k * c, -1)
        if b is not None:
            wmat = torch.cat([wmat, b.unsqueeze(1)], 1)
        ctx.save_for_backward(cols, wmat)
        ctx.x_shape, ctx.k, ctx.stride, ctx.bias = x.shape, k, stride, b is not None
        h2, w2 = -(-x.shape[2] // stride), -(-x.shape[3] // stride)
        return torch.bmm(cols, wmat).view(p, bsz, h2, w2, -1)

    @staticmethod
    def backward(ctx, dout):
        cols, wmat = ctx.saved_tensors
        p, bsz, h, wd, c = ctx.x_shape
        k, bias = ctx.k, ctx.bias
        dout = dout.reshape(p, -1, dout.shape[-1])
        dwmat = torch.bmm(cols.transpose(1, 2), dout)  # [P, K*K*C (+ 1), Cout]: weights and bias together
        dw = dwmat[:, :k * k * c].view(p, k, k, c, -1).permute(0, 4, 3, 1, 2)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = col2im(torch.bmm(dout, wmat[:, :k * k * c].transpose(1, 2)), ctx.x_shape, k, ctx.stride)
        return dx, dw, dwmat[:, -1] if bias else None, None


def im2col(x: torch.Tensor, k: int = 3, stride: int = 1, bias: bool = True) -> torch.Tensor:
    """[P, B, H, W, C] -> [P, B*H'*W', K*K*C (+ 1)]: each output pixel's K x K zero-padded neighbourhood (every
    stride-th pixel) in (kh, kw, c) order, then a 1 for the bias when `bias`."""
    p, bsz, h, w, c = x.shape
    r = k // 2
    h2, w2 = -(-h // stride), -(-w // stride)
    cols = torch.empty(p, bsz * h2 * w2, k * k * c + bias, dtype=x.dtype, device=x.device)
    if bias:
        cols[:, :, -1] = 1
    windows = F.pad(x, (0, 0, r, r, r, r)).unfold(2, k, stride).unfold(3, k, stride)  # [P, B, H', W', C, K, K]
    cols[:, :, :k * k * c].unflatten(1, (bsz, h2, w2)).unflatten(4, (k, k, c)).copy_(
        windows.permute(0, 1, 2, 3, 5, 6, 4))
    return cols


def col2im(dcols: torch.Tensor, shape, k: int = 3, stride: int = 1) -> torch.Tensor:
    """Adjoint of im2col (without the bias column): [P, B*H'*W', K*K*C] -> [P, B, H, W, C]."""
    p, bsz, h, w, c = shape
    r = k // 2
    h2, w2 = -(-h // stride), -(-w // stride)
    d = dcols.view(p, bsz, h2, w2, k, k, c)
    dx = torch.zeros(p, bsz, h + 2 * r, w + 2 * r, c, dtype=dcols.dtype, device=dcols.device)
    for kh in range(k):
        for kw in range(k):
            rows, cols = slice(kh, kh + stride * (h2 - 1) + 1, stride), slice(kw, kw + stride * (w2 - 1) + 1, stride)
            dx[:, :, rows, cols] += d[:, :, :, :, kh, kw]
    return dx[:, :, r:r + h, r:r + w]


def conv(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, stride: int = 1) -> torch.Tensor:
    """The conv alone (no ReLU): h [P, B, H, W, Cin]; w [P, Cout, Cin, K, K]; b [P, Cout] or None."""
    return _Conv.apply(h, w, b, stride)


def _row_sums(t: torch.Tensor) -> torch.Tensor:
    """[P, N, C] -> [P, C], summed over N, each network's sums in the same order whatever P: torch sums each output
    on one thread in an order set by N alone, except a lone output (P = C = 1), whose sum it splits across threads
    (so a zero row is added then; a batched GEMM with ones also changed with P)."""
    if t.shape[2] == 1:
        return torch.cat([t, torch.zeros_like(t)], 2).sum(1)[:, :1]
    return t.sum(1)


class _BatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm of every network with its own batch statistics: x [P, B, H, W, C] normalized over
    (B, H, W) per network and channel with the biased variance, scaled by gamma and shifted by beta [P, C].
    Returns (out, batch mean, biased batch variance)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        p, c = x.shape[0], x.shape[-1]
        flat = x.reshape(p, -1, c)
        n = flat.shape[1]
        mean = _row_sums(flat) / n
        centered = flat - mean.unsqueeze(1)
        var = _row_sums(centered * centered) / n
        invstd = 1 / torch.sqrt(var + eps)  # sqrt and / round the same vectorized or not; rsqrt does not
        xhat = centered * invstd.unsqueeze(1)
        ctx.save_for_backward(xhat, gamma, invstd)
        ctx.mark_non_differentiable(mean, var)
        return (xhat * gamma.unsqueeze(1) + beta.unsqueeze(1)).view_as(x), mean, var

    @staticmethod
    def backward(ctx, dout, _dmean, _dvar):
        xhat, gamma, invstd = ctx.saved_tensors
        p, n, c = xhat.shape
        d = dout.reshape(p, n, c)
        dbeta = _row_sums(d)
        dgamma = _row_sums(d * xhat)
        scale = (gamma * invstd / n).unsqueeze(1)
        dx = scale * (n * d - dbeta.unsqueeze(1) - xhat * dgamma.unsqueeze(1))
        return dx.view_as(dout), dgamma, dbeta, None


def batch_norm(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, running_mean: torch.Tensor,
               running_var: torch.Tensor, training: bool) -> torch.Tensor:
    """nn.BatchNorm2d of every network, h [P, B, H, W, C], gamma, beta and the running statistics [P, C]. In
    training: the batch's statistics, and the running ones updated in place (momentum BN_MOMENTUM, the unbiased
    variance, as torch); in evaluation: the running statistics."""
    if not training:
        scale = gamma / torch.sqrt(running_var + BN_EPS)
        shift = beta - running_mean * scale
        return h * scale[:, None, None, None] + shift[:, None, None, None]
    out, mean, var = _BatchNorm.apply(h, gamma, beta, BN_EPS)
    n = h.numel() // (h.shape[0] * h.shape[-1])
    with torch.no_grad():
        running_mean.mul_(1 - BN_MOMENTUM).add_(mean, alpha=BN_MOMENTUM)
        running_var.mul_(1 - BN_MOMENTUM).add_(var * (n / max(n - 1, 1)), alpha=BN_MOMENTUM)
    return out


def conv_bn_block(h, w, gamma, beta, running_mean, running_var, stride: int, training: bool, pool: str | None
                  ) -> torch.Tensor:
    """K x K conv (no bias, stride) + BatchNorm + ReLU, then an optional 2x2 pool as `conv_block`."""
    out = torch.relu(batch_norm(conv(h, w, None, stride), gamma, beta, running_mean, running_var, training))
    return pool2x2(out, pool) if pool else out


def conv_stride_block(h, w, b, stride: int, training: bool, pool: str | None) -> torch.Tensor:
    """A strided K x K conv + bias + ReLU, then an optional 2x2 pool (training: unused, the signature of
    `conv_bn_block`)."""
    out = torch.relu(conv(h, w, b, stride))
    return pool2x2(out, pool) if pool else out


def residual_block(h, params, stats, stride: int, training: bool) -> torch.Tensor:
    """The grammar's basic block (`fastpop.blocks.BasicBlock`) of every network. params: conv1 weight, bn1 weight
    and bias, conv2 weight, bn2 weight and bias, then (a projection) its 1x1 conv weight and BN weight and bias;
    stats: the BNs' running means and variances in the same order."""
    w1, g1, b1, w2, g2, b2, *proj = params
    out = torch.relu(batch_norm(conv(h, w1, None, stride), g1, b1, stats[0], stats[1], training))
    out = batch_norm(conv(out, w2), g2, b2, stats[2], stats[3], training)
    if proj:
        wp, gp, bp = proj
        h = batch_norm(conv(h, wp, None, stride), gp, bp, stats[4], stats[5], training)
    return torch.relu(out + h)


def conv_block(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, pool: str | None) -> torch.Tensor:
    """K x K conv (padding K // 2) + bias + ReLU, then a 2x2 max or average pool (floor) when pool is "max" or
    "avg". h [P, B, H, W, Cin]; w [P, Cout, Cin, K, K]; b [P, Cout]. Returns [P, B, H', W', Cout]."""
    out = torch.relu(_Conv.apply(h, w, b, 1))
    return pool2x2(out, pool) if pool else out


def pool2x2(h: torch.Tensor, kind: str) -> torch.Tensor:
    """2x2 max or average pool, stride 2, floor: [P, B, H, W, C] -> [P, B, H//2, W//2, C]."""
    return max_pool2x2(h) if kind == "max" else avg_pool2x2(h)


def avg_pool2x2(h: torch.Tensor) -> torch.Tensor:
    """[P, B, H, W, C] -> [P, B, H//2, W//2, C], as nn.AvgPool2d(2)."""
    p, bsz, hh, w, c = h.shape
    nchw = h.view(p * bsz, hh, w, c).permute(0, 3, 1, 2)
    return F.avg_pool2d(nchw, 2).permute(0, 2, 3, 1).reshape(p, bsz, hh // 2, w // 2, c)


def max_pool2x2(h: torch.Tensor) -> torch.Tensor:
    """[P, B, H, W, C] -> [P, B, H//2, W//2, C]; ties and gradients exactly as nn.MaxPool2d(2)."""
    p, bsz, hh, w, c = h.shape
    nchw = h.view(p * bsz, hh, w, c).permute(0, 3, 1, 2)  # a channels-last NCHW view: no copy
    return F.max_pool2d(nchw, 2).permute(0, 2, 3, 1).reshape(p, bsz, hh // 2, w // 2, c)


def global_avg_pool(h: torch.Tensor) -> torch.Tensor:
    """[P, B, H, W, C] -> [P, B, C]."""
    return h.mean((2, 3))


def flatten(h: torch.Tensor) -> torch.Tensor:
    """[P, B, H, W, C] -> [P, B, C*H*W] in nn.Flatten's (C, H, W) order."""
    return h.permute(0, 1, 4, 2, 3).flatten(2)


def dense(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, relu: bool) -> torch.Tensor:
    """h [P, B, Fin]; w [P, Fout, Fin]; b [P, Fout]. Returns [P, B, Fout]."""
    out = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
    return torch.relu(out) if relu else out


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """logits [P, B, K], y int64 [P, B] or [B] (shared) -> each network's mean cross-entropy, [P], with
    F.cross_entropy's label smoothing."""
    p, bsz, k = logits.shape
    y = y.expand(p, bsz)
    return F.cross_entropy(logits.reshape(p * bsz, k), y.reshape(-1), reduction="none",
                           label_smoothing=smoothing).view(p, bsz).mean(1)


def head_loss(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0
              ) -> torch.Tensor:
    """Global average pool + linear + each network's mean cross-entropy [P]. h [P, B, H, W, C]; y [P, B]."""
    return cross_entropy(dense(global_avg_pool(h), w, b, False), y, smoothing)


@torch.no_grad()
def head_score(h, w, b, y, bits, bit_offset, per_example=None):
    """Evaluation of the same head: see score_logits."""
    return score_logits(dense(global_avg_pool(h), w, b, False), y, bits, bit_offset, per_example)


def pack_into(bits: torch.Tensor, right: torch.Tensor, bit_offset: int) -> None:
    """Write bool [P, B] into bits uint8 [P, R] from bit `bit_offset` (a multiple of 8): bit i of byte j is
    example 8j + i (little bit order, as np.packbits(bitorder="little")); a last partial byte is zero-padded."""
    p, bsz = right.shape
    padded = torch.zeros(p, -(-bsz // 8) * 8, dtype=torch.int32, device=right.device)
    padded[:, :bsz] = right
    weights = 1 << torch.arange(8, dtype=torch.int32, device=right.device)
    packed = (padded.view(p, -1, 8) * weights).sum(-1).to(torch.uint8)
    bits[:, bit_offset // 8:bit_offset // 8 + packed.shape[1]] = packed


@torch.no_grad()
def score_logits(logits: torch.Tensor, y: torch.Tensor, bits: torch.Tensor, bit_offset: int, per_example=None):
    """Evaluation: writes argmax == y (ties to the lowest class) as bits [P, R] (uint8, little bit order) from
    bit `bit_offset` (a multiple of 8); returns (summed cross-entropy over examples with y >= 0 [P],
    predictions int64 [P, B]). y = -1 marks a class the network was not trained on: always wrong, no loss.
    per_example: (margin, xent) float32 [P, B] to fill with each example's true-class logit minus the largest
    other, and its cross-entropy (NaN where y = -1)."""
    p, bsz, k = logits.shape
    pred = logits.argmax(-1)
    pack_into(bits, pred == y, bit_offset)
    label = y.clamp_min(0).expand(p, bsz)
    ce = F.cross_entropy(logits.reshape(p * bsz, k), label.reshape(-1), reduction="none").view(p, bsz)
    if per_example is not None:
        margin, xent = per_example
        true = logits.gather(-1, label.unsqueeze(-1)).squeeze(-1)
        other = logits.scatter(-1, label.unsqueeze(-1), float("-inf")).amax(-1)
        margin.copy_(torch.where(y >= 0, true - other, float("nan")))
        xent.copy_(torch.where(y >= 0, ce, float("nan")))
    return torch.where(y >= 0, ce, 0.0).sum(1), pred


@torch.no_grad()
def sgd_step(params: torch.Tensor, grads: torch.Tensor, momentum_buf: torch.Tensor, lr: float, momentum: float,
             weight_decay: float, frozen: torch.Tensor | None = None, nesterov: bool = False) -> None:
    """torch.optim.SGD's update (dampening 0) over the flat buffers of all networks, in place. The op sequence
    mirrors torch's so the results match it bit for bit. Entries where `frozen` (bool, flat) is set get a zero
    gradient and momentum, so they do not move (a diverged network's NaNs stay its own)."""
    if weight_decay:
        grads.add_(params, alpha=weight_decay)
    if frozen is not None:
        grads.masked_fill_(frozen, 0)
        momentum_buf.masked_fill_(frozen, 0)
    momentum_buf.mul_(momentum).add_(grads)
    params.add_(grads.add(momentum_buf, alpha=momentum) if nesterov else momentum_buf, alpha=-lr)


@torch.no_grad()
def adam_step(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, lr: float,
              betas: tuple[float, float], eps: float, weight_decay: float, decoupled: bool, step: int,
              frozen: torch.Tensor | None = None) -> None:
    """torch.optim.Adam's update (AdamW's with `decoupled`), step = the number of updates so far including this
    one, in place, in torch's op sequence. Frozen entries do not move: zero gradient and moments, no decay."""
    beta1, beta2 = betas
    if weight_decay and decoupled:
        decayed = params.mul(1 - lr * weight_decay)
        params.copy_(decayed if frozen is None else torch.where(frozen, params, decayed))
    elif weight_decay:
        grads.add_(params, alpha=weight_decay)
    if frozen is not None:
        for t in (grads, exp_avg, exp_avg_sq):
            t.masked_fill_(frozen, 0)
    exp_avg.lerp_(grads, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    params.addcdiv_(exp_avg, denom, value=-step_size)
