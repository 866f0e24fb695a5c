"""Reading a run directory back: `load_run(path) -> Run`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import Config
from .errors import UsageError
from .rundir import MANIFEST, SPLITS, STATE, pred_dtype


class Run:
    """A run directory: its config, manifest, and record (memory-mapped, only completed checkpoints)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            raise UsageError(f"{self.path} is not a run directory (no {MANIFEST})") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read {self.path / MANIFEST}: {e}") from None
        problem = manifest_problem(self.manifest)
        if problem:
            raise UsageError(f"{self.path / MANIFEST} is damaged: {problem}")
        self.config = Config.from_dict(self.manifest["config"])

    def require_checkpoint(self) -> None:
        if not self.checkpoints:
            raise UsageError(f"{self.path} has no completed checkpoint yet")

    @property
    def arch(self):
        """The architecture rebuilt from the spec in run.json, sized for the run's data (an Arch); for a module
        arch, its module:package.module:function path (its parameter shapes are in manifest["arch"])."""
        from .archs import MODULE_PREFIX, build_arch

        spec = self.manifest["arch"].get("spec", self.config.arch)
        if spec.startswith(MODULE_PREFIX):
            return spec
        data = self.manifest["dataset"]
        return build_arch(spec, data["in_shape"], data["classes"])

    def examples(self, split: str = "test", data=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images [N, C, H, W] as stored, original class ids int64 [N] (-1 unknown), each example's index in the
        source data set's split int64 [N]) of a split, loaded again from the run's data set (`data`: the
        ArrayData of a data set given in memory)."""
        import torch

        from .data import load_dataset

        _check_split(split)
        part = load_dataset(Config.from_dict(dict(self.config.to_dict(), device="cpu")), torch.device("cpu"),
                            data).split(split)
        if len(part) != self.n(split):
            raise UsageError(f"the {split} data found now have {len(part)} examples; {self.path} was trained on "
                             f"{self.n(split)}")
        return part.x.numpy(), part.label.numpy(), part.index.numpy()

    @property
    def groups(self) -> list[dict] | None:
        """A grid run's combinations, each {hyperparameter: value, ..., "networks": [lo, hi)}; None without a
        grid."""
        return self.manifest.get("groups")

    @property
    def seeds(self) -> list[int]:
        return self.manifest["seeds"]

    @property
    def status(self) -> str:
        return self.manifest["status"]

    @property
    def checkpoints(self) -> list[dict]:
        """The completed checkpoints: [{"epoch": ..., "step": ...}, ...]."""
        return self.manifest["checkpoints"][: self.manifest["checkpoints_done"]]

    def n(self, split: str) -> int:
        return self.manifest["splits"][split]["n"]

    def _array(self, name: str, row_shape: tuple[int, ...], dtype) -> np.ndarray:
        """A record array, checked against the manifest, cut to the completed checkpoints."""
        path = self.path / name
        try:
            arr = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise UsageError(f"{path} is missing") from None
        except Exception as e:  # np.load raises many kinds on a damaged header
            raise UsageError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from None
        want = (len(self.manifest["checkpoints"]), len(self.seeds), *row_shape)
        if arr.shape != want or arr.dtype != dtype:
            raise UsageError(f"{path} holds {arr.dtype} {arr.shape}, but run.json says {np.dtype(dtype)} {want}")
        return arr[: self.manifest["checkpoints_done"]]

    def bits(self, split: str) -> np.ndarray:
        """uint8 [T, P, R] packed correctness (memory-mapped), T = completed checkpoints."""
        _check_split(split)
        return self._array(f"{split}.bits.npy", (self.manifest["splits"][split]["bytes_per_row"],), np.uint8)

    def correct(self, split: str, t: int = -1) -> np.ndarray:
        """bool [P, N]: which network is right on which example at checkpoint t."""
        bits = self.bits(split)[t]
        return np.unpackbits(bits, axis=-1, count=self.n(split), bitorder="little").astype(bool)

    def predictions(self, split: str = "test") -> np.ndarray | None:
        """uint8 [T, P, N] predicted labels (original class ids; uint16 beyond 256 classes), where the run recorded
        them (--record pred, or --record-predictions for the test split), else None."""
        _check_split(split)
        if "pred" not in self.recorded and not (split == "test" and self.manifest.get("predictions")):
            return None
        return self._array(f"{split}.pred.npy", (self.n(split),), pred_dtype(self.manifest.get("class_ids")))

    @property
    def recorded(self) -> set[str]:
        """The per-example arrays --record stored besides the bits: a subset of {"margin", "loss", "pred"}."""
        return set(self.manifest["config"].get("record") or [])

    def margins(self, split: str = "test") -> np.ndarray | None:
        """float16 [T, P, N] true-class logit minus the largest other logit (memory-mapped), or None when the run
        did not record margins."""
        _check_split(split)
        return self._array(f"{split}.margin.npy", (self.n(split),), np.float16) if "margin" in self.recorded else None

    def example_losses(self, split: str = "test") -> np.ndarray | None:
        """float16 [T, P, N] per-example cross-entropy (memory-mapped), or None when the run did not record them."""
        _check_split(split)
        return self._array(f"{split}.xent.npy", (self.n(split),), np.float16) if "loss" in self.recorded else None

    def member_bits(self) -> np.ndarray | None:
        """uint8 [P, R]: which train examples each network trained on (--subset-fraction), packed in the record's
        layout; None without a membership record."""
        path = self.path / "train.member.npy"
        if not path.exists():
            return None
        want = (len(self.seeds), self.manifest["splits"]["train"]["bytes_per_row"])
        try:
            packed = np.load(path)
        except Exception as e:
            raise UsageError(f"{path} is truncated or corrupt ({type(e).__name__})") from None
        if packed.shape != want or packed.dtype != np.uint8:
            raise UsageError(f"{path} holds {packed.dtype} {packed.shape}, expected uint8 {want}")
        return packed

    def member(self) -> np.ndarray | None:
        """bool [P, N_train]: member_bits unpacked."""
        packed = self.member_bits()
        if packed is None:
            return None
        return np.unpackbits(packed, axis=-1, count=self.n("train"), bitorder="little").astype(bool)

    def record_array(self, split: str, kind: str) -> np.ndarray:
        return {"bits": self.bits, "loss": self.loss, "acc": self.accuracy, "pred": self.predictions,
                "margin": self.margins, "xent": self.example_losses}[kind](split)

    def loss(self, split: str) -> np.ndarray:
        """float32 [T, P]: each network's mean cross-entropy on the split at each checkpoint."""
        _check_split(split)
        return self._array(f"{split}.loss.npy", (), np.float32)

    def accuracy(self, split: str) -> np.ndarray:
        """float32 [T, P]: each network's accuracy on the split at each checkpoint."""
        _check_split(split)
        return self._array(f"{split}.acc.npy", (), np.float32)

    @property
    def diverged(self) -> dict[int, int]:
        """{seed: step at which its loss stopped being finite} for networks that diverged (frozen from then on,
        wrong on every example, NaN loss)."""
        return {int(k): v for k, v in self.manifest.get("diverged", {}).items()}

    def weights(self) -> "torch.Tensor":  # noqa: F821
        """float32 [P, D]: each network's parameters at the last saved state, in arch.param_shapes order."""
        import torch  # here, so reading a record (analysis, metrics) does not load torch

        return torch.load(self.path / STATE, map_location="cpu")["params"]

    def __repr__(self) -> str:
        return (f"Run({str(self.path)!r}, arch={self.config.arch}, P={len(self.seeds)}, "
                f"checkpoints={len(self.checkpoints)}, status={self.status})")


def manifest_problem(m) -> str | None:
    """What is wrong with a manifest's structure, or None: every field a reader relies on, with its type."""
    def is_int(v, lo=0):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    if not isinstance(m, dict):
        return "not a JSON object"
    checks = {
        "config": lambda v: isinstance(v, dict),
        "seeds": lambda v: isinstance(v, list) and v and all(is_int(s) for s in v),
        "checkpoints": lambda v: isinstance(v, list) and all(
            isinstance(c, dict) and is_int(c.get("step"), 1) and isinstance(c.get("epoch"), (int, float))
            for c in v),
        "checkpoints_done": is_int,
        "total_steps": is_int,
        "status": lambda v: v in ("running", "complete", "interrupted", "failed"),
        "splits": lambda v: isinstance(v, dict) and set(v) == set(SPLITS) and all(
            isinstance(s, dict) and is_int(s.get("n"), 1) and s.get("bytes_per_row") == 8 * -(-s["n"] // 64)
            for s in v.values()),
        "arch": lambda v: isinstance(v, dict) and is_int(v.get("params_per_network"), 1),
        "checksums": lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()),
        "diverged": lambda v: isinstance(v, dict),
    }
    optional = {"checksums", "diverged"}
    for key, ok in checks.items():
        if key not in m:
            if key in optional:
                continue
            return f"no {key!r}"
        if not ok(m[key]):
            return f"bad {key!r}"
    if m["checkpoints_done"] > len(m["checkpoints"]):
        return "checkpoints_done exceeds the checkpoint plan"
    for key in ("init_seeds", "order_seeds"):
        if key in m and not (isinstance(m[key], list) and len(m[key]) == len(m["seeds"])):
            return f"bad {key!r}"
    return None


def load_run(path: str | Path) -> Run:
    return Run(path)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
