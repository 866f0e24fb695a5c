"""The numba backend, the CPU default: every spec of the architecture grammar runs whole, one network per core at a
time (kernels in `fastpop.kernels.numba.network`): forward, loss, backward and the SGD step in one call in training
(Adam: a separate pass), forward and scoring in evaluation.
"""

from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np
import torch

from fastpop.kernels.numba import network as _k

from ..archs import Arch
from . import reference

# Examples per scoring kernel call: a network's activations for more than ~128 examples spill out of L2
# (small-cnn, P = 1000, forward only: 64 examples 96 GFLOP/s, 96-128 98, 256 86 on the 2-core CPU). Nothing an
# example gets depends on the split.
SCORE_EXAMPLES = 128

_KINDS = {"conv": _k.CONV, "maxpool": _k.MAXPOOL, "avgpool": _k.AVGPOOL, "gap": _k.GAP, "flat": _k.FLAT,
          "dense": _k.DENSE}


@lru_cache(maxsize=64)
def tables(arch: Arch, nb: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The kernels' op table and head array for batch size nb (columns in `network`), and the scratch floats
    per network. A residual block is three conv rows: conv1 (+ BN + ReLU), the projection (1x1 conv + BN) when it
    has one, conv2 (+ BN) adding the skip before its ReLU."""
    offsets = np.cumsum([0] + [int(np.prod(s)) for _, s in arch.param_shapes()])
    soffsets = np.cumsum([0] + [int(np.prod(s)) for _, s in arch.stat_shapes()])
    c, h, w = arch.in_shape
    end = c * h * w * nb  # the input images lie at 0
    layout = {"end": end, "work": 0, "t": 0, "s": 0}  # scratch used; parameter and statistic tensors

    def alloc(n: int) -> int:
        at = layout["end"]
        layout["end"] += n
        return at

    def conv(c, h, w, out, k, stride, bn, relu, src, din, t, st, skip=-1, acc=False):
        """A conv row reading src (din: the gradient of src is needed), its weight parameter tensor t (then
        BatchNorm's or the bias), its running statistics tensor st."""
        n, n2 = h * w * nb, -(-h // stride) * -(-w // stride) * nb
        row = [_k.CONV, c, h, w, out, k, int(relu), 0, 0, src, 0, 0, int(din), stride, int(bn), 0, 0, skip,
               int(acc), 0, 0]
        if stride != 1:  # the input's column copies; in the gradient scratch, their gradients
            row[_k.SHIFT] = alloc(k * c * h * -(-w // 2) * nb)
            if din:
                layout["work"] = max(layout["work"], k * c * h * -(-w // 2) * nb)
        elif k > 1:
            row[_k.SHIFT] = alloc((k - 1) * c * n)
            if din:  # a transposed conv's input: the pre-activation gradient shifted along rows
                layout["work"] = max(layout["work"], (k - 1) * out * n)
        row[_k.WOFF], row[_k.BOFF] = offsets[t], offsets[t + 1]
        if bn:
            row[_k.BETA], row[_k.XHAT] = offsets[t + 2], alloc(out * n2 + 2 * out)
            row[_k.SOFF], row[_k.SVAR] = soffsets[st], soffsets[st + 1]
        row[_k.OUT] = alloc(out * n2)
        return row

    cur, rows = 0, []
    last = len(arch.ops) - 1
    for i, op in enumerate(arch.ops):
        if op.kind == "conv":
            rows.append(conv(op.c, op.h, op.w, op.out, op.k, op.stride, op.bn, True, cur, layout["t"] > 0,
                             layout["t"], layout["s"]))
            layout["t"] += op.tensors[0]
            layout["s"] += op.tensors[1]
        elif op.kind == "res":  # conv1's input gradient is added to the skip's, which conv2 or the projection wrote
            din, t, st = layout["t"] > 0, layout["t"], layout["s"]  # tensors: conv1, bn1, conv2, bn2, proj, projbn
            conv1 = conv(op.c, op.h, op.w, op.out, 3, op.stride, True, True, cur, din, t, st, acc=True)
            rows.append(conv1)
            skip = cur
            if op.projects:
                rows.append(conv(op.c, op.h, op.w, op.out, 1, op.stride, True, False, cur, din, t + 6, st + 4))
                skip = rows[-1][_k.OUT]
            h2, w2 = op.out_hw
            rows.append(conv(op.out, h2, w2, op.out, 3, 1, True, True, conv1[_k.OUT], True, t + 3, st + 2, skip))
            layout["t"] += op.tensors[0]
            layout["s"] += op.tensors[1]
        else:
            row = [_KINDS[op.kind], op.c, op.h, op.w, op.out, op.k, int(op.relu), 0, 0, cur, -1, 0,
                   int(layout["t"] > 0), 1, 0, 0, 0, -1, 0, 0, 0]
            if op.kind == "dense":  # its input transposed, for the weight gradient
                layout["work"] = max(layout["work"], op.c * nb)
                row[_k.WOFF], row[_k.BOFF] = offsets[layout["t"]], offsets[layout["t"] + 1]
                layout["t"] += op.tensors[0]
            if op.kind == "flat":
                row[_k.OUT] = cur
            elif i < last:
                row[_k.OUT] = alloc(op.out_size * nb)
            rows.append(row)
        cur = rows[-1][_k.OUT]
    end = layout["end"]
    return np.array(rows, np.int64), np.array([end, arch.classes], np.int64), int(end + layout["work"])


@lru_cache(maxsize=64)
def _layer_major(arch: Arch, p: int, stats: bool = False) -> np.ndarray:
    """ptab of a population's flat layer-major buffer (of the parameters, or of the BatchNorm running statistics):
    each tensor's start and size per network."""
    sizes = [int(np.prod(s)) for _, s in (arch.stat_shapes() if stats else arch.param_shapes())]
    return np.array([[p * sum(sizes[:j]), n] for j, n in enumerate(sizes)], np.int64).reshape(-1, 2)


class NumbaBackend:
    name = "numba"
    graphable = False
    fuses_sgd = True

    def native(self, arch: Arch) -> str | None:
        return None

    def chunk_size(self, arch: Arch, batch_size: int, p: int, device: torch.device) -> int:
        """All networks: a thread holds one network's activations whatever the chunk."""
        return p

    def eval_floats(self, arch: Arch) -> int:
        """Only the logits leave the kernel."""
        return arch.classes

    def gradients(self, pop, lo: int, hi: int, x, idx, y, mean, std, aug=None, smoothing: float = 0.0,
                  update=None) -> torch.Tensor:
        """With update (SGD's groups), each network's step is taken in the same pass and its gradient never
        reaches pop.grads."""
        ops, head, scratch = tables(pop.arch, idx.shape[1])
        loss = torch.empty(hi - lo, dtype=torch.float32)
        if aug is None:
            draws, seeds = np.zeros(4, np.int64), np.empty(0, np.int64)
        else:
            a = aug.augment
            draws = np.array([int(a.flip), a.crop, a.cutout, aug.epoch], np.int64)
            seeds = aug.seeds.numpy()
        _k.train_kernel(x.numpy(), idx.contiguous().numpy(), y.contiguous().numpy(), _f32(mean).numpy(),
                        _f32(std).numpy(), pop.params.numpy(), _layer_major(pop.arch, pop.p), lo, ops, head, scratch,
                        pop.grads.numpy(), loss.numpy(), numba.get_num_threads(), draws, seeds, float(smoothing),
                        pop.stats.numpy(), _layer_major(pop.arch, pop.p, True), pop.momentum.numpy(),
                        *_per_network_sgd(update, lo, hi), (pop.diverged_at[lo:hi] >= 0).numpy(),
                        _normalized(x, mean, std))
        return loss

    @torch.no_grad()
    def score(self, arch: Arch, params, x, idx, y, mean, std, bits, bit_offset, per_example=None, stats=()):
        p, nb = idx.shape
        rows, ptab = _rows(params, p)
        srows, stab = _rows(stats, p)
        loss = torch.zeros(p)
        pred = torch.empty(p, nb, dtype=torch.int64)
        parts = -(-nb // SCORE_EXAMPLES)
        size = -(-nb // parts // 8) * 8  # parts start on whole bytes of the record
        images, mean32, std32, table = x.numpy(), _f32(mean).numpy(), _f32(std).numpy(), _normalized(x, mean, std)
        for lo in range(0, nb, size):
            part, labels = idx[:, lo:lo + size].contiguous(), y[:, lo:lo + size].contiguous()
            ops, head, scratch = tables(arch, part.shape[1])
            summed = torch.empty(p)
            # contiguous outputs, copied into their slices after: numba compiles the kernel once per argument
            # layout (15 s each), and slices of the outputs are contiguous or not depending on the split
            n = part.shape[1]
            out = np.empty((p, n), np.int64)
            extra = np.empty((2, p, n) if per_example is not None else (2, 0, 0), np.float32)
            _k.score_kernel(images, part.numpy(), labels.numpy(), mean32, std32, rows, ptab, ops, head, scratch,
                            bits.numpy(), (bit_offset + lo) // 8, summed.numpy(), out, numba.get_num_threads(),
                            extra[0], extra[1], srows, stab, table)
            pred[:, lo:lo + size] = torch.from_numpy(out)
            for t, values in zip(per_example or (), extra):
                t[:, lo:lo + size] = torch.from_numpy(values)
            loss += summed
        return loss, pred

    @torch.no_grad()
    def optimizer_step(self, pop, groups, frozen, step: int) -> None:
        """`reference.sgd_step` bit for bit, or `reference.adam_step` within fp32 rounding: one pass over all
        networks, each group's entries with its own scalars."""
        blocks, owners = pop.group_blocks(groups)
        blocks = None if blocks is None else np.array(blocks, np.int64)
        config = groups[0][2]
        lr = [groups[g][3] for g in owners]
        wd = [groups[g][2].weight_decay for g in owners]
        if config.optimizer == "sgd":
            sgd_step(pop.params, pop.grads, pop.momentum, lr, [groups[g][2].momentum for g in owners], wd, frozen,
                     config.nesterov, blocks)
        else:
            adam_step(pop.params, pop.grads, pop.momentum, pop.second, lr, config.betas, config.eps, wd,
                      config.optimizer == "adamw", step, frozen, blocks)


def _normalized(x, mean, std) -> np.ndarray:
    """For 8-bit images, each channel's 256 values normalized as the reference normalizes them (and the kernels'
    division: the same bits), [C * 256]; else empty."""
    if x.dtype != torch.uint8:
        return np.empty(0, np.float32)
    values = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1).expand(256, len(mean), 1, 1)
    table = reference.gather_images(values, torch.arange(256).view(1, 256), _f32(mean), _f32(std), flat=True)
    return table[0].T.contiguous().view(-1).numpy()  # [256, C] -> channel after channel


def _per_network_sgd(groups, lo: int, hi: int) -> tuple:
    """(lr, momentum, weight_decay) float32 [hi - lo] of networks lo:hi from the optimizer's groups
    [(lo, hi, config, lr)], and nesterov (one for all groups, as `sgd_step`); empty arrays without groups."""
    if groups is None:
        return np.empty(0, np.float32), np.empty(0, np.float32), np.empty(0, np.float32), False
    scalars = np.full((3, hi - lo), np.nan, np.float32)  # a network no group covers would diverge, not move at random
    for a, b, cfg, lr in groups:
        scalars[:, max(a, lo) - lo:max(min(b, hi) - lo, 0)] = np.array([lr, cfg.momentum, cfg.weight_decay],
                                                                        np.float32)[:, None]
    return (*scalars, bool(groups[0][2].nesterov))


def sgd_step(params, grads, momentum_buf, lr, momentum, weight_decay, frozen=None, nesterov=False, blocks=None
             ) -> None:
    """`reference.sgd_step` on flat buffers; lr, momentum and weight_decay are numbers, or one per block of
    `blocks` [m, 2] (default: one block of everything)."""
    blocks = _whole(params) if blocks is None else blocks
    f32 = [np.atleast_1d(np.asarray(v, np.float32)) for v in (lr, momentum, weight_decay)]
    f32 = [np.broadcast_to(v, len(blocks)).copy() for v in f32]
    _k.sgd_kernel(params.numpy(), grads.numpy(), momentum_buf.numpy(), blocks, *f32, _mask(frozen),
                  numba.get_num_threads(), nesterov)


def adam_step(params, grads, exp_avg, exp_avg_sq, lr, betas, eps, weight_decay, decoupled, step, frozen=None,
              blocks=None) -> None:
    """`reference.adam_step` on flat buffers, within fp32 rounding; lr and weight_decay per block as in
    `sgd_step`."""
    blocks = _whole(params) if blocks is None else blocks
    beta1, beta2 = betas
    lr64 = np.broadcast_to(np.asarray(lr, np.float64), len(blocks)).copy()
    wd = np.broadcast_to(np.asarray(weight_decay, np.float32), len(blocks)).copy()
    f32 = np.float32
    _k.adam_kernel(params.numpy(), grads.numpy(), exp_avg.numpy(), exp_avg_sq.numpy(), blocks, lr64.astype(f32),
                   f32(beta1), f32(beta2), f32(eps), wd, decoupled, (lr64 / (1 - beta1**step)).astype(f32),
                   f32((1 - beta2**step) ** 0.5), _mask(frozen), numba.get_num_threads())


def _rows(tensors, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-network tensors [p, ...] as one flat network-major buffer, and its ptab (one tensor per network)."""
    if not len(tensors):
        return np.empty(0, np.float32), np.empty((0, 2), np.int64)
    rows = torch.cat([t.detach().reshape(p, -1) for t in tensors], 1).contiguous().view(-1).numpy()
    return rows, np.array([[0, rows.shape[0] // p]], np.int64)


def _whole(buf) -> np.ndarray:
    return np.array([[0, buf.numel()]], np.int64)


def _mask(frozen) -> np.ndarray:
    return np.empty(0, np.bool_) if frozen is None else frozen.numpy()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()
