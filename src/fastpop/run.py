"""Reading a run directory back: `load_run(path) -> Run`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import Config
from .errors import UsageError, shown
from .rundir import (MANIFEST, SPLITS, diverged_row, load_member, load_state, manifest_problem, networks, open_array,
                     read_manifest, row_problems)

__all__ = ["Run", "load_run", "manifest_problem"]


class Run:
    """A run directory: its config, manifest, and record (memory-mapped, only completed checkpoints). Everything
    read is checked first (the manifest's checksum and fields, each row's checksum, the state's checksum): a
    damaged directory raises UsageError naming the file and the checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        try:
            self.config = Config.from_dict(self.manifest["config"])
        except Exception as e:  # UsageError, or a type a hand-edited config was never meant to hold
            raise UsageError(f"{self.path / MANIFEST}: bad config: {' '.join(str(e).split())[:200]}") from None
        self._checked: set[tuple[str, str]] = set()

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
                            data or self.saved_data()).split(split)
        if part.images_sha256() != self.manifest["splits"][split]["images_sha256"]:
            raise UsageError(f"the {split} images found now differ from those {self.path} was trained on")
        return part.x.numpy(), part.label.numpy(), part.index.numpy()

    def saved_data(self):
        """The ArrayData of a run trained on data in memory with save_data (its copy in the run directory,
        checked), else None."""
        from .data.arrays import SAVED, from_saved
        from .rundir import load_file

        if not all(name in self.manifest.get("files", {}) for name in SAVED):
            return None
        arrays = {name: load_file(self.path, self.manifest, name) for name in SAVED}
        return from_saved(arrays, self.config.dataset.removeprefix("arrays:"))

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

    def _array(self, split: str, kind: str) -> np.ndarray:
        """A record array, checked against the manifest and its rows' checksums, cut to the completed checkpoints."""
        arr = open_array(self.path, self.manifest, split, kind)
        if (split, kind) not in self._checked:
            problems = row_problems(self.manifest, split, kind, arr)
            if problems:
                raise UsageError(f"{self.path} is damaged: {problems[0]} (fastpop verify {self.path} lists all)")
            self._checked.add((split, kind))
        return arr[: self.manifest["checkpoints_done"]]

    def bits(self, split: str) -> np.ndarray:
        """uint8 [T, P, R] packed correctness (memory-mapped), T = completed checkpoints."""
        _check_split(split)
        return self._array(split, "bits")

    def correct(self, split: str, t: int = -1) -> np.ndarray:
        """bool [P, N]: which network is right on which example at checkpoint t (0-based; negative from the end)."""
        bits, done = self.bits(split), len(self.checkpoints)
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not -done <= t < done:
            raise UsageError(f"checkpoint {shown(t)} is out of range: {self.path} has {done} completed checkpoints"
                             + (f" (0 to {done - 1}, or -1 for the last)" if done else ""))
        bits = bits[t]
        return np.unpackbits(bits, axis=-1, count=self.n(split), bitorder="little").astype(bool)

    def predictions(self, split: str = "test") -> np.ndarray | None:
        """uint8 [T, P, N] predicted labels (original class ids; uint16 beyond 256 classes), where the run recorded
        them (--record pred, or --record-predictions for the test split), else None."""
        _check_split(split)
        if "pred" not in self.recorded and not (split == "test" and self.manifest["predictions"]):
            return None
        return self._array(split, "pred")

    @property
    def recorded(self) -> set[str]:
        """The per-example arrays --record stored besides the bits: a subset of {"margin", "loss", "pred"}."""
        return set(self.manifest["config"].get("record") or [])

    def margins(self, split: str = "test") -> np.ndarray | None:
        """float16 [T, P, N] true-class logit minus the largest other logit (memory-mapped), or None when the run
        did not record margins."""
        _check_split(split)
        return self._array(split, "margin") if "margin" in self.recorded else None

    def example_losses(self, split: str = "test") -> np.ndarray | None:
        """float16 [T, P, N] per-example cross-entropy (memory-mapped), or None when the run did not record them."""
        _check_split(split)
        return self._array(split, "xent") if "loss" in self.recorded else None

    def member_bits(self) -> np.ndarray | None:
        """uint8 [P, R]: which train examples each network trained on (--subset-fraction), packed in the record's
        layout; None for a run on whole splits."""
        return load_member(self.path, self.manifest)

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
        return self._array(split, "loss")

    def accuracy(self, split: str) -> np.ndarray:
        """float32 [T, P]: each network's accuracy on the split at each checkpoint."""
        _check_split(split)
        return self._array(split, "acc")

    @property
    def diverged(self) -> dict[int, int]:
        """{seed: step at which its loss stopped being finite} for networks that diverged by the last completed
        checkpoint (frozen from then on, wrong on every example, NaN loss)."""
        return {int(k): v for k, v in self.manifest["diverged"].items()}

    def healthy(self) -> np.ndarray:
        """bool [P]: the networks that have not diverged."""
        return diverged_row(self.manifest) < 0

    def state(self) -> dict:
        """The saved training state, checked (see rundir.load_state)."""
        return load_state(self.path, self.manifest)

    def weights(self, key: str = "params") -> "torch.Tensor":  # noqa: F821
        """float32 [P, D]: each network's parameters (or momentum) at the last saved state, in arch.param_shapes
        order; key "stats": its BatchNorm running statistics [P, S] in arch.stat_shapes order (S = 0 without)."""
        if key not in ("params", "momentum", "second_moment", "stats"):
            raise UsageError(f"unknown weights {shown(key)}; valid: params, momentum, second_moment, stats")
        state = self.state()
        if key not in state:
            if key == "stats":
                import torch

                return torch.zeros(len(self.seeds), 0)
            raise UsageError(f"{self.path} has no {key} (its optimizer keeps none)")
        return networks(state[key], len(self.seeds), state["stat_shapes" if key == "stats" else "shapes"])

    def module(self, k: int):
        """Network k at the last saved state as a plain nn.Module (a spec arch): its parameters and BatchNorm
        running statistics loaded, in evaluation mode."""
        from .blocks import load_network

        arch = self.arch
        if isinstance(arch, str):
            raise UsageError(f"{self.path} trained a module arch ({arch}): build it with its factory and load "
                             "run.weights()[k]")
        if not 0 <= k < len(self.seeds):
            raise UsageError(f"network {k} does not exist; the run has {len(self.seeds)}")
        return load_network(arch.to_module(), self.weights()[k], self.weights("stats")[k]).eval()

    def __repr__(self) -> str:
        return (f"Run({str(self.path)!r}, arch={self.config.arch}, P={len(self.seeds)}, "
                f"checkpoints={len(self.checkpoints)}, status={self.status})")


def load_run(path: str | Path) -> Run:
    return Run(path)


def _check_split(split: str) -> None:
    if not isinstance(split, str) or split not in SPLITS:
        raise UsageError(f"unknown split {shown(split)}; valid: {', '.join(SPLITS)}")
