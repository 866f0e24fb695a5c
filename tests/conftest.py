import os

import torch

# The Triton interpreter runs kernels on CPU tensors; it must be on before any @triton.jit module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastpop  # noqa: E402


@pytest.fixture
def tiny(tmp_path):
    """A fast config factory: a few networks, one epoch, big batches."""

    def make(**kw):
        base = dict(seeds=3, epochs=1, batch_size=256, out=str(tmp_path / "run"))
        base.update(kw)
        return fastpop.Config(**base)

    return make
