"""Data sets resident on the training device, and per-network batch orders.

Images stay in their stored dtype (uint8 for digits) on the device and are normalized when gathered, so a
population can index one shared copy instead of materializing a [P, B, C, H, W] batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError


@dataclass
class Split:
    x: torch.Tensor  # [N, C, H, W], stored dtype
    y: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: int
    mean: torch.Tensor  # float32 [C], per channel over the train split
    std: torch.Tensor  # float32 [C]

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    def split(self, name: str) -> Split:
        return {"train": self.train, "test": self.test}[name]

    def to(self, device: torch.device) -> "Dataset":
        move = lambda s: Split(s.x.to(device), s.y.to(device))  # noqa: E731
        return Dataset(self.name, move(self.train), move(self.test), self.classes,
                       self.mean.to(device), self.std.to(device))


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return xf.mean(1).float(), xf.std(1).clamp_min(1e-6).float()


def load_dataset(name: str, device: torch.device) -> Dataset:
    from . import digits

    loaders = {"digits": digits.load}
    if name not in loaders:
        raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(loaders)}")
    return loaders[name]().to(device)


DATASETS = ("digits",)
