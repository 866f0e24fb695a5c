"""The one configuration of a run: validated on construction, saved into run.json, loadable from TOML.

CLI flags in kebab-case map onto these fields (--batch-size -> batch_size); TOML files may use either spelling.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass, field

from .errors import UsageError, shown

VARY = ("both", "init", "order")
SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd", "adam", "adamw")
GRID_KEYS = ("lr", "momentum", "weight_decay", "label_smoothing", "crop", "cutout")
STEP_MILESTONES = (0.5, 0.75)  # the step schedule multiplies lr by 0.1 at these fractions of training
_STRINGS = ("dataset", "labels", "pixels", "vary", "schedule", "device", "backend")


@dataclass
class Config:
    arch: str = "small-cnn"  # a preset, a spec ("c8-mp-c16-gap"), a fastpop.Arch, or module:package.module:function
    dataset: str = "digits"  # digits, mnist, fashion-mnist, cifar10, cifar100, gaussian, npz:PATH or hf:PATH
    save_data: bool = False  # keep a copy of data given in memory (fastpop.train(data=...)) in the run directory
    image_column: str = "image"  # hf: the image column
    label_column: str = "label"  # hf: the label column
    data_dir: str | None = None  # where the data files are (default $FASTPOP_DATA or ./data)
    classes: list[int] | None = None  # train (and, by default, test) only on these classes
    test_dataset: str | None = None  # test on another data set's test split, or "noise"
    test_classes: list[int] | None = None  # test only on these classes (may be unseen in training)
    labels: str = "true"  # "random": train labels permuted once with a fixed seed
    pixels: str = "natural"  # "shuffled": one fixed pixel permutation applied to every image
    separation: float = 1.0  # class separation of the gaussian data set
    superclass: int | None = None  # CIFAR-100: only this superclass (e.g. 16, small mammals)
    record_predictions: bool = False  # store predicted test labels (on by itself for unseen test classes)
    record: list[str] = field(default_factory=list)  # per-example arrays to store: any of margin, loss, pred
    subset_fraction: float = 1.0  # each network trains on its own random subset of this fraction (C-score)
    seeds: int | list[int] = 100  # a count (seed_offset, seed_offset+1, ...) or an explicit list
    seed_offset: int = 0
    vary: str = "both"  # what differs between networks: init and batch order, or only one of them
    shared_seed: int = 0  # the seed of whatever `vary` keeps the same for all networks
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "sgd"  # sgd, adam or adamw
    lr: float = 0.1
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: float = 1e-8  # adam, adamw
    weight_decay: float = 5e-4  # sgd and adam: added to the gradient; adamw: decoupled
    label_smoothing: float = 0.0  # as F.cross_entropy's label_smoothing
    augment: str = ""  # flip, crop:N, cutout:N, comma-separated
    grid: dict | None = None  # {"lr": [0.4, 0.1], ...}: every combination trains `seeds` networks of its own
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    record_every: int = 0  # also record every this many steps (0: only at the end of each epoch)
    save_every: int = 0  # also save the training state every this many steps (it is saved at every checkpoint)
    max_nets_per_chunk: int | str = "auto"  # networks per forward/backward pass; auto: fit a memory budget
    shard: str | None = None  # "i/n": train only the i-th of n contiguous blocks of the seeds (merge joins them)
    device: str = "auto"
    cuda_graphs: bool = True  # capture the training step as a CUDA graph (CUDA with the triton backend)
    backend: str = "auto"
    out: str | None = None
    extra: dict = field(default_factory=dict, repr=False)  # reserved; must stay empty

    def __post_init__(self):
        from .archs import MODULE_PREFIX, parse_arch
        from .data import DATASETS, TEST_ONLY, valid_name

        for name in _STRINGS:  # before any lookup: a list or table from TOML is unhashable
            if not isinstance(getattr(self, name), str):
                raise UsageError(f"{name} must be a string, got {shown(getattr(self, name))}")
        if isinstance(self.arch, str) and self.arch.startswith(MODULE_PREFIX):
            _check_module_path(self.arch)
        else:
            arch = parse_arch(self.arch)
            self.arch = arch.name or arch.spec
        if not valid_name(self.dataset):
            raise UsageError(f"unknown dataset {shown(self.dataset)}; valid: {', '.join(DATASETS)}, npz:PATH, hf:PATH")
        if not (isinstance(self.image_column, str) and isinstance(self.label_column, str)):
            raise UsageError("image_column and label_column must be column names")
        if self.test_dataset is not None and not (isinstance(self.test_dataset, str)
                                                  and valid_name(self.test_dataset, test=True)):
            raise UsageError(f"unknown test dataset {shown(self.test_dataset)}; valid: "
                             f"{', '.join(DATASETS + TEST_ONLY)}, npz:PATH")
        for name in ("classes", "test_classes"):
            v = getattr(self, name)
            if v is not None:
                if not isinstance(v, (list, tuple)) or not v:
                    raise UsageError(f"{name} must be a non-empty list of class labels")
                for c in v:
                    _check_int(name, c, 0, 65_535)
                if len(set(v)) < len(v):
                    raise UsageError(f"{name}: duplicated class")
                setattr(self, name, sorted(v))
        _check_choice("labels", self.labels, ("true", "random"))
        _check_choice("pixels", self.pixels, ("natural", "shuffled"))
        _check_float("separation", self.separation, 0.0, 1e6)
        _check_float("subset_fraction", self.subset_fraction, 0.0, 1.0, low_open=True)
        if self.superclass is not None:
            _check_int("superclass", self.superclass, 0, 19)
            if self.dataset != "cifar100":
                raise UsageError("superclass needs dataset cifar100")
        if not isinstance(self.cuda_graphs, bool):
            raise UsageError("cuda_graphs must be true or false")
        if not isinstance(self.save_data, bool):
            raise UsageError("save_data must be true or false")
        if not isinstance(self.record_predictions, bool):
            raise UsageError("record_predictions must be true or false")
        if not isinstance(self.record, list) or not set(self.record) <= {"margin", "loss", "pred"}:
            raise UsageError(f"record takes a list of margin, loss, pred; got {shown(self.record)}")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise UsageError("data_dir must be a path string")
        _check_int("seed_offset", self.seed_offset, 0, 2**62)
        _check_int("shared_seed", self.shared_seed, 0, 2**62)
        if isinstance(self.seeds, (list, tuple)):
            self.seeds = list(self.seeds)
            if not self.seeds:
                raise UsageError("seeds: the list is empty")
            for s in self.seeds:
                _check_int("seeds", s, 0, 2**62)
            dup = sorted(s for s, n in Counter(self.seeds).items() if n > 1)
            if dup:
                raise UsageError(f"seeds: duplicated seed(s) {', '.join(map(str, dup[:5]))}")
            if self.seed_offset:
                raise UsageError("seed_offset applies to a seed count, not to an explicit list of seeds")
        else:
            _check_int("seeds", self.seeds, 1, 10_000_000)
        _check_choice("vary", self.vary, VARY)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_int("epochs", self.epochs, 1, 100_000)
        _check_int("batch_size", self.batch_size, 1, 1_000_000)
        _check_int("record_every", self.record_every, 0, 10**9)
        _check_int("save_every", self.save_every, 0, 10**9)
        if not (isinstance(self.max_nets_per_chunk, str) and self.max_nets_per_chunk == "auto"):
            _check_int("max_nets_per_chunk", self.max_nets_per_chunk, 1, 10**9)
        self._check_grid()
        if self.shard is not None:
            parts = str(self.shard).split("/")
            ok = len(parts) == 2 and all(x.isdigit() for x in parts) and 0 <= int(parts[0]) < int(parts[1])
            if not ok or int(parts[1]) > len(self.seed_list):
                raise UsageError(f"shard must be i/n with 0 <= i < n <= number of seeds, got {shown(self.shard)}")
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if not isinstance(self.nesterov, bool):
            raise UsageError("nesterov must be true or false")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise UsageError("nesterov needs optimizer sgd with momentum > 0")
        if not (isinstance(self.betas, (list, tuple)) and len(self.betas) == 2):
            raise UsageError(f"betas must be two numbers in [0, 1), got {shown(self.betas)}")
        self.betas = list(self.betas)
        for beta in self.betas:
            _check_float("betas", beta, 0.0, 1.0, high_open=True)
        _check_float("eps", self.eps, 0.0, 1.0, low_open=True)
        _check_float("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        from .data.augment import Augment

        self.augment = str(Augment.parse(self.augment))
        _check_float("lr", self.lr, 0.0, 10.0, low_open=True)
        _check_float("momentum", self.momentum, 0.0, 1.0, high_open=True)
        _check_float("weight_decay", self.weight_decay, 0.0, 1.0, high_open=True)
        _check_float("warmup_epochs", self.warmup_epochs, 0.0, float(self.epochs))
        if not isinstance(self.device, str) or not isinstance(self.backend, str):
            raise UsageError("device and backend must be strings")
        if self.out is not None and not isinstance(self.out, str):
            raise UsageError("out must be a path string")
        if self.extra:
            raise UsageError(f"unknown config keys: {', '.join(self.extra)}")

    @property
    def seed_list(self) -> list[int]:
        """Every network's seed; with a grid, `seeds` consecutive seeds per group, group after group."""
        if isinstance(self.seeds, list):
            return list(self.seeds)
        return list(range(self.seed_offset, self.seed_offset + self.seeds * len(self.groups())))

    def groups(self) -> list[dict]:
        """The grid's combinations in order (the first key varies slowest), each a dict of field values; one empty
        combination without a grid."""
        combos = [{}]
        for key, values in (self.grid or {}).items():
            combos = [dict(c, **{key: v}) for c in combos for v in values]
        return combos

    def group_config(self, group: dict) -> "Config":
        """This config with one grid combination's values in place (crop and cutout set the augmentation)."""
        from .data.augment import Augment

        d = dict(self.to_dict(), grid=None, seeds=1, seed_offset=0, shard=None)
        aug = Augment.parse(self.augment)
        for key, value in group.items():
            if key in ("crop", "cutout"):
                aug = dataclasses.replace(aug, **{key: value})
            else:
                d[key] = value
        d["augment"] = str(aug)
        return Config(**d)

    def shard_range(self) -> tuple[int, int]:
        """[lo, hi) of this shard's networks within seed_list (all of them without --shard)."""
        p = len(self.seed_list)
        if self.shard is None:
            return 0, p
        i, n = map(int, self.shard.split("/"))
        return i * p // n, (i + 1) * p // n

    def shard_seeds(self) -> list[int]:
        lo, hi = self.shard_range()
        return self.seed_list[lo:hi]

    def init_seeds(self) -> list[int]:
        return self.seed_list if self.vary in ("both", "init") else [self.shared_seed] * len(self.seed_list)

    def order_seeds(self) -> list[int]:
        return self.seed_list if self.vary in ("both", "order") else [self.shared_seed] * len(self.seed_list)

    def lr_at(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """Learning rate of step `step` (0-based): linear warm-up, then the schedule over the remaining steps."""
        warmup = round(self.warmup_epochs * steps_per_epoch)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, total_steps - warmup)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * frac))
        if self.schedule == "step":
            return self.lr * 0.1 ** sum(frac >= m for m in STEP_MILESTONES)
        return self.lr

    def _check_grid(self) -> None:
        if self.grid is None:
            return
        if not isinstance(self.grid, dict) or not self.grid:
            raise UsageError("grid must map hyperparameters to lists of values, e.g. {lr = [0.4, 0.1]}")
        grid = {}
        for key, values in self.grid.items():
            name = str(key).replace("-", "_")
            if name not in GRID_KEYS:
                raise UsageError(f"grid: unknown key {key!r}; valid: {', '.join(GRID_KEYS)}")
            if name in grid:
                raise UsageError(f"grid: {name} given twice")
            if not isinstance(values, (list, tuple)) or not values:
                raise UsageError(f"grid: {name} needs a non-empty list of values")
            if len(set(values)) < len(values):
                raise UsageError(f"grid: {name} has a value twice")
            grid[name] = list(values)
        self.grid = grid
        if isinstance(self.seeds, list):
            raise UsageError("a grid takes a seed count (--seeds N: N networks per combination), not a list")
        if self.seeds * len(self.groups()) > 10_000_000:
            raise UsageError(f"the grid has {len(self.groups())} combinations of {self.seeds} seeds: more than "
                             "10,000,000 networks")
        for group in self.groups():
            self.group_config(group)  # each combination is a valid config

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        d = {k.replace("-", "_"): v for k, v in d.items()}
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def from_toml(cls, path: str, **overrides) -> "Config":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            with open(path, "rb") as f:
                d = tomllib.load(f)
        except OSError as e:
            raise UsageError(f"cannot read config {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"malformed TOML in {path}: {e}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{path} is not UTF-8 text (TOML must be)") from None
        d = {k.replace("-", "_"): v for k, v in d.items()}
        d.update(overrides)
        return cls.from_dict(d)


def _check_module_path(arch: str) -> None:
    """module:package.module:function, each part a dotted Python name."""
    parts = arch.split(":")
    if len(parts) != 3 or not all(re.fullmatch(r"[\w.<>]+", x) for x in parts[1:]):
        raise UsageError(f"arch {shown(arch)}: a module is given as module:package.module:function")


def _check_int(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise UsageError(f"{name} must be an integer in [{lo}, {hi}], got {shown(v)}")


def _check_float(name, v, lo, hi, low_open=False, high_open=False):
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    ok = ok and (lo < v if low_open else lo <= v) and (v < hi if high_open else v <= hi)
    if not ok:
        brackets = ("(" if low_open else "[") + f"{lo}, {hi}" + (")" if high_open else "]")
        raise UsageError(f"{name} must be a number in {brackets}, got {shown(v)}")


def _check_choice(name, v, choices):
    if v not in choices:
        raise UsageError(f"unknown {name} {shown(v)}; valid: {', '.join(choices)}")
