"""Op-by-op backends: an architecture's layers chained over an op set (one call per layer for all networks,
gradients through autograd). The torch backend is this chain over `reference`; the triton backend is the same
chain over its kernels.

An op set offers the functions of `reference`: gather_images, conv_block (conv + ReLU + an optional 2x2 pool fused),
pool2x2, global_avg_pool, flatten, dense, cross_entropy, head_loss / head_score (global average pool + classifier +
loss fused), score_logits, and sgd_step or optimizer_step (the op set's own update of every group at once, when
it has one).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import torch

from ..archs import Arch
from . import reference

# --max-nets-per-chunk auto on a CPU: activation bytes per chunk. Measured on the 2-core AVX-512 CPU, small-cnn on
# digits, P = 1000, B = 32 (1.5 MB per network): one chunk of all 1000 networks 72.5k net-images/s, chunks of 250
# 93.6k, 100 113.8k, 50 101.1k, 10 65.9k; the working set of a chunk near 128 MiB is the sweet spot.
CPU_CHUNK_BYTES = 128 << 20


def _fused_head(arch: Arch) -> bool:
    """Convs end in a global average pool and the classifier: the op set's fused head takes both."""
    ops = arch.ops
    return len(ops) >= 2 and ops[-2].kind == "gap" and any(op.kind == "conv" for op in ops)


def _features(arch: Arch, ops: ModuleType, params, images, idx, mean, std, stop: int, aug=None, stats=(),
              training: bool = False):
    """Layers 0..stop-1 of arch; a conv takes the pool right after it into its block. Returns (activation, the
    parameters left), the batch augmented by aug (an AugmentBatch) when given. stats: the BatchNorm running
    statistics ([n, C] each, `Arch.stat_shapes` order), normalizing in evaluation and updated in place in
    training."""
    it, st = iter(params), iter(stats)
    layers, i = arch.ops, 0
    # a first layer on the reference's ops takes the reference's batch (an op set's may be a marker its kernels read)
    first = _block(layers[0]) if stop else None
    gather = reference.gather_images if first and not hasattr(ops, first) else ops.gather_images
    h = gather(images, idx, mean, std, arch.flat_input, aug)
    while i < stop:
        op = layers[i]
        if op.kind == "conv":
            pool = None
            if i + 1 < stop and layers[i + 1].kind in ("maxpool", "avgpool"):
                pool, i = layers[i + 1].kind[:3], i + 1
            if _block(op):
                h = _op(ops, _block(op))(h, *_take(it, op.tensors[0]), *_take(st, op.tensors[1]), op.stride, training,
                                         pool)
            else:
                h = ops.conv_block(h, next(it), next(it), pool)
        elif op.kind == "res":
            h = _op(ops, _block(op))(h, _take(it, op.tensors[0]), _take(st, op.tensors[1]), op.stride, training)
        elif op.kind in ("maxpool", "avgpool"):
            h = ops.pool2x2(h, op.kind[:3])
        elif op.kind == "gap":
            h = ops.global_avg_pool(h)
        elif op.kind == "flat":
            h = ops.flatten(h)
        else:
            h = ops.dense(h, next(it), next(it), op.relu)
        i += 1
    return h, list(it)


def _take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def _op(ops: ModuleType, name: str):
    """The op set's own `name`, else the reference's (the backend's `native` says so once per run)."""
    return getattr(ops, name, None) or getattr(reference, name)


def _block(op) -> str | None:
    """The op-set function of a BatchNorm conv, a strided conv or a residual block (None for other layers)."""
    if op.kind == "res":
        return "residual_block"
    if op.kind == "conv" and (op.bn or op.stride != 1):
        return "conv_bn_block" if op.bn else "conv_stride_block"
    return None


def native(arch: Arch, ops: ModuleType) -> str | None:
    """Which layers of arch an op set runs through the reference's torch ops, or None when it has them all."""
    missing = sorted({_block(op) for op in arch.ops if _block(op) and not hasattr(ops, _block(op))})
    if not missing:
        return None
    return (f"{', '.join(missing)} of {arch} run{'s' if len(missing) == 1 else ''} on the reference's torch ops "
            f"(no kernels of its own yet); the other layers on its kernels")


def loss(arch: Arch, ops: ModuleType, params, images, idx, y, mean, std, aug=None, smoothing: float = 0.0,
         stats=()) -> torch.Tensor:
    """Each network's mean cross-entropy [P] (label-smoothed by `smoothing`) on its batch idx [P, B] with labels
    y [P, B], augmented by aug (an AugmentBatch) when given; BatchNorm in training mode, its running statistics
    `stats` updated in place."""
    if _fused_head(arch):
        h, (w, b) = _features(arch, ops, params, images, idx, mean, std, len(arch.ops) - 2, aug, stats, True)
        return ops.head_loss(h, w, b, y, smoothing)
    h, _ = _features(arch, ops, params, images, idx, mean, std, len(arch.ops), aug, stats, True)
    return ops.cross_entropy(h, y, smoothing)


