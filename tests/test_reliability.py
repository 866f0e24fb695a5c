"""Kill -9 and resume, graceful stop, locks, verify, divergence, chunking, a full disk."""

import inspect
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastpop
from fastpop import trainer
from fastpop.ops import numba_cpu
from fastpop.cli import main
from fastpop.rundir import LOCK, STATE, write_manifest

RUN_ARGS = ["--arch", "small-cnn", "--seeds", "3,11,4,8", "--epochs", "3", "--batch-size", "16",
            "--record-every", "9", "--save-every", "4"]


def assert_same_run(a, b, nets=None):
    """Record, history and final weights bit-identical (networks `nets` of b, in order, if given)."""
    sel = slice(None) if nets is None else nets
    assert len(a.checkpoints) == len(b.checkpoints)
    for split in ("train", "test"):
        np.testing.assert_array_equal(a.bits(split), b.bits(split)[:, sel], err_msg=f"{split} bits")
        np.testing.assert_array_equal(a.loss(split), b.loss(split)[:, sel], err_msg=f"{split} loss")
        np.testing.assert_array_equal(a.accuracy(split), b.accuracy(split)[:, sel], err_msg=f"{split} acc")
    for key in ("params", "momentum"):
        assert torch.equal(a.weights(key), b.weights(key)[sel]), key
    assert a.state()["step"] == b.state()["step"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["run", *RUN_ARGS, "--out", str(out), "--quiet"]) == 0
    return fastpop.load_run(out)


def _cli(*args):
    return [sys.executable, "-m", "fastpop", "run", *args, "--quiet"]


KILL_ARGS = ["--arch", "small-cnn", "--seeds", "3,11,4", "--epochs", "4", "--batch-size", "8",
             "--record-every", "25", "--save-every", "3"]


def _mtime(path):
    return path.stat().st_mtime_ns if path.exists() else 0


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    """SIGKILL at 5 random moments (tests/test_faults.py kills at every write boundary in process; each attempt
    here is a process start, ~4 s): mostly a random instant after the attempt has saved new progress (so kills fall
    across steps, state saves and checkpoint writes), every fourth at a random time from launch."""
    ref = tmp_path / "ref"
    assert main(["run", *KILL_ARGS, "--out", str(ref), "--quiet"]) == 0
    out = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    for attempt in range(300):
        if (out / "run.json").exists() and json.loads((out / "run.json").read_text())["status"] == "complete":
            break
        cmd = _cli("--resume", str(out)) if (out / "run.json").exists() else _cli(*KILL_ARGS, "--out", str(out))
        before = _mtime(out / STATE)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills < 5:
            if attempt % 4 == 3:
                time.sleep(rng.uniform(0.0, 2.5))
            else:
                while proc.poll() is None and _mtime(out / STATE) == before:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.04))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert kills >= 5, f"only {kills} kills landed"
    run = fastpop.load_run(out)
    assert run.status == "complete"
    assert_same_run(fastpop.load_run(ref), run)
    assert main(["verify", str(out)]) == 0


def test_sigterm_stops_at_a_step_and_resumes(tmp_path, reference_run, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(*RUN_ARGS, "--out", str(out)), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / STATE).exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 130, err
    assert f"fastpop run --resume {out}" in err and err.count("\n") == 1
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert not (out / LOCK).exists()
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert_same_run(reference_run, fastpop.load_run(out))


def test_lock_refuses_a_second_writer_and_stale_locks_are_taken_over(tmp_path, reference_run, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.path, run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    meta["status"] = "running"
    write_manifest(run_dir, meta)
    (run_dir / LOCK).write_text(str(os.getpid()))  # a live writer: this process
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 2
    assert "in use by process" in capsys.readouterr().err
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / LOCK).write_text(str(dead.pid))  # its writer died
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert_same_run(reference_run, fastpop.load_run(run_dir))


def test_resume_refuses_complete_and_corrupt_runs_without_touching_them(tmp_path, reference_run, capsys):
    import shutil

    assert main(["run", "--resume", str(reference_run.path)]) == 2
    assert "already complete" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(reference_run.path, bad)
    meta = json.loads((bad / "run.json").read_text())
    meta["status"] = "interrupted"
    write_manifest(bad, meta)
    (bad / STATE).write_bytes(b"garbage")
    before = {p.name: p.read_bytes() for p in bad.iterdir()}
    assert main(["run", "--resume", str(bad)]) == 2
    assert "state.pt is corrupt" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == before


