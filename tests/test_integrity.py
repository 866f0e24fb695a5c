"""Every path to a silent wrong result found by trying to break fastpop: each reader checks what it reads, merge
joins only the shards of one population, data identity, hostile manifests, divergence said out loud."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import fastpop
from fastpop.cli import main
from fastpop.rundir import DIVERGED, LOCK, MANIFEST, STATE, write_manifest

TINY = ["--arch", "mlp", "--seeds", "6", "--epochs", "1", "--batch-size", "256", "--quiet"]


def _run(out, *extra):
    assert main(["run", *TINY, *extra, "--out", str(out)]) == 0
    return fastpop.load_run(out)


def _snapshot(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _one_line(capsys, code, want_code=2):
    err = capsys.readouterr().err
    assert code == want_code, err
    assert err.startswith("fastpop: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for spec in ("0/3", "1/3", "2/3", "1/2"):
        assert main(["run", *TINY, "--shard", spec, "--out", str(root / spec.replace("/", "of"))]) == 0
    return root


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A complete run with subsets, predictions and a record every 2 steps."""
    out = tmp_path_factory.mktemp("done") / "run"
    assert main(["run", *TINY, "--subset-fraction", "0.5", "--record-predictions", "--record-every", "1",
                 "--out", str(out)]) == 0
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _flip(path, offset_from_end=1):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- A1, A2: merge

def test_merge_refuses_shards_of_different_splits(shards, tmp_path, capsys):
    out = tmp_path / "m"
    code = main(["merge", str(shards / "0of3"), str(shards / "1of2"), str(shards / "2of3"), "--out", str(out)])
    assert "split the seeds in different ways" in _one_line(capsys, code)
    assert not out.exists()
    assert main(["merge", str(shards / "0of3"), str(shards / "1of3"), str(shards / "2of3"), "--out", str(out)]) == 0
    assert fastpop.load_run(out).seeds == list(range(6))


def test_merge_refuses_a_damaged_shard_and_writes_nothing(shards, tmp_path, capsys):
    bad = _copy(shards / "1of3", tmp_path / "bad")
    _flip(bad / "test.bits.npy")
    out = tmp_path / "m"
    code = main(["merge", str(shards / "0of3"), str(bad), str(shards / "2of3"), "--out", str(out)])
    err = _one_line(capsys, code)
    assert "test.bits.npy checkpoint 0 does not match its checksum" in err and str(bad) in err
    assert not out.exists() and not list(tmp_path.glob(".m.tmp-*"))
    nostate = _copy(shards / "1of3", tmp_path / "nostate")
    (nostate / STATE).unlink()
    code = main(["merge", str(shards / "0of3"), str(nostate), str(shards / "2of3"), "--out", str(out)])
    assert "state.pt is missing" in _one_line(capsys, code)
    assert not out.exists()