@torch.no_grad()
def score(arch: Arch, ops: ModuleType, params, images, idx, y, mean, std, bits, bit_offset, per_example=None,
          stats=()):
    """Evaluation of a batch: correctness bits into `bits` [P, R] from bit `bit_offset`, and per-example margins
    and losses into per_example when given (see `reference.score_logits`); returns (summed loss over labelled
    examples [P], predictions [P, B]). BatchNorm normalizes with the running statistics `stats`."""
    extra = () if per_example is None else (per_example,)
    if _fused_head(arch):
        h, (w, b) = _features(arch, ops, params, images, idx, mean, std, len(arch.ops) - 2, stats=stats)
        return ops.head_score(h, w, b, y, bits, bit_offset, *extra)
    h, _ = _features(arch, ops, params, images, idx, mean, std, len(arch.ops), stats=stats)
    return ops.score_logits(h, y, bits, bit_offset, *extra)


class ChainBackend:
    """A backend that runs every layer of all networks as one op of `ops`, gradients through autograd."""

    graphable = False
    fuses_sgd = False

    def __init__(self, name: str, ops: ModuleType, graphable: bool = False):
        self.name, self.ops, self.graphable = name, ops, graphable

    def native(self, arch: Arch) -> str | None:
        return native(arch, self.ops)

    def chunk_size(self, arch: Arch, batch_size: int, p: int, device: torch.device) -> int:
        if device.type == "cuda":
            budget = torch.cuda.mem_get_info(device)[0] // 2
        else:
            budget = CPU_CHUNK_BYTES
        per_net = 4 * batch_size * arch.train_floats_per_example()
        return max(1, min(p, budget // per_net, self._max_networks(p)))

    def _max_networks(self, p: int) -> int:
        """Networks one op may take: the op set's MAX_NETWORKS (a launch grid's limit), else any number."""
        return getattr(self.ops, "MAX_NETWORKS", None) or max(p, 1)

    def _pieces(self, lo: int, hi: int):
        step = self._max_networks(hi - lo)
        return [(a, min(hi, a + step)) for a in range(lo, hi, step)]

    def eval_floats(self, arch: Arch) -> int:
        return arch.activations_per_example()

    def gradients(self, pop, lo: int, hi: int, x, idx, y, mean, std, aug=None, smoothing: float = 0.0
                  ) -> torch.Tensor:
        for g in pop.views(pop.grads):
            g[lo:hi].zero_()
        losses = []
        for a, b in self._pieces(lo, hi):  # more networks than one op takes (an explicit chunk size): in pieces
            part = None if aug is None else dataclasses.replace(aug, seeds=aug.seeds[a - lo:b - lo])
            out = loss(pop.arch, self.ops, pop.leaves(a, b), x, idx[a - lo:b - lo], y[a - lo:b - lo], mean, std,
                       part, smoothing, [v[a:b] for v in pop.stat_views()])
            out.sum().backward()  # networks share no parameters: each gets exactly its own mean loss's gradient
            losses.append(out.detach())
        return torch.cat(losses)

    def score(self, arch: Arch, params, x, idx, y, mean, std, bits, bit_offset, per_example=None, stats=()):
        parts = [score(arch, self.ops, [v[a:b] for v in params], x, idx[a:b], y[a:b], mean, std, bits[a:b],
                       bit_offset, None if per_example is None else tuple(t[a:b] for t in per_example),
                       [v[a:b] for v in stats])
                 for a, b in self._pieces(0, idx.shape[0])]
        return torch.cat([loss for loss, _ in parts]), torch.cat([pred for _, pred in parts])

    def optimizer_step(self, pop, groups, frozen, step: int) -> None:
        fused = getattr(self.ops, "optimizer_step", None)  # an op set's own update of all groups at once
        if fused is not None:
            fused(pop, groups, frozen, step)
        else:
            optimizer_step(pop, groups, frozen, step, self.ops.sgd_step)


def optimizer_step(pop, groups, frozen, step: int, sgd_step=reference.sgd_step) -> None:
    """The optimizer's update of each group's networks: plain SGD through an op set's `sgd_step`, Nesterov and
    Adam(W) through the reference's torch ops."""
    for lo, hi, config, lr in groups:
        for params, grads, m1, m2, f in pop.blocks(lo, hi, frozen):
            if config.optimizer == "sgd" and not config.nesterov:
                sgd_step(params, grads, m1, lr, config.momentum, config.weight_decay, f)
            elif config.optimizer == "sgd":
                reference.sgd_step(params, grads, m1, lr, config.momentum, config.weight_decay, f, nesterov=True)
            else:
                reference.adam_step(params, grads, m1, m2, lr, config.betas, config.eps, config.weight_decay,
                                    config.optimizer == "adamw", step, f)
