"""The parameters of P networks in one flat buffer.

Layout is layer-major: parameter i of every network lies in one contiguous block viewed as [P, *shape], so each
layer of all networks is one tensor for one op, and a slice of networks [lo:hi] of a layer is contiguous too.
Gradients and momentum live in flat buffers of the same layout, so the optimizer is one op over everything.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from .archs import Arch
from .seeding import INIT, generator


def init_network(arch: Arch, seed: int) -> torch.Tensor:
    """Network `seed`'s initial parameters, flat [D] in `param_shapes` order, on the CPU.

    torch.nn's default distributions: Conv2d and Linear weights and biases are all U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5) reduces to that bound); BatchNorm's weight 1 and bias 0. One
    draw of D numbers per network (BatchNorm's entries drawn too, then set, so other layers' draws do not move).
    """
    if hasattr(arch, "init_network"):  # a user's module initialises itself
        return arch.init_network(seed)
    bounds, fixed = [], []
    for name, shape in arch.param_shapes():
        n = math.prod(shape)
        if _batchnorm(name):
            bounds.append(torch.zeros(n))
            fixed.append(torch.full((n,), 1.0 if name.endswith("weight") else 0.0))
            continue
        if name.endswith("weight"):  # a bias follows its weight and shares its fan_in
            fan_in = math.prod(shape[1:])
        bounds.append(torch.full((n,), fan_in ** -0.5))
        fixed.append(torch.zeros(n))
    bound = torch.cat(bounds)
    u = torch.rand(len(bound), generator=generator(seed, INIT))
    return torch.where(bound > 0, (u * 2 - 1) * bound, torch.cat(fixed))


def _batchnorm(name: str) -> bool:
    """A BatchNorm parameter by its name in `Arch.param_shapes` (bn0.weight, res1.projbn.bias, ...)."""
    return name.rsplit(".", 2)[-2].startswith(("bn", "projbn"))





INIT_BLOCK = 1024  # networks drawn at a time when a population is built


class Population:
    def __init__(self, arch: Arch, init_seeds: list[int], device: torch.device, second_moment: bool = False):
        self.arch = arch
        self.p = len(init_seeds)
        self.shapes = [shape for _, shape in arch.param_shapes()]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.d = sum(self.sizes)
        self.params = torch.empty(self.p * self.d, device=device)
        self.grads = torch.zeros_like(self.params)
        self.momentum = torch.zeros_like(self.params)  # SGD's momentum, Adam's first moment
        self.second = torch.zeros_like(self.params) if second_moment else None  # Adam's second moment
        # BatchNorm's running statistics, layer-major as the parameters: training state that no optimizer moves
        self.stat_shapes = [shape for _, shape in arch.stat_shapes()]
        self.stat_sizes = [math.prod(s) for s in self.stat_shapes]
        self.stats = torch.cat([torch.zeros(0)] + [  # running means 0, variances 1
            torch.full((self.p * n,), 1.0 if name.endswith("var") else 0.0)
            for (name, _), n in zip(arch.stat_shapes(), self.stat_sizes)]).to(device)
        # drawn INIT_BLOCK networks at a time, so that no [P, D] copy exists beside the buffers; a seed shared
        # by many networks (--vary order) is drawn once
        shared = {s for s, n in Counter(init_seeds).items() if n > 1}
        drawn = {s: init_network(arch, s) for s in shared}
        for lo in range(0, self.p, INIT_BLOCK):
            block = init_seeds[lo:lo + INIT_BLOCK]
            self.set_networks(torch.stack([drawn[s] if s in shared else init_network(arch, s) for s in block]),
                              lo=lo)
        self.diverged_at = torch.full((self.p,), -1, dtype=torch.int64, device=device)  # step, or -1
        self.frozen: torch.Tensor | None = None  # flat bool mask of diverged networks' entries; None if none

    def mark_diverged(self, mask: torch.Tensor, step: int) -> None:
        """Networks in `mask` [P] that are not yet diverged are diverged from `step` on: frozen for good."""
        new = mask & (self.diverged_at < 0)
        if new.any():
            self.set_diverged(torch.where(new, step, self.diverged_at))

    def set_diverged(self, diverged_at: torch.Tensor) -> None:
        self.diverged_at = diverged_at.to(self.params.device, torch.int64)
        dead = self.diverged_at >= 0
        self.frozen = self.entry_mask(dead) if dead.any() else None

    def entry_mask(self, per_network: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        """bool [P] -> bool [P * D] in the flat layout: every parameter entry (or, with sizes=stat_sizes, every
        running statistic) of the marked networks."""
        return torch.cat([per_network.repeat_interleave(n) for n in (self.sizes if sizes is None else sizes)])

    def finite_stats(self) -> torch.Tensor:
        """bool [P]: networks whose BatchNorm running statistics are all finite (all, without BatchNorm)."""
        ok = torch.ones(self.p, dtype=torch.bool, device=self.params.device)
        for v in self.stat_views():
            ok &= torch.isfinite(v).all(1)
        return ok

    def keep_diverged_stats(self, before: torch.Tensor) -> None:
        """Diverged networks' running statistics back to `before` (the flat stats before this step's forward): they
        are frozen with the parameters, not moved by the batches they still see."""
        if self.stat_sizes:
            dead = self.entry_mask(self.diverged_at >= 0, self.stat_sizes)
            self.stats.copy_(torch.where(dead, before, self.stats))

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer views [P, *shape] into a flat buffer of this population's layout."""
        return self._views(buf, self.shapes, self.sizes)

    def stat_views(self) -> list[torch.Tensor]:
        """Per-layer views [P, C] of the BatchNorm running statistics (`Arch.stat_shapes` order; [] without)."""
        return self._views(self.stats, self.stat_shapes, self.stat_sizes)

    def _views(self, buf, shapes, sizes) -> list[torch.Tensor]:
        out, start = [], 0
        for shape, n in zip(shapes, sizes):
            out.append(buf[start:start + self.p * n].view(self.p, *shape))
            start += self.p * n
        return out

    def networks(self, buf: torch.Tensor | None = None) -> torch.Tensor:
        """Network-major copy [P, D] of a flat buffer (default: the parameters); row k is network k."""
        views = self.views(self.params if buf is None else buf)
        return torch.cat([v.reshape(self.p, -1) for v in views], dim=1)

    def set_networks(self, rows: torch.Tensor, buf: torch.Tensor | None = None, lo: int = 0) -> None:
        """Write network-major rows [K, D] into networks lo..lo+K-1 of a flat buffer (default: the parameters)."""
        rows = rows.to(self.params.device)
        start = 0
        for v, n in zip(self.views(self.params if buf is None else buf), self.sizes):
            part = v[lo:lo + len(rows)]
            part.copy_(rows[:, start:start + n].view_as(part))
            start += n

    def group_blocks(self, groups) -> tuple[list[tuple[int, int]] | None, list[int]]:
        """Where each group's networks lie in the flat buffers, for optimizer kernels that take per-block
        scalars: blocks [(start, end)] layer-major, then group, and the index of the group that owns each; None
        (one block of everything) for one group of all networks. groups: [(lo, hi, ...)]."""
        if len(groups) == 1 and tuple(groups[0][:2]) == (0, self.p):
            return None, [0]
        blocks, owners, start = [], [], 0
        for n in self.sizes:
            for g, (lo, hi, *_) in enumerate(groups):
                blocks.append((start + lo * n, start + hi * n))
                owners.append(g)
            start += self.p * n
        return blocks, owners

    def blocks(self, lo: int, hi: int, frozen: torch.Tensor | None):
        """The optimizer's buffers (params, grads, momentum, second moment or None, frozen or None) of networks
        lo:hi as 1-D tensors: the whole flat buffers in one block for all networks, else one block per layer (a
        layer's networks lie next to each other)."""
        bufs = (self.params, self.grads, self.momentum, self.second, frozen)
        if (lo, hi) == (0, self.p):
            yield bufs
            return
        per_layer = [self.views(b) if b is not None else [None] * len(self.sizes) for b in bufs]
        for layer in zip(*per_layer):
            yield tuple(None if v is None else v[lo:hi].reshape(-1) for v in layer)

    def leaves(self, lo: int, hi: int) -> list[torch.Tensor]:
        """Autograd leaves for networks lo:hi that alias the parameters, with .grad aliasing the gradient
        buffer: backward accumulates in place, straight into the flat gradients."""
        out = []
        for param, grad in zip(self.views(self.params), self.views(self.grads)):
            leaf = param[lo:hi].detach().requires_grad_()
            leaf.grad = grad[lo:hi]
            out.append(leaf)
        return out
