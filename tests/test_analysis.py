"""analyze, report and compare on tiny real runs, and their refusals of broken run directories."""

import json

import numpy as np
import pytest

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


def test_analyze_writes_metrics_and_arrays(runs, capsys):
    run = runs[0]
    assert main(["analyze", str(run.path), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "mass at TPA = 1" in out and "Fleiss kappa" in out and "split-half" in out
    meta = json.loads((run.path / "train.metrics.json").read_text())
    t = len(run.checkpoints)
    assert len(meta["per_checkpoint"]) == t and meta["P"] == 6 and meta["N"] == run.n("train")
    tpa = np.load(run.path / "train.tpa.npy")
    c = np.stack([run.correct("train", i) for i in range(t)])  # [T, P, N], from numpy alone
    np.testing.assert_allclose(tpa, c.mean(1), rtol=1e-6)
    np.testing.assert_allclose(np.load(run.path / "train.accessibility.npy"), c.mean((0, 1)))
    np.testing.assert_array_equal(np.load(run.path / "train.forgetting.npy"), (c[:-1] & ~c[1:]).sum((0, 1)))
    np.testing.assert_allclose(np.load(run.path / "train.never_learned.npy"), (~c.any(0)).mean(0))
    assert meta["agreement"]["mass1"] == pytest.approx((c[-1].all(0)).mean())
    assert meta["checkpoint"] == t - 1


def test_analyze_checkpoint_flag(runs, capsys):
    assert main(["analyze", str(runs[0].path), "--checkpoint", "0"]) == 0
    assert "checkpoint 0 of" in capsys.readouterr().out
    assert main(["analyze", str(runs[0].path), "--checkpoint", "99"]) == 2


def test_report_writes_figures(runs):
    assert main(["report", str(runs[1].path)]) == 0
    folder = runs[1].path / "report"
    for name in ("tpa_histograms", "accuracy_band", "accessibility", "kappa", "tpa_heatmap"):
        assert (folder / f"{name}.png").stat().st_size > 1000
        assert (folder / f"{name}.svg").exists()
    page = (folder / "report.html").read_text()
    assert "tpa_histograms.png" in page and "Fleiss kappa" in page


def test_compare(runs, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "cmp"
    assert main(["compare", str(a.path), str(b.path), "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    acc_a, acc_b = M.accessibility(a), M.accessibility(b)
    assert result["spearman_accessibility"] == pytest.approx(M.spearman(acc_a, acc_b))
    assert (out / "compare_accessibility.png").exists()
    assert "Spearman of accessibility" in capsys.readouterr().out


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
    meta["checkpoints_done"] = 0
    (empty / "run.json").write_text(json.dumps(meta))
    assert main(["analyze", str(empty)]) == 2
    assert "no completed checkpoint" in capsys.readouterr().err
    garbled = _copy(runs[0], tmp_path / "garbled")
    (garbled / "run.json").write_text("{not json")
    assert main(["report", str(garbled)]) == 2


def test_compare_refuses_different_data(runs, tmp_path, capsys):
    other = _copy(runs[1], tmp_path / "other")
    meta = json.loads((other / "run.json").read_text())
    meta["splits"]["test"]["labels_sha256"] = "0" * 64
    (other / "run.json").write_text(json.dumps(meta))
    assert main(["compare", str(runs[0].path), str(other), "--out", str(tmp_path / "c")]) == 2
    assert "same data" in capsys.readouterr().err
