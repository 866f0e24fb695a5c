"""analyze, report and compare on tiny real runs and on hand-written run directories: what they compute, what they
write (nothing in the run directory unless asked), reuse of a current analysis, and refusals of broken input."""

import json

import numpy as np
import pytest
from fastpop.rundir import write_manifest
from handmade_run import random_correct, write_run

import fastpop
from fastpop import metrics as M
from fastpop.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    common = dict(epochs=2, batch_size=128, record_every=5)
    a = fastpop.train(fastpop.Config(arch="mlp", seeds=6, out=str(root / "mlp"), **common))
    b = fastpop.train(fastpop.Config(arch="small-cnn", seeds=4, out=str(root / "cnn"), **common))
    return a, b


def listing(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_analyze_writes_only_where_asked(runs, tmp_path, capsys):
    run = runs[0]
    before = listing(run.path)
    assert main(["analyze", str(run.path), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "mass at TPA = 1" in out and "Fleiss kappa" in out and "split-half" in out and " of " in out
    assert listing(run.path) == before  # a read-only archive of runs can be analyzed
    assert main(["analyze", str(run.path), "--split", "train", "--out", str(tmp_path / "a")]) == 0
    assert listing(run.path) == before
    meta = json.loads((tmp_path / "a" / "train.metrics.json").read_text())
    t = len(run.checkpoints)
    assert len(meta["per_checkpoint"]) == t and meta["P"] == 6 and meta["N"] == run.n("train")
    assert meta["split"] == "train" and meta["arch"] == "mlp"
    tpa = np.load(tmp_path / "a" / "train.tpa.npy")
    c = np.stack([run.correct("train", i) for i in range(t)])  # [T, P, N], from numpy alone
    np.testing.assert_allclose(tpa, c.mean(1), rtol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "a" / "train.accessibility.npy"), c.mean((0, 1)))
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "train.forgetting.npy"), (c[:-1] & ~c[1:]).sum((0, 1)))
    np.testing.assert_allclose(np.load(tmp_path / "a" / "train.never_learned.npy"), (~c.any(0)).mean(0))
    assert meta["agreement"]["mass1"] == pytest.approx((c[-1].all(0)).mean())
    assert meta["agreement"]["count1"] == int(c[-1].all(0).sum())
    assert meta["checkpoint"] == t - 1


