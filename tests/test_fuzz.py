"""Property-based bad input: whatever the flags, TOML or damage to a run directory, the CLI answers with exit 0
or a one-line error and exit 2, never a traceback, and a refused command changes nothing on disk."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fastpop
from fastpop.cli import RUN_FLAGS, main
from fastpop.rundir import write_manifest

WEIRD = st.sampled_from(["", "-1", "0", "1e400", "nan", "inf", "3,3", "1,,2", "x", "small-cnn", "../..", "1/0",
                         "0/0", "auto", "999999999999999999999", " ", "\x00", "-", "--seeds", "1.5", "2/1"])
VALUES = st.one_of(WEIRD, st.text(max_size=12), st.integers(-10**6, 10**6).map(str),
                   st.floats(allow_nan=True).map(repr))
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def no_training(monkeypatch):
    """Input handling only: everything up to the new run directory runs for real (config, data, arch, --out
    checks, RunWriter.create); the population and its training loop are skipped, since a fuzzed value can be
    valid and large (--epochs=123456, --seeds=999999) and would train for hours."""
    from fastpop import trainer

    monkeypatch.setattr(trainer, "Population", lambda *args, **kwargs: None)
    def finish(setup, pop, writer, *rest):
        writer.adopt_rows(0, 1)  # as a run stopped after its first checkpoint (its rows stay NaN and zero)
        writer.commit(1)
        writer.close("interrupted")
        return trainer.Run(setup.out)

    monkeypatch.setattr(trainer, "_run", finish)


def _expect_clean(code, err):
    if code == 1:  # a population or record too large for this machine: refused before anything is allocated
        assert "free" in err and err.count("\n") == 1, err
        return
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("fastpop: error: ") and err.count("\n") == 1, err


@FUZZ
@given(flag=st.sampled_from(sorted(set(RUN_FLAGS) - {"out"})), value=VALUES)  # --out stays in a temporary folder
def test_run_flags(tmp_path_factory, capsys, no_training, flag, value):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    code = main(["run", "--seeds", "1", "--epochs", "1", "--batch-size", "1024", "--out", str(out), "--quiet",
                 f"--{flag}={value}"])
    _expect_clean(code, capsys.readouterr().err)
    if code == 2:
        assert not out.exists()


@FUZZ
@given(text=st.one_of(st.text(max_size=80),
                      st.dictionaries(st.sampled_from(["arch", "seeds", "epochs", "lr", "batch-size", "vary",
                                                       "schedule", "colour", "shard", "max_nets_per_chunk"]),
                                      VALUES, max_size=4).map(
                          lambda d: "\n".join(f"{k} = {json.dumps(v)}" for k, v in d.items()))))
def test_toml_files(tmp_path_factory, capsys, no_training, text):
    folder = tmp_path_factory.mktemp("toml")
    cfg = folder / "c.toml"
    cfg.write_text(text + "\nepochs = 1\n" if "epochs" not in text else text)
    code = main(["run", "--config", str(cfg), "--seeds", "1", "--batch-size", "1024", "--out",
                 str(folder / "run"), "--quiet", "--epochs", "1"])
    _expect_clean(code, capsys.readouterr().err)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    run = fastpop.train(fastpop.Config(arch="mlp", seeds=3, epochs=2, batch_size=128, record_every=5,
                                       out=str(out)))
    meta = json.loads((out / "run.json").read_text())
    meta["status"] = "interrupted"  # so that --resume has something to do
    write_manifest(out, meta)
    return run.path


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


DAMAGE = st.sampled_from(["truncate", "flip", "delete", "json-field", "json-garble"])
FILES = st.sampled_from(["run.json", "state.pt", "test.bits.npy", "train.bits.npy", "test.loss.npy",
                         "train.acc.npy", "diverged.npy"])
JSON_FIELDS = st.sampled_from(["seeds", "checkpoints", "checkpoints_done", "splits", "config", "total_steps",
                               "arch", "status", "checksums"])
JUNK = st.sampled_from([None, -1, 10**9, "x", [], {}, [1, 1], 1.5, True])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=DAMAGE, name=FILES, field=JSON_FIELDS, junk=JUNK, frac=st.floats(0, 1),
       command=st.sampled_from(["analyze", "verify", "resume", "report"]))
def test_damaged_run_directories(tmp_path_factory, capsys, base_run, damage, name, field, junk, frac, command):
    run = tmp_path_factory.mktemp("dmg") / "run"
    shutil.copytree(base_run, run)
    target = run / name
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: int(len(data) * frac)])
    elif damage == "flip":
        i = min(len(data) - 1, int(len(data) * frac))
        target.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    elif damage == "delete":
        target.unlink()
    elif damage == "json-field":
        meta = json.loads((run / "run.json").read_text())
        meta[field] = junk
        (run / "run.json").write_text(json.dumps(meta))
    else:
        (run / "run.json").write_text((run / "run.json").read_text()[: int(100 * frac)] + "}{")
    before = _snapshot(run)
    argv = {"analyze": ["analyze", str(run)], "verify": ["verify", str(run)],
            "resume": ["run", "--resume", str(run), "--quiet"],
            "report": ["report", str(run), "--out", str(run.parent / "report")]}[command]
    code = main(argv)
    _expect_clean(code, capsys.readouterr().err)
    if code == 2:
        assert _snapshot(run) == before, "a refused command must not modify the run directory"


ARRAY = st.one_of(
    st.tuples(st.sampled_from([np.uint8, np.float32, np.float64, np.int16, np.bool_, np.int64]),
              st.lists(st.integers(0, 9), min_size=0, max_size=4)).map(
        lambda t: np.ones(t[1], dtype=t[0]) * 3),
    st.just(np.array(["a", "b"])), st.just(np.full((4, 6, 6), np.nan, np.float32)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrays=st.dictionaries(st.sampled_from(["x_train", "y_train", "x_test", "y_test", "extra"]), ARRAY,
                              max_size=5))
def test_npz_files(tmp_path_factory, capsys, no_training, arrays):
    folder = tmp_path_factory.mktemp("npz")
    np.savez(folder / "d.npz", **arrays)
    out = folder / "run"
    code = main(["run", "--dataset", f"npz:{folder / 'd.npz'}", "--seeds", "1", "--epochs", "1", "--batch-size", "1",
                 "--out", str(out), "--quiet"])
    _expect_clean(code, capsys.readouterr().err)
    if code == 2:
        assert not out.exists()
