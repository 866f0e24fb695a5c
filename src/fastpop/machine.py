"""The machine a run trained on, as facts for run.json: CPU model and ISA level, thread counts, GPU and driver,
the command line, fastpop's version and commit. Records differ in their last bits between instruction sets
(numba's vectorized float code and oneDNN pick their code paths by ISA), so a run says where it came from, and
merge refuses to join shards whose bits came from different machines.

Every probe is best effort: a fact that cannot be read is None, never an error.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

# x86-64 microarchitecture levels (the psABI's v2-v4) by the /proc/cpuinfo flags each adds
_X86_LEVELS = (
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
)


def cpu_flags(cpuinfo: str | None = None) -> tuple[str | None, set[str]]:
    """(CPU model name, feature flags) from /proc/cpuinfo (or the text given); (None, set()) where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None, set()
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and model is None:
            model = value.strip() or None
        elif key in ("flags", "features") and not flags:  # x86 says flags, arm64 says features
            flags = set(value.split())
    return model, flags


def isa_level(machine: str, flags: set[str]) -> str:
    """x86-64-v1..v4 on x86-64; on other machines the architecture plus its vector extensions (e.g. aarch64+sve)."""
    if machine.lower() in ("x86_64", "amd64"):
        level = "x86-64"
        for name, needs in reversed(_X86_LEVELS):  # each level needs the one below it
            if not needs <= flags:
                break
            level = name
        return level
    vectors = sorted(flags & {"asimd", "sve", "sve2"})
    return "+".join([machine.lower(), *vectors])


def host_cpu_name() -> str | None:
    """LLVM's name for this CPU (e.g. skylake-avx512, znver4): what numba compiles for."""
    try:
        import llvmlite.binding as llvm

        return llvm.get_host_cpu_name()
    except Exception:  # llvmlite missing or too old: the fact is optional
        return None


def thread_counts() -> dict:
    import torch

    counts = {"logical_cpus": os.cpu_count(), "torch": torch.get_num_threads()}
    try:
        counts["usable_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # absent on macOS
        counts["usable_cpus"] = None
    import numba

    counts["numba"] = numba.get_num_threads()
    return counts


def gpu_facts(device) -> dict | None:
    """Name, compute capability, CUDA runtime and driver of a CUDA device; None for a CPU device."""
    import torch

    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}",
            "cuda_runtime": torch.version.cuda, "driver": nvidia_driver()}


def nvidia_driver() -> str | None:
    try:  # the kernel module states its version here; cheaper than starting nvidia-smi
        found = driver_version(Path("/proc/driver/nvidia/version").read_text())
        if found:
            return found
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.stdout.split("\n")[0].strip()
    return first if out.returncode == 0 and first else None


def driver_version(text: str) -> str | None:
    """The version in /proc/driver/nvidia/version's text ("NVRM version: NVIDIA UNIX x86_64 Kernel Module
    550.54.15 ...")."""
    for word in text.split():
        if "." in word and word.replace(".", "").isdigit():
            return word
    return None


def source_commit() -> str | None:
    """The git commit of the checkout fastpop runs from (with "-dirty" when it has uncommitted changes), or None
    when it is installed from a wheel or git is not there."""
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        root = Path(top.stdout.strip())
        if top.returncode != 0 or 'name = "fastpop"' not in _read(root / "pyproject.toml"):
            return None  # installed inside some other repository (a project's virtual environment)
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def command_line() -> list[str] | None:
    """The command that started this process, the program by its name (python -m fastpop: fastpop)."""
    if not sys.argv or not sys.argv[0]:
        return None
    program = Path(sys.argv[0]).name
    return ["fastpop" if program == "__main__.py" else program, *sys.argv[1:]]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def machine_facts(device=None) -> dict:
    """Everything above, as the "host" entry of run.json."""
    from . import __version__

    model, flags = cpu_flags()
    machine = platform.machine()
    return {
        "machine": machine,
        "cpu_model": model or platform.processor() or None,
        "isa": isa_level(machine, flags),
        "llvm_cpu": host_cpu_name(),
        "os": platform.platform(),
        "threads": thread_counts(),
        "device_kind": device.type if device is not None else "cpu",
        "gpu": gpu_facts(device) if device is not None else None,
        "command": command_line(),
        "fastpop": __version__,
        "commit": source_commit(),
    }


def describe(host: dict) -> str:
    """One line for people: CPU, ISA, threads, GPU."""
    threads = host.get("threads") or {}
    gpu = host.get("gpu")
    text = (f"{host.get('cpu_model') or host.get('machine')} ({host.get('isa')}, LLVM {host.get('llvm_cpu')}), "
            f"{threads.get('usable_cpus')} usable CPUs, threads torch {threads.get('torch')} numba "
            f"{threads.get('numba')}")
    if gpu:
        text += f"; {gpu['name']} (sm {gpu['capability']}, CUDA {gpu['cuda_runtime']}, driver {gpu['driver']})"
    return text


def machine_mismatch(runs: list[tuple[str, dict]]) -> str | None:
    """Why the records of these run directories, given as (name, run.json), may differ in their last bits, or
    None: one of them, or a session that resumed one, trained on another kind of device or backend, or on a CPU
    of another instruction set (a GPU of another model, on CUDA)."""
    sessions = []
    for name, m in runs:
        sessions.append((name, m.get("host", {}), m.get("backend")))
        sessions += [(f"{name} (resumed)", host, m.get("backend")) for host in m.get("resumed_on", [])]

    def key(host: dict, backend: str) -> dict:
        kind = host.get("device_kind")
        k = {"device kind": kind, "backend": backend}
        if kind == "cuda":  # the kernels run on the GPU; its architecture picks their code
            k["GPU"] = (host.get("gpu") or {}).get("name")
        else:  # vectorized CPU code differs by instruction set
            k["ISA"] = host.get("isa")
        return k

    first_name, first_host, first_backend = sessions[0]
    want = key(first_host, first_backend)
    for name, host, backend in sessions[1:]:
        got = key(host, backend)
        for what in want:
            if got.get(what) != want[what]:
                return (f"{name} was trained with {what} {got.get(what) or 'unknown'}, {first_name} with "
                        f"{want[what] or 'unknown'}: their records may differ in the last bits")
    return None
