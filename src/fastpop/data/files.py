"""Readers for the standard distribution files, and user arrays.

MNIST and Fashion-MNIST: the four idx files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
`t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally `.gz`). CIFAR-10: `cifar-10-batches-py/`
(`data_batch_1..5`, `test_batch`); CIFAR-100: `cifar-100-python/` (`train`, `test`), python pickles. They are looked
for in --data-dir, in its subfolder named after the data set, and in torchvision's layout (`MNIST/raw`, ...); when
they are missing and torchvision is installed, it is asked to download them into --data-dir first.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from ..errors import UsageError

IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
TORCHVISION = {"mnist": ("MNIST", "MNIST"), "fashion-mnist": ("FashionMNIST", "FashionMNIST"),
               "cifar10": ("CIFAR10", None), "cifar100": ("CIFAR100", None)}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (uint8 data, big-endian dims) as uint8 [d0, d1, ...]."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UsageError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise UsageError(f"{path} is truncated (no complete header)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims))
    if len(data) - header != size:
        raise UsageError(f"{path} holds {len(data) - header} bytes of data, its header promises {size}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _find(data_dir: Path, name: str, candidates: list[str]) -> Path | None:
    folders = [data_dir, data_dir / name]
    tv = TORCHVISION.get(name)
    if tv:
        folders += [data_dir / tv[0] / "raw", data_dir / tv[0]]
    for folder in folders:
        for cand in candidates:
            for suffix in ("", ".gz"):
                if (folder / (cand + suffix)).exists():
                    return folder / (cand + suffix)
    return None


def _download(name: str, data_dir: Path) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError:
        return
    try:
        getattr(tvd, TORCHVISION[name][0])(str(data_dir), train=True, download=True)
        getattr(tvd, TORCHVISION[name][0])(str(data_dir), train=False, download=True)
    except Exception:  # offline, or a mirror is down: fall through to the clear "missing" error
        pass


def load_idx_pair(name: str, data_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, (images, labels) in IDX.items():
        pi, pl = _find(data_dir, name, [images]), _find(data_dir, name, [labels])
        if pi is None or pl is None:
            _download(name, data_dir)
            pi, pl = _find(data_dir, name, [images]), _find(data_dir, name, [labels])
        if pi is None or pl is None:
            raise UsageError(f"{name}: {images} and {labels} (or .gz) not found in --data-dir {data_dir}")
        x, y = read_idx(pi), read_idx(pl)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UsageError(f"{name}: {pi.name} {x.shape} and {pl.name} {y.shape} do not match")
        out[split] = (x[:, None], y.astype(np.int64))
    return out


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:
        raise UsageError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def load_cifar(name: str, data_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """split -> (uint8 [N, 3, 32, 32], labels, coarse labels (CIFAR-100) or None)."""
    folder_name, files = (("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)],
                                                    "test": ["test_batch"]})
                          if name == "cifar10" else ("cifar-100-python", {"train": ["train"], "test": ["test"]}))
    folder = next((f for f in (data_dir / folder_name, data_dir / name / folder_name, data_dir / name, data_dir)
                   if all((f / b).exists() for b in files["train"] + files["test"])), None)
    if folder is None:
        _download(name, data_dir)
        folder = data_dir / folder_name
        if not all((folder / b).exists() for b in files["train"] + files["test"]):
            raise UsageError(f"{name}: {folder_name}/ with {', '.join(files['train'] + files['test'])} not found in "
                             f"--data-dir {data_dir}")
    out = {}
    for split, batches in files.items():
        xs, ys, cs = [], [], []
        for b in batches:
            d = _unpickle(folder / b)
            key = b"labels" if name == "cifar10" else b"fine_labels"
            if b"data" not in d or key not in d:
                raise UsageError(f"{folder / b} has no {key.decode()!r} or 'data' entry")
            x = np.asarray(d[b"data"])
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(d[key]):
                raise UsageError(f"{folder / b}: data must be uint8 [N, 3072] with N labels")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[key], np.int64))
            cs.append(np.asarray(d.get(b"coarse_labels", []), np.int64))
        out[split] = (np.concatenate(xs), np.concatenate(ys), np.concatenate(cs) if name == "cifar100" else None)
    return out


def load_npz(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """User arrays x_train, y_train, x_test, y_test: images [N, H, W] or [N, C, H, W] (uint8 or float), integer
    labels."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise UsageError(f"cannot read npz {path}: {type(e).__name__}: {e}") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise UsageError(f"npz {path} lacks {', '.join(missing)}")
    out = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or min(x.shape) == 0:
            raise UsageError(f"npz x_{split} must be [N, H, W] or [N, C, H, W], got {x.shape}")
        if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
            raise UsageError(f"npz x_{split} must be uint8 or float, got {x.dtype}")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise UsageError(f"npz x_{split} has NaN or infinite values")
        if y.ndim != 1 or len(y) != len(x):
            raise UsageError(f"npz y_{split} must be [N] with N = {len(x)} like x_{split}, got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise UsageError(f"npz y_{split} must hold integers, got {y.dtype}")
        if y.min() < 0 or y.max() > 255:
            raise UsageError(f"npz y_{split} labels must be in 0..255, got {y.min()}..{y.max()}")
        out[split] = (x if x.dtype == np.uint8 else x.astype(np.float32), y.astype(np.int64))
    if out["train"][0].shape[1:] != out["test"][0].shape[1:]:
        raise UsageError(f"npz train images {out['train'][0].shape[1:]} and test images "
                         f"{out['test'][0].shape[1:]} differ in shape")
    return out
