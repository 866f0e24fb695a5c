"""The training loop: steps, evaluation checkpoints, progress, checkpoint/resume. `train(config) -> Run` and
`resume(path) -> Run` are the library's front doors.

Everything a run needs is checked before anything is written, so bad input leaves no trace on disk. The whole
training state is (parameters, momentum, step, which networks diverged): batch orders come from (seed, epoch)
and the learning rate from the step, so a run resumed from a saved state continues bit for bit.
"""

from __future__ import annotations

import logging
import platform
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .archs import MODULE_PREFIX, Arch, build_arch
from .config import Config
from .data import Dataset, load_dataset
from .data.arrays import ArrayData, saved_files
from .data.augment import Augment, AugmentBatch
from .data.orders import epoch_orders, subsets
from .errors import ResourceError, UsageError
from .machine import machine_facts
from .ops import get_backend, resolve_device
from .population import Population
from .recorder import evaluate, record
from .run import Run
from .rundir import (FORMAT, MEMBER, SPLITS, STATE, RunWriter, bytes_per_row, check_new_out, checkpoint_plan,
                     diverged_map, integrity_problems, pack_member)

log = logging.getLogger("fastpop")  # the library's messages; it installs no handler (the CLI does)


class Interrupted(Exception):
    """Training stopped at a step boundary on request (SIGINT/SIGTERM); the state is saved and resumable."""

    def __init__(self, path: Path, step: int, total: int):
        super().__init__(f"interrupted at step {step} of {total}; resume with: fastpop run --resume {path}")
        self.path, self.step = path, step


@dataclass
class Progress:
    """What a progress callback receives after every step; at a checkpoint also every network's accuracy and loss
    on both splits, so a logger hook reads no files:

        def hook(p):
            if p.checkpoint is not None:
                wandb.log({"test_acc": p.accuracy["test"].mean(), "loss": p.loss["train"].mean()}, step=p.step)
    """

    step: int
    total_steps: int
    epoch: float
    net_images_per_s: float  # training steps only, evaluation excluded
    mean_test_acc: float | None  # at the latest checkpoint, over networks that have not diverged
    eta_s: float | None = None  # seconds left at this session's pace so far, evaluation included
    run_dir: str | None = None
    checkpoint: int | None = None  # the checkpoint recorded after this step (0-based), else None
    accuracy: dict[str, np.ndarray] | None = None  # at a checkpoint: {"train", "test"} -> float32 [P]
    loss: dict[str, np.ndarray] | None = None  # at a checkpoint: {"train", "test"} -> float32 [P] (NaN: diverged)

    @property
    def epochs(self) -> float:
        return self.epoch * self.total_steps / self.step if self.step else float("nan")


@dataclass
class Setup:
    config: Config
    device: torch.device
    backend: object
    data: Dataset
    arch: Arch
    seeds: list[int]  # this run's networks (one shard's, with --shard)
    steps_per_epoch: int
    checkpoints: list[dict]
    chunk: int  # networks per forward/backward chunk
    out: Path
    subset: torch.Tensor | None  # int64 [P, round(f N)] each network's examples under --subset-fraction
    groups: list[Group]  # blocks of networks with their own hyperparameters (one without a grid)

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch


