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
    """User arrays x_train, y_train, x_test, y_test, checked as `arrays.check_split` checks in-memory arrays."""
    from .arrays import ArrayData

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise UsageError(f"cannot read npz {path}: {type(e).__name__}: {e}") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise UsageError(f"npz {path} lacks {', '.join(missing)}")
    return ArrayData(*(arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))).splits()
