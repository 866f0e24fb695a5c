"""Your own data: arrays in memory (channels first or last, vectors, 300 classes), a torch Dataset, a Hugging Face
dataset (in memory and as a saved folder on the CLI), npz files; each example's index in its source; bad input in
one line with nothing written."""

import numpy as np
import pytest
import torch

import fastpop
from fastpop.cli import main

RNG = np.random.default_rng(0)
X = RNG.integers(0, 256, (120, 6, 6, 3), dtype=np.uint8)  # channels last
Y = np.arange(120) % 4
XT, YT = X[:30].copy(), Y[:30].copy()
COMMON = dict(seeds=2, epochs=1, batch_size=32)


def test_arrays_channels_last_and_first_train_the_same(tmp_path):
    last = fastpop.train(fastpop.Config(out=str(tmp_path / "last"), **COMMON), data=fastpop.ArrayData(X, Y, XT, YT))
    first = fastpop.train(fastpop.Config(out=str(tmp_path / "first"), **COMMON),
                          data=fastpop.ArrayData(torch.from_numpy(X.transpose(0, 3, 1, 2)), torch.from_numpy(Y),
                                                 XT.transpose(0, 3, 1, 2), YT, name="first"))
    assert last.manifest["dataset"]["in_shape"] == [3, 6, 6] and last.config.dataset == "arrays:arrays"
    assert torch.equal(last.weights(), first.weights())
    np.testing.assert_array_equal(last.bits("test"), first.bits("test"))


def test_resume_takes_the_same_arrays_again(tmp_path):
    steps = []
    data = fastpop.ArrayData(X, Y, XT, YT)
    with pytest.raises(fastpop.Interrupted):
        fastpop.train(fastpop.Config(out=str(tmp_path / "r"), **COMMON), data=data,
                      progress=lambda p: steps.append(1), should_stop=lambda: len(steps) == 1)
    with pytest.raises(fastpop.UsageError, match="pass the same data again"):
        fastpop.resume(tmp_path / "r")
    changed = X.copy()
    changed[0, 0, 0, 0] ^= 1
    with pytest.raises(fastpop.UsageError, match="differ"):
        fastpop.resume(tmp_path / "r", data=fastpop.ArrayData(changed, Y, XT, YT))
    assert fastpop.resume(tmp_path / "r", data=data).status == "complete"


def test_vectors_and_300_classes(tmp_path):
    x = RNG.standard_normal((600, 5)).astype(np.float32)
    y = np.arange(600) % 300
    run = fastpop.train(fastpop.Config(arch="d16", record_predictions=True, out=str(tmp_path / "v"), **COMMON),
                        data=fastpop.ArrayData(x, y, x[:50], y[:50]))
    assert run.manifest["dataset"]["in_shape"] == [5, 1, 1]
    pred = run.predictions("test")
    assert pred.dtype == np.uint16 and pred.max() < 300


class Images(torch.utils.data.Dataset):
    def __init__(self, x, y, fail_at=None):
        self.x, self.y, self.fail_at = x, y, fail_at

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise OSError("disk read failed")
        return torch.from_numpy(self.x[i].transpose(2, 0, 1)).float() / 255, int(self.y[i])


def test_torch_dataset(tmp_path):
    data = fastpop.ArrayData.from_torch(Images(X, Y), Images(XT, YT))
    x, y = data.splits()["train"]
    assert x.shape == (120, 3, 6, 6) and x.dtype == np.float32 and (y == Y).all()
    with pytest.raises(fastpop.UsageError, match="the train Dataset raised OSError"):
        fastpop.ArrayData.from_torch(Images(X, Y, fail_at=7), Images(XT, YT))


