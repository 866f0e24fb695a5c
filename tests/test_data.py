"""Data sets: format readers on generated files, transforms, subsets, predictions, C-score, the experiment."""

import gzip
import json
import pickle

import numpy as np
import pytest
import torch

import fastpop
from fastpop import metrics as M
from fastpop.cli import main
from fastpop.config import Config
from fastpop.data import load_dataset
from fastpop.data.files import read_idx
from fastpop.data.orders import subsets
from fastpop.errors import UsageError

CPU = torch.device("cpu")


def write_idx(path, arr, gz=False):
    arr = np.asarray(arr, np.uint8)
    data = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def make_mnist(folder, n_train=60, n_test=25, size=8, gz=True, layout=""):
    rng = np.random.default_rng(0)
    d = folder / layout if layout else folder
    d.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n, stem in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        y = np.arange(n) % 10
        ext = ".gz" if gz else ""
        write_idx(d / f"{stem}-images-idx3-ubyte{ext}", x, gz)
        write_idx(d / f"{stem}-labels-idx1-ubyte{ext}", y, gz)
        arrays[split] = (x, y)
    return arrays


@pytest.mark.parametrize("gz, layout", [(True, ""), (False, "MNIST/raw"), (True, "fashion-mnist")])
def test_mnist_idx_reader(tmp_path, gz, layout):
    name = "fashion-mnist" if layout == "fashion-mnist" else "mnist"
    arrays = make_mnist(tmp_path, gz=gz, layout=layout)
    data = load_dataset(Config(dataset=name, data_dir=str(tmp_path)), CPU)
    assert data.train.x.dtype == torch.uint8 and data.train.x.shape == (60, 1, 8, 8)
    np.testing.assert_array_equal(data.train.x[:, 0].numpy(), arrays["train"][0])
    np.testing.assert_array_equal(data.test.y.numpy(), arrays["test"][1])
    assert data.class_ids == list(range(10))


def test_idx_errors(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(bytes([0, 0, 9, 1, 0, 0, 0, 2, 5, 5]))
    with pytest.raises(UsageError, match="magic"):
        read_idx(p)
    write_idx(p, np.zeros((3, 4, 4)))
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(UsageError, match="promises"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 8, 3, 0]))
    with pytest.raises(UsageError, match="truncated"):
        read_idx(p)
    with pytest.raises(UsageError, match="not found"):
        load_dataset(Config(dataset="mnist", data_dir=str(tmp_path / "empty")), CPU)