def test_merge_killed_half_way_is_redone_by_the_same_command(shards, tmp_path):
    """A kill while the output is built leaves only a temporary folder; the same command merges anew."""
    import subprocess
    import sys

    out = tmp_path / "m"
    args = [str(shards / "0of3"), str(shards / "1of3"), str(shards / "2of3")]
    code = ("import os, sys; from fastpop import rundir, distributed\n"
            "rundir.save_state = lambda *a, **k: os._exit(9)\n"
            f"distributed.merge({args!r}, {str(out)!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    assert not out.exists() and list(tmp_path.glob(".m.tmp-*")), "killed while building the temporary folder"
    assert main(["merge", *args, "--out", str(out)]) == 0
    assert not list(tmp_path.glob(".m.tmp-*")), "the dead merge's folder is removed"
    assert main(["verify", str(out)]) == 0


# ---------------------------------------------------------------- A3, A8 (experiment)

def test_experiment_refuses_a_population_trained_with_other_settings(tmp_path, capsys):
    from fastpop.experiment import paper

    fastpop.train(fastpop.Config(arch="mlp", seeds=2, epochs=1, out=str(tmp_path / "paper" / "mlp")))
    with pytest.raises(fastpop.UsageError, match="other settings: epochs 1 \\(asked 3\\)"):
        paper(tmp_path / "paper", nets=2, epochs=3)
    with pytest.raises(fastpop.UsageError, match="seeds 2 \\(asked 5\\)"):
        paper(tmp_path / "paper", nets=5, epochs=1)
    code = main(["experiment", "paper", "--out", str(tmp_path / "p2"), "--epochs", "0", "--nets", "2"])
    assert "--epochs must be a positive integer" in _one_line(capsys, code)
    assert not (tmp_path / "p2").exists()


# ---------------------------------------------------------------- A5, A7: every reader checks rows and state

def test_a_flipped_bit_in_state_is_refused_by_verify_resume_and_weights(done, tmp_path, capsys):
    bad = _copy(done, tmp_path / "bad")
    run = fastpop.load_run(bad)
    params = run.state()["params"]
    with open(bad / STATE, "r+b") as f:  # one bit of one parameter, found by its bytes in the file
        data = f.read()
        at = data.find(params[:4].numpy().tobytes())
        f.seek(at)
        f.write(bytes([data[at] ^ 0x01]))
    assert main(["verify", str(bad)]) == 2
    assert "state.pt is corrupt or does not fit this run: its content does not match its checksum" in \
        capsys.readouterr().err
    with pytest.raises(fastpop.UsageError, match="state.pt"):
        fastpop.load_run(bad).weights()
    meta = json.loads((bad / MANIFEST).read_text())
    meta["status"] = "interrupted"
    write_manifest(bad, meta)
    before = _snapshot(bad)
    assert "state.pt" in _one_line(capsys, main(["run", "--resume", str(bad), "--quiet"]))
    assert _snapshot(bad) == before


@pytest.mark.parametrize("command", ["analyze", "report", "compare", "merge", "resume", "cscore"])
def test_a_flipped_bit_in_a_row_is_refused_by_every_reader(done, tmp_path, capsys, command):
    bad = _copy(done, tmp_path / "bad")
    bits = np.load(bad / "train.bits.npy", mmap_mode="r+")
    bits[1, 2, 0] ^= 4
    bits.flush()
    del bits
    if command in ("resume", "merge"):
        meta = json.loads((bad / MANIFEST).read_text())
        if command == "resume":
            meta["status"] = "interrupted"
        else:  # as a shard of a one-shard population
            meta["config"]["shard"] = "0/1"
            meta["shard"] = "0/1"
        write_manifest(bad, meta)
    argv = {"analyze": ["analyze", str(bad), "--split", "train"],
            "report": ["report", str(bad), "--split", "train", "--out", str(tmp_path / "r")],
            "compare": ["compare", str(done), str(bad), "--split", "train", "--out", str(tmp_path / "c")],
            "merge": ["merge", str(bad), "--out", str(tmp_path / "m")],
            "resume": ["run", "--resume", str(bad), "--quiet"],
            "cscore": ["cscore", str(bad), "--out", str(tmp_path / "c.npy")]}[command]
    before = _snapshot(bad)
    err = _one_line(capsys, main(argv))
    assert "train.bits.npy checkpoint 1 does not match its checksum" in err
    assert _snapshot(bad) == before
    assert not (tmp_path / "m").exists() and not (tmp_path / "c.npy").exists()


# ---------------------------------------------------------------- A8, B6: hostile manifests

def _edit(meta, how):
    if how == "seed id":
        meta["seeds"][0] = 99
    elif how == "reversed seeds":
        meta["seeds"].reverse()
    elif how == "duplicated seeds":
        meta["seeds"][1] = meta["seeds"][0]
    elif how == "n + 1":
        meta["splits"]["test"]["n"] += 1
    elif how == "complete half-done":
        meta["checkpoints_done"] -= 1
    elif how == "label hash":
        meta["splits"]["train"]["labels_sha256"] = "0" * 64
    elif how == "epochs":
        meta["config"]["epochs"] = 3
    elif how == "diverged key":
        meta["diverged"] = {"x1": 3}
    elif how == "no predictions key":
        del meta["predictions"]


CONFIG_EDITS = ("seed id", "reversed seeds", "epochs")  # sealed, they contradict only the config
EDITS = ["seed id", "reversed seeds", "duplicated seeds", "n + 1", "complete half-done", "label hash", "epochs",
         "diverged key", "no predictions key"]


@pytest.mark.parametrize("how", EDITS)
def test_an_edited_manifest_fails_verify_sealed_or_not(done, tmp_path, capsys, how):
    # a sealed new label hash is a consistent manifest of other data: resume and compare catch it (test below)
    for sealed in (False, True) if how != "label hash" else (False,):
        bad = _copy(done, tmp_path / f"bad-{sealed}")
        meta = json.loads((bad / MANIFEST).read_text())
        _edit(meta, how)
        if sealed:  # recomputing the checksum does not help: the fields are checked against each other
            write_manifest(bad, meta)
        else:
            (bad / MANIFEST).write_text(json.dumps(meta))
        before = _snapshot(bad)
        commands = [["verify", str(bad)], ["run", "--resume", str(bad), "--quiet"]]
        if not sealed or how not in CONFIG_EDITS:  # readers check integrity; verify and resume also the config
            commands.append(["analyze", str(bad)])
        for argv in commands:
            err = _one_line(capsys, main(argv))
            assert "run.json" in err or "checksum" in err or "already complete" in err, err
        assert _snapshot(bad) == before


def test_a_deeply_nested_manifest_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MANIFEST).write_text("[" * 100000 + "]" * 100000)
    assert "cannot read" in _one_line(capsys, main(["verify", str(bad)]))


