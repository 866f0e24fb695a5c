"""Backends: the one contract (`Backend`) through which the trainer, the recorder and the population run networks,
and the registry of the backends that implement it.

Adding a backend: write a class with the members of `Backend` (kernels in `kernels/<name>/`, the wrapper in
`fastpop/ops/`), add one line to `_FACTORIES`, and run the backend tests over it (tests/test_backends.py takes
every registered backend: forward and gradients against the reference on random specs, network k alone or in
company, the population against plain nn.Modules).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Protocol

import torch

from ..errors import UsageError


class Backend(Protocol):
    """What every backend offers. Tensors of networks lo:hi are slices of the population's layer-major buffers
    (`Population.views`); idx [n, B] holds each network's batch as indices into x [N, C, H, W] (stored dtype),
    y [n, B] its labels; mean and std [C] normalize x on the fly."""

    name: str  # as in --backend, run.json and the bench
    graphable: bool  # its training step may be captured as a CUDA graph (no host sync, fixed shapes)
    fuses_sgd: bool  # gradients() takes update= and applies plain SGD's step in the same pass

    def native(self, arch) -> str | None:
        """None when the backend's own kernels run every layer of `arch`; else which path runs it and why."""

    def chunk_size(self, arch, batch_size: int, p: int, device: torch.device) -> int:
        """Networks per forward/backward chunk for --max-nets-per-chunk auto."""

    def eval_floats(self, arch) -> int:
        """Floats a network holds per example in evaluation (the largest activation, or only the logits): sizes
        the blocks of networks evaluated at once."""

    def gradients(self, pop, lo: int, hi: int, x, idx, y, mean, std, aug=None, smoothing: float = 0.0,
                  update=None) -> torch.Tensor:
        """Networks lo:hi: each one's mean cross-entropy [hi - lo] on its batch (augmented by aug, an AugmentBatch
        with the networks' order seeds; label-smoothed by `smoothing`); its gradient written (not added) into
        pop.grads (not with update, below). BatchNorm normalizes with the batch's statistics and updates
        pop.stats (running statistics) in place. update is given only to a backend that `fuses_sgd`: groups as
        `optimizer_step`'s (optimizer sgd); each network lo:hi then takes that SGD step in the pass that computed
        its gradient (which need not reach pop.grads), unless it is diverged (before, or now: a loss or running
        statistic not finite), which freezes it as `optimizer_step` freezes diverged networks; the trainer makes
        no separate optimizer step."""

    def score(self, arch, params, x, idx, y, mean, std, bits, bit_offset, per_example=None, stats=()
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation of networks whose per-layer parameters are params ([n, *shape] each) on batches idx [n, B]:
        argmax == y (ties to the lowest class) as bits into bits [n, R] from bit `bit_offset` (a multiple of 8);
        returns (cross-entropy summed over examples with y >= 0 [n], predictions int64 [n, B]). y = -1 marks a
        class the networks were not trained on: wrong, and no loss. per_example: (margin, xent) float32 [n, B]
        to fill in the same pass: true-class logit minus the largest other, and each example's cross-entropy
        (NaN where y = -1). stats: the networks' BatchNorm running statistics ([n, C] each, `Arch.stat_shapes`
        order; empty without BatchNorm), which BatchNorm normalizes with in evaluation."""

    def optimizer_step(self, pop, groups, frozen, step: int) -> None:
        """Optimizer step number `step` (from 1) in place. groups: [(lo, hi, config, lr)], blocks of networks that
        together cover the population, each with the optimizer and hyperparameters of its config and learning
        rate lr (one block of all networks without a grid); entries where frozen (flat bool, or None) is set do
        not move."""


def _torch(device):
    from . import reference
    from .chain import ChainBackend

    return ChainBackend("torch", reference)


def _numba(device):
    if device.type != "cpu":
        raise UsageError(f"backend numba runs on the CPU, not on {device}; use --device cpu or another backend")
    from .numba_cpu import NumbaBackend

    return NumbaBackend()


def _triton(device):
    if importlib.util.find_spec("triton") is None:
        raise UsageError("backend triton needs the triton package: pip install triton")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("backend triton needs a CUDA device (or TRITON_INTERPRET=1 to interpret its kernels "
                         "on the CPU, slowly)")
    from . import triton as triton_ops
    from .chain import ChainBackend

    return ChainBackend("triton", triton_ops, graphable=True)


def _torch_func(device):
    from .torchfunc import TorchFuncBackend

    return TorchFuncBackend()


# name -> factory(device); the names are those of --backend, run.json and the bench
_FACTORIES = {"numba": _numba, "torch": _torch, "triton": _triton, "torch.func": _torch_func}
BACKENDS = ("auto", *_FACTORIES)


def get_backend(name: str, device: torch.device) -> Backend:
    """auto: Triton on CUDA (when triton is installed, else torch), numba on the CPU. torch (the reference ops)
    runs anywhere. triton on the CPU needs TRITON_INTERPRET=1 (set before fastpop is imported): correct, and very
    slow. torch.func runs any nn.Module (--arch module:...), and is what such an arch gets with auto."""
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "auto":
        triton = importlib.util.find_spec("triton") is not None
        name = "numba" if device.type == "cpu" else "triton" if triton else "torch"
    return _FACTORIES[name](device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device
