"""Data sets resident on the training device, and per-network batch orders.

Images stay in their stored dtype (uint8 for the image data sets) on the device and are normalized when gathered
(per-channel mean and std of the train split), so a population indexes one shared copy instead of
materializing a [P, B, C, H, W] batch.

A data set is assembled from the config: the base set, an optional CIFAR-100 superclass, class filters for train
and test, an optional other test set (`--test-dataset`, e.g. `noise`), random train labels, shuffled pixels. The
network's outputs are the train classes in increasing order; a test label outside them is stored as -1 (never
correct) and its predictions are recorded instead.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from ..errors import UsageError

if TYPE_CHECKING:  # imported where tensors are made, so validating a Config does not load torch
    import torch

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "gaussian")  # and npz:PATH
TEST_ONLY = ("noise",)
LABEL_SEED, PIXEL_SEED = 0, 0  # the fixed permutations of --labels random and --pixels shuffled
NOISE_N = 1000


@dataclass
class Split:
    x: torch.Tensor  # [N, C, H, W], stored dtype
    y: torch.Tensor  # int64 [N]: index into the network's classes, -1 outside them
    index: torch.Tensor | None = None  # int64 [N]: each example's index in the source data set's split
    label: torch.Tensor | None = None  # int64 [N]: each example's original class id (y is relative to the classes)

    def __len__(self) -> int:
        return len(self.y)

    def images_sha256(self) -> str:
        """sha256 of the images as trained on (dtype, shape and bytes): the data identity a run records."""
        return array_sha256(self.x.cpu().numpy())

    def labels_sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.y.cpu().numpy(), np.int64).tobytes()).hexdigest()


def array_sha256(arr: np.ndarray) -> str:
    h = hashlib.sha256(f"{arr.dtype.str} {list(arr.shape)}".encode())
    h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
    return h.hexdigest()


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    class_ids: list[int]  # original label of each network output
    mean: torch.Tensor  # float32 [C], per channel over the train split
    std: torch.Tensor  # float32 [C]

    @property
    def classes(self) -> int:
        return len(self.class_ids)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    @property
    def open_set(self) -> bool:
        """Some test labels lie outside the training classes: predictions, not correctness, tell them apart."""
        return bool((self.test.y < 0).any())

    def split(self, name: str) -> Split:
        return {"train": self.train, "test": self.test}[name]

    def to(self, device: torch.device) -> "Dataset":
        move = lambda s: Split(s.x.to(device), s.y.to(device), s.index, s.label)  # noqa: E731
        return Dataset(self.name, move(self.train), move(self.test), self.class_ids, self.mean.to(device),
                       self.std.to(device))


PREFIXES = ("npz:", "hf:", "arrays:")  # a file, a saved Hugging Face dataset, arrays given to fastpop.train


def valid_name(name: str, test: bool = False) -> bool:
    return name in DATASETS or (test and name in TEST_ONLY) or (isinstance(name, str) and name.startswith(PREFIXES))


def data_dir(setting: str | None) -> Path:
    return Path(setting or os.environ.get("FASTPOP_DATA", "data")).expanduser()


def load_base(name: str, folder: Path, config=None, arrays=None) -> dict:
    """split -> (x numpy [N, C, H, W], y int64 [N], coarse labels or None, each example's index in the source
    split int64 [N])."""
    from . import digits, files, synthetic
    from .arrays import ArrayData

    if name == "digits":
        return digits.load_arrays()
    if name in ("mnist", "fashion-mnist"):
        base = {s: (x, y, None) for s, (x, y) in files.load_idx_pair(name, folder).items()}
    elif name in ("cifar10", "cifar100"):
        base = files.load_cifar(name, folder)
    elif name == "gaussian":
        base = synthetic.gaussian(config.separation if config else 1.0)
    elif name.startswith("npz:"):
        base = {s: (x, y, None) for s, (x, y) in files.load_npz(Path(name[4:]).expanduser()).items()}
    elif name.startswith("hf:"):
        data = ArrayData.from_hf(str(Path(name[3:]).expanduser()), config.image_column, config.label_column,
                                 name=Path(name[3:]).name or "hf")
        base = {s: (x, y, None) for s, (x, y) in data.splits().items()}
    elif name.startswith("arrays:"):
        if arrays is None:
            raise UsageError(f"dataset {name} was given in memory: pass the same data again (data=ArrayData(...))")
        base = {s: (x, y, None) for s, (x, y) in arrays.splits().items()}
    else:
        raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}, npz:PATH, hf:PATH")
    return {s: (x, y, c, np.arange(len(y))) for s, (x, y, c) in base.items()}


def load_dataset(config, device: torch.device, arrays=None) -> Dataset:
    """The data set a config describes, on `device`; `arrays` (an ArrayData) for a dataset given in memory."""
    import torch

    from . import synthetic

    folder = data_dir(config.data_dir)
    base = load_base(config.dataset, folder, config, arrays)
    (xtr, ytr, ctr, itr), (xte, yte, cte, ite) = base["train"], base["test"]
    if config.superclass is not None:
        if ctr is None:
            raise UsageError("--superclass needs --dataset cifar100")
        keep_tr, keep_te = ctr == config.superclass, cte == config.superclass
        xtr, ytr, itr, xte, yte, ite = xtr[keep_tr], ytr[keep_tr], itr[keep_tr], xte[keep_te], yte[keep_te], \
            ite[keep_te]
    if config.test_dataset == "noise":
        xte, yte, ite = synthetic.noise(xtr, NOISE_N), np.full(NOISE_N, -1, np.int64), np.arange(NOISE_N)
    elif config.test_dataset:
        xte, yte, _, ite = load_base(config.test_dataset, folder, config, arrays)["test"]
        if xte.shape[1:] != xtr.shape[1:]:
            raise UsageError(f"--test-dataset {config.test_dataset} has images {xte.shape[1:]}, the train set "
                             f"{xtr.shape[1:]}")
    if config.classes is not None:
        xtr, ytr, itr = _keep(xtr, ytr, itr, config.classes, "--classes")
    test_classes = config.test_classes if config.test_classes is not None else (
        config.classes if not config.test_dataset else None)
    if test_classes is not None:
        xte, yte, ite = _keep(xte, yte, ite, test_classes, "--test-classes")
    class_ids = sorted(int(c) for c in np.unique(ytr))
    if len(class_ids) < 2:
        raise UsageError(f"the train split has {len(class_ids)} class(es); at least 2 are needed")
    if config.labels == "random":
        ytr = ytr[np.random.default_rng(LABEL_SEED).permutation(len(ytr))]
    if config.pixels == "shuffled":
        perm = np.random.default_rng(PIXEL_SEED).permutation(xtr.shape[2] * xtr.shape[3])
        xtr, xte = (x.reshape(*x.shape[:2], -1)[..., perm].reshape(x.shape) for x in (xtr, xte))
    source_ytr, source_yte = ytr.astype(np.int64), yte.astype(np.int64)
    lookup = {c: i for i, c in enumerate(class_ids)}
    ytr = np.array([lookup[int(c)] for c in ytr], np.int64)
    yte = np.array([lookup.get(int(c), -1) for c in yte], np.int64)
    if len(yte) == 0:
        raise UsageError("the test split is empty after filtering")
    x_train = torch.from_numpy(np.ascontiguousarray(xtr))
    mean, std = channel_stats(x_train)
    train = Split(x_train, torch.from_numpy(ytr), torch.from_numpy(itr.astype(np.int64)), torch.from_numpy(source_ytr))
    test = Split(torch.from_numpy(np.ascontiguousarray(xte)), torch.from_numpy(yte),
                 torch.from_numpy(ite.astype(np.int64)), torch.from_numpy(source_yte))
    return Dataset(config.dataset, train, test, class_ids, mean, std).to(device)


def _keep(x, y, index, classes, flag):
    present = set(np.unique(y).tolist())
    unknown = sorted(set(classes) - present)
    if unknown:
        raise UsageError(f"{flag}: unknown class(es) {unknown[:10]}; the data have {len(present)} classes")
    mask = np.isin(y, classes)
    return x[mask], y[mask], index[mask]


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return xf.mean(1).float(), xf.std(1).clamp_min(1e-6).float()