def make_cifar(folder, name):
    rng = np.random.default_rng(1)
    if name == "cifar10":
        d = folder / "cifar-10-batches-py"
        d.mkdir(parents=True)
        for b in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            x = rng.integers(0, 256, (12, 3072), dtype=np.uint8)
            pickle.dump({b"data": x, b"labels": list(rng.integers(0, 10, 12))}, open(d / b, "wb"))
    else:
        d = folder / "cifar-100-python"
        d.mkdir(parents=True)
        for b, n in (("train", 200), ("test", 100)):
            fine = np.arange(n) % 100
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(fine),
                         b"coarse_labels": list(fine // 5)}, open(d / b, "wb"))
    return d


def test_cifar_readers_and_superclass(tmp_path):
    make_cifar(tmp_path, "cifar10")
    data = load_dataset(Config(dataset="cifar10", data_dir=str(tmp_path)), CPU)
    assert data.train.x.shape == (60, 3, 32, 32) and len(data.test) == 12
    make_cifar(tmp_path, "cifar100")
    sub = load_dataset(Config(dataset="cifar100", superclass=16, data_dir=str(tmp_path)), CPU)
    assert sub.class_ids == [80, 81, 82, 83, 84] and set(sub.test.y.tolist()) <= set(range(5))
    with pytest.raises(UsageError, match="superclass needs"):
        Config(dataset="cifar10", superclass=3)
    bad = tmp_path / "bad"
    d = make_cifar(bad, "cifar10")
    (d / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(UsageError, match="cannot read"):
        load_dataset(Config(dataset="cifar10", data_dir=str(bad)), CPU)


def test_npz_reader_and_validation(tmp_path):
    rng = np.random.default_rng(2)
    good = dict(x_train=rng.random((30, 6, 6)).astype(np.float32), y_train=np.arange(30) % 3,
                x_test=rng.random((9, 6, 6)).astype(np.float32), y_test=np.arange(9) % 3)
    np.savez(tmp_path / "ok.npz", **good)
    data = load_dataset(Config(dataset=f"npz:{tmp_path / 'ok.npz'}"), CPU)
    assert data.in_shape == (1, 6, 6) and data.classes == 3
    cases = {"lacks y_test": {k: v for k, v in good.items() if k != "y_test"},
             "must be \\[N\\] with N": dict(good, y_train=good["y_train"][:5]),
             "labels must be in 0..65535": dict(good, y_test=-good["y_test"] - 1),
             "must hold integer labels": dict(good, y_train=good["y_train"].astype(float)),
             "NaN": dict(good, x_test=np.full((9, 6, 6), np.nan, np.float32)),
             "differ in shape": dict(good, x_test=np.zeros((9, 5, 5), np.float32))}
    for what, arrays in cases.items():
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(UsageError, match=what):
            load_dataset(Config(dataset=f"npz:{tmp_path / 'bad.npz'}"), CPU)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(UsageError, match="cannot read npz"):
        load_dataset(Config(dataset=f"npz:{tmp_path / 'junk.npz'}"), CPU)


def test_random_labels_are_reproducible_and_really_permuted():
    true = load_dataset(Config(), CPU).train.y
    a, b = (load_dataset(Config(labels="random"), CPU).train.y for _ in range(2))
    assert torch.equal(a, b)
    assert (a != true).float().mean() > 0.8
    assert torch.equal(torch.bincount(a), torch.bincount(true))


def test_class_filters_and_out_of_sample(tmp_path):
    data = load_dataset(Config(classes=[3, 7]), CPU)
    assert data.class_ids == [3, 7] and set(data.train.y.tolist()) == {0, 1} and set(data.test.y.tolist()) == {0, 1}
    with pytest.raises(UsageError, match="unknown class"):
        load_dataset(Config(classes=[3, 42]), CPU)
    run = fastpop.train(Config(seeds=3, epochs=1, batch_size=64, classes=[0, 1, 2, 3, 4],
                               test_classes=[5, 6, 7, 8, 9], out=str(tmp_path / "oos")))
    assert run.manifest["predictions"] and not np.unpackbits(run.bits("test")).any()
    pred = run.predictions()
    assert pred.shape == (1, 3, run.n("test")) and set(np.unique(pred)) <= {0, 1, 2, 3, 4}
    agree = M.consensus_agreement(np.ascontiguousarray(pred)).agreement
    assert agree.shape == (1, run.n("test")) and (agree >= 1 / 3).all()


def test_recorded_predictions_match_the_bits(tmp_path):
    run = fastpop.train(Config(seeds=3, epochs=1, batch_size=64, record_predictions=True,
                               out=str(tmp_path / "p")))
    data = load_dataset(Config(), CPU)
    np.testing.assert_array_equal(run.predictions()[-1] == data.test.y.numpy(), run.correct("test"))


def test_shuffled_pixels_gaussian_and_noise():
    plain, shuffled = load_dataset(Config(), CPU), load_dataset(Config(pixels="shuffled"), CPU)
    assert not torch.equal(plain.train.x, shuffled.train.x)
    assert torch.equal(plain.train.x.flatten(1).sort(1).values, shuffled.train.x.flatten(1).sort(1).values)
    flat_p, flat_s = plain.test.x.flatten(1), shuffled.test.x.flatten(1)
    perm = [int((flat_s.T == col).all(1).nonzero()[0]) if (flat_s.T == col).all(1).any() else -1
            for col in flat_p.T[:3]]
    assert -1 not in perm  # the same column permutation on the test split
    g0 = load_dataset(Config(dataset="gaussian", separation=0.0), CPU)
    assert g0.train.x.dtype == torch.float32 and g0.in_shape == (1, 8, 8) and g0.classes == 10
    noise = load_dataset(Config(test_dataset="noise"), CPU)
    assert (noise.test.y == -1).all() and noise.test.x.dtype == torch.uint8 and noise.open_set


def test_subsets_are_reproducible_and_independent_of_company(tmp_path):
    a = subsets([4, 9], 100, 0.3)
    assert torch.equal(a, subsets([4, 9], 100, 0.3)) and a.shape == (2, 30)
    assert torch.equal(subsets([9], 100, 0.3)[0], a[1])
    run = fastpop.train(Config(seeds=[4, 9], epochs=1, batch_size=64, subset_fraction=0.5,
                               out=str(tmp_path / "s")))
    member = run.member()
    assert member.shape == (2, run.n("train")) and (member.sum(1) == round(0.5 * run.n("train"))).all()
    want = subsets([4, 9], run.n("train"), 0.5)
    assert torch.equal(torch.from_numpy(member).nonzero()[:, 1].view(2, -1), want)


def test_cscore_against_a_naive_computation(tmp_path):
    rng = np.random.default_rng(5)
    p, n = 7, 90
    correct, member = rng.random((p, n)) < 0.6, rng.random((p, n)) < 0.5
    member[:, 0] = True  # example 0 is seen by every network

    def words(b):
        out = np.zeros((p, 8 * -(-n // 64)), np.uint8)
        out[:, : -(-n // 8)] = np.packbits(b, axis=-1, bitorder="little")
        return out.view(np.uint64)

    got = M.cscore(words(correct), words(member), n).values
    held = ~member
    with np.errstate(invalid="ignore"):
        want = (correct & held).sum(0) / held.sum(0)
    np.testing.assert_allclose(got, want)
    assert np.isnan(got[0])


def test_cscore_command_combines_fractions(tmp_path, capsys):
    runs = []
    for f in (0.3, 0.6):
        runs.append(tmp_path / f"f{f}")
        assert main(["run", "--seeds", "4", "--epochs", "1", "--batch-size", "64", "--subset-fraction", str(f),
                     "--out", str(runs[-1]), "--quiet"]) == 0
    out = tmp_path / "c.npy"
    assert main(["cscore", *map(str, runs), "--out", str(out)]) == 0
    scores = np.load(out)
    from fastpop.analysis import run_cscore

    each = [run_cscore(fastpop.load_run(r)) for r in runs]
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(scores, np.nanmean(np.stack(each), 0))
    plain = tmp_path / "plain"
    assert main(["run", "--seeds", "2", "--epochs", "1", "--batch-size", "256", "--out", str(plain), "--quiet"]) == 0
    assert main(["cscore", str(plain), "--out", str(out)]) == 2
    assert "without --subset-fraction" in capsys.readouterr().err


@pytest.mark.parametrize("args, what", [(["--dataset", "npz:/nonexistent.npz"], "cannot read npz"),
                                        (["--superclass", "3"], "superclass needs"),
                                        (["--subset-fraction", "0"], "subset_fraction"),
                                        (["--subset-fraction", "1.5"], "subset_fraction"),
                                        (["--classes", "3,42"], "unknown class"),
                                        (["--test-dataset", "imagenet"], "unknown test dataset"),
                                        (["--labels", "shuffled"], "unknown labels"),
                                        (["--dataset", "mnist", "--data-dir", "/nonexistent"], "not found")])
def test_bad_data_input(tmp_path, capsys, args, what):
    out = tmp_path / "run"
    assert main(["run", "--seeds", "2", "--epochs", "1", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert what in err and err.count("\n") == 1, err
    assert not out.exists()


def test_training_on_generated_mnist_files(tmp_path):
    make_mnist(tmp_path / "data", n_train=80, n_test=30)
    out = tmp_path / "run"
    assert main(["run", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--seeds", "2", "--epochs", "1",
                 "--batch-size", "16", "--out", str(out), "--quiet"]) == 0
    assert fastpop.load_run(out).n("test") == 30


def test_experiment_paper_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "paper"
    tiny = ["--nets", "3", "--epochs", "1", "--random-label-epochs", "2", "--draws", "50", "--quiet"]
    assert main(["experiment", "paper", "--out", str(out), *tiny]) == 0
    text = capsys.readouterr().out
    assert "random-labels (train)" in text and "small-cnn vs wide-cnn" in text and "half fit" in text
    summary = json.loads((out / "summary.json").read_text())
    assert fastpop.load_run(out / "random-labels").config.epochs == 2
    assert summary["populations"]["mlp (test)"]["rho_ci_networks"] is not None
    assert "containment_expected" in summary["cross_architecture"]["mlp vs small-cnn"]
    page = (out / "report.html").read_text()
    assert "tpa_by_population.png" in page and "out_of_sample_consensus.png" in page
    for name in ("mlp", "small-cnn", "wide-cnn", "random-labels", "out-of-sample"):
        assert fastpop.load_run(out / name).status == "complete"
    assert main(["experiment", "paper", "--out", str(out), *tiny]) == 0  # reuse
