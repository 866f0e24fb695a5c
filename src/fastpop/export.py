"""`fastpop export`: one row per example of a split with what the population did on it, as CSV, Parquet or npz, or
as a pandas DataFrame in Python.

Columns: id (the example's row in the split), source_index (its index in the source data set's split, where the run
stored it), label (its original class id, -1 unknown), accessibility (mean correctness over checkpoints and
networks), learned_at_epoch (the median over networks of the epoch from which a network stays right; NaN when more
than half never do), forgetting (events summed over networks), never_learned (fraction of networks never right),
final_tpa (fraction of networks right at the last checkpoint), and where the run recorded what they need: cscore
(train split, --subset-fraction), plurality (the most common predicted class id) and plurality_agreement, aum,
confidence, variability, el2n.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import metrics as M
from .errors import UsageError
from .rundir import atomic_write, load_file
from .run import Run

FORMATS = ("csv", "parquet", "npz")


def example_table(run: Run, split: str = "test") -> dict[str, np.ndarray]:
    """The columns of the per-example table, each [N]."""
    run.require_checkpoint()
    rec = M.as_record(run, split=split)
    at = M.learned_at(rec).checkpoint  # [P, N], NaN: not learned by the last checkpoint
    learned = np.full(at.shape, np.nan)
    known = ~np.isnan(at)
    learned[known] = np.array([c["epoch"] for c in run.checkpoints])[at[known].astype(np.intp)]
    forget = M.forgetting(rec)
    speed = M.speed_counts(rec)
    table = {"id": np.arange(rec.n), "source_index": _stored(run, split, "index"),
             "label": _stored(run, split, "label"),
             "accessibility": speed.counts.sum(0) / (rec.t * rec.p),
             "learned_at_epoch": _median_or_nan(learned),
             "forgetting": forget.events.sum(0, dtype=np.int64),
             "never_learned": forget.never.mean(0),
             "final_tpa": M.tpa_counts(rec.checkpoint(-1)).counts[0] / rec.p}
    if split == "train" and run.member_bits() is not None:
        table["cscore"] = M.cscore(run).values
    labels = run.predictions(split)
    if labels is not None:
        last = np.asarray(labels[-1])  # [P, N]
        table["plurality"] = np.array([np.bincount(last[:, n]).argmax() for n in range(rec.n)])
        table["plurality_agreement"] = M.consensus_agreement(last, split).agreement[0]
    if run.margins(split) is not None:
        table["aum"] = M.aum(run, split).values
    if run.example_losses(split) is not None:
        cart = M.cartography(run, split)
        table.update(confidence=cart.confidence, variability=cart.variability, el2n=M.el2n(run, split).values)
    return table


def example_frame(run: Run, split: str = "test"):
    """The table as a pandas DataFrame (pandas must be installed)."""
    try:
        import pandas as pd
    except ImportError:
        raise UsageError("a DataFrame needs pandas: pip install pandas (or use example_table)") from None
    return pd.DataFrame(example_table(run, split))


def export(run: Run, split: str, out: str | Path, fmt: str | None = None) -> Path:
    """Write the table to `out` as csv, parquet or npz (from the suffix when fmt is None); returns the path."""
    out = Path(out)
    fmt = fmt or out.suffix.lstrip(".")
    if fmt not in FORMATS:
        raise UsageError(f"export format must be one of {', '.join(FORMATS)} (or a --out ending so), got {fmt!r}")
    if out.is_dir() or not out.parent.exists():
        raise UsageError(f"--out {out}: not a file in an existing folder")
    table = example_table(run, split)
    if fmt == "npz":
        import io

        buf = io.BytesIO()
        np.savez(buf, **table)
        atomic_write(out, buf.getvalue())
    elif fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("parquet needs pyarrow: pip install pyarrow (or --format csv or npz)") from None
        tmp = out.with_name(out.name + ".tmp")
        pq.write_table(pa.table(table), tmp)
        tmp.replace(out)
    else:
        lines = [",".join(table)]
        for row in zip(*table.values()):
            lines.append(",".join(_cell(v) for v in row))
        atomic_write(out, ("\n".join(lines) + "\n").encode())
    return out


def _cell(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else repr(float(v))
    return str(int(v))


def _stored(run: Run, split: str, kind: str) -> np.ndarray:
    """{split}.{kind}.npy of the run (int64 [N], checked), or -1 for every example where the run has none."""
    arr = load_file(run.path, run.manifest, f"{split}.{kind}.npy")
    if arr is None:
        return np.full(run.n(split), -1, np.int64)
    if arr.shape != (run.n(split),):
        raise UsageError(f"{run.path}/{split}.{kind}.npy holds {arr.shape}, expected ({run.n(split)},)")
    return arr.astype(np.int64)


def _median_or_nan(x: np.ndarray) -> np.ndarray:
    """Median over axis 0 with NaN (never) as +inf: NaN where more than half are NaN."""
    med = np.median(np.where(np.isnan(x), np.inf, x), axis=0)
    return np.where(np.isinf(med), np.nan, med)