def prepare(config: Config, out: Path | None = None, model: Callable | None = None, data: ArrayData | None = None
            ) -> Setup:
    """Resolve and check everything a run needs; raises UsageError before anything is written. With `out`, the
    run directory exists already (resume). `model`: the factory of a module arch (else imported from its path);
    `data`: the arrays of a data set given in memory."""
    device = resolve_device(config.device)
    data = load_dataset(config, device, data)
    arch, backend = resolve_arch(config, data, device, model)
    for _, _, cfg in network_groups(config):
        Augment.parse(cfg.augment).check(*data.in_shape[1:])
    n = round(config.subset_fraction * len(data.train))  # examples each network trains on
    if config.batch_size > n:
        raise UsageError(f"batch_size {config.batch_size} is larger than the {n} training examples of a network")
    seeds = config.shard_seeds()
    check_memory(len(seeds), arch.params_per_network(), device, 3 + (config.optimizer != "sgd"))
    if out is None:
        out = check_new_out(Path(config.out) if config.out else default_out(config))
    chunk = chunk_size(config.max_nets_per_chunk, arch, config.batch_size, len(seeds), device, backend)
    plan = checkpoint_plan(config.epochs, n // config.batch_size, config.record_every)
    # drawn from each network's own seed; both the membership record and the batch orders use it
    subset = subsets(seeds, len(data.train), config.subset_fraction) if config.subset_fraction < 1 else None
    return Setup(config, device, backend, data, arch, seeds, n // config.batch_size, plan, chunk, out, subset,
                 network_groups(config))


def resolve_arch(config: Config, data: Dataset, device: torch.device, model: Callable | None = None):
    """(architecture sized for the data, the backend that runs it). A module arch runs on the torch.func backend;
    a spec on any other."""
    if config.arch.startswith(MODULE_PREFIX):
        if config.backend not in ("auto", "torch.func"):
            raise UsageError(f"arch {config.arch} is a module: it trains with backend torch.func, not "
                             f"{config.backend}")
        from .ops.torchfunc import module_arch

        return module_arch(config.arch, model, data.in_shape, data.classes), get_backend("torch.func", device)
    if config.backend == "torch.func":
        raise UsageError("backend torch.func trains module archs (--arch module:package.module:function); "
                         "a spec runs on numba, torch or triton")
    if model is not None:
        raise UsageError("model= is given, but config.arch is not a module arch")
    arch, backend = build_arch(config.arch, data.in_shape, data.classes), get_backend(config.backend, device)
    for layer, op in zip(arch.layers, arch.ops):
        if op.bn and config.batch_size * op.out_hw[0] * op.out_hw[1] == 1:  # as nn.BatchNorm2d in training
            raise UsageError(f"arch {arch}: token {str(layer)!r} would normalize 1 value per channel at batch size "
                             "1; BatchNorm needs more than 1 in training")
    note = backend.native(arch)
    if note:  # said once per run: in the log and in run.json
        log.warning("backend %s: %s", backend.name, note)
    return arch, backend


def default_out(config: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    dataset = f"npz-{Path(config.dataset[4:]).stem}" if config.dataset.startswith("npz:") else config.dataset
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{config.arch}-{dataset}-P{len(config.seed_list)}-{stamp}")
    return Path("runs") / name


def check_memory(p: int, d: int, device: torch.device, buffers: int) -> None:
    """Refuse a population whose `buffers` float32 buffers of P * D (parameters, gradients, momentum, and Adam's
    second moment) cannot fit the device's free memory, before allocating anything."""
    need = buffers * 4 * p * d
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _host_available()
    if free is not None and need > free:
        raise ResourceError(f"{p:,} networks of {d:,} parameters need {need / 2**30:,.1f} GiB for parameters, "
                            f"gradients and momentum; {device} has {free / 2**30:,.1f} GiB free: train fewer "
                            f"networks per process (--shard i/n)")


def _host_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def chunk_size(setting: int | str, arch: Arch, batch_size: int, p: int, device: torch.device, backend) -> int:
    """Networks per chunk: the setting, or (auto) the backend's choice."""
    if setting != "auto":
        return min(int(setting), p)
    return backend.chunk_size(arch, batch_size, p, device)


Group = tuple[int, int, Config]  # networks lo:hi of this population train with this config's hyperparameters


def network_groups(config: Config) -> list[Group]:
    """The grid's groups within this shard's networks (one group of all without a grid)."""
    slo, shi = config.shard_range()
    combos = config.groups()
    per = len(config.seed_list) // len(combos)
    out = []
    for g, combo in enumerate(combos):
        lo, hi = max(g * per, slo), min((g + 1) * per, shi)
        if lo < hi:
            out.append((lo - slo, hi - slo, config.group_config(combo) if combo else config))
    return out


def accumulate_gradients(pop: Population, backend, data: Dataset, idx: torch.Tensor, chunk: int | None,
                         groups: list[Group], epoch: int = 0, seeds: torch.Tensor | None = None,
                         update: list | None = None) -> torch.Tensor:
    """Forward and backward of every network on its batch idx [P, B], `chunk` networks of one group at a time,
    into pop.grads, with its group's label smoothing and augmentation (drawn from the networks' order seeds [P]
    and the epoch); returns each network's batch loss [P]. update: the SGD step's groups, for a backend that
    `fuses_sgd`: it takes the step in the same pass instead (pop.grads need not be written)."""
    losses = []
    fused = {} if update is None else {"update": update}
    for glo, ghi, cfg in _same_loss(groups):
        augment = Augment.parse(cfg.augment)
        for lo in range(glo, ghi, chunk or ghi - glo):
            hi = min(ghi, lo + (chunk or ghi - glo))
            aug = AugmentBatch(augment, seeds[lo:hi], epoch) if augment else None
            losses.append(backend.gradients(pop, lo, hi, data.train.x, idx[lo:hi], data.train.y[idx[lo:hi]],
                                            data.mean, data.std, aug, cfg.label_smoothing, **fused))
    return torch.cat(losses)


def _same_loss(groups: list[Group]) -> list[Group]:
    """Consecutive groups that differ only in optimizer scalars joined: the gradient pass runs them at once."""
    out = []
    for lo, hi, cfg in groups:
        if out and (out[-1][2].label_smoothing, out[-1][2].augment) == (cfg.label_smoothing, cfg.augment):
            out[-1] = (out[-1][0], hi, out[-1][2])
        else:
            out.append((lo, hi, cfg))
    return out


def train_step(pop: Population, backend, data: Dataset, idx: torch.Tensor, lr: float | list[float], config: Config,
               chunk: int | None = None, step: int = 1, epoch: int = 0, seeds: torch.Tensor | None = None,
               groups: list[Group] | None = None) -> torch.Tensor:
    """Optimizer step number `step` (counted from 1, in `epoch`) of every network on its own batch idx [P, B],
    `chunk` networks at a time; returns each network's batch loss [P]. groups: blocks of networks with their own
    hyperparameters (a grid), lr then each group's learning rate; default one group, all networks with `config`.
    seeds: the networks' order seeds, which draw their augmentation. A network whose loss is not finite is marked
    diverged and frozen before the update, so nothing of it reaches the others or its own weights (nor its
    BatchNorm running statistics: they keep the values before the step; non-finite ones mark it diverged too)."""
    groups = groups or [(0, pop.p, config)]
    lrs = lr if isinstance(lr, list) else [lr]
    update = [(lo, hi, cfg, lr_g) for (lo, hi, cfg), lr_g in zip(groups, lrs)]
    fused = backend.fuses_sgd and config.optimizer == "sgd"  # a grid does not vary the optimizer
    before = pop.stats.clone() if pop.stat_sizes else None
    loss = accumulate_gradients(pop, backend, data, idx, chunk, groups, epoch, seeds, update if fused else None)
    pop.mark_diverged(~torch.isfinite(loss) | ~pop.finite_stats(), step)
    if before is not None and pop.frozen is not None:  # only once some network has diverged
        pop.keep_diverged_stats(before)
    if not fused:
        backend.optimizer_step(pop, update, pop.frozen, step)
    return loss


def train(config: Config, progress: Callable[[Progress], None] | None = None,
          should_stop: Callable[[], bool] | None = None, model: Callable | None = None,
          data: ArrayData | None = None) -> Run:
    """Train the population that `config` describes into a new run directory; returns it as a Run.
    `should_stop` is polled after every step: when it returns True the state is saved and Interrupted raised.
    `model`: a function returning an nn.Module, to train P copies of it (config.arch becomes its
    module:package.module:function path). `data`: an ArrayData to train on (config.dataset becomes arrays:NAME;
    resuming takes the same data again, checked by its hash)."""
    if model is not None:
        config = Config.from_dict(dict(config.to_dict(), arch=f"module:{model.__module__}:{model.__qualname__}"))
    if data is not None:
        config = Config.from_dict(dict(config.to_dict(), dataset=f"arrays:{data.name}"))
    for field in ("dataset", "test_dataset"):  # file data sets by absolute path: readable from any folder
        name = getattr(config, field)
        if name and name.startswith(("npz:", "hf:")):
            kind, path = name.split(":", 1)
            config = Config.from_dict(dict(config.to_dict(), **{field: f"{kind}:{Path(path).expanduser().resolve()}"}))
    setup = prepare(config, model=model, data=data)
    setup.config.out = str(setup.out)
    pop = Population(setup.arch, _shard(config.init_seeds(), config), setup.device, config.optimizer != "sgd")
    files = {}  # inside the new directory before it appears: no kill can lose them
    if setup.subset is not None:
        files[MEMBER] = pack_member(setup.subset.cpu().numpy(), len(setup.data.train))
    for split in SPLITS:  # each example's index in its source split and its original label
        part = setup.data.split(split)
        files[f"{split}.index.npy"], files[f"{split}.label.npy"] = part.index.numpy(), part.label.numpy()
    if config.save_data:
        if data is None:
            raise UsageError("save_data keeps a copy of data given in memory (fastpop.train(config, data=...))")
        files.update(saved_files(data))
    writer = RunWriter.create(setup.out, _manifest(setup), files)
    return _run(setup, pop, writer, 0, progress, should_stop)


def resume(path: str | Path, progress: Callable[[Progress], None] | None = None,
           should_stop: Callable[[], bool] | None = None, max_nets_per_chunk: int | str | None = None,
           model: Callable | None = None, epochs: int | None = None, data: ArrayData | None = None) -> Run:
    """Continue a run directory from its last saved state (from the start if it has none). The chunk size may
    change: chunks never change results. `model`: the factory of a module arch (else imported from its path).
    `epochs`: train a finished or interrupted run on to this many epochs, where its learning rate so far is the one
    the longer run would have had (the result is the run trained that long in one go)."""
    run = Run(path)
    if epochs is not None and epochs != run.config.epochs:
        _checked(run)
        extend(run, epochs)
        run = Run(path)
    if run.status == "complete":
        raise UsageError(f"{run.path} is already complete")
    m = run.manifest
    state = _checked(run)
    pinned = dict(run.config.to_dict(), backend=m["backend"], device=_pinned_device(m, run.config))
    if max_nets_per_chunk is not None:
        pinned["max_nets_per_chunk"] = max_nets_per_chunk
    run.config = Config.from_dict(pinned)
    setup = prepare(run.config, out=run.path, model=model, data=data or run.saved_data())
    if setup.backend.name != m["backend"] or setup.device.type != m["device"].split(":")[0]:
        raise UsageError(f"{run.path} trained with the {m['backend']} backend on {m['device']}; this machine gives "
                         f"{setup.backend.name} on {setup.device}: resume it where its kernels run")
    for split, info in _data_identity(setup.data).items():
        if (m["splits"][split]["images_sha256"], m["splits"][split]["labels_sha256"]) != (
                info["images_sha256"], info["labels_sha256"]):
            raise UsageError(f"the {split} images or labels of {run.path} differ from the data found now; "
                             "cannot resume")
    pop = Population(setup.arch, _shard(run.config.init_seeds(), run.config), setup.device,
                     run.config.optimizer != "sgd")
    step, done = 0, 0
    if state is not None:
        _load_state(state, pop)
        step, done = state["step"], state["checkpoints_done"]
        del state
    writer = RunWriter.reopen(run.path, m)
    try:
        writer.adopt_rows(m["checkpoints_done"], done)  # rows up to `done` were flushed before the state
        # divergence as of checkpoint `done`, rebuilt from the state: a kill may have come before it was written
        at = pop.diverged_at.cpu().numpy()
        upto = setup.checkpoints[done - 1]["step"] if done else 0
        writer.save_diverged(np.where((at >= 0) & (at <= upto), at, -1))
        writer.commit(done, status="running", diverged=diverged_map(setup.seeds, at, upto))
    except BaseException:
        writer.close("failed")
        raise
    # each session's machine, written with the next checkpoint: a resume elsewhere may change the last bits
    writer.manifest["resumed_on"] = [*run.manifest.get("resumed_on", []), machine_facts(setup.device)]
    return _run(setup, pop, writer, step, progress, should_stop)


def _checked(run: Run) -> dict | None:
    """The run's saved state (None before its first), after every completed row, the membership record, the
    state and the divergence record passed their checks; UsageError naming the first problem otherwise."""
    problems, state = integrity_problems(run.path, run.manifest)
    if problems:
        raise UsageError(f"{run.path} is damaged, cannot resume: {problems[0]} (fastpop verify {run.path} lists "
                         "all)")
    return state


def _pinned_device(m: dict, config: Config) -> str:
    """The device a resume runs on: the run's own kind of device (its kernels give its bits); an explicit
    cuda:N of the config (a torchrun rank's) is kept."""
    kind = m["device"].split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"the run trained on {m['device']} with the {m['backend']} backend; resume it on a "
                         "machine with CUDA (its kernels give its bits)")
    return config.device if config.device.split(":")[0] == kind else kind


def extend(run: Run, epochs: int) -> None:
    """Plan `epochs` epochs for a run: the manifest's config, step count and checkpoint plan, then the record arrays
    grown to the longer plan (a kill in between is mended by the next resume). Refused, with the reason, when the
    learning rate of a step already taken would differ in the longer run."""
    old = run.config
    new = Config.from_dict(dict(old.to_dict(), epochs=epochs))
    if epochs < old.epochs:
        raise UsageError(f"--epochs {epochs}: {run.path} already plans {old.epochs}; a run cannot be shortened")
    spe, done = run.manifest["steps_per_epoch"], _steps_done(run)
    old_total, new_total = old.epochs * spe, epochs * spe
    for (_, _, a), (_, _, b) in zip(network_groups(old), network_groups(new)):
        for step in range(done):
            if a.lr_at(step, old_total, spe) != b.lr_at(step, new_total, spe):
                raise UsageError(f"--epochs {epochs}: with the {old.schedule} schedule the learning rate of step "
                                 f"{step + 1}, already taken, would change ({a.lr_at(step, old_total, spe):.6g} -> "
                                 f"{b.lr_at(step, new_total, spe):.6g}); a constant schedule, or a step schedule "
                                 "before its first milestone, can be extended")
    manifest = dict(run.manifest, config=new.to_dict(), total_steps=new_total,
                    checkpoints=checkpoint_plan(epochs, spe, new.record_every), status="interrupted")
    writer = RunWriter.reopen(run.path, run.manifest)
    writer.manifest = manifest
    writer.close("interrupted")  # the manifest first: reopening grows the arrays to its plan
    RunWriter.reopen(run.path, manifest).close("interrupted")


def _steps_done(run: Run) -> int:
    if (run.path / STATE).exists():
        return int(run.state()["step"])
    return 0


def _run(setup: Setup, pop: Population, writer: RunWriter, start: int, progress, should_stop) -> Run:
    log.info("%s: %s %d networks of %s on %s with the %s backend on %s, steps %d to %d", setup.out,
             "resuming" if start else "training", pop.p, setup.arch, setup.data.name, setup.backend.name,
             setup.device, start + 1, setup.total_steps)
    try:
        timings = _loop(setup, pop, writer, start, progress, should_stop)
    except Interrupted:
        writer.close("interrupted")
        raise
    except BaseException as e:
        try:
            writer.close("failed")
        except OSError:  # the disk that failed may fail again: keep the original error
            pass
        if _out_of_memory(e):
            smaller = max(1, setup.chunk // 4)
            raise ResourceError(f"out of memory training {setup.chunk} networks at a time; the last checkpoint "
                                f"is saved: fastpop run --resume {setup.out} --max-nets-per-chunk {smaller}") from e
        raise
    writer.close("complete", timings=timings)
    log.info("%s: complete in %.1f s", setup.out, timings["wall_s"])
    return Run(setup.out)


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))


