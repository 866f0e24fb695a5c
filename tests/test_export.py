"""The per-example table: its values against `fastpop analyze`'s arrays and the record, in every format."""

import numpy as np
import pytest

import fastpop
from fastpop.analysis import analyze
from fastpop.cli import main
from fastpop.export import example_frame, example_table


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    return fastpop.train(fastpop.Config(seeds=4, epochs=2, batch_size=128, record_every=5, subset_fraction=0.5,
                                        record=["margin", "loss", "pred"], out=str(out)))


@pytest.mark.parametrize("split", ["test", "train"])
def test_table_agrees_with_analyze_and_the_record(run, split):
    table = example_table(run, split)
    result = analyze(run, split)
    n = run.n(split)
    assert all(len(v) == n for v in table.values())
    np.testing.assert_array_equal(table["id"], np.arange(n))
    np.testing.assert_allclose(table["accessibility"], result.arrays["accessibility"])
    np.testing.assert_array_equal(table["forgetting"], result.arrays["forgetting"])
    np.testing.assert_allclose(table["never_learned"], result.arrays["never_learned"])
    np.testing.assert_allclose(table["final_tpa"], result.arrays["tpa"][-1])
    np.testing.assert_allclose(table["aum"], result.arrays["aum"])
    if split == "train":
        np.testing.assert_allclose(table["cscore"], result.arrays["cscore"], equal_nan=True)
    correct = np.stack([run.correct(split, t) for t in range(len(run.checkpoints))])  # [T, P, N]
    epochs = [c["epoch"] for c in run.checkpoints]
    for k in range(0, n, 37):  # learned-at: the median network's epoch from which it stays right
        stays = [next((epochs[t] for t in range(len(epochs)) if correct[t:, p, k].all()), np.inf)
                 for p in range(4)]
        want = np.median(stays)
        assert (np.isnan(table["learned_at_epoch"][k]) and np.isinf(want)) or table["learned_at_epoch"][k] == want
        preds = np.asarray(run.predictions(split)[-1, :, k])
        assert (preds == table["plurality"][k]).sum() == np.bincount(preds).max()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "npz"])
def test_every_format_round_trips(run, tmp_path, fmt):
    out = tmp_path / f"t.{fmt}"
    assert main(["export", str(run.path), "--out", str(out)]) == 0
    want = example_frame(run)
    if fmt == "npz":
        got = dict(np.load(out))
        np.testing.assert_allclose(got["accessibility"], want["accessibility"])
        return
    import pandas as pd

    got = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
    assert list(got.columns) == list(want.columns)
    np.testing.assert_allclose(got["accessibility"], want["accessibility"], rtol=1e-12)
    np.testing.assert_allclose(got["learned_at_epoch"], want["learned_at_epoch"], equal_nan=True)


def test_bad_export_requests(run, tmp_path, capsys):
    assert main(["export", str(run.path), "--out", str(tmp_path / "t.xlsx")]) == 2
    assert "export format must be one of" in capsys.readouterr().err
    assert main(["export", str(run.path), "--out", str(tmp_path / "missing" / "t.csv")]) == 2


def test_examples_and_the_report_gallery(run, tmp_path):
    from sklearn.datasets import load_digits

    from fastpop.report import write_report

    x, labels, index = run.examples("test")
    source = load_digits()
    np.testing.assert_array_equal(x[:, 0], source.images[index].astype(np.uint8))
    np.testing.assert_array_equal(labels, source.target[index])
    write_report(run, "test", tmp_path / "rep")
    assert (tmp_path / "rep" / "gallery.png").exists()
    rng = np.random.default_rng(0)
    xs, ys = rng.integers(0, 255, (64, 6, 6), dtype=np.uint8), np.arange(64) % 2
    mem = fastpop.train(fastpop.Config(seeds=2, epochs=1, batch_size=32, out=str(tmp_path / "mem")),
                        data=fastpop.ArrayData(xs, ys, xs, ys))
    write_report(mem, "test", tmp_path / "rep2")  # its images are not on disk: no gallery, no error
    assert (tmp_path / "rep2" / "report.html").exists() and not (tmp_path / "rep2" / "gallery.png").exists()