def test_verify_finds_damage(tmp_path, reference_run, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(reference_run.path, bad)
    bits = np.load(bad / "test.bits.npy", mmap_mode="r+")
    bits[2, 1, 0] ^= 1
    bits.flush()
    del bits
    assert main(["verify", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "test.bits.npy checkpoint 2 does not match its checksum" in err and err.count("\n") == 1


def test_one_diverging_network_touches_no_other(tmp_path, monkeypatch):
    """Inject NaN into one network's weights mid-run: it is flagged and frozen, wrong from then on; the others
    are bit-identical to a run without it."""
    common = dict(epochs=2, batch_size=64, record_every=5)
    clean = fastpop.train(fastpop.Config(seeds=[5, 9], out=str(tmp_path / "clean"), **common))
    original = trainer.train_step

    def poisoned(pop, *args, **kwargs):
        if inspect.signature(original).bind(pop, *args, **kwargs).arguments["step"] == 12:
            with torch.no_grad():
                pop.views(pop.params)[0][1].fill_(float("nan"))  # network 1 (seed 13), first conv weight
        return original(pop, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", poisoned)
    run = fastpop.train(fastpop.Config(seeds=[5, 13, 9], out=str(tmp_path / "sick"), **common))
    assert run.diverged == {13: 12}
    assert np.load(run.path / "diverged.npy").tolist() == [-1, 12, -1]
    assert_same_run(clean, run, nets=[0, 2])
    steps = [c["step"] for c in run.checkpoints]
    after = [t for t, s in enumerate(steps) if s >= 12]
    assert not np.unpackbits(run.bits("test")[after, 1]).any(), "a diverged network is wrong on everything"
    assert np.isnan(run.loss("test")[after, 1]).all()
    assert run.accuracy("test")[after[0] - 1, 1] > 0.05  # it was learning before


def test_learning_rate_divergence_is_contained(tmp_path):
    common = dict(arch="small-cnn", epochs=2, batch_size=64, lr=5.0)
    run = fastpop.train(fastpop.Config(seeds=8, out=str(tmp_path / "all"), **common))
    assert run.diverged, "lr 5 was seen to diverge seed 2 of 0..7"
    healthy = [s for s in run.seeds if s not in run.diverged]
    alone = fastpop.train(fastpop.Config(seeds=healthy, out=str(tmp_path / "healthy"), **common))
    assert_same_run(alone, run, nets=[run.seeds.index(s) for s in healthy])


def test_chunked_population_is_bit_identical(tmp_path, reference_run):
    out = tmp_path / "chunked"
    assert main(["run", *RUN_ARGS, "--max-nets-per-chunk", "3", "--out", str(out), "--quiet"]) == 0
    assert_same_run(reference_run, fastpop.load_run(out))


def test_full_disk_while_saving_keeps_the_last_checkpoint(tmp_path, reference_run, monkeypatch, capsys):
    from fastpop import rundir

    real = rundir.atomic_write
    calls = []

    def failing(path, data):
        calls.append(path.name)
        if path.name == STATE and calls.count(STATE) == 5:
            raise OSError(28, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(rundir, "atomic_write", failing)
    out = tmp_path / "run"
    assert main(["run", *RUN_ARGS, "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and err.count("\n") == 1
    monkeypatch.setattr(rundir, "atomic_write", real)
    assert main(["verify", str(out)]) == 0
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert_same_run(reference_run, fastpop.load_run(out))


def test_out_of_memory_suggests_smaller_chunks_and_resumes(tmp_path, reference_run, monkeypatch, capsys):
    real = numba_cpu.NumbaBackend.gradients  # the CPU default's training call

    def hungry(self, pop, lo, hi, *args, **kw):
        if hi - lo > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, pop, lo, hi, *args, **kw)

    out = tmp_path / "run"
    monkeypatch.setattr(numba_cpu.NumbaBackend, "gradients", hungry)
    assert main(["run", *RUN_ARGS, "--max-nets-per-chunk", "4", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "out of memory" in err and f"--resume {out} --max-nets-per-chunk 1" in err and err.count("\n") == 1
    assert main(["run", "--resume", str(out), "--max-nets-per-chunk", "2", "--quiet"]) == 0
    assert_same_run(reference_run, fastpop.load_run(out))
