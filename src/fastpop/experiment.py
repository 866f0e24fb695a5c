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
from .report import _ci
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


def populations(dataset: str, nets: int, epochs: int | None, data_dir: str | None,
                random_label_epochs: int | None = None) -> dict[str, dict]:
    if dataset not in HALVES:
        raise UsageError(f"experiment paper runs on {', '.join(HALVES)}, not {dataset!r}")
    for flag, value in (("--epochs", epochs), ("--random-label-epochs", random_label_epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{flag} must be a positive integer, got {value!r}")
    if random_label_epochs is None:
        random_label_epochs = RANDOM_LABEL_EPOCHS_PER_EPOCH * (epochs if epochs is not None else Config.epochs)
    base = dict(dataset=dataset, seeds=nets, data_dir=data_dir, **({"epochs": epochs} if epochs is not None else {}))
    seen, unseen = HALVES[dataset]
    pops = {arch: dict(base, arch=arch) for arch in ARCHS}
    pops["random-labels"] = dict(base, **RANDOM_LABELS, epochs=random_label_epochs)
    pops["out-of-sample"] = dict(base, arch="small-cnn", classes=seen, test_classes=unseen)
    return pops


def paper(out: str | Path, dataset: str = "digits", nets: int = 100, epochs: int | None = None,
          data_dir: str | None = None, progress=None, random_label_epochs: int | None = None,
          draws: int = M.DRAWS, seed: int = M.SEED) -> Path:
    """Train (or reuse) every population under `out`, then write out/report.html and out/summary.json; the
    random-label population trains for `random_label_epochs` (default 10x `epochs`); `draws` bootstrap draws
    seeded with `seed` give the intervals."""
    out = Path(out)
    pops = populations(dataset, nets, epochs, data_dir, random_label_epochs)
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
    summary = summarize(runs, draws, seed)
    summary["wall_s_this_session"] = time.perf_counter() - t0
    summary["command"] = f"fastpop experiment paper --out {out} --dataset {dataset} --nets {nets}" + (
        f" --epochs {epochs}" if epochs is not None else "") + (
        f" --random-label-epochs {random_label_epochs}" if random_label_epochs is not None else "") + (
        f" --draws {draws} --seed {seed}" if (draws, seed) != (M.DRAWS, M.SEED) else "")
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


def summarize(runs: dict[str, Run], draws: int = M.DRAWS, seed: int = M.SEED) -> dict:
    """Every population's agreement on its test split (and the random-label population's on its train split, at
    the end and at the first checkpoint where its networks fit half of their random labels) with its nulls and
    95% intervals; each pair of architectures' order agreement with its chance baselines; the out-of-sample
    plurality agreement with its chance levels."""
    rows = {}
    for name, run in runs.items():
        if name == "out-of-sample":
            continue
        views = [("test", -1)]
        if name == "random-labels":
            views += [("train", -1), ("train", half_fit(run))]
        for split, t in views:
            r = analyze(run, split, t, draws=draws, seed=seed)
            label = f"{name} ({split})" if t == -1 else f"{name} ({split}, epoch {r.identity['epoch']:g}: half fit)"
            rows[label] = population_row(r)
    pairs = {}
    for a, b in (("mlp", "small-cnn"), ("small-cnn", "wide-cnn"), ("mlp", "wide-cnn")):
        pairs[f"{a} vs {b}"] = pair_row(compare([runs[a], runs[b]], draws=draws, seed=seed).pairs[0])
    oos = analyze(runs["out-of-sample"], "test", draws=draws, seed=seed)
    c = oos.extra.get("consensus", {})
    return {"populations": rows, "cross_architecture": pairs,
            "out_of_sample": {"networks": oos.identity["P"], "examples": oos.identity["N"], **c}}


def half_fit(run: Run) -> int:
    """The first checkpoint at which the mean train accuracy reaches 0.5 (the last if it never does)."""
    mean = np.asarray(run.accuracy("train"), np.float64).mean(1)
    reached = np.flatnonzero(mean >= 0.5)
    return int(reached[0]) if len(reached) else len(mean) - 1


def population_row(r) -> dict:
    """One population's headline numbers: value, 95% interval ([lo, hi], over the unit named) and nulls."""
    g, cc, iv, sh = r.agreement, r.class_conditional or {}, r.intervals or {}, r.split_half or {}
    net, ex = iv.get("networks", {}), iv.get("examples", {})
    row = {"networks": r.identity["P"], "examples": r.identity["N"], "split": r.identity["split"],
           "checkpoint": r.identity["checkpoint"], "epoch": r.identity["epoch"], "mean_accuracy": r.accuracy["mean"]}
    for m in ("1", "0"):
        row.update({f"mass{m}": g[f"mass{m}"], f"mass{m}_ci_examples": ex.get(f"mass{m}"),
                    f"mass{m}_null": g[f"mass{m}_poisson_binomial"],
                    f"mass{m}_class_null": cc.get(f"mass{m}_class_conditional")})
    row["tv_class_null"] = cc.get("tv_class_conditional")
    for key, value in (("rho", g["rho"]), ("fleiss_kappa", g["fleiss_kappa"]),
                       ("rho_within_class", cc.get("rho_within_class")),
                       ("kappa_within_class", cc.get("kappa_within_class"))):
        row.update({key: value, f"{key}_ci_networks": net.get(key), f"{key}_ci_examples": ex.get(key)})
    row.update(split_half_spearman=None, split_half_sd=None, split_half_spearman_ci_examples=None)
    if r.identity["checkpoint"] == r.identity["T"] - 1:  # split-half ranks accessibility over all checkpoints
        row.update(split_half_spearman=sh.get("spearman_brown"), split_half_sd=sh.get("spearman_brown_std"),
                   split_half_spearman_ci_examples=sh.get("spearman_brown_interval"))
    if "consensus" in r.extra:
        c = r.extra["consensus"]
        row.update(plurality_agreement=c["mean"], plurality_agreement_ci_examples=c.get("interval"),
                   plurality_chance_uniform=c.get("chance"), plurality_chance_own=c.get("chance_own_frequencies"))
    return row


def pair_row(c: dict) -> dict:
    null, within = c["spearman_permutation_null"], c.get("spearman_permutation_null_within_class", {})
    iv, civ, exp = c.get("spearman_interval", {}), c.get("containment_interval", {}), c["containment_expected"]
    return {"spearman_accessibility": c["spearman_accessibility"],
            "spearman_accessibility_ci_examples": iv.get("examples"),
            "spearman_accessibility_ci_networks": iv.get("networks"), "spearman_null_q975": null["null_q975"],
            "spearman_null_within_class_mean": within.get("null_mean"),
            "spearman_null_within_class_q975": within.get("null_q975"), "weaker": Path(c["weaker"]).name,
            "weak_learned_also_by_strong": c["weak_learned_also_by_strong"],
            "weak_learned_also_by_strong_ci_networks": civ.get("networks", {}).get("weak_learned_also_by_strong"),
            "weak_learned_also_by_strong_ci_examples": civ.get("examples", {}).get("weak_learned_also_by_strong"),
            "containment_expected": exp["weak_learned_also_by_strong"],
            "containment_expected_within_class": exp.get("weak_learned_also_by_strong_within_class"),
            "strong_learned_also_by_weak": c["strong_learned_also_by_weak"]}


def draw(runs: dict[str, Run], summary: dict, out: Path) -> list[tuple[str, str]]:
    from .analysis import labels
    from .report import _plt, _save, class_null

    plt = _plt()
    views = [(name.split(" (")[0], name, row) for name, row in summary["populations"].items()]
    fig, axes = plt.subplots(1, len(views), figsize=(3.4 * len(views), 3.6), squeeze=False, layout="constrained")
    for ax, (pop, name, row) in zip(axes[0], views):
        run, split, t = runs[pop], row["split"], row["checkpoint"]
        correct = M.unpack(np.asarray(run.bits(split)[t]), run.n(split))
        p, counts = len(correct), correct.sum(0)
        k = np.arange(p + 1) / p
        ax.stairs(np.bincount(counts, minlength=p + 1) / len(counts), np.arange(p + 2) / p - 0.5 / p, fill=True,
                  label="observed")
        ax.plot(k, M.poisson_binomial_pmf(correct.mean(1)), "--", color="tab:red",
                label="independent errors (each network's accuracy)")
        found = labels(run, split)
        if found is not None:
            ax.plot(k, class_null(run.bits(split)[t], M.class_index(found, run.n(split))[1]), ":", color="black",
                    label="independent errors within classes (class-conditional)")
        ax.set(title=name, xlabel="TP-agreement", yscale="log", ylim=(1e-4, 1))
        ax.title.set_fontsize(8)
    axes[0][0].set_ylabel("fraction of examples")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    figures = [("TP-agreement against the independent-error nulls", _save(fig, out, "tpa_by_population"))]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), layout="constrained")
    for ax, (a, b) in zip(axes, (("mlp", "small-cnn"), ("small-cnn", "wide-cnn"), ("mlp", "wide-cnn"))):
        n = runs[a].n("test")  # ranks show the agreement of orders that raw accessibility crowds near 1
        ax.scatter(M.rank(M.accessibility(runs[a]).values) / n, M.rank(M.accessibility(runs[b]).values) / n, s=4,
                   alpha=0.5)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        row = summary["cross_architecture"][f"{a} vs {b}"]
        ax.set(xlabel=f"accessibility rank / N, {a} (P = {len(runs[a].seeds)})",
               ylabel=f"accessibility rank / N, {b} (P = {len(runs[b].seeds)})",
               title=f"Spearman {row['spearman_accessibility']:.3f}{_ci(row['spearman_accessibility_ci_examples'])}\n"
                     f"within-class permutation null: 97.5% at {row['spearman_null_within_class_q975'] or 0:.3f}")
        ax.title.set_fontsize(9)
    fig.suptitle(f"Learning order across architectures: {runs['mlp'].config.dataset}, test split, N = {n}")
    figures.append(("Learning order across architectures (test examples)", _save(fig, out, "order_across_archs")))
    labels_oos = runs["out-of-sample"].predictions()
    if labels_oos is not None:
        from .report import draw_consensus

        oos = summary["out_of_sample"]
        figures.append(("Out-of-sample: agreement of predictions on classes never trained on", draw_consensus(
            M.consensus_agreement(np.asarray(labels_oos[-1:])).agreement[0], oos.get("chance"),
            f"{runs['out-of-sample'].config.arch}, {runs['out-of-sample'].config.dataset} unseen classes, "
            f"P = {oos['networks']}", out, "out_of_sample_consensus", oos.get("chance_own_frequencies"))))
    return figures


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    for unit in ("examples", "networks"):
        text += _ci(row.get(f"{key}_ci_{unit}"))
    return text


