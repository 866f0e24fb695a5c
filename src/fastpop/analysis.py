"""`fastpop analyze` and `fastpop compare` as library calls, returning typed results that the console, the report,
the export (`save`) and JSON all render. Nothing is written anywhere unless `save` is called.

An Analysis saved into a folder is `{split}.metrics.json` (every scalar, and the run's identity with a fingerprint
of the record it was computed from) and per-example arrays `{split}.{name}.npy`: tpa float32 [T, N],
accessibility float64 [N], forgetting int32 [N] (events summed over networks), never_learned float32 [N] (fraction
of networks never right), and where recorded consensus float32 [T, N], cscore float64 [N], aum, confidence,
variability, el2n float64 [N].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import metrics as M
from .errors import UsageError
from .rundir import atomic_write, load_file, same_data, write_npy
from .run import Run

FORMAT = 2  # bump when what an Analysis holds changes, so saved ones stop counting as current
KAPPA_MAX_NETS = 2000  # all-pairs kappa over at most this many networks (a fixed random subset above it)


@dataclass
class Analysis:
    """Every metric of one split of a run. `identity`: run, arch, dataset, split, P, N, T, checkpoint (the one the
    scalars describe), epoch, fingerprint."""
    identity: dict
    accuracy: dict
    agreement: dict
    per_checkpoint: list[dict]
    kappa: dict
    split_half: dict | None
    pairwise_spearman: dict | None
    forgetting: dict
    class_conditional: dict | None = None  # the class-conditional null, within-class rho and kappa (needs labels)
    intervals: dict | None = None  # bootstrap intervals of the headline numbers (metrics.bootstrap)
    extra: dict = field(default_factory=dict)  # consensus, cscore_mean, margins: where the run recorded them
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def title(self) -> str:
        i = self.identity
        group = f" ({i['group']})" if i.get("group") else ""
        return f"{i['arch']} on {i['dataset']}{group}, {i['split']} split, P = {i['P']}"

    def to_json(self) -> dict:
        out = {"format": FORMAT, **self.identity}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name not in ("identity", "extra", "arrays")})
        out.update(self.extra)
        return out

    def save(self, folder: str | Path) -> list[Path]:
        """Write the JSON and the arrays into `folder` (created if missing); returns the paths written."""
        folder = out_folder(folder)
        split = self.identity["split"]
        paths = []
        for name, arr in self.arrays.items():
            paths.append(folder / f"{split}.{name}.npy")
            write_npy(paths[-1], arr)
        paths.append(folder / f"{split}.metrics.json")
        atomic_write(paths[-1], (json.dumps(self.to_json(), indent=1) + "\n").encode())
        return paths

    @classmethod
    def load(cls, folder: str | Path, split: str) -> "Analysis | None":
        """A saved Analysis, or None when the folder holds none (or a damaged or older one)."""
        folder = Path(folder)
        try:
            d = json.loads((folder / f"{split}.metrics.json").read_text())
            if d.get("format") != FORMAT:
                return None
            arrays = {name: np.load(folder / f"{split}.{name}.npy") for name in ARRAYS
                      if (folder / f"{split}.{name}.npy").exists()}
        except (OSError, ValueError):
            return None
        names = {f.name for f in dataclasses.fields(cls)} - {"identity", "extra", "arrays"}
        ident = {k: d[k] for k in IDENTITY if k in d}
        return cls(identity=ident, **{k: d.get(k) for k in names},
                   extra={k: v for k, v in d.items() if k not in names | set(IDENTITY) | {"format"}}, arrays=arrays)


ARRAYS = ("tpa", "accessibility", "forgetting", "never_learned", "consensus", "cscore", "aum", "confidence",
          "variability", "el2n")
IDENTITY = ("run", "arch", "dataset", "split", "P", "N", "T", "checkpoint", "epoch", "fingerprint", "group")


def fingerprint(run: Run, split: str, checkpoint: int) -> str:
    """Names the record an analysis was computed from: the run, the split, the checkpoint, and the checksums of the
    completed rows (the bits file's size and modification time where the manifest has no checksums)."""
    sums = run.manifest.get("checksums", {}).get(f"{split}.bits")
    if sums:
        record = [sums.get(str(t)) for t in range(len(run.checkpoints))]
    else:
        st = (run.path / f"{split}.bits.npy").stat()
        record = [st.st_size, st.st_mtime_ns]
    key = json.dumps([FORMAT, str(run.path.resolve()), split, checkpoint, len(run.checkpoints), record])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def identity(run: Run, split: str, checkpoint: int, group: int | None = None) -> dict:
    nets = group_networks(run, group)
    out = {"run": str(run.path), "arch": run.config.arch, "dataset": run.manifest.get("dataset", {}).get(
        "name", run.config.dataset), "split": split, "P": len(range(len(run.seeds))[nets]), "N": run.n(split),
        "T": len(run.checkpoints), "checkpoint": checkpoint, "epoch": run.checkpoints[checkpoint]["epoch"],
        "fingerprint": fingerprint(run, split, checkpoint) + ("" if group is None else f"-g{group}")}
    if group is not None:
        out["group"] = group_label(run, group)
    return out


def group_networks(run: Run, group: int | None) -> slice:
    """The networks of one group of a grid run (all networks for group None)."""
    if group is None:
        return slice(None)
    if not run.groups or not 0 <= group < len(run.groups):
        raise UsageError(f"{run.path} has {len(run.groups or [])} grid groups; no group {group}")
    return slice(*run.groups[group]["networks"])


def group_label(run: Run, group: int) -> str:
    return ", ".join(f"{k}={v}" for k, v in run.groups[group].items() if k != "networks")


def labels(run: Run, split: str) -> np.ndarray | None:
    """int64 [N]: each example's label as the networks were trained on it (original class ids; the permuted ones
    of --labels random), from the run directory; None for a run that predates the file."""
    found = load_file(run.path, run.manifest, f"{split}.label.npy")
    return None if found is None else np.asarray(found, np.int64)


def analyze(run: Run, split: str = "test", checkpoint: int = -1, group: int | None = None,
            draws: int = M.DRAWS, seed: int = M.SEED) -> Analysis:
    """Every metric of one split, at every checkpoint where it has one and at `checkpoint` (default the last); of
    one group's networks of a grid run when `group` is given. `draws` bootstrap draws (0: no intervals), seeded
    with `seed`, give the 95% intervals of the headline numbers."""
    run.require_checkpoint()
    nets = group_networks(run, group)
    rec = M.as_record(run, split=split)
    if group is not None:
        rec = rec.networks(np.arange(len(run.seeds))[nets])
    t_sel = _checkpoint(checkpoint, rec.t)
    if rec.small:
        rec.dense()  # unpacked once, shared by every metric below
    counts = M.tpa_counts(rec).counts
    acc = M.accuracy(rec).values
    per_checkpoint = [dict(run.checkpoints[t], **M.agreement_summary(counts[t], acc[t])) for t in range(rec.t)]
    subset = _kappa_subset(rec.p)
    kappa = M.error_consistency(rec if subset is None else rec.networks(subset), t=t_sel).kappa
    speed = M.speed_counts(rec)
    forget = M.forgetting(rec)
    never = forget.never.mean(0, dtype=np.float32)
    correct = rec.checkpoint(t_sel).dense()[0]
    found = labels(run, split)
    index = M.class_index(found, rec.n)[1] if found is not None else None
    conditional = None
    if index is not None:
        conditional = M.class_conditional_summary(counts[t_sel], M.class_accuracy(correct, index, index.max() + 1),
                                                  index)
    result = Analysis(
        identity=identity(run, split, t_sel, group), accuracy=_spread(acc[t_sel]), agreement=per_checkpoint[t_sel],
        per_checkpoint=per_checkpoint, kappa=_kappa(kappa), class_conditional=conditional,
        intervals=M.agreement_intervals(correct, index, draws, seed) if draws and rec.p > 1 else None,
        split_half=M.split_half(speed, seed=seed, draws=draws) if rec.p > 1 else None,
        pairwise_spearman=M.pairwise_spearman(speed) if rec.p > 1 else None,
        forgetting={"events": int(forget.events.sum(dtype=np.int64)),
                    "never_learned_pairs": int(forget.never.sum()), "never_learned_by_all": int((never == 1).sum()),
                    "pairs": rec.p * rec.n},
        arrays={"tpa": (counts / rec.p).astype(np.float32), "accessibility": speed.counts.sum(0) / (rec.t * rec.p),
                "forgetting": forget.events.sum(0, dtype=np.int32), "never_learned": never})
    _extras(run, split, t_sel, result, nets, draws, seed)
    return result


def _extras(run: Run, split: str, t_sel: int, result: Analysis, nets: slice, draws: int, seed: int) -> None:
    """The C-score, the consensus of predictions and the margin scores, where the run recorded what they need;
    how many of the networks diverged, where some did."""
    if run.diverged:
        result.extra["diverged"] = diverged_summary(run, nets)
    if split == "train" and run.member_bits() is not None:
        cs = M.cscore(run.bits("train")[-1][nets], run.member_bits()[nets], n=run.n("train"))
        result.arrays["cscore"] = cs.values
        result.extra["cscore_mean"] = float(np.nanmean(cs.values)) if np.isfinite(cs.values).any() else None
    labels = run.predictions(split)
    if labels is not None:
        predicted = np.asarray(labels)[:, nets]
        consensus = M.consensus_agreement(predicted, split).agreement
        result.arrays["consensus"] = consensus.astype(np.float32)
        classes = run.config.classes or run.manifest.get("dataset", {}).get("classes") or 0
        k = len(classes) if isinstance(classes, list) else int(classes)
        p = predicted.shape[1]
        result.extra["consensus"] = {
            "mean": float(consensus[t_sel].mean()), "classes": k,
            "chance": M.chance_agreement(k, p) if k else None,
            "chance_own_frequencies": M.chance_agreement_own(predicted[t_sel]),
            "histogram": np.histogram(consensus[t_sel], bins=10, range=(0, 1))[0].tolist()}
        if draws:  # the mean over examples, resampled
            means = M.example_weights(consensus.shape[1], draws, seed) @ consensus[t_sel] / consensus.shape[1]
            result.extra["consensus"]["interval"] = M.percentile_interval(means)
    margins = {}
    if run.margins(split) is not None:
        result.arrays["aum"] = M.aum(run.margins(split)[:, nets], split).values
        margins["aum_mean"] = _nanmean(result.arrays["aum"])
    if run.example_losses(split) is not None:
        losses = run.example_losses(split)[:, nets]
        cart = M.cartography(losses, split, correct=run.bits(split)[:, nets], n=run.n(split))
        result.arrays.update(confidence=cart.confidence, variability=cart.variability,
                             el2n=M.el2n(losses, split, checkpoint=0).values)
        margins.update(confidence_mean=_nanmean(cart.confidence), variability_mean=_nanmean(cart.variability))
    if margins:
        result.extra["margins"] = margins


def diverged_summary(run: Run, nets: slice = slice(None)) -> dict:
    """How many of networks `nets` diverged: they stay in every number, counted wrong on every example from the
    step they diverged (so they pull means down and add to TPA = 0); `healthy_test_accuracy` leaves them out."""
    healthy = run.healthy()[nets]
    acc = np.asarray(run.accuracy("test")[-1][nets], np.float64)[healthy]
    seeds = np.asarray(run.seeds)[nets][~healthy]
    return {"networks": int((~healthy).sum()), "seeds": sorted(int(s) for s in seeds)[:100],
            "healthy_test_accuracy": float(acc.mean()) if len(acc) else None}


def _nanmean(x: np.ndarray) -> float | None:
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def current_analysis(run: Run, split: str, checkpoint: int, folders: list[Path]) -> Analysis | None:
    """A saved Analysis of exactly this record and checkpoint in one of `folders`, or None."""
    run.require_checkpoint()
    t_sel = _checkpoint(checkpoint, len(run.checkpoints))
    want = fingerprint(run, split, t_sel)
    for folder in folders:
        found = Analysis.load(folder, split)
        if found is not None and found.identity.get("fingerprint") == want and "tpa" in found.arrays:
            return found
    return None


def _checkpoint(checkpoint: int, done: int) -> int:
    if not -done <= checkpoint < done:
        raise UsageError(f"--checkpoint {checkpoint} out of range: {done} completed checkpoints")
    return checkpoint % done


def out_folder(path: str | Path) -> Path:
    """Create an --out folder (and its parents), or say in one line why it cannot be one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {path}: {e.strerror or e}") from None
    return path


def _kappa_subset(p: int) -> np.ndarray | None:
    if p <= KAPPA_MAX_NETS:
        return None
    return np.sort(np.random.default_rng(0).choice(p, KAPPA_MAX_NETS, replace=False))


def _kappa(kappa: np.ndarray) -> dict:
    """The summary of the pairs' kappa, and its histogram (40 bins over [-1, 1]) for the report."""
    pairs = kappa[np.triu_indices(len(kappa), 1)]
    counts, edges = np.histogram(pairs[np.isfinite(pairs)], bins=40, range=(-1, 1))
    return dict(M.kappa_summary(kappa), networks=len(kappa), histogram=counts.tolist(), edges=edges.tolist())


def _spread(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max())}


