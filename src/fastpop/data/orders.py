"""Per-network batch orders: a permutation of the network's training examples for each (seed, epoch).

A step takes B consecutive entries of each network's permutation; the entries left at the end of an epoch
(N mod B) are skipped that epoch (different ones for each network), so every step has the same shape. With
--subset-fraction f, network k trains on its own round(f N) examples, drawn from its own seed.
"""

import torch

from ..seeding import ORDER, SUBSET, generator


def subsets(seeds: list[int], n: int, fraction: float) -> torch.Tensor:
    """int64 [P, round(f N)]: the training examples of each network, drawn from its seed alone."""
    size = round(fraction * n)
    return torch.stack([torch.randperm(n, generator=generator(s, SUBSET))[:size].sort().values for s in seeds])


def epoch_orders(seeds: list[int], epoch: int, n: int, subset: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [P, M]: row k is network k's order of its examples in this epoch (M = N, or the subset size)."""
    m = n if subset is None else subset.shape[1]
    cache: dict[int, torch.Tensor] = {}
    for s in seeds:
        if s not in cache:
            cache[s] = torch.randperm(m, generator=generator(s, ORDER, epoch))
    orders = torch.stack([cache[s] for s in seeds])
    return orders if subset is None else torch.gather(subset, 1, orders)