def test_hugging_face_dataset_in_memory_and_saved(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    def part(x, y):
        return datasets.Dataset.from_dict({"img": [Image.fromarray(im) for im in x], "fine": y.tolist()})

    dd = datasets.DatasetDict({"train": part(X, Y), "test": part(XT, YT)})
    x, y = fastpop.ArrayData.from_hf(dd, image="img", label="fine").splits()["train"]
    np.testing.assert_array_equal(x, X.transpose(0, 3, 1, 2))
    dd.save_to_disk(str(tmp_path / "hf"))
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["run", "--dataset", f"hf:{tmp_path / 'hf'}", "--image-column", "img", "--label-column", "fine",
                 "--seeds", "2", "--epochs", "1", "--batch-size", "32", "--out", str(out), "--quiet"]) == 0
    assert fastpop.load_run(out).manifest["dataset"]["in_shape"] == [3, 6, 6]
    assert main(["run", "--dataset", f"hf:{tmp_path / 'hf'}", "--image-column", "nope", "--seeds", "2",
                 "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has no column 'nope'" in err and err.count("\n") == 1 and not (tmp_path / "bad").exists()


def test_example_index_follows_filters():
    from fastpop.data import load_dataset

    data = load_dataset(fastpop.Config(classes=[3, 5]), torch.device("cpu"))
    from sklearn.datasets import load_digits

    source = load_digits()
    for split in (data.train, data.test):
        idx = split.index.numpy()
        np.testing.assert_array_equal(source.images[idx].astype(np.uint8)[:, None], split.x.numpy())
        assert set(source.target[idx]) == {3, 5}


@pytest.mark.parametrize("data, message", [
    (fastpop.ArrayData(X, Y, XT[:, :, :4], YT), "differ in shape"),
    (fastpop.ArrayData(X[:, :3, :, :3], Y, XT[:, :3, :, :3], YT), "could be [N, C, H, W] or [N, H, W, C]"),
    (fastpop.ArrayData(X, -Y, XT, YT), "labels must be in 0..65535"),
    (fastpop.ArrayData(X, Y[:9], XT, YT), "y_train must be [N] with N = 120"),
    (fastpop.ArrayData(X[:0], Y[:0], XT, YT), "the train split is empty"),
    (fastpop.ArrayData(np.full(X.shape, np.inf, np.float32), Y, XT, YT), "NaN, infinite"),
    (fastpop.ArrayData(X, Y.astype(float), XT, YT), "integer labels"),
    (fastpop.ArrayData(np.array([np.zeros(3), np.zeros(4)], dtype=object), Y[:2], XT, YT), "object arrays"),
])
def test_bad_arrays_get_one_line_and_write_nothing(tmp_path, data, message):
    with pytest.raises(fastpop.UsageError) as e:
        fastpop.train(fastpop.Config(out=str(tmp_path / "r"), **COMMON), data=data)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "r").exists()


def test_runs_store_source_indices_and_labels_and_a_copy_of_data_on_request(tmp_path):
    data = fastpop.ArrayData(X, Y, XT, YT, name="toy")
    run = fastpop.train(fastpop.Config(save_data=True, classes=[1, 3], out=str(tmp_path / "r"), **COMMON), data=data)
    from fastpop.export import example_table

    table = example_table(run, "train")
    np.testing.assert_array_equal(table["source_index"], np.flatnonzero(np.isin(Y, [1, 3])))
    np.testing.assert_array_equal(table["label"], Y[np.isin(Y, [1, 3])])
    x, labels, index = run.examples("test")  # from the copy in the run directory, in any process
    np.testing.assert_array_equal(x, XT.transpose(0, 3, 1, 2)[index])
    (tmp_path / "r" / "data.x_test.npy").write_bytes((tmp_path / "r" / "data.x_train.npy").read_bytes())
    assert main(["verify", str(tmp_path / "r")]) == 2  # a damaged copy is caught
    with pytest.raises(fastpop.UsageError, match="save_data keeps a copy"):
        fastpop.train(fastpop.Config(save_data=True, out=str(tmp_path / "d"), **COMMON))


def test_a_saved_copy_resumes_without_the_arrays(tmp_path):
    steps = []
    with pytest.raises(fastpop.Interrupted):
        fastpop.train(fastpop.Config(save_data=True, out=str(tmp_path / "r"), **COMMON),
                      data=fastpop.ArrayData(X, Y, XT, YT), progress=lambda p: steps.append(1),
                      should_stop=lambda: len(steps) == 1)
    assert fastpop.resume(tmp_path / "r").status == "complete"


def test_npz_path_is_stored_absolute(tmp_path, monkeypatch):
    np.savez(tmp_path / "d.npz", x_train=X, y_train=Y, x_test=XT, y_test=YT)
    monkeypatch.chdir(tmp_path)
    run = fastpop.train(fastpop.Config(dataset="npz:d.npz", out=str(tmp_path / "r"), **COMMON))
    assert run.config.dataset == f"npz:{tmp_path / 'd.npz'}"


def test_examples_refuse_changed_images(tmp_path):
    run = fastpop.train(fastpop.Config(out=str(tmp_path / "r"), **COMMON), data=fastpop.ArrayData(X, Y, XT, YT))
    changed = XT.copy()
    changed[3] ^= 1
    with pytest.raises(fastpop.UsageError, match="differ from those"):
        run.examples("test", data=fastpop.ArrayData(X, Y, changed, YT))
    assert run.examples("test", data=fastpop.ArrayData(X, Y, XT, YT))[0].shape == (30, 3, 6, 6)
