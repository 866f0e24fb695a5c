"""Terminal display for the CLI: a progress bar fed by the trainer's callback, and the end-of-run summary."""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .run import Run
from .trainer import Progress


class ProgressBar:
    def __init__(self, enabled: bool = True, per_run: bool = False):
        self.enabled, self.per_run = enabled, per_run
        self.bar = RichProgress(
            TextColumn("epoch {task.fields[epoch]:.2f}"), BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[rate]} net-img/s"), TextColumn("test acc {task.fields[acc]}"),
            console=Console(stderr=True), disable=not enabled)
        self.task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.task is not None:  # started lazily, so an early error leaves the terminal untouched
            self.bar.stop()

    def update(self, p: Progress) -> None:
        if not self.enabled:
            return
        fields = {"epoch": p.epoch, "rate": f"{p.net_images_per_s:,.0f}",
                  "acc": "-" if p.mean_test_acc is None else f"{p.mean_test_acc:.3f}"}
        if self.task is None:
            self.bar.start()
        if self.task is None or (self.per_run and p.step <= 1):  # a new bar for each run of an experiment
            self.task = self.bar.add_task("train", total=p.total_steps, **fields)
        self.bar.update(self.task, completed=p.step, **fields)


def print_summary(run: Run, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"{run.config.arch} on {run.config.dataset}: {len(run.seeds)} networks, "
                        f"{len(run.checkpoints)} checkpoints")
    for col in ("split", "mean acc", "std", "min", "max"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split in ("train", "test"):
        acc = np.asarray(run.accuracy(split)[-1], dtype=np.float64)
        table.add_row(split, *(f"{v:.4f}" for v in (acc.mean(), acc.std(), acc.min(), acc.max())))
    console.print(table)
    t = run.manifest.get("timings", {})
    if "wall_s" in t:
        console.print(f"wall {t['wall_s']:.1f} s (train {t['train_s']:.1f} s, evaluation {t['eval_s']:.1f} s), "
                      f"{t['net_images_per_s']:,.0f} net-images/s in training")
    console.print(f"run directory: {run.path}")


def print_analysis(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    a, g, k = result["accuracy"], result["agreement"], result["kappa"]
    table = Table(title=f"{result['split']} split, checkpoint {result['checkpoint']} of {result['T']}: "
                        f"P={result['P']}, N={result['N']}")
    table.add_column("measure")
    for col in ("observed", "binomial null", "Poisson-binomial null"):
        table.add_column(col, justify="right")
    table.add_row("accuracy mean (std, min, max)",
                  f"{a['mean']:.4f} ({a['std']:.4f}, {a['min']:.4f}, {a['max']:.4f})", "", "")
    table.add_row("mass at TPA = 0", f"{g['mass0']:.4f}", f"{g['mass0_binomial']:.3g}",
                  f"{g['mass0_poisson_binomial']:.3g}")
    table.add_row("mass at TPA = 1", f"{g['mass1']:.4f}", f"{g['mass1_binomial']:.3g}",
                  f"{g['mass1_poisson_binomial']:.3g}")
    table.add_row("TV distance to the null", "", f"{g['tv_binomial']:.4f}", f"{g['tv_poisson_binomial']:.4f}")
    table.add_row("over-dispersion rho", f"{g['rho']:.4f}", "", "")
    table.add_row("Fleiss kappa", f"{g['fleiss_kappa']:.4f}", "", "")
    table.add_row(f"mean pairwise kappa ({k['networks']} nets)", f"{k['mean']:.4f}", "", "")
    if "consensus" in result:
        table.add_row("agreement with the plurality prediction", f"{result['consensus']['mean']:.4f}", "", "")
    if result.get("cscore_mean") is not None:
        table.add_row("mean C-score (held-out networks' accuracy)", f"{result['cscore_mean']:.4f}", "", "")
    if result["split_half"]:
        sh = result["split_half"]
        table.add_row("split-half Spearman (Spearman-Brown)", f"{sh['r']:.4f} ({sh['spearman_brown']:.4f})", "", "")
        table.add_row("mean pairwise Spearman of speed", f"{result['pairwise_spearman']['mean']:.4f}", "", "")
    console.print(table)
