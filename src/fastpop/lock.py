"""The writer lock of a run directory (RUN/.lock): one process writes a run directory at a time.

The lock file holds its owner as JSON (pid, host, the process's start time, a random nonce). It is complete before
it appears: written aside, then hard-linked into place, which fails while a lock exists. A stale lock (its process
died, on this host; a pid reused by another process counts as dead) is taken over through a claim named after
the stale lock's content, so that of all processes that saw the same stale lock exactly one replaces it. Only
the owner (by nonce) removes its lock. A lock of another host cannot be checked: it is refused with the way to
take over deliberately.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

from .errors import UsageError

LOCK = ".lock"
TAKEOVER_WAIT_S = 10.0  # how long to wait for another process's takeover of a stale lock to finish


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
            "nonce": os.urandom(8).hex()}


def acquire_lock(folder: Path) -> str:
    """Take the directory's lock; returns its nonce (needed to release it). UsageError when a live process (or
    another host's) holds it."""
    me = _me()
    text = json.dumps(me).encode()
    lock, mine = folder / LOCK, folder / f"{LOCK}.{me['nonce']}"
    _write_file(mine, text)
    deadline = time.monotonic() + TAKEOVER_WAIT_S
    try:
        while time.monotonic() < deadline:
            try:
                os.link(mine, lock)
                return me["nonce"]
            except FileExistsError:
                pass
            try:
                held = lock.read_bytes()
            except FileNotFoundError:
                continue  # released meanwhile
            holder = _parse_lock(held)
            if holder is not None and _holder_alive(holder):
                raise UsageError(_in_use(folder, holder))
            if _take_over(lock, held, mine):
                return me["nonce"]
            time.sleep(0.001)  # another process holds the claim: it replaces the lock in a moment
        raise UsageError(f"{folder}: could not take over its stale lock (another process claimed it and did not "
                         f"finish); if no process writes the directory, delete {lock} and {lock}.claim-*")
    finally:
        mine.unlink(missing_ok=True)


def _take_over(lock: Path, stale: bytes, mine: Path) -> bool:
    """Replace the stale lock (content `stale`) by ours; False if another process got there first."""
    claim = lock.with_name(f"{LOCK}.claim-{hashlib.sha256(stale).hexdigest()[:16]}")
    try:
        os.link(lock, claim)  # only one process per stale lock gets this name
    except (FileExistsError, FileNotFoundError):
        return False
    try:
        if claim.read_bytes() != stale:  # the lock is a fresh one of a faster taker, not the stale one
            return False
        os.replace(mine, lock)
        return True
    finally:
        claim.unlink(missing_ok=True)


def _in_use(folder: Path, holder: dict) -> str:
    if holder.get("host") not in (None, socket.gethostname()):
        return (f"{folder} is in use by process {holder.get('pid')} on host {holder['host']} (its lock cannot be "
                f"checked from here); if no process writes it any more, delete {folder / LOCK} and retry")
    return f"{folder} is in use by process {holder.get('pid')} (a live process holds {folder / LOCK})"


def _parse_lock(data: bytes) -> dict | None:
    """The lock's holder, or None for a lock that names no process (empty or garbage: stale)."""
    try:
        holder = json.loads(data)
    except ValueError:
        holder = None
    if isinstance(holder, int) and not isinstance(holder, bool):  # a bare pid, as written by format 1
        holder = {"pid": holder}
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) and holder["pid"] > 0:
        return None
    return holder


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") not in (None, socket.gethostname()):
        return True  # another host's process: cannot be checked from here
    if not _alive(holder["pid"]):
        return False
    started = holder.get("started")
    return started is None or _start_time(holder["pid"]) in (None, started)  # a reused pid is another process


def live_writer(folder: Path) -> dict | None:
    """The holder ({pid, host, ...}) of the directory's lock if it may be alive, else None."""
    try:
        holder = _parse_lock((folder / LOCK).read_bytes())
    except OSError:
        return None
    return holder if holder is not None and _holder_alive(holder) else None


def release_lock(folder: Path, nonce: str) -> None:
    """Remove the lock only if it is still ours."""
    lock = folder / LOCK
    try:
        holder = _parse_lock(lock.read_bytes())
    except FileNotFoundError:
        return
    if holder is not None and holder.get("nonce") == nonce:
        lock.unlink(missing_ok=True)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
