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


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """Tests write only under their temporary folders: a run directory in the checkout fails the session (the
    flag fuzz test once wrote `--out=<value>` folders here, and they were committed)."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    before = set(os.listdir(root))
    yield
    made = sorted(set(os.listdir(root)) - before - {".pytest_cache", ".hypothesis", ".benchmarks"})
    assert not made, f"tests wrote into the checkout: {made}"