# Cells show the value, then its 95% intervals: [over examples] [over networks], where computed.
POPULATION_COLUMNS = (("mean accuracy", "mean_accuracy"), ("TPA=1 [CI examples]", "mass1"),
                      ("null: Poisson-binomial", "mass1_null"), ("null: class-conditional", "mass1_class_null"),
                      ("TPA=0 [CI examples]", "mass0"), ("class-conditional null", "mass0_class_null"),
                      ("rho [CI examples] [CI networks]", "rho"),
                      ("within-class rho [CI examples] [CI networks]", "rho_within_class"),
                      ("within-class kappa [CI examples] [CI networks]", "kappa_within_class"),
                      ("split-half (all checkpoints), mean of 20 [CI examples]", "split_half_spearman"),
                      ("split-half sd over splits", "split_half_sd"),
                      ("plurality agreement [CI examples]", "plurality_agreement"),
                      ("its chance: own label frequencies", "plurality_chance_own"))
PAIR_COLUMNS = (("Spearman [CI examples] [CI networks]", "spearman_accessibility"),
                ("permutation null 97.5%", "spearman_null_q975"),
                ("within-class permutation null: mean", "spearman_null_within_class_mean"),
                ("within-class null 97.5%", "spearman_null_within_class_q975"), ("weaker", "weaker"),
                ("containment [CI examples] [CI networks]", "weak_learned_also_by_strong"),
                ("expected: independent overlap", "containment_expected"),
                ("expected: within classes", "containment_expected_within_class"))