def test_verify_checks_diverged_npy(done, tmp_path, capsys):
    bad = _copy(done, tmp_path / "bad")
    np.save(bad / DIVERGED, np.array([-1, 1, -1, -1, -1, -1], np.int64))
    err = _one_line(capsys, main(["verify", str(bad)]))
    assert "diverged.npy disagrees with run.json" in err


def test_a_missing_membership_record_is_damage(done, tmp_path, capsys):
    bad = _copy(done, tmp_path / "bad")
    (bad / "train.member.npy").unlink()
    assert "train.member.npy" in _one_line(capsys, main(["analyze", str(bad), "--split", "train"]))
    assert "train.member.npy" in _one_line(capsys, main(["cscore", str(bad), "--out", str(tmp_path / "c.npy")]))


# ---------------------------------------------------------------- A6: data identity

def _npz(path, scale=1.0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * scale).astype(np.float64)
    np.savez(path, x_train=x[:1200], y_train=d.target[:1200], x_test=x[1200:], y_test=d.target[1200:])


def test_resume_and_compare_refuse_changed_images(tmp_path, capsys):
    data = tmp_path / "d.npz"
    _npz(data)
    config = fastpop.Config(arch="mlp", seeds=2, epochs=2, batch_size=256, dataset=f"npz:{data}",
                            out=str(tmp_path / "run"))
    with pytest.raises(fastpop.Interrupted):
        fastpop.train(config, should_stop=lambda: True)
    other = fastpop.train(fastpop.Config(**dict(config.to_dict(), out=str(tmp_path / "a"))))
    _npz(data, scale=1.01)  # the same labels, other images
    before = _snapshot(tmp_path / "run")
    err = _one_line(capsys, main(["run", "--resume", str(tmp_path / "run"), "--quiet"]))
    assert "images or labels" in err and "differ" in err
    assert _snapshot(tmp_path / "run") == before
    changed = fastpop.train(fastpop.Config(**dict(config.to_dict(), out=str(tmp_path / "b"))))
    code = main(["compare", str(other.path), str(changed.path), "--out", str(tmp_path / "c")])
    assert "same data" in _one_line(capsys, code)


# ---------------------------------------------------------------- A9: divergence refused at the input, shown

def test_images_beyond_float32_are_refused(tmp_path, capsys):
    data = tmp_path / "d.npz"
    _npz(data)
    z = dict(np.load(data))
    z["x_train"][0, 0, 0] = 1e200
    np.savez(data, **z)
    code = main(["run", *TINY, "--dataset", f"npz:{data}", "--out", str(tmp_path / "run")])
    assert "beyond float32" in _one_line(capsys, code)
    assert not (tmp_path / "run").exists()


def test_summary_analyze_and_report_say_how_many_networks_diverged(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--seeds", "8", "--epochs", "2", "--batch-size", "64", "--lr", "5", "--out", str(out),
                 "--quiet"]) == 0
    run = fastpop.load_run(out)
    k = len(run.diverged)
    assert k, "lr 5 was seen to diverge seed 2 of 0..7"
    text = capsys.readouterr().out
    assert f"{k} of 8 networks diverged" in text
    assert main(["analyze", str(out), "--out", str(tmp_path / "a")]) == 0
    assert f"{k} of 8 networks diverged" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "test.metrics.json").read_text())["diverged"]["networks"] == k
    assert main(["report", str(out), "--out", str(tmp_path / "r")]) == 0
    assert f"{k} of 8 networks diverged" in (tmp_path / "r" / "report.html").read_text()


