"""Figures (PNG and SVG) and report.html for a run, and the scatter figure of `fastpop compare`."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from . import metrics as M
from .analysis import analyze, write_analysis
from .run import Run
from .rundir import SPLITS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, folder: Path, name: str) -> str:
    for ext in ("png", "svg"):
        fig.savefig(folder / f"{name}.{ext}", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return f"{name}.png"


def write_report(run: Run, split: str = "test") -> Path:
    """RUN/report/: the figures and report.html. Returns the html path."""
    plt = _plt()
    result = analyze(run, split, write=False)  # everything is read and checked before anything is written
    accuracy = {s: np.asarray(run.accuracy(s), np.float64) for s in SPLITS}
    write_analysis(run, result)
    arrays = result["arrays"]
    folder = run.path / "report"
    folder.mkdir(exist_ok=True)
    p, n, t_done = result["P"], result["N"], result["T"]
    counts = np.rint(arrays["tpa"] * p).astype(np.int64)
    acc = accuracy[split]
    figures = []

    picks = sorted({0, t_done // 2, t_done - 1})
    fig, axes = plt.subplots(1, len(picks), figsize=(4.2 * len(picks), 3.4), squeeze=False)
    for ax, t in zip(axes[0], picks):
        k = np.arange(p + 1)
        ax.bar(k / p, np.bincount(counts[t], minlength=p + 1) / n, width=1 / max(p, 1), color="tab:blue",
               label="observed")
        ax.plot(k / p, M.binomial_pmf(p, acc[t].mean()), color="tab:orange", label="binomial null")
        ax.plot(k / p, M.poisson_binomial_pmf(acc[t]), "--", color="tab:red", label="Poisson-binomial null")
        ax.set(title=f"checkpoint {t} (epoch {run.checkpoints[t]['epoch']:.2f})", xlabel="TP-agreement",
               yscale="log", ylim=(max(1 / (10 * n), 1e-6), 1))
    axes[0][0].set_ylabel("fraction of examples")
    axes[0][0].legend(fontsize=8)
    figures.append(("TP-agreement against independent-error nulls", _save(fig, folder, "tpa_histograms")))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    epochs = [c["epoch"] for c in run.checkpoints]
    for s, color in (("train", "tab:blue"), ("test", "tab:green")):
        a = accuracy[s]
        ax.fill_between(epochs, a.min(1), a.max(1), color=color, alpha=0.15)
        ax.fill_between(epochs, *np.percentile(a, [10, 90], axis=1), color=color, alpha=0.3)
        ax.plot(epochs, a.mean(1), color=color, label=f"{s} (mean; 10-90%; min-max)")
    ax.set(xlabel="epoch", ylabel="accuracy", title=f"accuracy of all {p} networks")
    ax.legend(fontsize=8)
    figures.append(("Accuracy of every network", _save(fig, folder, "accuracy_band")))

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.hist(arrays["accessibility"], bins=40, color="tab:purple")
    ax.set(xlabel="accessibility (mean correctness over checkpoints and networks)", ylabel="examples")
    figures.append(("Accessibility of the examples", _save(fig, folder, "accessibility")))

    fig, ax = plt.subplots(figsize=(5, 3.4))
    kappa = arrays["kappa"][np.triu_indices(len(arrays["kappa"]), 1)]
    ax.hist(kappa[np.isfinite(kappa)], bins=40, color="tab:brown")
    ax.set(xlabel="error consistency kappa (network pairs)", ylabel="pairs",
           title=f"checkpoint {result['checkpoint']}")
    figures.append(("Pairwise error consistency", _save(fig, folder, "kappa")))

    fig, ax = plt.subplots(figsize=(7, 3.6))
    order = np.argsort(-arrays["accessibility"], kind="stable")
    im = ax.imshow(arrays["tpa"][:, order], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax.set(xlabel="examples, most accessible first", ylabel="checkpoint")
    fig.colorbar(im, ax=ax, label="TP-agreement")
    figures.append(("TP-agreement over training", _save(fig, folder, "tpa_heatmap")))

    path = folder / "report.html"
    path.write_text(_html(run, result, figures))
    return path


def _html(run: Run, result: dict, figures: list[tuple[str, str]]) -> str:
    a, g, k = result["accuracy"], result["agreement"], result["kappa"]
    rows = [("networks P", result["P"]), ("examples N", result["N"]), ("checkpoints T", result["T"]),
            ("accuracy mean / std / min / max", f"{a['mean']:.4f} / {a['std']:.4f} / {a['min']:.4f} / {a['max']:.4f}"),
            ("mass at TPA=0: observed / binomial / Poisson-binomial",
             f"{g['mass0']:.4f} / {g['mass0_binomial']:.4g} / {g['mass0_poisson_binomial']:.4g}"),
            ("mass at TPA=1: observed / binomial / Poisson-binomial",
             f"{g['mass1']:.4f} / {g['mass1_binomial']:.4g} / {g['mass1_poisson_binomial']:.4g}"),
            ("TV distance to binomial / Poisson-binomial",
             f"{g['tv_binomial']:.4f} / {g['tv_poisson_binomial']:.4f}"),
            ("over-dispersion rho", f"{g['rho']:.4f}"), ("Fleiss kappa", f"{g['fleiss_kappa']:.4f}"),
            ("mean pairwise error-consistency kappa", f"{k['mean']:.4f}")]
    if result["split_half"]:
        rows.append(("split-half Spearman of accessibility (Spearman-Brown)",
                     f"{result['split_half']['r']:.4f} ({result['split_half']['spearman_brown']:.4f})"))
        rows.append(("mean pairwise Spearman of per-network speed", f"{result['pairwise_spearman']['mean']:.4f}"))
    table = "".join(f"<tr><td>{html.escape(str(a_))}</td><td>{html.escape(str(b_))}</td></tr>" for a_, b_ in rows)
    imgs = "".join(f"<h2>{html.escape(t)}</h2><img src='{src}'>" for t, src in figures)
    title = f"fastpop: {run.config.arch} on {run.config.dataset}, {result['split']} split"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td{padding:2px 12px}"
            "img{max-width:100%}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(str(run.path))}</p><table>{table}</table>"
            f"{imgs}</body></html>\n")


def write_compare_figure(result: dict, folder: Path) -> str:
    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.scatter(result["arrays"]["accessibility_a"], result["arrays"]["accessibility_b"], s=4, alpha=0.5)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.set(xlabel=f"accessibility in {Path(result['a']).name}", ylabel=f"accessibility in {Path(result['b']).name}",
           title=f"Spearman {result['spearman_accessibility']:.3f}")
    return _save(fig, folder, "compare_accessibility")
