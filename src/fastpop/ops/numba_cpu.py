"""The numba backend, the CPU default: a CNN whose only dense layer is the classifier runs whole, one network per
core at a time (`cnn_kernels`): forward, loss and backward in one call in training, forward and scoring in
evaluation; the optimizer is one fused pass. Other architectures (the mlp) run op by op on the torch path of
`reference`.
"""

from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np
import torch

from . import cnn_kernels as _k
from .reference import (conv_block, cross_entropy, dense, gather_images, global_avg_pool,  # noqa: F401
                        head_loss, head_score, score_logits)

NAME = "numba"


def runs_whole(arch) -> bool:
    """Whether `cnn_kernels` runs this architecture (network_grads, network_score): convs, then the classifier
    as the only dense layer."""
    return bool(arch.convs) and len(arch.dense) == 1


@lru_cache(maxsize=64)
def _tables(arch, nb: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The kernels' layer and head tables for batch size nb (columns in `cnn_kernels`), and the scratch floats
    per network."""
    shapes = arch.param_shapes()
    offsets = np.cumsum([0] + [int(np.prod(s)) for _, s in shapes])
    c, h, w = arch.in_shape
    end = c * h * w * nb  # the input images lie at 0
    rows = []
    for i, (conv, (h, w)) in enumerate(zip(arch.convs, arch.conv_sizes())):
        n = h * w * nb
        inp = rows[-1][_k.NEXT] if rows else 0
        shift, out = end, end + 2 * conv.cin * n
        end = nxt = out + conv.cout * n
        if conv.pool:
            end += conv.cout * (h // 2) * (w // 2) * nb
        rows.append([conv.cin, conv.cout, h, w, int(conv.pool), offsets[2 * i], offsets[2 * i + 1], inp, out,
                     nxt if conv.pool else out, shift])
    n_conv = len(arch.convs)
    g, end = end, end + arch.convs[-1].cout * nb
    head = [offsets[2 * n_conv], offsets[2 * n_conv + 1], g, arch.classes, end]
    # room for a pre-activation gradient shifted left and right: the input of a transposed conv (not the first's)
    end += max([2 * conv.cout * h * w * nb for conv, (h, w) in zip(arch.convs[1:], arch.conv_sizes()[1:])] + [0])
    return np.array(rows, np.int64), np.array(head, np.int64), int(end)


def _rows(params) -> torch.Tensor:
    """Network-major copy [P, D] of per-layer parameter tensors [P, *shape]."""
    return torch.cat([p.detach().reshape(p.shape[0], -1) for p in params], 1).contiguous()


@lru_cache(maxsize=64)
def _layer_major(arch, p: int) -> np.ndarray:
    """ptab of a population's flat layer-major buffer: each parameter tensor's start and size per network."""
    sizes = [int(np.prod(s)) for _, s in arch.param_shapes()]
    return np.array([[p * sum(sizes[:j]), n] for j, n in enumerate(sizes)], np.int64)


def network_grads(pop, lo: int, x, idx, y, mean, std) -> torch.Tensor:
    """Networks lo..lo + n of the population: each one's mean cross-entropy [n] on its batch idx [n, B] with
    labels y [n, B]; its gradient is written (not added) into pop.grads."""
    layers, head, scratch = _tables(pop.arch, idx.shape[1])
    loss = torch.empty(idx.shape[0], dtype=torch.float32)
    _k.train_kernel(x.numpy(), idx.contiguous().numpy(), y.contiguous().numpy(), _f32(mean).numpy(),
                    _f32(std).numpy(), pop.params.numpy(), _layer_major(pop.arch, pop.p), lo, layers, head, scratch,
                    pop.grads.numpy(), loss.numpy(), numba.get_num_threads())
    return loss


# Examples per scoring kernel call: a network's activations for more than ~128 examples spill out of L2
# (small-cnn, P = 1000, forward only: 64 examples 96 GFLOP/s, 96-128 98, 256 86 on the 2-core CPU). Nothing an
# example gets depends on the split.
SCORE_EXAMPLES = 128


@torch.no_grad()
def network_score(arch, params, x, idx, y, mean, std, bits, bit_offset):
    """`population.score` in whole networks: correctness bits into bits [P, R] from bit `bit_offset` (a multiple
    of 8); returns (summed cross-entropy over labelled examples [P], predictions int64 [P, B]). params are
    per-layer tensors [P, *shape]."""
    p, nb = idx.shape
    rows = _rows(params).view(-1).numpy()
    ptab = np.array([[0, rows.shape[0] // p]], np.int64)
    loss = torch.zeros(p)
    pred = torch.empty(p, nb, dtype=torch.int64)
    parts = -(-nb // SCORE_EXAMPLES)
    size = -(-nb // parts // 8) * 8  # parts start on whole bytes of the record
    for lo in range(0, nb, size):
        part, labels = idx[:, lo:lo + size].contiguous(), y[:, lo:lo + size].contiguous()
        layers, head, scratch = _tables(arch, part.shape[1])
        summed = torch.empty(p)
        _k.score_kernel(x.numpy(), part.numpy(), labels.numpy(), _f32(mean).numpy(), _f32(std).numpy(), rows,
                        ptab, layers, head, scratch, bits.numpy(), (bit_offset + lo) // 8, summed.numpy(),
                        pred[:, lo:lo + size].numpy(), numba.get_num_threads())
        loss += summed
    return loss, pred


@torch.no_grad()
def sgd_step(params, grads, momentum_buf, lr, momentum, weight_decay, frozen=None) -> None:
    """`reference.sgd_step`, bit for bit, in one pass."""
    none = np.empty(0, np.bool_)
    _k.sgd_kernel(params.numpy(), grads.numpy(), momentum_buf.numpy(), np.float32(lr), np.float32(momentum),
                  np.float32(weight_decay), none if frozen is None else frozen.numpy(), numba.get_num_threads())


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()
