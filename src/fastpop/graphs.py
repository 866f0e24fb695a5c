"""A whole training step captured as one CUDA graph (fixed shapes), replayed every step: plain SGD without
augmentation (the trainer runs anything else eagerly).

The batch indices, learning rate and step number live in static device buffers that are refilled before each
replay. Divergence is handled on the device inside the graph (no host sync): a network whose loss is not finite
gets its step in diverged_at and is frozen by the optimizer kernel in that same step, as on the eager path.
"""

from __future__ import annotations

import torch

from .population import Population
from .trainer import accumulate_gradients


class GraphedStep:
    def __init__(self, pop: Population, backend, data, config, chunk: int, batch_shape: tuple[int, int]):
        dev = pop.params.device
        self.pop, self.backend, self.data, self.config, self.chunk = pop, backend, data, config, chunk
        self.idx = torch.zeros(batch_shape, dtype=torch.int64, device=dev)
        self.lr = torch.zeros(1, device=dev)
        self.step = torch.zeros((), dtype=torch.int64, device=dev)
        self.frozen = torch.zeros(pop.p * pop.d, dtype=torch.bool, device=dev)
        state = (pop.params, pop.momentum, pop.diverged_at, pop.stats)
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: autotuning, allocator, autograd graph
            for _ in range(2):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(state, saved):
            t.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._body()

    def _body(self) -> torch.Tensor:
        pop = self.pop
        before = pop.stats.clone()
        loss = accumulate_gradients(pop, self.backend, self.data, self.idx, self.chunk, [(0, pop.p, self.config)])
        new = ~(torch.isfinite(loss) & pop.finite_stats()) & (pop.diverged_at < 0)
        pop.diverged_at.copy_(torch.where(new, self.step, pop.diverged_at))
        pop.keep_diverged_stats(before)
        self.frozen.copy_(pop.entry_mask(pop.diverged_at >= 0))
        self.backend.optimizer_step(pop, [(0, pop.p, self.config, self.lr)], self.frozen, 0)
        return loss

    def __call__(self, idx: torch.Tensor, lr: float, step: int) -> torch.Tensor:
        self.idx.copy_(idx)
        self.lr.fill_(lr)
        self.step.fill_(step)
        self.graph.replay()
        return self.loss