def _html(summary: dict, figures: list[tuple[str, str]]) -> str:
    def table(rows: dict, columns) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["", *(c for c, _ in columns)])
        body = "".join("<tr><td>" + html.escape(name) + "</td>" + "".join(
            f"<td>{html.escape(_cell(r, key))}</td>" for _, key in columns) + "</tr>" for name, r in rows.items())
        return f"<table border=1 cellspacing=0><tr>{head}</tr>{body}</table>"

    oos = summary["out_of_sample"]
    chance = (f"; chance: uniform guesses {oos['chance']:.3f}, each network guessing from its own label "
              f"frequencies {oos['chance_own_frequencies']:.3f}") if oos.get("chance") is not None else ""
    imgs = "".join(f"<h2>{html.escape(t)}</h2><img src='{src}'>" for t, src in figures)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>fastpop: the paper's study</title>"
            "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}td,th{padding:2px 8px;font-size:90%}"
            "img{max-width:100%}</style></head><body><h1>All neural networks are created equal: fastpop</h1>"
            f"<p><code>{html.escape(summary['command'])}</code></p>{DEFINITIONS}"
            f"<h2>Agreement per population</h2>{table(summary['populations'], POPULATION_COLUMNS)}"
            f"<h2>Across architectures</h2>{table(summary['cross_architecture'], PAIR_COLUMNS)}"
            f"<p>Out-of-sample: {oos['networks']} networks on {oos['examples']} images of unseen classes; mean "
            f"agreement with the plurality prediction {oos.get('mean', float('nan')):.3f}"
            f"{_ci(oos.get('interval'))}{chance}.</p>{imgs}</body></html>\n")


DEFINITIONS = (
    "<h2>Definitions, and how they relate to the paper's</h2><ul>"
    "<li><b>TP-agreement</b> (the paper's): the fraction of networks right on an example, at one checkpoint.</li>"
    "<li><b>Accessibility</b> (the paper's): mean correctness over checkpoints and networks.</li>"
    "<li><b>Nulls</b>: the paper compares TPA with a binomial (every network at the mean accuracy); fastpop adds "
    "the Poisson-binomial (each network at its own accuracy) and the <b>class-conditional</b> null (each network "
    "at its own accuracy on each class, mixed by class frequency): agreement beyond it is example-level, not the "
    "classes' difficulty.</li>"
    "<li>Additions (not in the paper): over-dispersion rho and Fleiss' kappa, overall and within classes; split-half "
    "as the mean Spearman-Brown over 20 random splits of the networks; containment; the permutation nulls and "
    "overlap baselines; 95% percentile-bootstrap intervals (1,000 seeded draws) over examples for the masses, over "
    "networks and over examples for the others (fastpop.metrics.bootstrap).</li>"
    "<li><b>Random labels</b>: trained to fit their random train labels; the paper's question is whether they "
    "agree while memorizing (train split, half fit) and what they agree on where their labels mean nothing (test "
    "split), each against the class-conditional null.</li></ul>")
