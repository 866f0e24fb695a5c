"""The command line: a tiny end-to-end run, and every bad input refused in one line with exit 2, writing nothing."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fastpop.cli import main


def test_end_to_end_run(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fastpop", "run", "--seeds", "3", "--epochs", "1",
                           "--batch-size", "128", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "test" in proc.stdout and str(out) in proc.stdout and "net-images/s" in proc.stdout
    # stderr is a pipe here, as under SLURM or nohup: plain lines, the last at the final checkpoint
    assert proc.stderr.splitlines()[-1].startswith(f"{out}: step 11/11 epoch 1.00/1 ")
    assert "(checkpoint 1)" in proc.stderr
    bits = np.load(out / "test.bits.npy")
    assert bits.shape[:2] == (1, 3)


def test_archs_lists_every_arch(capsys):
    assert main(["archs", "--input-shape", "3x32x32"]) == 0
    text = capsys.readouterr().out
    for name in ("small-cnn", "wide-cnn", "mlp"):
        assert name in text


def test_config_file_and_flag_override(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('arch = "mlp"\nseeds = [4, 5]\nbatch-size = 256\nepochs = 3\n')
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    import fastpop

    run = fastpop.load_run(out)
    assert run.config.arch == "mlp" and run.seeds == [4, 5] and run.config.epochs == 1


BAD = {
    "unknown arch": ["--arch", "resnet"],
    "unknown dataset": ["--dataset", "imagenet"],
    "zero seeds": ["--seeds", "0"],
    "negative seed count": ["--seeds", "-4"],
    "negative seed in list": ["--seeds", "3,-1"],
    "duplicated seeds": ["--seeds", "3,7,3"],
    "seeds not numbers": ["--seeds", "a,b"],
    "zero epochs": ["--epochs", "0"],
    "epochs not a number": ["--epochs", "ten"],
    "zero batch": ["--batch-size", "0"],
    "batch larger than data": ["--batch-size", "100000"],
    "zero lr": ["--lr", "0"],
    "negative lr": ["--lr", "-0.1"],
    "nan lr": ["--lr", "nan"],
    "huge lr": ["--lr", "1e6"],
    "momentum 1": ["--momentum", "1"],
    "unknown schedule": ["--schedule", "linear"],
    "unknown vary": ["--vary", "width"],
    "unknown backend": ["--backend", "jax"],
    "unknown device": ["--device", "tpu"],
    "unknown flag": ["--colour", "red"],
    "offset with list": ["--seeds", "1,2", "--seed-offset", "5"],
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--epochs", "1", *BAD[case]])
    err = capsys.readouterr().err
    assert code == 2, case
    assert err.startswith("fastpop: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not out.exists(), "nothing may be written on bad input"


def _snapshot(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_existing_nonempty_out_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    before = _snapshot(out)
    assert main(["run", "--out", str(out), "--seeds", "2", "--epochs", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["run", "--out", str(blocker / "run"), "--seeds", "2"]) == 2
    assert "not a directory" in capsys.readouterr().err
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert main(["run", "--out", str(ro / "run"), "--seeds", "2"]) == 2


@pytest.mark.parametrize("text, what", [("arch = 'small-cnn\n", "malformed TOML"),
                                        ("colour = 'red'\n", "unknown config keys"),
                                        ("epochs = 'ten'\n", "epochs must be")])
def test_bad_toml(tmp_path, capsys, text, what):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert what in err and err.count("\n") == 1, err
    assert not out.exists()


def test_missing_toml(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read config" in capsys.readouterr().err
