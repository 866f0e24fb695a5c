"""What the CLI shows: a progress bar on a terminal, plain progress lines off one (SLURM, nohup, a pipe), and the
end-of-run summary."""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the analysis commands print through here: they should not load torch and the trainer
    from .analysis import Analysis, Comparison
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


class ProgressLines:
    """Off a terminal: one plain line at the first step, at every checkpoint and every `every_s` seconds between,
    so a long job's log shows signs of life (a bar's redraws would be lost or garble it)."""

    def __init__(self, stream=None, every_s: float = 30.0, clock=time.monotonic):
        self.stream, self.every_s, self.clock = stream or sys.stderr, every_s, clock
        self.last = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def update(self, p: Progress) -> None:
        now = self.clock()
        if p.checkpoint is None and self.last is not None and now - self.last < self.every_s:
            return
        self.last = now
        print(progress_line(p), file=self.stream, flush=True)


def progress_line(p: Progress) -> str:
    eta = "-" if p.eta_s is None else str(timedelta(seconds=round(p.eta_s)))
    acc = "-" if p.mean_test_acc is None else f"{p.mean_test_acc:.4f}"
    where = f"{p.run_dir}: " if p.run_dir else ""
    line = (f"{where}step {p.step}/{p.total_steps} epoch {p.epoch:.2f}/{p.epochs:g} "
            f"{p.net_images_per_s:,.0f} net-img/s ETA {eta} mean test acc {acc}")
    return line + (f" (checkpoint {p.checkpoint + 1})" if p.checkpoint is not None else "")


def progress_display(quiet: bool, per_run: bool = False, stream=None):
    """The bar on a terminal, plain lines elsewhere, nothing with --quiet."""
    stream = stream or sys.stderr
    if not quiet and not stream.isatty():
        return ProgressLines(stream)
    return ProgressBar(enabled=not quiet, per_run=per_run)


def seeds_text(seeds: list[int]) -> str:
    """Which seeds, as "seeds 0 to 999" for a range, else the first few: shows what --seeds 5 (five networks)
    and --seeds 5, (seed 5) gave."""
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"seeds {seeds[0]} to {seeds[-1]}"
    return "seeds " + ", ".join(map(str, seeds[:5])) + (", ..." if len(seeds) > 5 else "")


def print_summary(run: Run, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"{run.config.arch} on {run.config.dataset}: {len(run.seeds)} networks "
                        f"({seeds_text(run.seeds)}), {len(run.checkpoints)} checkpoints")
    for col in ("split", "mean acc", "std", "min", "max"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split in ("train", "test"):
        acc = np.asarray(run.accuracy(split)[-1], dtype=np.float64)
        table.add_row(split, *(f"{v:.4f}" for v in (acc.mean(), acc.std(), acc.min(), acc.max())))
    console.print(table)
    if run.diverged:
        healthy = run.healthy()
        acc = np.asarray(run.accuracy("test")[-1], np.float64)[healthy]
        console.print(f"{len(run.diverged)} of {len(run.seeds)} networks diverged (seeds "
                      f"{', '.join(map(str, sorted(run.diverged)[:10]))}{', ...' if len(run.diverged) > 10 else ''}): "
                      f"counted wrong on every example above; mean test acc of the other "
                      f"{int(healthy.sum())}: {acc.mean() if len(acc) else float('nan'):.4f}", soft_wrap=True)
    t = run.manifest.get("timings", {})
    if "wall_s" in t:
        console.print(f"wall {t['wall_s']:.1f} s (train {t['train_s']:.1f} s, evaluation {t['eval_s']:.1f} s), "
                      f"{t['net_images_per_s']:,.0f} net-images/s in training")
    if "isa" in run.manifest.get("host", {}):
        from .machine import describe

        console.print(f"machine: {describe(run.manifest['host'])}", soft_wrap=True)
    console.print(f"run directory: {run.path}")


def print_analysis(result: "Analysis", console: Console | None = None) -> None:
    from .report import summary_rows

    if console is None:  # piped output gets 120 columns (rich's default of 80 breaks every measure in two)
        console = Console()
        console = console if console.is_terminal else Console(width=120)
    table = Table(title=result.title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in summary_rows(result):
        table.add_row(name, value)
    console.print(table)


def print_comparison(result: "Comparison", console: Console | None = None) -> None:
    console = console or Console(soft_wrap=True)  # long paths stay on their line
    for i, r in enumerate(result.runs):
        console.print(f"[{i}] {r['run']}: {r['arch']}, P = {r['P']}, T = {r['T']}, final mean accuracy "
                      f"{r['mean_final_accuracy']:.4f}")
    for w in result.warnings:
        console.print(f"warning: {w}", style="yellow")
    for pair in result.pairs:
        weak = pair["weaker"]
        console.print(f"[{pair['a']}] vs [{pair['b']}] on {result.n} {result.split} examples: Spearman of "
                      f"accessibility {pair['spearman_accessibility']:.4f}{_intervals(pair.get('spearman_interval'))}; "
                      f"weaker {weak} (final TPA >= {result.threshold} counts as learned)")
        for key, text in (("spearman_permutation_null", "examples shuffled"),
                          ("spearman_permutation_null_within_class", "examples shuffled within classes")):
            if key in pair:
                null = pair[key]
                console.print(f"  Spearman's permutation null ({text}, {null['draws']} draws): mean "
                              f"{null['null_mean']:.4f}, 97.5th percentile {null['null_q975']:.4f}, p = "
                              f"{null['p_value']:.2g}")
        both = pair["learned_by_both"]
        expected, ci = pair.get("containment_expected", {}), pair.get("containment_interval")
        for key, text in (("weak_learned_also_by_strong", "learned by the weaker and also by the stronger"),
                          ("strong_learned_also_by_weak", "learned by the stronger and also by the weaker")):
            count = pair["learned_by_weak" if key.startswith("weak") else "learned_by_strong"]
            line = f"  {text}: " + _fraction(pair[key], both, count)
            if ci:
                line += _intervals({unit: ci[unit][key] for unit in ci})
            if key in expected:
                line += f"; independent overlap {expected[key]:.4f}"
                if f"{key}_within_class" in expected:
                    line += f", within classes {expected[f'{key}_within_class']:.4f}"
            console.print(line)


def _intervals(iv: dict | None) -> str:
    """" [95% CI networks lo-hi; examples lo-hi]" from {"networks": [lo, hi], "examples": [lo, hi]}."""
    if not iv:
        return ""
    parts = [f"{unit} {iv[unit][0]:.3f}-{iv[unit][1]:.3f}" for unit in ("networks", "examples")
             if unit in iv and iv[unit][0] is not None and iv[unit][0] == iv[unit][0]]
    return f" [95% CI {'; '.join(parts)}]" if parts else ""


def _fraction(value: float, k: int, m: int) -> str:
    return f"{value:.4f} ({k} of {m})" if m else "undefined (0 of 0)"
