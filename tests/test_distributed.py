"""Shards + merge, and torchrun with 2 gloo processes on the CPU: the same record and weights as one process."""

import json
import subprocess
import sys

import pytest

import fastpop
from fastpop.cli import main
from fastpop.rundir import write_manifest
from test_reliability import assert_same_run

ARGS = ["--arch", "mlp", "--seeds", "5", "--seed-offset", "20", "--epochs", "2", "--batch-size", "64",
        "--record-every", "10"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["run", *ARGS, "--out", str(out), "--quiet"]) == 0
    return fastpop.load_run(out)


def test_shards_merge_to_the_single_process_run(tmp_path, single):
    shards = []
    for i in range(2):
        shards.append(tmp_path / f"s{i}")
        assert main(["run", *ARGS, "--shard", f"{i}/2", "--out", str(shards[-1]), "--quiet"]) == 0
    assert fastpop.load_run(shards[0]).seeds == [20, 21] and fastpop.load_run(shards[1]).seeds == [22, 23, 24]
    merged = tmp_path / "merged"
    assert main(["merge", str(shards[1]), str(shards[0]), "--out", str(merged)]) == 0  # any order
    run = fastpop.load_run(merged)
    assert run.seeds == single.seeds and run.config.shard is None
    assert_same_run(single, run)
    assert main(["verify", str(merged)]) == 0


def test_merge_refuses_shards_that_do_not_fit(tmp_path, capsys):
    paths = {}
    for name, extra in {"a": ["--shard", "0/2"], "b": ["--shard", "1/2", "--lr", "0.05"],
                        "c": ["--shard", "0/3"], "plain": []}.items():
        paths[name] = tmp_path / name
        assert main(["run", *ARGS, *extra, "--out", str(paths[name]), "--quiet"]) == 0
    cases = {"same population": [paths["a"], paths["b"]], "missing": [paths["a"]],
             "not a shard": [paths["a"], paths["plain"]], "both shard": [paths["a"], paths["a"]]}
    for what, shard_list in cases.items():
        out = tmp_path / f"m-{what.replace(' ', '-')}"
        assert main(["merge", *map(str, shard_list), "--out", str(out)]) == 2, what
        assert what in capsys.readouterr().err, what
        assert not out.exists()
    meta = json.loads((paths["c"] / "run.json").read_text())
    meta["status"] = "interrupted"
    write_manifest(paths["c"], meta)
    assert main(["merge", str(paths["c"]), "--out", str(tmp_path / "m")]) == 2
    assert "not complete" in capsys.readouterr().err


def test_bad_shard_specs(tmp_path, capsys):
    for spec in ("2/2", "a/b", "1", "0/9"):
        assert main(["run", "--seeds", "4", "--shard", spec, "--out", str(tmp_path / "x")]) == 2, spec
        assert "shard must be" in capsys.readouterr().err


def test_torchrun_two_gloo_processes(tmp_path, single):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "fastpop", "run", *ARGS, "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = fastpop.load_run(out)
    assert run.seeds == single.seeds and run.status == "complete"
    assert_same_run(single, run)
    assert not out.with_name(out.name + ".shards").exists()


def test_torchrun_resume_merges_shards_a_killed_merge_left(tmp_path, single):
    """Both ranks' shards complete, the merge killed before RUN appeared (its temporary folder left behind):
    the documented `torchrun ... fastpop run --resume RUN` merges them into RUN."""
    out = tmp_path / "run"
    shards = out.with_name(out.name + ".shards")
    for rank in range(2):
        assert main(["run", *ARGS, "--shard", f"{rank}/2", "--out", str(shards / f"{rank}-of-2"), "--quiet"]) == 0
    (tmp_path / f".run.tmp-{__import__('socket').gethostname()}-999999").mkdir()  # a dead merge's half
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29519",
           "-m", "fastpop", "run", "--resume", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = fastpop.load_run(out)
    assert run.status == "complete" and run.seeds == single.seeds
    assert_same_run(single, run)
    assert not shards.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
