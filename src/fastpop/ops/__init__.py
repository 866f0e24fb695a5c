"""The backend seam: every backend module offers the functions of `reference` with the same signatures."""

from __future__ import annotations

from types import ModuleType

import torch

from ..errors import UsageError

BACKENDS = ("auto", "torch")


def get_backend(name: str, device: torch.device) -> ModuleType:
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    from . import reference

    return reference


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device
