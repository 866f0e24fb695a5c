"""The run directory: pre-allocated record arrays, an atomically written manifest (run.json), a writer lock, and
the saved population state. Readable with numpy and json alone; the layout is documented in README.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


def write_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write(path, buf.getvalue())


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
    """Writes a run directory's record, one checkpoint at a time. `create` makes a new one, `reopen` continues
    one for --resume; both hold the directory's lock until `close`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.arrays = {(split, kind): _open_array(path / f"{split}.{kind}.npy", shape, dtype, fill)
                       for split, kind, shape, dtype, fill in record_arrays(manifest)}

    @classmethod
    def create(cls, path: Path, manifest: dict) -> "RunWriter":
        """Build the directory under a temporary name, then rename it into place: --out appears whole (manifest,
        pre-allocated arrays) or not at all."""
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.mkdir(parents=True)
            for split, kind, shape, dtype, fill in record_arrays(manifest):
                _new_array(tmp / f"{split}.{kind}.npy", shape, dtype, fill)
            write_json(tmp / MANIFEST, manifest)
            acquire_lock(tmp)
            os.rename(tmp, path)  # onto a missing or empty directory
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UsageError(f"cannot create --out {path}: {e.strerror or e}") from None
        return cls(path, manifest)

    @classmethod
    def reopen(cls, path: Path, manifest: dict) -> "RunWriter":
        acquire_lock(path)
        try:
            return cls(path, manifest)
        except BaseException:
            release_lock(path)
            raise

    def write_rows(self, t: int, records: dict[str, dict[str, np.ndarray]]) -> None:
        """records: split -> {"bits": uint8 [P, R], "loss": [P], "acc": [P], and "pred": uint8 or uint16 [P, N]
        where predictions are recorded}, flushed to disk. They count only once `commit` says so."""
        for split, rows in records.items():
            for kind, row in rows.items():
                arr = self.arrays[split, kind]
                arr[t] = row
                arr.flush()
                self._checksum(split, kind, t)

    def adopt_rows(self, lo: int, hi: int) -> None:
        """Checksum rows lo..hi-1 that reached the disk (and the saved state) before a kill kept the manifest
        from counting them."""
        for split, kind in self.arrays:
            for t in range(lo, hi):
                self._checksum(split, kind, t)

    def _checksum(self, split: str, kind: str, t: int) -> None:
        sums = self.manifest.setdefault("checksums", {}).setdefault(f"{split}.{kind}", {})
        sums[str(t)] = row_checksum(self.arrays[split, kind][t])

    def commit(self, checkpoints_done: int, **fields) -> None:
        self.manifest["checkpoints_done"] = checkpoints_done
        self.manifest.update(fields)
        write_json(self.path / MANIFEST, self.manifest)

    def save_state(self, state: dict) -> None:
        import torch  # here, so readers of run directories do not load torch

        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(self.path / STATE, buf.getvalue())

    def save_array(self, name: str, arr: np.ndarray) -> None:
        write_npy(self.path / name, arr)

    def close(self, status: str, **fields) -> None:
        self.manifest.update(status=status, **fields)
        write_json(self.path / MANIFEST, self.manifest)
        release_lock(self.path)


def record_arrays(manifest: dict) -> list[tuple[str, str, tuple, type, float]]:
    """(split, kind, shape, dtype, fill) of every record array a manifest implies."""
    t, p = len(manifest["checkpoints"]), len(manifest["seeds"])
    out = []
    for split, info in manifest["splits"].items():
        out += [(split, "bits", (t, p, info["bytes_per_row"]), np.uint8, 0),
                (split, "loss", (t, p), np.float32, np.nan), (split, "acc", (t, p), np.float32, np.nan)]
        asked = set(manifest["config"].get("record") or [])
        if "pred" in asked or (split == "test" and manifest.get("predictions")):
            out.append((split, "pred", (t, p, info["n"]), pred_dtype(manifest.get("class_ids")), 0))
        for kind, name in (("margin", "margin"), ("loss", "xent")):
            if kind in asked:
                out.append((split, name, (t, p, info["n"]), np.float16, np.nan))
    return out


def pred_dtype(class_ids) -> type:
    """Predicted labels are stored as original class ids in the smallest unsigned type that holds them."""
    return np.uint8 if not class_ids or max(class_ids) < 256 else np.uint16


def row_checksum(row: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(row).tobytes()).hexdigest()[:16]


def _new_array(path: Path, shape, dtype, fill) -> None:
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    arr[...] = fill
    arr.flush()
    del arr
    with open(path, "r+b") as f:  # real blocks now, so a later write into the map cannot hit a full disk
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        os.fsync(f.fileno())


def _open_array(path: Path, shape, dtype, fill) -> np.memmap:
    """A record array for writing; one with fewer checkpoint rows than the plan (a run given more epochs) is first
    grown to it, its new rows filled, and swapped in atomically."""
    try:
        arr = np.load(path, mmap_mode="r+")
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is missing or corrupt ({e})") from None
    if arr.shape[1:] == tuple(shape[1:]) and arr.shape[0] < shape[0] and arr.dtype == dtype:
        tmp = path.with_name(path.name + ".grow")
        _new_array(tmp, shape, dtype, fill)
        grown = np.load(tmp, mmap_mode="r+")
        grown[:arr.shape[0]] = arr
        grown.flush()
        del grown, arr
        os.replace(tmp, path)
        arr = np.load(path, mmap_mode="r+")
    if arr.shape != tuple(shape) or arr.dtype != dtype:
        raise UsageError(f"{path} holds {arr.dtype} {arr.shape}, but run.json says {np.dtype(dtype)} {shape}")
    return arr


def acquire_lock(path: Path) -> None:
    lock = path / LOCK
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = live_writer(path)
        if pid is not None:
            raise UsageError(f"{path} is in use by process {pid}") from None
        lock.unlink(missing_ok=True)  # stale: its writer died
        return acquire_lock(path)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))


def live_writer(path: Path) -> int | None:
    """The pid of the live process that holds the directory's lock, or None (no lock, or a stale one)."""
    pid = _read_pid(path / LOCK)
    return pid if pid is not None and _alive(pid) else None


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
