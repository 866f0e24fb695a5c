"""`fastpop experiment paper`: the study of "All Neural Networks are Created Equal" in one command.

Populations (all the same size, digits by default): mlp, small-cnn and wide-cnn; small-cnn on randomly permuted
train labels (the breakdown case); small-cnn trained on the first half of the classes and tested on the other half
(out-of-sample: only predictions can agree). One report compares them: TP-agreement against the nulls per
population, cross-architecture Spearman and containment, the breakdown case, the out-of-sample consensus.
Re-running the command reuses finished populations and resumes interrupted ones; a population trained with other
settings (networks, epochs, data set) is refused, never reused.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np

from . import metrics as M
from .analysis import analyze, compare
from .config import Config
from .errors import UsageError
from .run import Run
from .trainer import resume, train

ARCHS = ("mlp", "small-cnn", "wide-cnn")
# The random-label study needs networks that fit their random train labels, as the paper's do: on digits (1,438
# train images) two dense layers of 128 without weight decay reach train accuracy 0.9999 in 100 epochs, where
# small-cnn stays near 0.40 after 60 (8 networks each, measured on a 2-core EPYC).
RANDOM_LABELS = dict(arch="d128-d128", labels="random", weight_decay=0.0, record=["pred"])
RANDOM_LABEL_EPOCHS_PER_EPOCH = 10  # random-label epochs per epoch of the other populations
HALVES = {"digits": ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9]), "cifar10": ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9]),
          "mnist": ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9]), "fashion-mnist": ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])}


def populations(dataset: str, nets: int, epochs: int | None, data_dir: str | None) -> dict[str, dict]:
    if dataset not in HALVES:
        raise UsageError(f"experiment paper runs on {', '.join(HALVES)}, not {dataset!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise UsageError(f"--epochs must be a positive integer, got {epochs!r}")
    base = dict(dataset=dataset, seeds=nets, data_dir=data_dir, **({"epochs": epochs} if epochs is not None else {}))
    seen, unseen = HALVES[dataset]
    pops = {arch: dict(base, arch=arch) for arch in ARCHS}
    pops["random-labels"] = dict(base, **RANDOM_LABELS,
                                 epochs=RANDOM_LABEL_EPOCHS_PER_EPOCH * (epochs if epochs is not None else Config.epochs))
    pops["out-of-sample"] = dict(base, arch="small-cnn", classes=seen, test_classes=unseen)
    return pops


def paper(out: str | Path, dataset: str = "digits", nets: int = 100, epochs: int | None = None,
          data_dir: str | None = None, progress=None) -> Path:
    """Train (or reuse) every population under `out`, then write out/report.html and out/summary.json."""
    out = Path(out)
    pops = populations(dataset, nets, epochs, data_dir)
    configs = {name: Config(**kw, out=str(out / name)) for name, kw in pops.items()}  # validate all first
    t0 = time.perf_counter()
    runs = {}
    for name, config in configs.items():
        path = out / name
        if (path / "run.json").exists():
            run = Run(path)
            _check_same_population(run, config)
            runs[name] = run if run.status == "complete" else resume(path, progress)
        else:
            out.mkdir(parents=True, exist_ok=True)
            runs[name] = train(config, progress)
    summary = summarize(runs)
    summary["wall_s_this_session"] = time.perf_counter() - t0
    summary["command"] = f"fastpop experiment paper --out {out} --dataset {dataset} --nets {nets}" + (
        f" --epochs {epochs}" if epochs is not None else "")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    figures = draw(runs, summary, out)
    path = out / "report.html"
    path.write_text(_html(summary, figures))
    return path


# settings that may differ between the population on disk and the request: they never change its record
_FREE = ("out", "device", "max_nets_per_chunk", "cuda_graphs", "backend")


def _check_same_population(run: Run, config: Config) -> None:
    have = {k: v for k, v in run.manifest["config"].items() if k not in _FREE}
    want = {k: v for k, v in config.to_dict().items() if k not in _FREE}
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diff:
        shown = ", ".join(f"{k} {have.get(k)!r} (asked {want.get(k)!r})" for k in diff[:4])
        raise UsageError(f"{run.path} holds a population trained with other settings: {shown}; give another --out "
                         "or remove it")


def summarize(runs: dict[str, Run]) -> dict:
    rows = {}
    for name, run in runs.items():
        if name == "out-of-sample":
            continue
        for split in ("test", "train") if name == "random-labels" else ("test",):
            r = analyze(run, split).to_json()
            g = r["agreement"]
            rows[f"{name} ({split})"] = {
                "networks": r["P"], "examples": r["N"], "mean_accuracy": r["accuracy"]["mean"],
                "mass1": g["mass1"], "mass1_null": g["mass1_poisson_binomial"], "mass0": g["mass0"],
                "mass0_null": g["mass0_poisson_binomial"], "tv_null": g["tv_poisson_binomial"], "rho": g["rho"],
                "fleiss_kappa": g["fleiss_kappa"], "mean_pairwise_kappa": r["kappa"]["mean"],
                "split_half_spearman": r["split_half"]["spearman_brown"] if r["split_half"] else None}
    pairs = {}
    for a, b in (("mlp", "small-cnn"), ("small-cnn", "wide-cnn"), ("mlp", "wide-cnn")):
        c = compare([runs[a], runs[b]]).pairs[0]
        pairs[f"{a} vs {b}"] = {"spearman_accessibility": c["spearman_accessibility"], "weaker": Path(c["weaker"]).name,
                                "weak_learned_also_by_strong": c["weak_learned_also_by_strong"],
                                "strong_learned_also_by_weak": c["strong_learned_also_by_weak"]}
    oos = analyze(runs["out-of-sample"], "test").to_json()
    return {"populations": rows, "cross_architecture": pairs,
            "out_of_sample": {"networks": oos["P"], "examples": oos["N"], **oos.get("consensus", {})}}


def draw(runs: dict[str, Run], summary: dict, out: Path) -> list[tuple[str, str]]:
    from .report import _plt, _save

    plt = _plt()
    names = [n for n in runs if n != "out-of-sample"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names):
        run = runs[name]
        p = len(run.seeds)
        counts = M.tpa_counts(run.bits("test")[-1:], run.n("test")).counts[0]
        acc = M.accuracy(run.bits("test")[-1:], run.n("test")).values[0]
        k = np.arange(p + 1) / p
        ax.stairs(np.bincount(counts, minlength=p + 1) / len(counts), np.arange(p + 2) / p - 0.5 / p, fill=True,
                  label="observed")
        ax.plot(k, M.poisson_binomial_pmf(acc), "--", color="tab:red", label="independent-error null")
        ax.set(title=f"{name}: {run.config.dataset}, test, P = {p}", xlabel="TP-agreement", yscale="log",
               ylim=(1e-4, 1))
    axes[0][0].set_ylabel("fraction of examples")
    axes[0][0].legend(fontsize=7)
    figures = [("TP-agreement at the end of training, against the Poisson-binomial null",
                _save(fig, out, "tpa_by_population"))]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), layout="constrained")
    for ax, (a, b) in zip(axes, (("mlp", "small-cnn"), ("small-cnn", "wide-cnn"), ("mlp", "wide-cnn"))):
        n = runs[a].n("test")  # ranks show the agreement of orders that raw accessibility crowds near 1
        ax.scatter(M.rank(M.accessibility(runs[a]).values) / n, M.rank(M.accessibility(runs[b]).values) / n, s=4,
                   alpha=0.5)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        rho = summary["cross_architecture"][f"{a} vs {b}"]["spearman_accessibility"]
        ax.set(xlabel=f"accessibility rank / N, {a} (P = {len(runs[a].seeds)})",
               ylabel=f"accessibility rank / N, {b} (P = {len(runs[b].seeds)})", title=f"Spearman {rho:.3f}")
    fig.suptitle(f"Learning order across architectures: {runs['mlp'].config.dataset}, test split, N = {n}")
    figures.append(("Learning order across architectures (test examples)", _save(fig, out, "order_across_archs")))
    labels = runs["out-of-sample"].predictions()
    if labels is not None:
        from .report import draw_consensus

        oos = summary["out_of_sample"]
        figures.append(("Out-of-sample: agreement of predictions on classes never trained on", draw_consensus(
            M.consensus_agreement(np.asarray(labels[-1:])).agreement[0], oos.get("chance"),
            f"{runs['out-of-sample'].config.arch}, {runs['out-of-sample'].config.dataset} unseen classes, "
            f"P = {oos['networks']}", out,
            "out_of_sample_consensus")))
    return figures


def _html(summary: dict, figures: list[tuple[str, str]]) -> str:
    def table(rows: dict) -> str:
        cols = list(next(iter(rows.values())))
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["", *cols])
        body = "".join("<tr><td>" + html.escape(name) + "</td>" + "".join(
            f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>" for v in r.values())
                       + "</tr>" for name, r in rows.items())
        return f"<table border=1 cellspacing=0><tr>{head}</tr>{body}</table>"

    oos = summary["out_of_sample"]
    imgs = "".join(f"<h2>{html.escape(t)}</h2><img src='{src}'>" for t, src in figures)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>fastpop: the paper's study</title>"
            "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}td,th{padding:2px 8px}"
            "img{max-width:100%}</style></head><body><h1>All neural networks are created equal: fastpop</h1>"
            f"<p><code>{html.escape(summary['command'])}</code></p>"
            f"<h2>Agreement per population (final checkpoint)</h2>{table(summary['populations'])}"
            f"<h2>Across architectures</h2>{table(summary['cross_architecture'])}"
            f"<p>Out-of-sample: {oos['networks']} networks on {oos['examples']} images of unseen classes; mean "
            f"agreement with the plurality prediction {oos.get('mean', float('nan')):.3f}.</p>{imgs}</body></html>\n")
