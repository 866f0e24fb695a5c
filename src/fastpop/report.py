"""Figures (PNG and SVG) and report.html for a run, rendered from an Analysis; and the figure of `fastpop compare`.

Every figure names the run it shows (arch, data, split, P) in its title, uses constrained layout, and marks
epochs with integer ticks.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from . import metrics as M
from .analysis import Analysis, Comparison, analyze, current_analysis, default_report_out, labels, out_folder
from .run import Run
from .rundir import SPLITS

SPLIT_COLORS = {"train": "tab:blue", "test": "tab:orange"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, folder: Path, name: str) -> str:
    for ext in ("png", "svg"):
        fig.savefig(folder / f"{name}.{ext}", dpi=110)
    _plt().close(fig)
    return f"{name}.png"


def _epoch(e: float) -> str:
    return f"{e:g}" if float(e).is_integer() else f"{e:.2f}"


def _no_minor_ticks(axis) -> None:
    from matplotlib.ticker import NullLocator

    axis.set_minor_locator(NullLocator())


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def write_report(run: Run, split: str = "test", out: str | Path | None = None,
                 checkpoint: int = -1) -> tuple[Path, bool]:
    """The figures and report.html in `out` (default: report-NAME-SPLIT-HASH in the current folder), with the
    analysis saved beside them. A current analysis of the same record, saved in `out` or in the run directory,
    is reused instead of recomputed. Returns (html path, whether an analysis was reused)."""
    folder = Path(out) if out is not None else default_report_out(run, split)
    run.require_checkpoint()
    result = current_analysis(run, split, checkpoint, [folder, run.path])
    reused = result is not None
    if result is None:
        result = analyze(run, split, checkpoint)
    accuracy = {s: np.asarray(run.accuracy(s), np.float64) for s in SPLITS}  # read before anything is written
    out_folder(folder)
    if not reused or Analysis.load(folder, split) is None:
        result.save(folder)
    figures = draw_run(run, result, accuracy, folder)
    path = folder / "report.html"
    path.write_text(_html(run, result, figures))
    return path, reused


def class_null(bits: np.ndarray, index: np.ndarray) -> np.ndarray:
    """float64 [P + 1]: the class-conditional null of one checkpoint's packed bits [P, R] (examples' classes
    index [N])."""
    correct = M.unpack(np.asarray(bits), len(index))
    pmfs = M.poisson_binomial_pmfs(M.class_accuracy(correct, index, index.max() + 1).T)
    return (np.bincount(index) / len(index)) @ pmfs


def draw_run(run: Run, result: Analysis, accuracy: dict, folder: Path) -> list[tuple[str, str]]:
    plt = _plt()
    ident, arrays = result.identity, result.arrays
    p, n, t_done = ident["P"], ident["N"], ident["T"]
    epochs = [c["epoch"] for c in run.checkpoints]
    counts = np.rint(arrays["tpa"] * p).astype(np.int64)
    acc = accuracy[ident["split"]]
    figures = []

    picks = sorted({0, t_done // 2, t_done - 1})
    found = labels(run, ident["split"]) if result.class_conditional is not None else None
    index = M.class_index(found, n)[1] if found is not None else None
    bits = run.bits(ident["split"])
    fig, axes = plt.subplots(1, len(picks), figsize=(4.2 * len(picks), 3.6), squeeze=False, layout="constrained")
    k = np.arange(p + 1) / p
    for ax, t in zip(axes[0], picks):
        edges = np.arange(p + 2) / p - 0.5 / p  # one filled outline, not P + 1 bars: 1.5 s less at P = 1000
        ax.stairs(np.bincount(counts[t], minlength=p + 1) / n, edges, fill=True, color="tab:blue", label="observed")
        # One null curve: the binomial null (every network at the mean accuracy) lies on or near this one, and
        # drawn together they read as one curve with two names; the table gives both nulls' masses.
        ax.plot(k, M.poisson_binomial_pmf(acc[t]), "--", color="tab:red",
                label="independent-error null (Poisson-binomial: each network's own accuracy)")
        if index is not None:
            ax.plot(k, class_null(bits[t], index), ":", color="black",
                    label="class-conditional null (each network's accuracy on each class)")
        ax.set(title=f"checkpoint {t} (epoch {_epoch(epochs[t])})", xlabel="TP-agreement", yscale="log",
               ylim=(max(1 / (10 * n), 1e-6), 1))
        _no_minor_ticks(ax.yaxis)  # log minor ticks took ~0.4 s of the figure's 1.1 s to draw
    axes[0][0].set_ylabel("fraction of examples")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(f"TP-agreement against the independent-error null: {result.title}")
    figures.append(("TP-agreement against independent-error nulls", _save(fig, folder, "tpa_histograms")))

    fig, ax = plt.subplots(figsize=(6, 3.8), layout="constrained")
    for s in SPLITS:
        a = accuracy[s]
        lo, hi = np.percentile(a, [10, 90], axis=1)
        ax.fill_between(epochs, lo, hi, color=SPLIT_COLORS[s], alpha=0.2, lw=0)
        for edge in (lo, hi):  # the band's own edges, so overlapping bands stay readable
            ax.plot(epochs, edge, color=SPLIT_COLORS[s], lw=0.6, ls=":")
        ax.plot(epochs, a.mean(1), color=SPLIT_COLORS[s], label=f"{s}: mean, 10-90% of networks")
    _integer_ticks(ax.xaxis)
    ax.set(xlabel="epoch", ylabel="accuracy", title=f"Accuracy of every network\n{run.config.arch} on "
           f"{ident['dataset']}, P = {p}")
    ax.legend(fontsize=8)
    figures.append(("Accuracy of every network", _save(fig, folder, "accuracy_band")))

    fig, ax = plt.subplots(figsize=(5.4, 3.6), layout="constrained")
    ax.hist(arrays["accessibility"], bins=40, color="tab:purple", histtype="stepfilled")
    ax.set(xlabel="accessibility (mean correctness over checkpoints and networks)", ylabel="examples",
           title=f"Accessibility\n{result.title}")
    figures.append(("Accessibility of the examples", _save(fig, folder, "accessibility")))

    fig, ax = plt.subplots(figsize=(5.4, 3.6), layout="constrained")
    kap = result.kappa
    if kap.get("histogram"):
        edges = np.asarray(kap["edges"])
        ax.stairs(kap["histogram"], edges, fill=True, color="tab:brown")
    ax.set(xlabel="error consistency kappa (network pairs)", ylabel="pairs",
           title=f"Error consistency at checkpoint {ident['checkpoint']}\n{result.title}")
    figures.append(("Pairwise error consistency", _save(fig, folder, "kappa")))

    fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    order = np.argsort(-arrays["accessibility"], kind="stable")
    im = ax.imshow(arrays["tpa"][:, order], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ticks = sorted({0, t_done // 2, t_done - 1})
    ax.set_yticks(ticks, [_epoch(epochs[t]) for t in ticks])
    ax.set(xlabel="examples, most accessible first", ylabel="epoch",
           title=f"TP-agreement over training\n{result.title}")
    fig.colorbar(im, ax=ax, label="TP-agreement")
    figures.append(("TP-agreement over training", _save(fig, folder, "tpa_heatmap")))

    if "consensus" in arrays and "consensus" in result.extra:
        figures.append(("Agreement of predicted labels", draw_consensus(
            arrays["consensus"][ident["checkpoint"]], result.extra["consensus"].get("chance"), result.title,
            folder, chance_own=result.extra["consensus"].get("chance_own_frequencies"))))
    if "confidence" in arrays:
        figures.append(("Data map: dataset cartography", draw_data_map(arrays, result.title, folder)))
    gallery = draw_gallery(run, result, folder)
    if gallery:
        figures.append(("Hardest and easiest examples per class", gallery))
    if "aum" in arrays:
        fig, ax = plt.subplots(figsize=(5.4, 3.6), layout="constrained")
        ax.hist(arrays["aum"][np.isfinite(arrays["aum"])], bins=40, color="tab:olive", histtype="stepfilled")
        ax.axvline(0, color="black", lw=0.8)
        ax.set(xlabel="area under the margin (mean margin over checkpoints and networks)", ylabel="examples",
               title=f"Area under the margin\n{result.title}")
        figures.append(("Area under the margin", _save(fig, folder, "aum")))
    return figures


GALLERY_CLASSES, GALLERY_EACH = 10, 4


def draw_gallery(run: Run, result: Analysis, folder: Path) -> str | None:
    """For up to GALLERY_CLASSES classes, the GALLERY_EACH least and most accessible examples as images, each with
    its accessibility and, where predictions were recorded, the plurality prediction. None (no figure) when the
    images cannot be loaded again here (a data set given in memory, files moved) or are not images."""
    from .errors import UsageError

    split = result.identity["split"]
    try:
        x, labels, _ = run.examples(split)
    except UsageError:
        return None
    if x.shape[2] * x.shape[3] < 4 or x.shape[1] not in (1, 3):
        return None
    access = result.arrays["accessibility"]
    preds = run.predictions(split)
    plurality = None if preds is None else np.asarray(preds[-1])
    classes = [c for c in np.unique(labels) if c >= 0][:GALLERY_CLASSES]
    plt = _plt()
    fig, axes = plt.subplots(len(classes), 2 * GALLERY_EACH, figsize=(2 * GALLERY_EACH * 1.1, len(classes) * 1.25),
                             squeeze=False, layout="constrained")
    for row, c in zip(axes, classes):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(access[members], kind="stable")]
        picks = list(order[:GALLERY_EACH]) + list(order[::-1][:GALLERY_EACH][::-1])
        for ax, n in zip(row, picks):
            img = x[n].astype(np.float64)
            img = (img - img.min()) / max(img.max() - img.min(), 1e-12)
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", interpolation="nearest")
            caption = f"{access[n]:.2f}"
            if plurality is not None:
                caption += f" → {np.bincount(plurality[:, n]).argmax()}"
            ax.set_title(caption, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"class {c}", fontsize=8)
    fig.suptitle(f"Hardest (left) and easiest (right) examples per class: accessibility"
                 f"{' → plurality prediction' if plurality is not None else ''}\n{result.title}", fontsize=9)
    return _save(fig, folder, "gallery")


def draw_data_map(arrays: dict, title: str, folder: Path) -> str:
    """Confidence against variability per example (Swayamdipta et al. 2020), coloured by correctness."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.4, 4.4), layout="constrained")
    points = ax.scatter(arrays["variability"], arrays["confidence"], c=arrays["accessibility"], s=4, cmap="coolwarm_r",
                        vmin=0, vmax=1)
    fig.colorbar(points, ax=ax, label="correctness (fraction of checkpoints and networks right)")
    ax.set(xlabel="variability (std over checkpoints of p(true class))",
           ylabel="confidence (mean p(true class))", title=f"Data map\n{title}")
    return _save(fig, folder, "data_map")


