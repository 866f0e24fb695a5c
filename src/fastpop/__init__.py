"""fastpop: train populations of small neural networks at once and study how they agree, example by example.

    import fastpop
    run = fastpop.train(fastpop.Config(arch="small-cnn", seeds=100, epochs=5, out="runs/demo"))
    run.correct("test")          # bool [P, N] at the last checkpoint
    fastpop.load_run("runs/demo")
"""

__version__ = "0.1.0"

from .archs import Arch  # noqa: E402
from .config import Config  # noqa: E402
from .data.arrays import ArrayData  # noqa: E402
from .errors import UsageError  # noqa: E402
from .run import Run, load_run  # noqa: E402
from .trainer import Interrupted, Progress, resume, train  # noqa: E402

__all__ = ["Arch", "ArrayData", "Config", "Interrupted", "Progress", "Run", "UsageError", "load_run", "resume", "train", "__version__"]
