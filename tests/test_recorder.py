"""The bit record: layout, round trip, and agreement with an independent evaluation of the final weights."""

import json

import numpy as np
import pytest
import torch

import fastpop
from fastpop.archs import build_arch
from fastpop.data import load_dataset
from fastpop.recorder import pack_bits
from fastpop.rundir import bytes_per_row


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 100, 130])
def test_pack_bits_matches_numpy(n):
    rng = np.random.default_rng(n)
    correct = rng.random((5, n)) < 0.5
    packed = pack_bits(torch.from_numpy(correct))
    r = bytes_per_row(n)
    assert packed.shape == (5, r) and packed.dtype == np.uint8 and r % 8 == 0
    want = np.zeros((5, r), np.uint8)
    want[:, : -(-n // 8)] = np.packbits(correct, axis=-1, bitorder="little")
    np.testing.assert_array_equal(packed, want)
    back = np.unpackbits(packed, axis=-1, count=n, bitorder="little").astype(bool)
    np.testing.assert_array_equal(back, correct)
    padding = np.unpackbits(packed, axis=-1, bitorder="little")[:, n:]
    assert not padding.any(), "padding bits must be zero"
    assert packed.view(np.uint64).shape == (5, r // 8)


def test_run_directory_is_readable_with_numpy_and_json(tiny):
    run = fastpop.train(tiny(seeds=[4, 2, 9], epochs=2, record_every=2))
    meta = json.loads((run.path / "run.json").read_text())
    assert meta["status"] == "complete"
    t = meta["checkpoints_done"]
    assert t == len(meta["checkpoints"]) and [c["step"] for c in meta["checkpoints"]] == [2, 4, 5, 6, 8, 10]
    for split in ("train", "test"):
        n = meta["splits"][split]["n"]
        bits = np.load(run.path / f"{split}.bits.npy")
        assert bits.shape == (t, 3, 8 * -(-n // 64)) and bits.dtype == np.uint8
        correct = np.unpackbits(bits, axis=-1, count=n, bitorder="little").astype(bool)
        acc = np.load(run.path / f"{split}.acc.npy")
        np.testing.assert_allclose(correct.mean(-1), acc, rtol=1e-6)
        assert np.isfinite(np.load(run.path / f"{split}.loss.npy")).all()
        assert not np.unpackbits(bits, axis=-1, bitorder="little")[..., n:].any()


def test_final_record_equals_independent_evaluation(tiny):
    """Rebuild each network as a plain nn.Module from the saved weights and score it from scratch."""
    run = fastpop.train(tiny(seeds=[3, 8], epochs=2, batch_size=64))
    data = load_dataset(fastpop.Config(), torch.device("cpu"))
    arch = build_arch("small-cnn", data.in_shape, data.classes)
    weights = run.weights()
    for k in range(2):
        module = arch.to_module()
        start = 0
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(weights[k, start:start + p.numel()].view_as(p))
                start += p.numel()
        for split in ("train", "test"):
            s = data.split(split)
            x = (s.x.float() - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1)
            logits = module(x)
            theirs = (logits.argmax(1) == s.y).numpy()
            np.testing.assert_array_equal(run.correct(split)[k], theirs, err_msg=f"network {k}, {split}")
            assert run.accuracy(split)[-1, k] == pytest.approx(theirs.mean(), abs=1e-6)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_recorded_margins_losses_and_predictions_match_the_final_weights(tmp_path, backend):
    """--record margin,loss,pred: float16 margins and cross-entropies and the predictions of both splits, written in
    the scoring pass, equal an independent torch evaluation of the final weights; shards merge to the whole."""
    from fastpop.cli import main

    common = dict(arch="c4-mp-c6-gap-d8", seeds=3, epochs=1, batch_size=256, record=["margin", "loss", "pred"],
                  backend=backend)
    run = fastpop.train(fastpop.Config(out=str(tmp_path / "run"), **common))
    data = load_dataset(run.config, torch.device("cpu"))
    arch = build_arch(run.config.arch, data.in_shape, data.classes)
    for split in ("train", "test"):
        s = data.split(split)
        x = (s.x.float() - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1)
        for k in range(3):
            module = arch.to_module()
            torch.nn.utils.vector_to_parameters(run.weights()[k], module.parameters())
            with torch.no_grad():
                logits = module(x)
            true = logits.gather(1, s.y[:, None])[:, 0]
            other = logits.scatter(1, s.y[:, None], float("-inf")).amax(1)
            xent = torch.nn.functional.cross_entropy(logits, s.y, reduction="none")
            np.testing.assert_allclose(run.margins(split)[-1, k], true - other, rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(run.example_losses(split)[-1, k], xent, rtol=2e-3, atol=2e-3)
            np.testing.assert_array_equal(run.predictions(split)[-1, k], logits.argmax(1))
    for i in range(3):
        fastpop.train(fastpop.Config(out=str(tmp_path / f"s{i}"), shard=f"{i}/3", **common))
    assert main(["merge", *(str(tmp_path / f"s{i}") for i in range(3)), "--out", str(tmp_path / "m")]) == 0
    merged = fastpop.load_run(tmp_path / "m")
    np.testing.assert_array_equal(merged.margins("train"), run.margins("train"))
    np.testing.assert_array_equal(merged.predictions("test"), run.predictions("test"))
    assert main(["verify", str(tmp_path / "m")]) == 0
