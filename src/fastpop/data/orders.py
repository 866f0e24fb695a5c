"""Per-network batch orders: a permutation of the train split for each (seed, epoch).

A step takes B consecutive entries of each network's permutation; the N mod B examples left at the end of an
epoch are skipped that epoch (different ones for each network), so every step has the same shape.
"""

import torch

from ..seeding import ORDER, generator


def epoch_orders(seeds: list[int], epoch: int, n: int) -> torch.Tensor:
    """int64 [P, N]: row k is network k's order of the train split in this epoch. Computed on the CPU."""
    cache: dict[int, torch.Tensor] = {}
    for s in seeds:
        if s not in cache:
            cache[s] = torch.randperm(n, generator=generator(s, ORDER, epoch))
    return torch.stack([cache[s] for s in seeds])