def draw_consensus(agreement: np.ndarray, chance: float | None, title: str, folder: Path,
                   name: str = "consensus", chance_own: float | None = None) -> str:
    """Histogram of the plurality agreement per example, with its mean and two levels of chance: independent
    uniform guesses, and independent guesses from each network's own label frequencies."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.4, 3.6), layout="constrained")
    ax.hist(agreement, bins=20, range=(0, 1), color="tab:cyan", histtype="stepfilled")
    ax.axvline(float(np.mean(agreement)), color="tab:blue", lw=1.5, label=f"mean ({np.mean(agreement):.2f})")
    if chance is not None:
        ax.axvline(chance, color="black", ls="--", lw=1, label=f"chance: independent uniform guesses ({chance:.2f})")
    if chance_own is not None:
        ax.axvline(chance_own, color="black", ls=":", lw=1.2,
                   label=f"chance: each network's own label frequencies ({chance_own:.2f})")
    ax.legend(fontsize=7)
    ax.set(xlabel="fraction of networks agreeing with the plurality label", ylabel="examples",
           title=f"Agreement of predictions\n{title}")
    return _save(fig, folder, name)


def _html(run: Run, result: Analysis, figures: list[tuple[str, str]]) -> str:
    rows = summary_rows(result)
    table = "".join(f"<tr><td>{html.escape(str(a_))}</td><td>{html.escape(str(b_))}</td></tr>" for a_, b_ in rows)
    imgs = "".join(f"<h2>{html.escape(t)}</h2><img src='{src}'>" for t, src in figures)
    title = f"fastpop: {result.title}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td{padding:2px 12px}"
            "img{max-width:100%}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(str(run.path))}</p><table>{table}</table>"
            f"{DEFINITIONS}{imgs}</body></html>\n")


DEFINITIONS = (
    "<h2>Definitions, and how they relate to the paper's</h2><ul>"
    "<li><b>TP-agreement</b> and <b>accessibility</b> are the paper's (Hacohen, Choshen and Weinshall, ICML 2020): "
    "the fraction of networks right on an example at one checkpoint, and mean correctness over checkpoints and "
    "networks.</li>"
    "<li><b>Nulls</b>: the paper's binomial (every network at the mean accuracy); added here, the Poisson-binomial "
    "(each network at its own accuracy) and the class-conditional null (each network at its own accuracy on each "
    "class, mixed by class frequency), whose excess is agreement beyond the classes' difficulty.</li>"
    "<li><b>Additions, not in the paper</b>: over-dispersion rho and Fleiss' kappa, overall and within classes; "
    "pairwise error consistency; split-half as the mean Spearman-Brown over 20 random splits of the networks; the "
    "chance levels of plurality agreement; forgetting, C-score and the margin scores; and the 95% intervals: "
    "seeded percentile bootstrap, over examples for the masses at TPA 0 and 1 (copies of a network drawn twice would "
    "inflate them), over networks and over examples for the others.</li></ul>")


def _ci(interval) -> str:
    """A 95% interval as "[lo, hi]" ("" when there is none)."""
    if not interval or interval[0] is None or not np.isfinite(interval).all():
        return ""
    return f" [{interval[0]:.3g}, {interval[1]:.3g}]"


def _units(intervals: dict | None, key: str) -> tuple[str, str]:
    """(label suffix, value suffix) for the 95% intervals of one statistic over networks and over examples, where
    computed: (" [95% CI: networks; examples]", " [lo, hi; lo, hi]")."""
    if not intervals:
        return "", ""
    units = [u for u in ("networks", "examples") if key in intervals.get(u, {}) and _ci(intervals[u][key])]
    if not units:
        return "", ""
    values = "; ".join(_ci(intervals[u][key]).strip()[1:-1] for u in units)
    return f" [95% CI over {'; '.join(units)}]", f" [{values}]"


def _with_ci(name: str, value: float, intervals: dict | None, key: str) -> tuple[str, str]:
    label, ci = _units(intervals, key)
    return f"{name}{label}", f"{value:.4f}{ci}"


def summary_rows(result: Analysis) -> list[tuple[str, str]]:
    """(measure, value) rows of an Analysis, shared by the console and the html report. Intervals are 95%
    percentile bootstrap intervals over networks and over examples (metrics.bootstrap)."""
    i, a, g, k = result.identity, result.accuracy, result.agreement, result.kappa
    f, cc, iv = result.forgetting, result.class_conditional, result.intervals
    nulls = "binomial / Poisson-binomial" + (" / class-conditional" if cc else "")
    rows = [("run", i["run"]), ("networks P / examples N / checkpoints T", f"{i['P']} / {i['N']} / {i['T']}"),
            ("checkpoint (epoch)", f"{i['checkpoint']} ({_epoch(i['epoch'])})"),
            ("accuracy mean (std, min, max)", f"{a['mean']:.4f} ({a['std']:.4f}, {a['min']:.4f}, {a['max']:.4f})")]
    for m in ("0", "1"):
        null = f"{g[f'mass{m}_binomial']:.3g} / {g[f'mass{m}_poisson_binomial']:.3g}" + (
            f" / {cc[f'mass{m}_class_conditional']:.3g}" if cc else "")
        label, ci = _units(iv, f"mass{m}")
        rows.append((f"mass at TPA = {m}: observed{label} / {nulls}",
                     f"{g[f'mass{m}']:.4f} ({g[f'count{m}']} of {g['N']}){ci} / {null}"))
    rows += [(f"TV distance to {nulls}", f"{g['tv_binomial']:.4f} / {g['tv_poisson_binomial']:.4f}"
              + (f" / {cc['tv_class_conditional']:.4f}" if cc else "")),
             _with_ci("over-dispersion rho", g["rho"], iv, "rho"),
             _with_ci("Fleiss kappa", g["fleiss_kappa"], iv, "fleiss_kappa")]
    if cc:
        rows += [_with_ci("within-class rho", cc["rho_within_class"], iv, "rho_within_class"),
                 _with_ci("within-class Fleiss kappa", cc["kappa_within_class"], iv, "kappa_within_class")]
    rows += [(f"mean pairwise error-consistency kappa ({k['networks']} networks, {k['pairs']} pairs)",
              f"{k['mean']:.4f}"),
             ("forgetting events (all networks); network-example pairs never learned",
              f"{f['events']}; {f['never_learned_pairs']} of {f['pairs']}")]
    if result.split_half:
        sh, pw = result.split_half, result.pairwise_spearman
        ci = _ci(sh.get("spearman_brown_interval"))
        rows.append((f"split-half Spearman-Brown of accessibility: mean over {sh.get('splits', 1)} random splits "
                     f"into {sh['halves'][0]} + {sh['halves'][1]} (sd over splits)"
                     + (" [95% CI over examples]" if ci else ""),
                     f"{sh['spearman_brown']:.4f} ({sh.get('spearman_brown_std', float('nan')):.4f}){ci}"))
        rows.append((f"mean pairwise Spearman of per-network speed ({pw['defined_pairs']} of {pw['pairs']} pairs "
                     "defined)", f"{pw['mean']:.4f}"))
    extra = result.extra
    if "consensus" in extra:
        c = extra["consensus"]
        chance = f"; chance: uniform guesses {c['chance']:.4f}" if c.get("chance") is not None else ""
        if c.get("chance_own_frequencies") is not None:
            chance += f", each network's own label frequencies {c['chance_own_frequencies']:.4f}"
        rows.append(("agreement with the plurality prediction" + (" [95% CI over examples]" if c.get("interval")
                                                                   else ""),
                     f"{c['mean']:.4f}{_ci(c.get('interval'))}{chance}"))
    if extra.get("cscore_mean") is not None:
        rows.append(("mean C-score (held-out networks' accuracy)", f"{extra['cscore_mean']:.4f}"))
    if extra.get("diverged"):
        d, healthy = extra["diverged"], extra["diverged"]["healthy_test_accuracy"]
        rows.append(("diverged networks (counted wrong on every example in every number here)",
                     f"{d['networks']} of {result.identity['P']} networks diverged (seeds {d['seeds'][:10]})"
                     + (f"; mean test acc of the others {healthy:.4f}" if healthy is not None else "")))
    for key, value in extra.get("margins", {}).items():
        if value is not None:
            rows.append((key.replace("_", " "), f"{value:.4f}"))
    return rows


def write_compare_figure(result: Comparison, folder: Path) -> list[str]:
    """One rank-rank plot of accessibility per pair of runs (hexbin above 2,000 examples), files named by the runs'
    positions on the command line so two runs of the same name cannot collide."""
    plt = _plt()
    out_folder(folder)
    names = []
    for pair in result.pairs:
        a, b = pair["a"], pair["b"]
        ra, rb = (M.rank(result.accessibility[i]) / result.n for i in (a, b))
        fig, ax = plt.subplots(figsize=(4.8, 4.6), layout="constrained")
        if result.n > 2000:
            ax.hexbin(ra, rb, gridsize=40, cmap="viridis", mincnt=1)
        else:
            ax.scatter(ra, rb, s=5, alpha=0.5)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        label = [f"{result.runs[i]['arch']}, P = {result.runs[i]['P']} ({Path(result.runs[i]['run']).name})"
                 for i in (a, b)]
        ax.set(xlabel=f"accessibility rank / N: {label[0]}", ylabel=f"accessibility rank / N: {label[1]}",
               title=f"Order agreement: Spearman {pair['spearman_accessibility']:.3f}\n{result.dataset}, "
               f"{result.split} split, N = {result.n}")
        names.append(_save(fig, folder, f"order_{a}_vs_{b}"))
    return names