def _loop(setup: Setup, pop: Population, writer: RunWriter, start: int, progress, should_stop) -> dict:
    config, data = setup.config, setup.data
    spe, bsz, total = setup.steps_per_epoch, config.batch_size, setup.total_steps
    order_seeds = _shard(config.order_seeds(), config)
    record_at = {c["step"]: t for t, c in enumerate(setup.checkpoints)}
    train_s = eval_s = 0.0
    mean_test_acc = None
    orders = None
    step_fn = _step_function(setup, pop, (pop.p, bsz))
    seeds = torch.tensor(order_seeds, dtype=torch.int64, device=setup.device)
    t_start = time.perf_counter()
    for step in range(start, total):
        epoch, i = divmod(step, spe)
        if orders is None or i == 0:
            orders = epoch_orders(order_seeds, epoch, len(data.train), setup.subset).to(setup.device)
        t0 = time.perf_counter()
        lrs = [cfg.lr_at(step, total, spe) for _, _, cfg in setup.groups]
        step_fn(orders[:, i * bsz:(i + 1) * bsz], lrs, step + 1, epoch, seeds)
        _sync(setup.device)
        train_s += time.perf_counter() - t0
        done = step + 1
        records = None
        if done in record_at:
            t0 = time.perf_counter()
            records = _checkpoint(setup, pop, writer, record_at[done], done)
            mean_test_acc = _mean_healthy(records["test"]["acc"], pop)
            eval_s += time.perf_counter() - t0
            log.info("%s: checkpoint %d of %d at step %d (epoch %.2f): mean test acc %.4f, mean train loss %.4f",
                     setup.out, record_at[done] + 1, len(setup.checkpoints), done, done / spe, mean_test_acc,
                     _mean_healthy(records["train"]["loss"], pop))
        elif config.save_every and done % config.save_every == 0:
            _save_state(pop, writer, done, writer.manifest["checkpoints_done"])
        if progress:
            rate = pop.p * bsz * (done - start) / max(train_s, 1e-9)
            eta = (time.perf_counter() - t_start) / (done - start) * (total - done)
            progress(Progress(done, total, done / spe, rate, mean_test_acc, eta, str(setup.out),
                              *_checkpoint_fields(record_at.get(done), records)))
        if should_stop and should_stop() and done < total:
            if done not in record_at:
                _save_state(pop, writer, done, writer.manifest["checkpoints_done"])
            raise Interrupted(setup.out, done, total)
    steps = total - start
    return {"wall_s": time.perf_counter() - t_start, "train_s": train_s, "eval_s": eval_s,
            "net_images_per_s": pop.p * bsz * steps / max(train_s, 1e-9), "steps_this_session": steps}