# ---------------------------------------------------------------- B1, B5: space and memory

def test_a_full_disk_at_creation_exits_1_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "run"
    err = _one_line(capsys, main(["run", *TINY, "--out", str(out)]), want_code=1)
    assert "No space left on device" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_record_larger_than_the_free_disk_is_refused_up_front(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    err = _one_line(capsys, main(["run", *TINY, "--out", str(tmp_path / "run")]), want_code=1)
    assert "needs" in err and "MiB free" in err
    assert not list(tmp_path.iterdir())


def test_a_dead_creation_s_temporary_folder_is_removed(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".run.tmp-{socket.gethostname()}-{dead.pid}"
    stale.mkdir()
    (stale / "test.bits.npy").write_bytes(b"\0" * 1000)
    _run(tmp_path / "run")
    assert not stale.exists()


def test_a_population_that_cannot_fit_in_memory_is_refused_before_allocating(tmp_path, capsys):
    code = main(["run", "--seeds", "10000000", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"])
    err = _one_line(capsys, code, want_code=1)
    assert "10,000,000 networks" in err and "GiB" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the unclear list

def test_resume_pins_the_device_it_ran_on(done, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    bad = _copy(done, tmp_path / "bad")
    meta = json.loads((bad / MANIFEST).read_text())
    meta.update(status="interrupted", device="cuda:0", backend="triton")
    write_manifest(bad, meta)
    err = _one_line(capsys, main(["run", "--resume", str(bad), "--quiet"]))
    assert "cuda" in err.lower()


def test_output_errors_of_other_commands_give_no_resume_advice(done, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _one_line(capsys, main(["cscore", str(done), "--out", str(blocker / "c.npy")]))
    assert "--resume" not in err
    err = _one_line(capsys, main(["compare", str(done), str(done), "--out", str(blocker / "c")]))
    assert "--resume" not in err


def test_a_read_only_run_directory_is_bad_input(done, tmp_path, monkeypatch, capsys):
    import errno

    from fastpop import analysis

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(analysis, "write_npy", read_only)
    err = _one_line(capsys, main(["analyze", str(done), "--out", str(tmp_path / "a")]))
    assert "Read-only file system" in err and "--resume" not in err


def test_a_symlinked_out_is_followed(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    _run(tmp_path / "link")
    assert (target / MANIFEST).exists()


def test_out_dot_is_one_line(tmp_path, monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert "working directory" in _one_line(capsys, main(["run", *TINY, "--out", "."]))


def test_default_run_name_of_an_npz_has_no_colon(tmp_path, monkeypatch):
    from fastpop.trainer import default_out

    name = default_out(fastpop.Config(dataset=f"npz:{tmp_path}/sub dir/my data.npz")).name
    assert ":" not in name and "/" not in name and " " not in name and "npz-my_data" in name


@pytest.mark.parametrize("text", ["3,,4", "٣,4", "+3", " 3", "3_0", ",", "1,2,,"])
def test_seed_lists_take_plain_digits_only(tmp_path, capsys, text):
    code = main(["run", "--seeds", text, "--out", str(tmp_path / "run")])
    assert "--seeds: a count (1000) or a comma-separated list" in _one_line(capsys, code)


@pytest.mark.parametrize("toml, what", [(b'arch = "\xff\xfe"\n', "not UTF-8"), (b"arch = []\n", "arch must be"),
                                        (b"arch = {a = 1}\n", "arch must be"), (b"backend = [1]\n", "backend must")])
def test_hostile_toml_is_one_line(tmp_path, capsys, toml, what):
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(toml)
    assert what in _one_line(capsys, main(["run", "--config", str(cfg), "--out", str(tmp_path / "run")]))


def test_run_json_lists_the_seeds_once(done):
    text = (done / MANIFEST).read_text()
    meta = json.loads(text)
    assert "init_seeds" not in meta and "order_seeds" not in meta and meta["seeds"] == list(range(6))


def test_membership_packing_matches_the_record_s_bit_packer():
    from fastpop.data.orders import subsets
    from fastpop.recorder import pack_bits
    from fastpop.rundir import pack_member

    for n in (1, 63, 64, 65, 300):
        sub = subsets([1, 2, 3, 9], n, 0.4)
        member = torch.zeros(4, n, dtype=torch.bool)
        member.scatter_(1, sub, True)
        np.testing.assert_array_equal(pack_member(sub.numpy(), n), pack_bits(member))
