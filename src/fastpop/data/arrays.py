"""Your own data: train and test arrays in memory (numpy or torch), a map-style torch Dataset, a Hugging Face
dataset, or an npz file, checked and brought to the resident layout [N, C, H, W] (uint8 or float32) with integer
labels.

Images may be [N, C, H, W] or channels-last [N, H, W, C] (what PIL, Keras and Hugging Face give): the axis of 1, 3 or
4 channels is found, and when both ends could be channels (or neither) `layout="nchw"` or `"nhwc"` says which.
[N, H, W] is one channel; [N, D] vectors become [N, D, 1, 1], for specs of dense layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UsageError

MAX_CLASS = 65_535
LAYOUTS = ("auto", "nchw", "nhwc")
CHANNELS = (1, 3, 4)


@dataclass(eq=False)
class ArrayData:
    """Train and test splits in memory: `fastpop.train(config, data=fastpop.ArrayData(x_train, y_train, x_test,
    y_test))`. Arrays are numpy arrays or torch tensors; `name` names the data set in run.json."""

    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any
    name: str = "arrays"
    layout: str = "auto"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise UsageError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if not isinstance(self.name, str) or not self.name or ":" in self.name or "/" in self.name:
            raise UsageError(f"name must be a short word without ':' or '/', got {self.name!r}")

    def splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """split -> (images [N, C, H, W] uint8 or float32, labels int64 [N]), checked."""
        out = {split: check_split(*(getattr(self, f"{k}_{split}") for k in "xy"), split, self.layout)
               for split in ("train", "test")}
        if out["train"][0].shape[1:] != out["test"][0].shape[1:]:
            raise UsageError(f"train images {list(out['train'][0].shape[1:])} and test images "
                             f"{list(out['test'][0].shape[1:])} differ in shape")
        return out

    @classmethod
    def from_torch(cls, train, test, name: str = "torch", layout: str = "auto") -> "ArrayData":
        """Map-style torch Datasets whose items are (image, label): images as tensors, arrays or PIL images."""
        return cls(*_items(train, "train"), *_items(test, "test"), name=name, layout=layout)

    @classmethod
    def from_hf(cls, dataset, image: str = "image", label: str = "label", name: str = "hf", layout: str = "auto"
                ) -> "ArrayData":
        """A Hugging Face DatasetDict with train and test splits (or the folder `save_to_disk` wrote): the
        `image` column (PIL images or arrays) and the integer `label` column."""
        if isinstance(dataset, str):
            try:
                import datasets
            except ImportError:
                raise UsageError("Hugging Face data sets need the datasets package: pip install datasets") from None
            try:
                dataset = datasets.load_from_disk(dataset)
            except Exception as e:
                raise UsageError(f"cannot load a Hugging Face dataset from {dataset}: {type(e).__name__}") from None
        arrays = []
        for split in ("train", "test"):
            if split not in dataset:
                raise UsageError(f"the Hugging Face dataset has no {split!r} split (it has {list(dataset)})")
            part = dataset[split]
            for column in (image, label):
                if column not in part.column_names:
                    raise UsageError(f"the {split} split has no column {column!r}; columns: {part.column_names}")
            arrays += [_stack([part[i][image] for i in range(len(part))], split), np.asarray(part[label])]
        return cls(*arrays, name=name, layout=layout)


# a saved copy in a run directory: file -> (split, 0 images / 1 labels)
SAVED = {f"data.{k}_{split}.npy": (split, i) for split in ("train", "test") for i, k in enumerate("xy")}


def saved_files(data: ArrayData) -> dict[str, np.ndarray]:
    """The copy of in-memory data that `save_data` keeps in the run directory: checked, [N, C, H, W]."""
    splits = data.splits()
    return {name: splits[split][i] for name, (split, i) in SAVED.items()}


def from_saved(arrays: dict[str, np.ndarray], name: str) -> ArrayData:
    """The ArrayData of a copy `saved_files` made (`arrays`: its files by name)."""
    parts = [arrays[f"data.{k}_{split}.npy"] for split in ("train", "test") for k in "xy"]
    return ArrayData(*parts, name=name, layout="nchw")


def check_split(x, y, split: str, layout: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """One split's images and labels as (x [N, C, H, W] uint8 or float32, y int64 [N]), or one line saying what
    is wrong."""
    x, y = _numpy(x, f"x_{split}"), _numpy(y, f"y_{split}")
    if x.dtype == object or y.dtype == object:
        raise UsageError(f"{split} split: object arrays (ragged images?); give one numeric array per split")
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
        raise UsageError(f"x_{split} must be uint8 or float, got {x.dtype}")
    if x.ndim == 0 or y.ndim == 0:  # a scalar has no len()
        raise UsageError(f"x_{split} and y_{split} must be arrays over examples, got shapes {x.shape}, {y.shape}")
    if len(x) == 0:
        raise UsageError(f"the {split} split is empty")
    if np.issubdtype(x.dtype, np.floating):
        big = float(np.abs(x).max())
        if not np.isfinite(big) or big > float(np.finfo(np.float32).max):  # a float32 scalar would overflow
            raise UsageError(f"x_{split} holds NaN, infinite or values beyond float32 (largest |x| = {big:.3g})")
        x = x.astype(np.float32)
    if y.ndim != 1 or len(y) != len(x):
        raise UsageError(f"y_{split} must be [N] with N = {len(x)} like x_{split}, got shape {list(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"y_{split} must hold integer labels, got {y.dtype}")
    if y.min() < 0 or y.max() > MAX_CLASS:
        raise UsageError(f"y_{split} labels must be in 0..{MAX_CLASS}, got {y.min()}..{y.max()}")
    return np.ascontiguousarray(to_nchw(x, layout, f"x_{split}")), y.astype(np.int64)


def to_nchw(x: np.ndarray, layout: str, what: str) -> np.ndarray:
    if x.ndim == 2:
        return x[:, :, None, None]
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise UsageError(f"{what} must be [N, D], [N, H, W], [N, C, H, W] or [N, H, W, C], got shape {list(x.shape)}")
    if layout == "auto":
        first, last = x.shape[1] in CHANNELS, x.shape[3] in CHANNELS
        if first == last:
            raise UsageError(f"{what} of shape {list(x.shape)} could be [N, C, H, W] or [N, H, W, C]; say which with "
                             "layout='nchw' or 'nhwc'")
        layout = "nchw" if first else "nhwc"
    return x if layout == "nchw" else x.transpose(0, 3, 1, 2)


def _numpy(a, what: str) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().numpy()
    try:
        return np.asarray(a)
    except ValueError:
        raise UsageError(f"{what} is ragged: its items differ in shape") from None


def _items(dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        n = len(dataset)
        items = [dataset[i] for i in range(n)]
    except Exception as e:
        raise UsageError(f"the {split} Dataset raised {type(e).__name__} while read: {e}") from None
    if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
        raise UsageError(f"the {split} Dataset's items must be (image, label) pairs")
    return _stack([im for im, _ in items], split), np.asarray([int(lab) for _, lab in items])


def _stack(images: list, split: str) -> np.ndarray:
    arrays = [_numpy(im, f"a {split} image") for im in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UsageError(f"the {split} images differ in shape: {sorted(shapes)[:3]}")
    return np.stack(arrays) if arrays else np.zeros((0,), np.uint8)