def _step_function(setup: Setup, pop: Population, batch_shape):
    """(idx, lrs, step, epoch, seeds) -> losses: a replayed CUDA graph on CUDA with a graphable backend (plain SGD
    without augmentation or grid), else eager."""
    config = setup.config
    plain_sgd = config.optimizer == "sgd" and not config.nesterov and not config.augment and not config.grid
    if setup.device.type == "cuda" and setup.backend.graphable and config.cuda_graphs and plain_sgd:
        from .graphs import GraphedStep

        graphed = GraphedStep(pop, setup.backend, setup.data, setup.config, setup.chunk, batch_shape)
        return lambda idx, lrs, step, epoch, seeds: graphed(idx, lrs[0], step)
    return lambda idx, lrs, step, epoch, seeds: train_step(pop, setup.backend, setup.data, idx, lrs, setup.config,
                                                           setup.chunk, step, epoch, seeds, setup.groups)


def _checkpoint(setup: Setup, pop: Population, writer: RunWriter, t: int, step: int) -> float:
    """Evaluate every network on both splits; then, in this order, flush the rows, save the state, write
    diverged.npy, and let the manifest count checkpoint t: a kill between any two leaves a resumable directory
    (resume counts rows the state counts, and rebuilds diverged.npy from the state)."""
    records, asked = {}, set(setup.config.record)
    for split in SPLITS:
        data = setup.data.split(split)
        extra = tuple(torch.empty(pop.p, len(data), device=setup.device) for _ in range(2)) \
            if asked & {"margin", "loss"} else None
        keep = "pred" in asked or (split == "test" and writer.manifest["predictions"])
        bits, loss, pred = evaluate(setup.arch, setup.backend, pop, data, setup.data.mean, setup.data.std,
                                    setup.chunk, extra, keep)
        records[split] = record(bits, loss, len(data), pred if keep else None, setup.data.class_ids,
                                extra[0] if "margin" in asked else None, extra[1] if "loss" in asked else None)
    writer.write_rows(t, records)
    _save_state(pop, writer, step, t + 1)
    diverged = pop.diverged_at.cpu().numpy()
    writer.save_diverged(diverged)
    writer.commit(t + 1, diverged=diverged_map(setup.seeds, diverged, step))
    return records


