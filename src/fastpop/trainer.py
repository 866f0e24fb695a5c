"""The training loop: steps, evaluation checkpoints, progress. `train(config) -> Run` is the library's front door.

Everything a run needs is checked before anything is written, so bad input leaves no trace on disk.
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .archs import Arch, build_arch
from .config import Config
from .data import Dataset, load_dataset
from .data.orders import epoch_orders
from .errors import UsageError
from .ops import get_backend, resolve_device
from .population import Population, forward
from .recorder import evaluate, record
from .rundir import SPLITS, RunWriter, bytes_per_row, check_new_out
from .run import Run


@dataclass
class Progress:
    """What a progress callback receives after every step."""

    step: int
    total_steps: int
    epoch: float
    net_images_per_s: float  # training steps only, evaluation excluded
    mean_test_acc: float | None  # at the latest checkpoint


@dataclass
class Setup:
    config: Config
    device: torch.device
    backend: object
    data: Dataset
    arch: Arch
    steps_per_epoch: int
    checkpoints: list[dict]
    out: Path


def prepare(config: Config) -> Setup:
    """Resolve and check everything a run needs; raises UsageError before anything is written."""
    device = resolve_device(config.device)
    backend = get_backend(config.backend, device)
    data = load_dataset(config.dataset, device)
    arch = build_arch(config.arch, data.in_shape, data.classes)
    n = len(data.train)
    if config.batch_size > n:
        raise UsageError(f"batch_size {config.batch_size} is larger than the train split ({n} examples)")
    steps_per_epoch = n // config.batch_size
    out = Path(config.out) if config.out else default_out(config)
    check_new_out(out)
    plan = checkpoint_plan(config.epochs, steps_per_epoch, config.record_every)
    return Setup(config, device, backend, data, arch, steps_per_epoch, plan, out)


def default_out(config: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.arch}-{config.dataset}-P{len(config.seed_list)}-{stamp}"


def checkpoint_plan(epochs: int, steps_per_epoch: int, record_every: int) -> list[dict]:
    """Record after the last step of every epoch, and after every `record_every` steps when that is set."""
    total = epochs * steps_per_epoch
    steps = {e * steps_per_epoch for e in range(1, epochs + 1)}
    if record_every:
        steps |= set(range(record_every, total + 1, record_every))
    return [{"step": s, "epoch": s / steps_per_epoch} for s in sorted(steps)]


def train_step(pop: Population, backend, data: Dataset, idx: torch.Tensor, lr: float, config: Config
               ) -> torch.Tensor:
    """One SGD step of every network on its own batch idx [P, B]; returns each network's batch loss [P]."""
    pop.grads.zero_()
    leaves = pop.leaves(0, pop.p)
    logits = forward(pop.arch, backend, leaves, data.train.x, idx, data.mean, data.std)
    loss = backend.cross_entropy(logits, data.train.y[idx])
    loss.sum().backward()  # networks share no parameters, so each gets exactly its own mean loss's gradient
    backend.sgd_step(pop.params, pop.grads, pop.momentum, lr, config.momentum, config.weight_decay)
    return loss.detach()


def train(config: Config, progress: Callable[[Progress], None] | None = None) -> Run:
    """Train the population that `config` describes into a new run directory; returns it as a Run."""
    setup = prepare(config)
    seeds = config.seed_list
    pop = Population(setup.arch, config.init_seeds(), setup.device)
    writer = RunWriter(setup.out, _manifest(setup, seeds), len(seeds),
                       {s: len(setup.data.split(s)) for s in SPLITS})
    try:
        timings = _loop(setup, pop, writer, progress)
    except BaseException as e:
        writer.close("interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
    writer.close("complete", timings=timings)
    return Run(setup.out)


def _loop(setup: Setup, pop: Population, writer: RunWriter, progress) -> dict:
    config, data = setup.config, setup.data
    spe, bsz = setup.steps_per_epoch, config.batch_size
    total = config.epochs * spe
    order_seeds = config.order_seeds()
    record_at = {c["step"]: t for t, c in enumerate(setup.checkpoints)}
    train_s = eval_s = 0.0
    mean_test_acc = None
    start = time.perf_counter()
    for step in range(total):
        epoch, i = divmod(step, spe)
        if i == 0:
            orders = epoch_orders(order_seeds, epoch, len(data.train)).to(setup.device)
        t0 = time.perf_counter()
        train_step(pop, setup.backend, data, orders[:, i * bsz:(i + 1) * bsz],
                   config.lr_at(step, total, spe), config)
        _sync(setup.device)
        train_s += time.perf_counter() - t0
        if step + 1 in record_at:
            t0 = time.perf_counter()
            mean_test_acc = _checkpoint(setup, pop, writer, record_at[step + 1], step + 1)
            eval_s += time.perf_counter() - t0
        if progress:
            rate = pop.p * bsz * (step + 1) / max(train_s, 1e-9)
            progress(Progress(step + 1, total, (step + 1) / spe, rate, mean_test_acc))
    return {"wall_s": time.perf_counter() - start, "train_s": train_s, "eval_s": eval_s,
            "net_images_per_s": pop.p * bsz * total / max(train_s, 1e-9)}


def _checkpoint(setup: Setup, pop: Population, writer: RunWriter, t: int, step: int) -> float:
    """Evaluate every network on both splits, write checkpoint t, save the population state."""
    params = pop.views(pop.params)
    records = {}
    for split in SPLITS:
        correct, loss = evaluate(setup.arch, setup.backend, params, setup.data.split(split),
                                 setup.data.mean, setup.data.std)
        records[split] = record(correct, loss)
    writer.save_state({"step": step, "checkpoints_done": t + 1, "params": pop.networks().cpu(),
                       "momentum": pop.networks(pop.momentum).cpu()})
    writer.write_checkpoint(t, records)
    return float(np.mean(records["test"][2]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _manifest(setup: Setup, seeds: list[int]) -> dict:
    import numba
    import sklearn

    config, arch, data = setup.config, setup.arch, setup.data
    return {
        "format": 1,
        "status": "running",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "seeds": seeds,
        "init_seeds": config.init_seeds(),
        "order_seeds": config.order_seeds(),
        "arch": {"name": arch.name, "params_per_network": arch.params_per_network(),
                 "flops_per_example": arch.flops_per_example(),
                 "param_shapes": [[n, list(s)] for n, s in arch.param_shapes()]},
        "dataset": {"name": data.name, "classes": data.classes, "in_shape": list(data.in_shape)},
        "splits": {s: {"n": len(data.split(s)), "bytes_per_row": bytes_per_row(len(data.split(s))),
                       "labels_sha256": hashlib.sha256(data.split(s).y.cpu().numpy().tobytes()).hexdigest()}
                   for s in SPLITS},
        "steps_per_epoch": setup.steps_per_epoch,
        "total_steps": config.epochs * setup.steps_per_epoch,
        "checkpoints": setup.checkpoints,
        "checkpoints_done": 0,
        "device": str(setup.device) if setup.device.type == "cpu" else torch.cuda.get_device_name(setup.device),
        "backend": setup.backend.NAME,
        "versions": {"fastpop": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "numba": numba.__version__, "scikit-learn": sklearn.__version__},
        "host": {"machine": platform.machine(), "cpus": torch.get_num_threads()},
    }