def run_cscore(run: Run) -> np.ndarray:
    """C-score estimate of each train example from one run: held-out networks' accuracy at the last checkpoint."""
    return M.cscore(run).values


def combined_cscore(runs: list[Run]) -> tuple[np.ndarray, list[float]]:
    """The mean over runs (one per subset fraction, say) of each run's C-score estimate; NaN where no network of
    any run held the example out."""
    first = runs[0]
    scores, fractions = [], []
    for run in runs:
        run.require_checkpoint()
        if run.manifest["dataset"] != first.manifest["dataset"] or not same_data(run.manifest, first.manifest,
                                                                                 "train"):
            raise UsageError(f"{run.path} and {first.path} were not trained on the same data")
        scores.append(run_cscore(run))
        fractions.append(run.config.subset_fraction)
    with warnings.catch_warnings():  # an all-NaN column (never held out) is meant to give NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(scores), 0), fractions


@dataclass
class Comparison:
    """Order agreement of two or more populations on the same examples. runs: per run its path, arch, P, T,
    final mean accuracy and checkpoint epochs; pairs: per pair (i < j) the Spearman of accessibility and
    containment with its counts (the weaker population, by final mean accuracy, as A); warnings: e.g. that the
    checkpoint plans differ (accessibility then averages over different moments of training)."""
    dataset: str
    split: str
    n: int
    threshold: float
    runs: list[dict]
    pairs: list[dict]
    warnings: list[str]
    accessibility: np.ndarray = field(repr=False)  # float64 [runs, N]

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "accessibility"}

    def save(self, folder: str | Path) -> Path:
        """compare.json in `folder` (created if missing)."""
        path = out_folder(folder) / "compare.json"
        atomic_write(path, (json.dumps(self.to_json(), indent=1) + "\n").encode())
        return path