def test_analyze_json_and_checkpoint_flag(runs, capsys):
    assert main(["analyze", str(runs[0].path), "--checkpoint", "0", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["checkpoint"] == 0 and d["split"] == "test" and d["written"] == []
    assert main(["analyze", str(runs[0].path), "--checkpoint", "99"]) == 2


def test_report_writes_figures_outside_the_run_and_reuses_a_current_analysis(runs, tmp_path, monkeypatch, capsys):
    run = runs[1]
    before = listing(run.path)
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(run.path)]) == 0
    assert listing(run.path) == before
    assert "reused" not in capsys.readouterr().out
    (folder,) = tmp_path.glob("report-cnn-test-*")
    for name in ("tpa_histograms", "accuracy_band", "accessibility", "kappa", "tpa_heatmap"):
        assert (folder / f"{name}.png").stat().st_size > 1000
        assert (folder / f"{name}.svg").exists()
    page = (folder / "report.html").read_text()
    assert "tpa_histograms.png" in page and "Fleiss kappa" in page and "small-cnn on digits" in page

    import fastpop.report

    def no_recompute(*a, **k):
        raise AssertionError("recomputed a current analysis")

    monkeypatch.setattr(fastpop.report, "analyze", no_recompute)
    assert main(["report", str(run.path), "--out", str(folder), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["reused_analysis"] and d["analysis"]["P"] == 4
    with pytest.raises(AssertionError, match="recomputed"):  # another checkpoint is another analysis
        main(["report", str(run.path), "--out", str(folder), "--checkpoint", "0"])


def test_compare_many_runs_counts_and_names(runs, tmp_path, monkeypatch, capsys):
    a, b = runs
    out = tmp_path / "cmp"
    assert main(["compare", str(a.path), str(b.path), str(a.path), "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert len(result["pairs"]) == 3 and not result["warnings"]
    acc_a, acc_b = M.accessibility(a).values, M.accessibility(b).values
    assert result["pairs"][0]["spearman_accessibility"] == pytest.approx(M.spearman(acc_a, acc_b))
    assert result["pairs"][1]["spearman_accessibility"] == pytest.approx(1.0)  # a run against itself
    for name in ("order_0_vs_1", "order_0_vs_2", "order_1_vs_2"):
        assert (out / f"{name}.png").exists()
    text = capsys.readouterr().out
    p = result["pairs"][0]
    assert f"({p['learned_by_both']} of {p['learned_by_weak']})" in text
    assert main(["compare", str(a.path)]) == 2


def test_compare_default_outputs_cannot_collide_and_plans_are_checked(tmp_path, monkeypatch, capsys):
    c = random_correct(3, 4, 50)
    one = write_run(tmp_path / "x" / "run", {"train": c, "test": c}, [1, 2, 3])
    two = write_run(tmp_path / "y" / "run", {"train": c, "test": c}, [1, 2, 3])
    odd = write_run(tmp_path / "z" / "run", {"train": c, "test": c}, [0.5, 1, 1.5])
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(one), str(two)]) == 0
    capsys.readouterr()
    assert main(["compare", str(one), str(odd), "--json"]) == 0
    assert "checkpoint plans differ" in json.loads(capsys.readouterr().out)["warnings"][0]
    outs = sorted(tmp_path.glob("compare-run-run-*"))
    assert len(outs) == 2  # same basenames, different folders: two outputs
    warned = [json.loads((o / "compare.json").read_text())["warnings"] for o in outs]
    assert sorted(bool(w) for w in warned) == [False, True]
    assert any("checkpoint plans differ" in w[0] for w in warned if w)


def test_recorded_margins_losses_predictions_reach_analysis_and_report(tmp_path):
    c = {"train": random_correct(4, 6, 70, 1), "test": random_correct(4, 6, 45, 2)}
    path = write_run(tmp_path / "r", c, [1, 2, 3, 4], record=("margin", "loss", "pred"))
    run = fastpop.load_run(path)
    assert run.margins("train").shape == (4, 6, 70) and run.example_losses("test").dtype == np.float16
    assert run.predictions("train").shape == (4, 6, 70)
    for split in ("train", "test"):
        assert main(["analyze", str(path), "--split", split, "--out", str(tmp_path / "a")]) == 0
        np.testing.assert_allclose(np.load(tmp_path / "a" / f"{split}.aum.npy"),
                                   run.margins(split).astype(np.float64).mean((0, 1)), rtol=1e-6)
        meta = json.loads((tmp_path / "a" / f"{split}.metrics.json").read_text())
        assert 0 < meta["consensus"]["chance"] < 1 and meta["margins"]["confidence_mean"] > 0
    html, reused = __import__("fastpop.report", fromlist=["x"]).write_report(run, "test", tmp_path / "a")
    assert reused
    for name in ("consensus", "data_map", "aum"):
        assert (tmp_path / "a" / f"{name}.png").exists()
    plain = write_run(tmp_path / "plain", c, [1, 2, 3, 4])
    assert fastpop.load_run(plain).margins("test") is None


def _copy(run, dst):
    import shutil

    shutil.copytree(run.path, dst)
    return dst


def test_broken_run_directories(runs, tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    bad = _copy(runs[0], tmp_path / "truncated")
    data = (bad / "test.bits.npy").read_bytes()
    (bad / "test.bits.npy").write_bytes(data[: len(data) // 2])
    assert main(["analyze", str(bad)]) == 2
    assert "truncated" in capsys.readouterr().err
    shape = _copy(runs[0], tmp_path / "mismatch")
    np.save(shape / "test.bits.npy", np.zeros((1, 2, 8), np.uint8))
    assert main(["analyze", str(shape)]) == 2
    assert "run.json says" in capsys.readouterr().err
    empty = _copy(runs[0], tmp_path / "empty")
    meta = json.loads((empty / "run.json").read_text())
    meta.update(checkpoints_done=0, status="interrupted", diverged={})
    write_manifest(empty, meta)  # a valid run killed before its first checkpoint
    assert main(["analyze", str(empty)]) == 2
    assert "no completed checkpoint" in capsys.readouterr().err
    garbled = _copy(runs[0], tmp_path / "garbled")
    (garbled / "run.json").write_text("{not json")
    assert main(["report", str(garbled), "--out", str(tmp_path / "rep")]) == 2
    assert not (tmp_path / "rep").exists()


def test_compare_refuses_different_data(runs, tmp_path, capsys):
    other = _copy(runs[1], tmp_path / "other")
    for field in ("labels_sha256", "images_sha256"):  # sealed, as if trained on other labels or images
        meta = json.loads((runs[1].path / "run.json").read_text())
        meta["splits"]["test"][field] = "0" * 64
        write_manifest(other, meta)
        assert main(["compare", str(runs[0].path), str(other), "--out", str(tmp_path / "c")]) == 2
        assert "same data" in capsys.readouterr().err
        assert not (tmp_path / "c").exists()


def test_analysis_commands_do_not_load_torch(tmp_path):
    """A reader validates the run's Config but never builds a network: analyze and compare run without torch
    (it would add ~1 s to every command)."""
    import subprocess
    import sys

    c = random_correct(3, 5, 60)
    path = write_run(tmp_path / "r", {"train": c, "test": c}, [1, 2, 3])
    code = (f"import sys; from fastpop.cli import main; assert main(['analyze', {str(path)!r}, '--json']) == 0; "
            f"assert main(['compare', {str(path)!r}, {str(path)!r}, '--out', {str(tmp_path / 'c')!r}]) == 0; "
            "assert 'torch' not in sys.modules, 'torch loaded'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_bad_out_and_checkpoint_are_one_line_errors(tmp_path, capsys):
    c = random_correct(3, 1, 40)  # one network: rho, kappa and Spearman are undefined (NaN)
    path = write_run(tmp_path / "r", {"train": c, "test": c}, [1, 2, 3])
    afile = tmp_path / "a-file"
    afile.write_text("keep me")
    for args in (["analyze", str(path), "--out", str(afile)], ["report", str(path), "--out", str(afile)],
                 ["compare", str(path), str(path), "--out", str(afile)],
                 ["report", str(path), "--out", str(tmp_path / "rep"), "--checkpoint", "99"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("not a folder" in err or "out of range" in err)
    assert afile.read_text() == "keep me" and not (tmp_path / "rep").exists()

    def strict(text):
        raise ValueError(f"not strict JSON: {text}")

    assert main(["analyze", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out, parse_constant=strict)  # NaN printed as null
    assert d["agreement"]["rho"] is None and d["P"] == 1
