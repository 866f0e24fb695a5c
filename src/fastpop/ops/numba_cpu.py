"""The numba backend, the CPU default: every spec of the architecture grammar runs whole, one network per core at a
time (kernels in `fastpop.kernels.numba.network`): forward, loss and backward in one call in training, forward and
scoring in evaluation; the optimizer is one fused pass.
"""

from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np
import torch

from fastpop.kernels.numba import network as _k

from ..archs import Arch

# Examples per scoring kernel call: a network's activations for more than ~128 examples spill out of L2
# (small-cnn, P = 1000, forward only: 64 examples 96 GFLOP/s, 96-128 98, 256 86 on the 2-core CPU). Nothing an
# example gets depends on the split.
SCORE_EXAMPLES = 128

_KINDS = {"conv": _k.CONV, "maxpool": _k.MAXPOOL, "avgpool": _k.AVGPOOL, "gap": _k.GAP, "flat": _k.FLAT,
          "dense": _k.DENSE}


@lru_cache(maxsize=64)
def tables(arch: Arch, nb: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The kernels' op table and head array for batch size nb (columns in `network`), and the scratch floats
    per network."""
    offsets = np.cumsum([0] + [int(np.prod(s)) for _, s in arch.param_shapes()])
    c, h, w = arch.in_shape
    end = c * h * w * nb  # the input images lie at 0
    cur, n_params, work, rows = 0, 0, 0, []
    last = len(arch.ops) - 1
    for i, op in enumerate(arch.ops):
        row = [_KINDS[op.kind], op.c, op.h, op.w, op.out, op.k, int(op.relu), 0, 0, cur, -1, 0, int(n_params > 0)]
        n = op.h * op.w * nb
        if op.kind == "conv":
            row[_k.SHIFT], end = end, end + (op.k - 1) * op.c * n
            if n_params:  # a transposed conv's input: the pre-activation gradient shifted along rows
                work = max(work, (op.k - 1) * op.out * n)
        if op.kind == "dense":  # its input transposed, for the weight gradient
            work = max(work, op.c * nb)
        if op.kind in ("conv", "dense"):
            row[_k.WOFF], row[_k.BOFF] = offsets[n_params], offsets[n_params + 1]
            n_params += 2
        if op.kind == "flat":
            row[_k.OUT] = cur
        elif i < last:
            row[_k.OUT], end = end, end + op.out_size * nb
        cur = row[_k.OUT]
        rows.append(row)
    head = [end, arch.classes]
    return np.array(rows, np.int64), np.array(head, np.int64), int(end + work)


@lru_cache(maxsize=64)
def _layer_major(arch: Arch, p: int) -> np.ndarray:
    """ptab of a population's flat layer-major buffer: each parameter tensor's start and size per network."""
    sizes = [int(np.prod(s)) for _, s in arch.param_shapes()]
    return np.array([[p * sum(sizes[:j]), n] for j, n in enumerate(sizes)], np.int64)


def _unsupported(arch: Arch) -> list[str]:
    """The layers of arch the kernels do not run (they go through the reference's torch ops)."""
    kinds = {"BatchNorm": any(op.bn for op in arch.ops), "strided convs": any(op.stride != 1 for op in arch.ops),
             "residual blocks": any(op.kind == "res" for op in arch.ops)}
    return [k for k, v in kinds.items() if v]


class NumbaBackend:
    name = "numba"
    graphable = False

    def __init__(self):
        from . import reference
        from .chain import ChainBackend

        self._torch = ChainBackend("torch", reference)

    def native(self, arch: Arch) -> str | None:
        missing = _unsupported(arch)
        if missing:
            return (f"{' and '.join(missing)} have no numba kernels yet: {arch} trains and evaluates on the torch "
                    "backend's ops")
        return None

    def chunk_size(self, arch: Arch, batch_size: int, p: int, device: torch.device) -> int:
        """All networks: a thread holds one network's activations whatever the chunk."""
        if _unsupported(arch):
            return self._torch.chunk_size(arch, batch_size, p, device)
        return p

    def eval_floats(self, arch: Arch) -> int:
        """Only the logits leave the kernel."""
        if _unsupported(arch):
            return self._torch.eval_floats(arch)
        return arch.classes

    def gradients(self, pop, lo: int, hi: int, x, idx, y, mean, std, aug=None, smoothing: float = 0.0
                  ) -> torch.Tensor:
        if _unsupported(pop.arch):
            return self._torch.gradients(pop, lo, hi, x, idx, y, mean, std, aug, smoothing)
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
                        pop.grads.numpy(), loss.numpy(), numba.get_num_threads(), draws, seeds, float(smoothing))
        return loss

    @torch.no_grad()
    def score(self, arch: Arch, params, x, idx, y, mean, std, bits, bit_offset, per_example=None, stats=()):
        if _unsupported(arch):
            return self._torch.score(arch, params, x, idx, y, mean, std, bits, bit_offset, per_example, stats)
        p, nb = idx.shape
        rows = torch.cat([t.detach().reshape(p, -1) for t in params], 1).contiguous().view(-1).numpy()
        ptab = np.array([[0, rows.shape[0] // p]], np.int64)
        loss = torch.zeros(p)
        pred = torch.empty(p, nb, dtype=torch.int64)
        parts = -(-nb // SCORE_EXAMPLES)
        size = -(-nb // parts // 8) * 8  # parts start on whole bytes of the record
        for lo in range(0, nb, size):
            part, labels = idx[:, lo:lo + size].contiguous(), y[:, lo:lo + size].contiguous()
            ops, head, scratch = tables(arch, part.shape[1])
            summed = torch.empty(p)
            none = np.empty((0, 0), np.float32)
            margin, xent = (none, none) if per_example is None else (t[:, lo:lo + size].numpy() for t in per_example)
            _k.score_kernel(x.numpy(), part.numpy(), labels.numpy(), _f32(mean).numpy(), _f32(std).numpy(), rows,
                            ptab, ops, head, scratch, bits.numpy(), (bit_offset + lo) // 8, summed.numpy(),
                            pred[:, lo:lo + size].numpy(), numba.get_num_threads(), margin, xent)
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


def _whole(buf) -> np.ndarray:
    return np.array([[0, buf.numel()]], np.int64)


def _mask(frozen) -> np.ndarray:
    return np.empty(0, np.bool_) if frozen is None else frozen.numpy()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()