def _mean_healthy(acc: np.ndarray, pop: Population) -> float:
    """Mean of a per-network value [P] (accuracy, loss) over the networks that have not diverged (NaN when all
    have)."""
    acc = acc[pop.diverged_at.cpu().numpy() < 0]
    return float(acc.mean()) if len(acc) else float("nan")


def _checkpoint_fields(t: int | None, records: dict | None) -> tuple:
    """(checkpoint, accuracy, loss) of Progress: each split's per-network arrays at a checkpoint, else Nones."""
    if records is None:
        return None, None, None
    return (t, {s: np.array(r["acc"], np.float32) for s, r in records.items()},
            {s: np.array(r["loss"], np.float32) for s, r in records.items()})


def _save_state(pop: Population, writer: RunWriter, step: int, checkpoints_done: int) -> None:
    """The population's own flat buffers (layer-major, see rundir.save_state): saved without a copy on the CPU."""
    writer.save_state(step, checkpoints_done, pop.shapes, pop.params, pop.momentum, pop.diverged_at, pop.second,
                      pop.stats, pop.stat_shapes)


def _load_state(state: dict, pop: Population) -> None:
    """A checked state (rundir.load_state) into the population's buffers."""
    if [list(s) for s in pop.shapes] != state["shapes"]:
        raise UsageError(f"the saved state's layers {state['shapes']} are not this architecture's")
    if (pop.second is None) != (state.get("second_moment") is None):
        raise UsageError("the saved state's optimizer moments do not fit this run's optimizer")
    if [list(s) for s in pop.stat_shapes] != state.get("stat_shapes", []):
        raise UsageError(f"the saved state's BatchNorm statistics {state.get('stat_shapes', [])} are not this "
                         "architecture's")
    pop.params.copy_(state["params"])
    pop.momentum.copy_(state["momentum"])
    if pop.stat_shapes:
        pop.stats.copy_(state["stats"])
    if pop.second is not None:
        pop.second.copy_(state["second_moment"])
    pop.set_diverged(state["diverged_at"])


