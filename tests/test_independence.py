"""The network with seed s ends with the same weights and record bits alone, among others, or among different
others: through the whole trainer, record included (with BatchNorm, the record is made with the running statistics
that training left)."""

import numpy as np
import pytest
import torch

import fastpop


@pytest.mark.parametrize("arch", ["small-cnn", "mlp", "c4s2b-r6-r8s2-gap"])
def test_network_is_independent_of_its_company(tmp_path, arch):
    common = dict(arch=arch, epochs=2, batch_size=64, record_every=7)
    runs = {name: fastpop.train(fastpop.Config(seeds=seeds, out=str(tmp_path / name), **common))
            for name, seeds in {"alone": [5], "with": [1, 5, 9], "other": [5, 2, 3, 4]}.items()}
    pos = {"alone": 0, "with": 1, "other": 0}
    ref_w = runs["alone"].weights()[0]
    for name, run in runs.items():
        k = pos[name]
        assert torch.equal(run.weights()[k], ref_w), f"weights of seed 5 differ when trained {name}"
        for split in ("train", "test"):
            np.testing.assert_array_equal(run.bits(split)[:, k], runs["alone"].bits(split)[:, 0],
                                          err_msg=f"{split} bits of seed 5 differ when trained {name}")
            np.testing.assert_array_equal(run.loss(split)[:, k], runs["alone"].loss(split)[:, 0])
