"""A whole training step captured as one CUDA graph (fixed shapes), replayed every step.

The batch indices, learning rate and step number live in static device buffers that are refilled before each
replay. Divergence is handled on the device inside the graph (no host sync): a network whose loss is not finite
gets its step in diverged_at and is frozen by the optimizer kernel in that same step, as on the eager path.
"""

from __future__ import annotations

import torch

from .population import Population, loss as population_loss


class GraphedStep:
    def __init__(self, pop: Population, backend, data, config, chunk: int, batch_shape: tuple[int, int]):
        dev = pop.params.device
        self.pop, self.backend, self.data, self.config, self.chunk = pop, backend, data, config, chunk
        self.idx = torch.zeros(batch_shape, dtype=torch.int64, device=dev)
        self.lr = torch.zeros(1, device=dev)
        self.step = torch.zeros((), dtype=torch.int64, device=dev)
        # which network each flat parameter entry belongs to (layer-major layout)
        self.owner = torch.cat([torch.arange(pop.p, device=dev).repeat_interleave(n) for n in pop.sizes])
        self.frozen = torch.zeros(pop.p * pop.d, dtype=torch.bool, device=dev)
        saved = [t.clone() for t in (pop.params, pop.momentum, pop.diverged_at)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: autotuning, allocator, autograd graph
            for _ in range(2):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip((pop.params, pop.momentum, pop.diverged_at), saved):
            t.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._body()

    def _body(self) -> torch.Tensor:
        pop, data = self.pop, self.data
        pop.grads.zero_()
        losses = []
        for lo in range(0, pop.p, self.chunk):
            hi = min(pop.p, lo + self.chunk)
            idx = self.idx[lo:hi]
            loss = population_loss(pop.arch, self.backend, pop.leaves(lo, hi), data.train.x, idx,
                                   data.train.y[idx], data.mean, data.std)
            loss.sum().backward()
            losses.append(loss.detach())
        loss = torch.cat(losses)
        new = ~torch.isfinite(loss) & (pop.diverged_at < 0)
        pop.diverged_at.copy_(torch.where(new, self.step, pop.diverged_at))
        self.frozen.copy_((pop.diverged_at >= 0)[self.owner])
        self.backend.sgd_step(pop.params, pop.grads, pop.momentum, self.lr, self.config.momentum,
                              self.config.weight_decay, self.frozen)
        return loss

    def __call__(self, idx: torch.Tensor, lr: float, step: int) -> torch.Tensor:
        self.idx.copy_(idx)
        self.lr.fill_(lr)
        self.step.fill_(step)
        self.graph.replay()
        return self.loss
