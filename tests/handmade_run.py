"""A run directory written by hand with numpy and json (no training), in the documented format, including the
per-example arrays of `--record margin,loss,pred`: for analysis tests that need exact contents or odd plans."""

from pathlib import Path

import numpy as np

from fastpop.metrics import pack
from fastpop.rundir import FORMAT, file_sha256, row_checksum, write_manifest


def write_run(path: Path, correct: dict, epochs: list[float], record=(), seed: int = 0, labels_sha="0" * 64,
              classes: int = 10, labels: dict | None = None) -> Path:
    """correct: split -> bool [T, P, N]. Margins are drawn to agree in sign with correct; losses and predictions
    follow from them. labels: split -> int64 [N], written as {split}.label.npy (as training writes them)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    t, p = next(iter(correct.values())).shape[:2]
    sums = {}
    for split, c in correct.items():
        arrays = {"bits": pack(c), "loss": rng.random((t, p)).astype(np.float32),
                  "acc": c.mean(-1).astype(np.float32)}
        margin = np.where(c, 1, -1) * rng.uniform(0.01, 3, c.shape)
        if "margin" in record:
            arrays["margin"] = margin.astype(np.float16)
        if "loss" in record:
            arrays["xent"] = np.log1p(np.exp(-margin)).astype(np.float16)
        if "pred" in record:
            arrays["pred"] = rng.integers(0, classes, c.shape).astype(np.uint8)
        for kind, arr in arrays.items():
            np.save(path / f"{split}.{kind}.npy", arr)
            sums[f"{split}.{kind}"] = arr
    manifest = {
        "format": FORMAT, "status": "complete", "config": {"arch": "mlp", "seeds": p, "record": list(record)},
        "seeds": list(range(p)), "arch": {"params_per_network": 10},
        "dataset": {"name": "digits", "classes": classes, "in_shape": [1, 8, 8]},
        "splits": {s: {"n": c.shape[-1], "bytes_per_row": 8 * -(-c.shape[-1] // 64), "labels_sha256": labels_sha,
                       "images_sha256": labels_sha} for s, c in correct.items()},
        "steps_per_epoch": 10, "total_steps": 10 * len(epochs),
        "checkpoints": [{"step": 10 * (i + 1), "epoch": e} for i, e in enumerate(epochs)],
        "checkpoints_done": t, "files": _label_files(path, labels or {}), "diverged": {}, "predictions": False, "backend": "numba",
        "device": "cpu"}
    manifest["checksums"] = {name: {str(i): row_checksum(arr[i], manifest, *name.split("."), i) for i in range(t)}
                             for name, arr in sums.items()}
    write_manifest(path, manifest)
    return path


def _label_files(path: Path, labels: dict) -> dict:
    files = {}
    for split, y in labels.items():
        np.save(path / f"{split}.label.npy", np.asarray(y, np.int64))
        files[f"{split}.label.npy"] = file_sha256((path / f"{split}.label.npy").read_bytes())
    return files


def random_correct(t: int, p: int, n: int, seed: int = 0) -> np.ndarray:
    """A learning-like record: examples of varied ease, learned over checkpoints."""
    rng = np.random.default_rng(seed)
    ease = rng.normal(0, 1.5, n)[None, None, :]
    time_ = np.linspace(-1, 2, t)[:, None, None]
    return rng.random((t, p, n)) < 1 / (1 + np.exp(-(time_ + ease)))
