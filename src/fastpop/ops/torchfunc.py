"""The torch.func backend: P copies of any nn.Module (`--arch module:package.module:function`, or
`fastpop.train(config, model=factory)`) through functional_call + vmap, with fastpop's batch orders, schedules,
record, resume and metrics. The universal path, and the slowest: every other backend runs the architecture grammar
in its own kernels.

Network k is the module built by the factory with torch's global generator seeded from seed k (its layers' own
reset_parameters draw its weights). Networks go through vmap in blocks of a fixed size, the last one padded with
copies, so every network is computed by the same batched kernels whatever P is: torch picks kernels by batch size
(a vmapped conv is one grouped convolution over the block, and oneDNN's choice of algorithm depends on the group
count), which would otherwise make network k's last bits depend on its company.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..seeding import INIT, generator
from . import reference
from .chain import optimizer_step

BLOCK = 16  # networks per vmap call


@dataclass(frozen=True, eq=False)
class ModuleArch:
    """A user's nn.Module as an architecture: what the population and the record need of it."""

    spec: str  # module:package.module:function
    factory: Callable[[], torch.nn.Module]
    in_shape: tuple[int, int, int]
    classes: int
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    flops: int

    @property
    def name(self) -> str:
        return self.spec

    def __str__(self) -> str:
        return self.spec

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return list(self.shapes)

    def stat_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return []  # modules with buffers are refused

    def params_per_network(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    def flops_per_example(self) -> int:
        return self.flops

    def activations_per_example(self) -> int:
        return self.classes

    def init_network(self, seed: int) -> torch.Tensor:
        """Network `seed`'s initial parameters, flat [D]: the factory's module, built with torch's generator
        seeded from the seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator(seed, INIT))))
            module = self.factory()
        return torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])

    def to_module(self) -> torch.nn.Module:
        return self.factory()


def load_factory(spec: str) -> Callable[[], torch.nn.Module]:
    """module:package.module:function -> the function (imported)."""
    _, module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"arch {spec}: cannot import {module_name} ({e})") from None
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UsageError(f"arch {spec}: {module_name} has no {attr}")
    if not callable(obj):
        raise UsageError(f"arch {spec}: {attr} is not callable")
    return obj


def module_arch(spec: str, factory: Callable[[], torch.nn.Module] | None, in_shape, classes: int) -> ModuleArch:
    """Build and check the user's module once: parameters only (no buffers, no randomness), logits [B, classes]."""
    factory = factory or load_factory(spec)
    try:
        module = factory()
    except Exception as e:
        raise UsageError(f"arch {spec}: the factory raised {type(e).__name__}: {e}") from None
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"arch {spec}: the factory returned {type(module).__name__}, not an nn.Module")
    buffers = [n for n, _ in module.named_buffers()]
    if buffers:
        raise UsageError(f"arch {spec}: the module has buffers ({', '.join(buffers[:3])}); the torch.func path "
                         "trains modules whose state is their parameters alone")
    lazy = [type(m).__name__ for m in module.modules() if isinstance(m, torch.nn.modules.lazy.LazyModuleMixin)]
    if lazy:
        raise UsageError(f"arch {spec}: the module has lazy layers ({lazy[0]}); give their sizes")
    random = [type(m).__name__ for m in module.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    if random:
        raise UsageError(f"arch {spec}: the module draws random numbers ({random[0]}); each network's draws would "
                         "depend on its company")
    params = list(module.named_parameters())
    if not params:
        raise UsageError(f"arch {spec}: the module has no parameters")
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(2, *in_shape)
    try:
        with FlopCounterMode(display=False) as counter:
            out = module(x)
    except Exception as e:
        raise UsageError(f"arch {spec}: the module fails on a batch of {tuple(x.shape)}: "
                         f"{type(e).__name__}: {e}") from None
    if tuple(out.shape) != (2, classes):
        raise UsageError(f"arch {spec}: the module maps a batch [2, {', '.join(map(str, in_shape))}] to "
                         f"{list(out.shape)}; it must give logits [2, {classes}]")
    shapes = tuple((n, tuple(p.shape)) for n, p in params)
    return ModuleArch(spec, factory, tuple(in_shape), classes, shapes, counter.get_total_flops() // 2)


class TorchFuncBackend:
    name = "torch.func"
    graphable = False
    fuses_sgd = False

    def native(self, arch) -> str | None:
        return None

    def chunk_size(self, arch, batch_size: int, p: int, device: torch.device) -> int:
        return p

    def eval_floats(self, arch) -> int:
        return arch.activations_per_example()

    def _base(self, arch):
        """The module as a stateless template on the meta device, and its parameter names in order."""
        cached = getattr(arch, "_fastpop_base", None)
        if cached is None:
            base = arch.to_module().to("meta")
            cached = (base, [n for n, _ in arch.param_shapes()])
            object.__setattr__(arch, "_fastpop_base", cached)
        return cached

    def _blocks(self, arch, params, x, extra, fn):
        """fn vmapped over networks in blocks of BLOCK (the last padded with copies of its first network):
        yields (lo, hi, outputs) with the outputs of networks lo:hi."""
        from torch.func import vmap

        p = params[0].shape[0]
        for lo in range(0, p, BLOCK):
            hi = min(p, lo + BLOCK)
            pad = BLOCK - (hi - lo)
            block = [_padded(t[lo:hi], pad) for t in params]
            xs = [_padded(t[lo:hi], pad) for t in (x, *extra)]
            yield lo, hi, vmap(fn)(block, *xs)

    def gradients(self, pop, lo: int, hi: int, x, idx, y, mean, std, aug=None, smoothing: float = 0.0
                  ) -> torch.Tensor:
        from torch.func import functional_call, grad_and_value

        base, names = self._base(pop.arch)

        def loss(prm, xb, yb):
            return F.cross_entropy(functional_call(base, dict(zip(names, prm)), (xb,)), yb, label_smoothing=smoothing)

        views = [v[lo:hi] for v in pop.views(pop.params)]
        grads = [g[lo:hi] for g in pop.views(pop.grads)]
        batch = _images(x, idx, mean, std, aug)
        losses = torch.empty(hi - lo, device=pop.params.device)
        for a, b, (g, value) in self._blocks(pop.arch, views, batch, (y,), grad_and_value(loss)):
            for dst, src in zip(grads, g):
                dst[a:b].copy_(src[:b - a])
            losses[a:b] = value[:b - a].detach()
        return losses

    @torch.no_grad()
    def score(self, arch, params, x, idx, y, mean, std, bits, bit_offset, per_example=None, stats=()):
        from torch.func import functional_call

        base, names = self._base(arch)

        def logits(prm, xb):
            return functional_call(base, dict(zip(names, prm)), (xb,))

        batch = _images(x, idx, mean, std)
        out = torch.empty(idx.shape[0], idx.shape[1], arch.classes, device=idx.device)
        for a, b, value in self._blocks(arch, list(params), batch, (), logits):
            out[a:b] = value[:b - a]
        return reference.score_logits(out, y, bits, bit_offset, per_example)

    def optimizer_step(self, pop, groups, frozen, step: int) -> None:
        optimizer_step(pop, groups, frozen, step)


def _images(x, idx, mean, std, aug=None) -> torch.Tensor:
    """Normalized (and augmented) batches [n, B, C, H, W] as a module takes them."""
    return reference.gather_images(x, idx, mean, std, False, aug).permute(0, 1, 4, 2, 3)


def _padded(t: torch.Tensor, pad: int) -> torch.Tensor:
    return t if not pad else torch.cat([t, t[:1].expand(pad, *t.shape[1:])])
