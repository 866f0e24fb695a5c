"""The backend seam: every backend module offers the functions of `reference` with the same signatures."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

from ..errors import UsageError

BACKENDS = ("auto", "numba", "torch", "triton")


def get_backend(name: str, device: torch.device) -> ModuleType:
    """auto: Triton on CUDA (when triton is installed, else torch), numba on the CPU. torch (the reference ops)
    runs anywhere. triton on the CPU needs TRITON_INTERPRET=1 (set before fastpop is imported): correct, and very
    slow."""
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "auto":
        name = "numba" if device.type == "cpu" else "triton" if _has_triton() else "torch"
    if name == "torch":
        from . import reference

        return reference
    if name == "numba":
        if device.type != "cpu":
            raise UsageError(f"backend numba runs on the CPU, not on {device}; use --device cpu or another backend")
        from . import numba_cpu

        return numba_cpu
    if not _has_triton():
        raise UsageError("backend triton needs the triton package: pip install triton")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("backend triton needs a CUDA device (or TRITON_INTERPRET=1 to interpret its kernels "
                         "on the CPU, slowly)")
    from . import triton as triton_backend

    return triton_backend


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


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
