"""fastpop: train populations of small neural networks at once and study how they agree, example by example.

    import fastpop
    run = fastpop.train(fastpop.Config(arch="small-cnn", seeds=100, epochs=5, out="runs/demo"))
    run.correct("test")          # bool [P, N] at the last checkpoint
    fastpop.load_run("runs/demo")
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())  # a library prints nothing unless its user asks

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it from here

# Imported on first use, so `import fastpop.metrics` (numpy only) does not pay for torch and the trainer.
_LAZY = {"Arch": "archs", "ArrayData": "data.arrays", "Config": "config", "UsageError": "errors", "Run": "run",
         "load_run": "run", "Interrupted": "trainer", "Progress": "trainer", "resume": "trainer", "train": "trainer"}

__all__ = ["Arch", "ArrayData", "Config", "Interrupted", "Progress", "Run", "UsageError", "load_run", "resume",
           "train", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fastpop' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
