"""The run directory: pre-allocated record arrays, an atomically written manifest (run.json), a writer lock, and
the saved population state. Readable with numpy and json alone; the layout is documented in README.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

FORMAT = 1
SPLITS = ("train", "test")
MANIFEST = "run.json"
STATE = "state.pt"
LOCK = ".lock"


def bytes_per_row(n: int) -> int:
    """R = 8 * ceil(N / 64): rows are whole uint64 words."""
    return 8 * -(-n // 64)


def atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the folder: readers see the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


def check_new_out(path: Path) -> None:
    """Refuse an --out that exists and is not empty, or that cannot be created; touches nothing."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--out {path} exists and is not empty; choose a new directory")
    parent = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not parent.is_dir():
        raise UsageError(f"--out {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path} is not writable")


class RunWriter:
    """Creates a run directory and writes its record, one checkpoint at a time."""

    def __init__(self, path: Path, manifest: dict, p: int, sizes: dict[str, int]):
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create --out {path}: {e.strerror}") from None
        acquire_lock(path)
        t = len(manifest["checkpoints"])
        self.manifest = manifest
        self.bits, self.loss, self.acc = {}, {}, {}
        for split, n in sizes.items():
            self.bits[split] = _new_array(path / f"{split}.bits.npy", (t, p, bytes_per_row(n)), np.uint8, 0)
            self.loss[split] = _new_array(path / f"{split}.loss.npy", (t, p), np.float32, np.nan)
            self.acc[split] = _new_array(path / f"{split}.acc.npy", (t, p), np.float32, np.nan)
        write_json(path / MANIFEST, manifest)

    def write_checkpoint(self, t: int, records: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """records: split -> (packed bits uint8 [P, R], loss [P], accuracy [P]). The arrays reach the disk before
        the manifest counts checkpoint t as done."""
        for split, (bits, loss, acc) in records.items():
            self.bits[split][t] = bits
            self.loss[split][t] = loss
            self.acc[split][t] = acc
            for arr in (self.bits[split], self.loss[split], self.acc[split]):
                arr.flush()
        self.manifest["checkpoints_done"] = t + 1
        write_json(self.path / MANIFEST, self.manifest)

    def save_state(self, state: dict) -> None:
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(self.path / STATE, buf.getvalue())

    def close(self, status: str, **fields) -> None:
        self.manifest.update(status=status, **fields)
        write_json(self.path / MANIFEST, self.manifest)
        release_lock(self.path)


def _new_array(path: Path, shape, dtype, fill) -> np.memmap:
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    arr[...] = fill
    return arr


def acquire_lock(path: Path) -> None:
    lock = path / LOCK
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = _read_pid(lock)
        if pid is not None and _alive(pid):
            raise UsageError(f"{path} is in use by process {pid}") from None
        lock.unlink(missing_ok=True)  # stale: its writer died
        return acquire_lock(path)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))


def release_lock(path: Path) -> None:
    (path / LOCK).unlink(missing_ok=True)


def _read_pid(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
