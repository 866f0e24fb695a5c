"""A kill at every write boundary of a run with divergence, subsets and predictions ends, after resume, in the
same files as an uninterrupted run; and the writer lock under a race has exactly one owner."""

import inspect
import json
import multiprocessing
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastpop
from fastpop import rundir, trainer
from fastpop.errors import UsageError

CONFIG = dict(arch="small-cnn", seeds=[5, 13, 9], epochs=2, batch_size=64, subset_fraction=0.5,
              record_predictions=True, save_every=4)
POISON_STEP = 12  # network 1's weights turn NaN before this step: it diverges there


class Killed(BaseException):
    """A simulated SIGKILL: the process writes nothing from here on."""


class Killer:
    """Counts write boundaries; at boundary `at` the process dies before the write, and stays dead."""

    def __init__(self, at: int | None = None):
        self.at, self.count, self.dead = at, 0, False

    def boundary(self):
        if self.dead:
            raise Killed
        self.count += 1
        if self.count == self.at:
            self.dead = True
            raise Killed


@pytest.fixture
def killer(monkeypatch):
    box = {"k": Killer()}

    def wrap(fn):
        def wrapped(*args, **kwargs):
            box["k"].boundary()
            return fn(*args, **kwargs)
        return wrapped

    # every durable write of the run directory: files (manifest, state, diverged.npy, membership, the lock),
    # new record arrays, flushed rows, and the rename that makes a new directory appear
    for name in ("atomic_write", "_new_array", "flush_rows", "publish"):
        monkeypatch.setattr(rundir, name, wrap(getattr(rundir, name)))
    # in one process the page cache outlives a simulated kill, as it outlives a real one: fsync proves nothing
    # here and costs half of each tiny run
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    original = trainer.train_step
    signature = inspect.signature(original)

    def poisoned(*args, **kwargs):
        call = signature.bind(*args, **kwargs).arguments
        if call["step"] == POISON_STEP:
            with torch.no_grad():
                call["pop"].views(call["pop"].params)[0][1].fill_(float("nan"))
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", poisoned)
    return box


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _final_files(path):
    run = fastpop.load_run(path)
    out = {name: np.load(path / name) for name in sorted(p.name for p in path.glob("*.npy"))}
    state = run.state()
    out.update({f"state.{k}": state[k].numpy() for k in rundir.STATE_TENSORS}, step=state["step"])
    m = run.manifest
    out.update({f"run.json {k}": json.dumps(m[k], sort_keys=True)
                for k in ("seeds", "splits", "checkpoints", "checkpoints_done", "checksums", "files", "diverged",
                          "status", "predictions")})
    return out


def test_a_kill_at_every_write_boundary_then_resume_gives_the_same_files(tmp_path, killer):
    killer["k"] = counting = Killer()
    ref = fastpop.train(fastpop.Config(**CONFIG, out=str(tmp_path / "ref")))
    assert ref.diverged == {13: POISON_STEP} and ref.member_bits() is not None and ref.predictions() is not None
    want = _final_files(ref.path)
    boundaries = counting.count
    assert boundaries > 20
    dead = _dead_pid()
    for k in range(1, boundaries + 1):
        out = tmp_path / f"k{k}"
        killer["k"] = Killer(at=k)
        with pytest.raises(Killed):
            fastpop.train(fastpop.Config(**CONFIG, out=str(out)))
        killer["k"] = Killer()
        if not (out / rundir.MANIFEST).exists():  # killed before the directory appeared: start again
            assert not out.exists() or not any(out.iterdir())
            fastpop.train(fastpop.Config(**CONFIG, out=str(out)))
        else:
            (out / rundir.LOCK).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
            fastpop.resume(out)
        got = _final_files(out)
        assert got.keys() == want.keys(), k
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"kill at boundary {k}: {name}")


def test_a_kill_during_resume_s_own_writes(tmp_path, killer):
    """The writes a resume makes before it trains (lock, diverged.npy, manifest) are boundaries too."""
    ref = fastpop.train(fastpop.Config(**CONFIG, out=str(tmp_path / "ref")))
    want = _final_files(ref.path)
    dead = _dead_pid()
    for j in range(1, 5):
        out = tmp_path / f"j{j}"
        killer["k"] = Killer(at=30)  # mid-run, after the first checkpoint
        with pytest.raises(Killed):
            fastpop.train(fastpop.Config(**CONFIG, out=str(out)))
        for at in (j, None):
            (out / rundir.LOCK).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
            killer["k"] = Killer(at=at)
            if at is None:
                fastpop.resume(out)
            else:
                with pytest.raises(Killed):
                    fastpop.resume(out)
        got = _final_files(out)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"resume killed at {j}: {name}")


# ---------------------------------------------------------------- the lock

ROUNDS, PROCESSES = 200, 8


def _contend(root, barrier, results, idx):
    wins = []
    try:
        for r in range(ROUNDS):
            barrier.wait()
            try:
                rundir.acquire_lock(root / f"r{r}")
                wins.append(1)
            except UsageError as e:
                wins.append(0 if "in use by process" in str(e) else str(e))
        barrier.wait()  # every winner alive until all rounds are judged
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
        wins.append(repr(e))
    results.put((idx, wins))


def test_lock_race_has_exactly_one_owner_per_round(tmp_path):
    """8 processes take the lock of the same directory at once, 200 times: no lock, a stale lock of a dead
    process, or an empty lock file. Exactly one wins each round; the others see a live owner."""
    dead = _dead_pid()
    for r in range(ROUNDS):
        folder = tmp_path / f"r{r}"
        folder.mkdir()
        if r % 3 == 1:
            (folder / rundir.LOCK).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
        elif r % 3 == 2:
            (folder / rundir.LOCK).write_text("")
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(tmp_path, barrier, results, i)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    wins = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    table = np.array([wins[i] for i in range(PROCESSES)], dtype=object)
    assert all(isinstance(v, int) for v in table.ravel()), [v for v in table.ravel() if not isinstance(v, int)][:3]
    owners = table.astype(int).sum(0)
    assert (owners == 1).all(), f"rounds without exactly one owner: {np.flatnonzero(owners != 1)[:10]}"
    leftovers = {p.name for r in range(ROUNDS) for p in (tmp_path / f"r{r}").iterdir()}
    assert leftovers == {rundir.LOCK}, leftovers


def test_lock_is_released_only_by_its_owner_and_names_another_host(tmp_path):
    nonce = rundir.acquire_lock(tmp_path)
    other = json.dumps({"pid": 1, "host": "elsewhere", "nonce": "feed"})
    (tmp_path / rundir.LOCK).write_text(other)  # taken over by someone else meanwhile
    rundir.release_lock(tmp_path, nonce)
    assert (tmp_path / rundir.LOCK).read_text() == other, "not ours: left alone"
    with pytest.raises(UsageError, match="on host elsewhere .* delete .*\\.lock"):
        rundir.acquire_lock(tmp_path)