def _shard(values: list[int], config: Config) -> list[int]:
    lo, hi = config.shard_range()
    return values[lo:hi]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _data_identity(data: Dataset) -> dict:
    return {s: {"images_sha256": data.split(s).images_sha256(), "labels_sha256": data.split(s).labels_sha256()}
            for s in SPLITS}


def _manifest(setup: Setup) -> dict:
    config, arch, data = setup.config, setup.arch, setup.data
    return {
        "format": FORMAT,
        "status": "running",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "seeds": setup.seeds,  # the init and order seeds follow from them and the config's vary and shared_seed
        "shard": config.shard,
        "arch": {"name": str(arch), "spec": arch.spec, "params_per_network": arch.params_per_network(),
                 "flops_per_example": arch.flops_per_example(),
                 "param_shapes": [[n, list(s)] for n, s in arch.param_shapes()],
                 **({"stat_shapes": [[n, list(s)] for n, s in arch.stat_shapes()]} if arch.stat_shapes() else {})},
        "dataset": {"name": data.name, "classes": data.classes, "in_shape": list(data.in_shape)},
        "splits": {s: {"n": len(data.split(s)), "bytes_per_row": bytes_per_row(len(data.split(s))), **ident}
                   for s, ident in _data_identity(data).items()},
        "steps_per_epoch": setup.steps_per_epoch,
        "total_steps": setup.total_steps,
        "checkpoints": setup.checkpoints,
        "checkpoints_done": 0,
        "checksums": {},
        "files": {},
        "diverged": {},
        "predictions": bool(config.record_predictions or data.open_set),
        "groups": _groups_manifest(config),
        "class_ids": data.class_ids,
        "device": str(setup.device),
        "device_name": platform.processor() or platform.machine() if setup.device.type == "cpu"
        else torch.cuda.get_device_name(setup.device),
        "backend": setup.backend.name,
        "backend_note": setup.backend.native(arch),
        "versions": {"fastpop": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "numba": version("numba"), "scikit-learn": version("scikit-learn")},
        "host": machine_facts(setup.device),
    }


def _groups_manifest(config: Config) -> list[dict] | None:
    """A grid's combinations with the networks [lo, hi) of the whole population that train with each."""
    if not config.grid:
        return None
    per = len(config.seed_list) // len(config.groups())
    return [dict(combo, networks=[g * per, (g + 1) * per]) for g, combo in enumerate(config.groups())]
