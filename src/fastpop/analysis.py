"""`fastpop analyze` and `fastpop compare` as library calls: metrics of a run directory, written next to its record.

Outputs in RUN/ (per split): {split}.metrics.json (per-checkpoint scalars and order consistency),
{split}.tpa.npy float32 [T, N] (TP-agreement per checkpoint), {split}.accessibility.npy float64 [N],
{split}.forgetting.npy int32 [N] (forgetting events summed over networks) and {split}.never_learned.npy float32 [N]
(fraction of networks that never get the example right).
"""

from __future__ import annotations

import json
import warnings

import numpy as np

from . import metrics as M
from .errors import UsageError
from .run import Run
from .rundir import atomic_write, write_npy

KAPPA_MAX_NETS = 2000  # all-pairs kappa over at most this many networks (a fixed random subset above it)


def analyze(run: Run, split: str = "test", checkpoint: int = -1, write: bool = True) -> dict:
    """Compute every metric of one split (all of it before anything is written), then write them when `write`."""
    run.require_checkpoint()
    bits, n = run.bits(split), run.n(split)
    t_done, p = bits.shape[:2]
    if not -t_done <= checkpoint < t_done:
        raise UsageError(f"--checkpoint {checkpoint} out of range: {t_done} completed checkpoints")
    t_sel = checkpoint % t_done
    counts = M.tpa_counts(bits, n)
    acc = M.accuracy(bits, n)
    per_checkpoint = [dict(run.checkpoints[t], **M.agreement_summary(counts[t], acc[t])) for t in range(t_done)]
    kappa_nets = _kappa_subset(p)
    kappa = M.error_consistency(bits[:, kappa_nets] if kappa_nets is not None else bits, n, t=t_sel)
    speed = M.speed_counts(bits, n)
    events, never = M.forgetting(bits, n)
    result = {
        "split": split, "P": p, "N": n, "T": t_done, "checkpoint": t_sel,
        "accuracy": _spread(acc[t_sel]),
        "agreement": per_checkpoint[t_sel],
        "kappa": dict(M.kappa_summary(kappa), networks=len(kappa)),
        "split_half": M.split_half(speed) if p > 1 else None,
        "pairwise_spearman": M.pairwise_spearman(speed) if p > 1 else None,
        "per_checkpoint": per_checkpoint,
    }
    arrays = {"tpa": (counts / p).astype(np.float32), "accessibility": speed.sum(0) / (t_done * p),
              "forgetting": events.sum(0, dtype=np.int32), "never_learned": never.mean(0, dtype=np.float32),
              "kappa": kappa}
    if split == "train" and run.member_bits() is not None:
        arrays["cscore"] = run_cscore(run)
        result["cscore_mean"] = float(np.nanmean(arrays["cscore"])) if np.isfinite(arrays["cscore"]).any() else None
    labels = run.predictions(split)
    if labels is not None:
        consensus = M.consensus_agreement(np.ascontiguousarray(labels))
        arrays["consensus"] = consensus.astype(np.float32)
        result["consensus"] = {"mean": float(consensus[t_sel].mean()),
                               "histogram": np.histogram(consensus[t_sel], bins=10, range=(0, 1))[0].tolist()}
    result["arrays"] = arrays
    if write:
        write_analysis(run, result)
    return result


def write_analysis(run: Run, result: dict) -> None:
    split = result["split"]
    for name, arr in result["arrays"].items():
        if name != "kappa":
            write_npy(run.path / f"{split}.{name}.npy", arr)
    summary = {k: v for k, v in result.items() if k != "arrays"}
    atomic_write(run.path / f"{split}.metrics.json", (json.dumps(summary, indent=1) + "\n").encode())


def run_cscore(run: Run) -> np.ndarray:
    """C-score estimate of each train example from one run: held-out networks' accuracy at the last checkpoint."""
    member = run.member_bits()
    if member is None:
        raise UsageError(f"{run.path} was trained without --subset-fraction: it has no membership record")
    correct = np.ascontiguousarray(run.bits("train")[-1])
    return M.cscore(correct.view(np.uint64), member.view(np.uint64), run.n("train"))


def combined_cscore(runs: list[Run]) -> tuple[np.ndarray, list[float]]:
    """The mean over runs (one per subset fraction, say) of each run's C-score estimate; NaN where no network of
    any run held the example out."""
    first = runs[0]
    scores, fractions = [], []
    for run in runs:
        run.require_checkpoint()
        if (run.manifest["dataset"], run.manifest["splits"]["train"].get("labels_sha256")) != (
                first.manifest["dataset"], first.manifest["splits"]["train"].get("labels_sha256")):
            raise UsageError(f"{run.path} and {first.path} were not trained on the same data")
        scores.append(run_cscore(run))
        fractions.append(run.config.subset_fraction)
    with warnings.catch_warnings():  # an all-NaN column (never held out) is meant to give NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(scores), 0), fractions


def _kappa_subset(p: int) -> np.ndarray | None:
    if p <= KAPPA_MAX_NETS:
        return None
    return np.sort(np.random.default_rng(0).choice(p, KAPPA_MAX_NETS, replace=False))


def _spread(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max())}


def compare(run_a: Run, run_b: Run, split: str = "test", threshold: float = 0.5) -> dict:
    """Cross-population order agreement on the same examples: Spearman of accessibility, and containment with the
    weaker population (lower final mean accuracy) as A."""
    for run in (run_a, run_b):
        run.require_checkpoint()
    sa, sb = run_a.manifest["splits"][split], run_b.manifest["splits"][split]
    if run_a.manifest["dataset"] != run_b.manifest["dataset"] or sa.get("labels_sha256") != sb.get("labels_sha256"):
        raise UsageError(f"{run_a.path} and {run_b.path} were not trained on the same data; "
                         f"their {split} splits cannot be compared")
    n = run_a.n(split)
    acc = {}
    final = {}
    for key, run in (("a", run_a), ("b", run_b)):
        acc[key] = M.accessibility(run, split=split)
        final[key] = M.tpa_counts(run.bits(split)[-1:], n)[0] / len(run.seeds)
    mean_acc = {key: float(final[key].mean()) for key in final}
    weak, strong = ("a", "b") if mean_acc["a"] <= mean_acc["b"] else ("b", "a")
    cont = M.containment(final[weak], final[strong], threshold)
    names = {"a": str(run_a.path), "b": str(run_b.path)}
    return {"split": split, "N": n, "a": names["a"], "b": names["b"],
            "mean_final_accuracy": {names[k]: v for k, v in mean_acc.items()},
            "spearman_accessibility": M.spearman(acc["a"], acc["b"]),
            "weaker": names[weak], "stronger": names[strong], "threshold": threshold,
            "weak_learned_also_by_strong": cont["a_in_b"], "strong_learned_also_by_weak": cont["b_in_a"],
            "learned_by_weak": cont["learned_a"], "learned_by_strong": cont["learned_b"],
            "arrays": {"accessibility_a": acc["a"], "accessibility_b": acc["b"]}}