def compare(runs: list[Run], split: str = "test", threshold: float = 0.5, draws: int = M.DRAWS,
            seed: int = M.SEED) -> Comparison:
    """Cross-population order agreement on the same examples, for every pair of `runs`; one grid run's groups are
    compared as populations. Each pair's numbers come with their chance baselines (a permutation null of the
    Spearman, plain and within classes; containment under independent overlap, plain and within classes) and,
    with draws > 0, 95% bootstrap intervals over networks and over examples."""
    groups = [None]
    if len(runs) == 1 and runs[0].groups:
        groups = list(range(len(runs[0].groups)))
        runs = runs * len(groups)
    elif len(runs) < 2:
        raise UsageError("compare needs at least two runs, or one run trained with --grid")
    groups = groups * (len(runs) // len(groups))
    first = runs[0]
    for run in runs:
        run.require_checkpoint()
        if first.manifest["dataset"] != run.manifest["dataset"] or not same_data(first.manifest, run.manifest, split):
            raise UsageError(f"{first.path} and {run.path} were not trained on the same data; their {split} splits "
                             "cannot be compared")
    n = first.n(split)
    found = labels(first, split)
    index = M.class_index(found, n)[1] if found is not None else None
    access, final, speeds, info = [], [], [], []
    for run, group in zip(runs, groups):
        rec = M.as_record(run, split=split)
        if group is not None:
            rec = rec.networks(np.arange(len(run.seeds))[group_networks(run, group)])
        speeds.append(M.speed_counts(rec).counts)
        access.append(speeds[-1].sum(0, dtype=np.int64) / (rec.t * rec.p))
        final.append(rec.checkpoint(-1).dense()[0])
        name = str(run.path) if group is None else f"{run.path} ({group_label(run, group)})"
        info.append({"run": name, "arch": run.config.arch, "P": rec.p, "T": rec.t,
                     "mean_final_accuracy": float(final[-1].mean()),
                     "epochs": [c["epoch"] for c in run.checkpoints]})
    warns = []
    if len({tuple(i["epochs"]) for i in info}) > 1:
        warns.append("the checkpoint plans differ (" + "; ".join(
            f"{i['run']}: {i['T']} checkpoints, epochs {_epochs_text(i['epochs'])}" for i in info)
                     + "): accessibility averages over different moments of training")
    pairs = []
    for a in range(len(runs)):
        for b in range(a + 1, len(runs)):
            weak, strong = (a, b) if info[a]["mean_final_accuracy"] <= info[b]["mean_final_accuracy"] else (b, a)
            tpa_w, tpa_s = final[weak].mean(0), final[strong].mean(0)
            c = M.containment(tpa_w, tpa_s, threshold)
            pair = {"a": a, "b": b, "spearman_accessibility": M.spearman(access[a], access[b]),
                    "examples": n, "weaker": info[weak]["run"], "stronger": info[strong]["run"],
                    "weak_learned_also_by_strong": c["a_in_b"], "strong_learned_also_by_weak": c["b_in_a"],
                    "learned_by_weak": c["learned_a"], "learned_by_strong": c["learned_b"],
                    "learned_by_both": c["learned_both"],
                    "spearman_permutation_null": M.permutation_null(access[a], access[b], None, draws or M.DRAWS,
                                                                    seed)}
            if index is not None:
                pair["spearman_permutation_null_within_class"] = M.permutation_null(
                    access[a], access[b], index, draws or M.DRAWS, seed)
            expected = M.containment_expected(tpa_w >= threshold, tpa_s >= threshold, index)
            pair["containment_expected"] = {k.replace("a_in_b", "weak_learned_also_by_strong").replace(
                "b_in_a", "strong_learned_also_by_weak"): v for k, v in expected.items()}
            if draws:
                pair["spearman_interval"] = M.spearman_intervals(speeds[a], speeds[b], draws, seed)
                ci = M.containment_intervals(final[weak], final[strong], threshold, draws, seed)
                pair["containment_interval"] = {unit: {"weak_learned_also_by_strong": v["a_in_b"],
                                                       "strong_learned_also_by_weak": v["b_in_a"]}
                                                for unit, v in ci.items() if unit in ("networks", "examples")}
            pairs.append(pair)
    dataset = first.manifest.get("dataset", {}).get("name", first.config.dataset)
    return Comparison(dataset, split, n, threshold, info, pairs, warns, np.stack(access))


def _epochs_text(epochs: list[float]) -> str:
    shown = [f"{e:g}" for e in epochs[:6]]
    return ", ".join(shown) + (", ..." if len(epochs) > 6 else "")


def default_compare_out(runs: list[Run]) -> Path:
    """compare-NAME-NAME-...-HASH: the hash of the runs' resolved paths keeps two runs both named `run` (in
    different folders) from colliding with another comparison."""
    names = "-".join(r.path.resolve().name for r in runs[:3]) + ("-etc" if len(runs) > 3 else "")
    key = hashlib.sha256("\0".join(str(r.path.resolve()) for r in runs).encode()).hexdigest()[:8]
    return Path(f"compare-{names}-{key}")


def default_report_out(run: Run, split: str) -> Path:
    """report-NAME-SPLIT-HASH in the current folder (outside the run directory, which may be read-only)."""
    key = hashlib.sha256(str(run.path.resolve()).encode()).hexdigest()[:8]
    return Path(f"report-{run.path.resolve().name}-{split}-{key}")
