"""`fastpop verify RUN`: check a run directory against its manifest (shapes, checksums, padding, state)."""

from __future__ import annotations

import numpy as np
import torch

from .errors import UsageError
from .run import Run
from .rundir import SPLITS, STATE, live_writer, record_arrays, row_checksum


def verify(path) -> tuple[Run, list[str], list[str]]:
    """(run, problems, notes). Problems make the directory untrustworthy; notes are facts a user should know."""
    run = Run(path)
    problems, notes = [], []
    done, p = run.manifest["checkpoints_done"], len(run.seeds)
    if not 0 <= done <= len(run.manifest["checkpoints"]):
        problems.append(f"checkpoints_done = {done} is outside the plan of {len(run.manifest['checkpoints'])}")
        return run, problems, notes
    sums = run.manifest.get("checksums", {})
    for split in SPLITS:
        n = run.n(split)
        kinds = [kind for s, kind, *_ in record_arrays(run.manifest) if s == split]
        for kind in kinds:
            try:
                arr = run.record_array(split, kind)
            except UsageError as e:
                problems.append(str(e))
                continue
            for t in range(done):
                want = sums.get(f"{split}.{kind}", {}).get(str(t))
                if want is None:
                    problems.append(f"{split}.{kind}.npy checkpoint {t} has no checksum in run.json")
                elif row_checksum(arr[t]) != want:
                    problems.append(f"{split}.{kind}.npy checkpoint {t} does not match its checksum")
            if kind == "bits" and done and n % 64:
                pad = np.asarray(arr).view(np.uint64)[..., -1] >> np.uint64(n % 64)
                if pad.any():
                    problems.append(f"{split}.bits.npy has nonzero padding bits past N = {n}")
    state_path = run.path / STATE
    if state_path.exists():
        try:
            state = torch.load(state_path, map_location="cpu")
            d = run.manifest["arch"]["params_per_network"]
            if tuple(state["params"].shape) != (p, d) or tuple(state["momentum"].shape) != (p, d):
                problems.append(f"state.pt holds parameters {tuple(state['params'].shape)}, expected {(p, d)}")
            if state["checkpoints_done"] > done + 1 or state["checkpoints_done"] < 0:
                problems.append(f"state.pt counts {state['checkpoints_done']} checkpoints, the manifest {done}")
            elif state["checkpoints_done"] == done + 1:
                notes.append("the state is one checkpoint ahead of run.json (killed while saving): --resume "
                             "counts it")
            if not 0 <= state["step"] <= run.manifest["total_steps"]:
                problems.append(f"state.pt is at step {state['step']}, outside 0..{run.manifest['total_steps']}")
        except Exception as e:  # torch.load raises many kinds on a damaged file
            problems.append(f"state.pt cannot be read ({type(e).__name__})")
    elif done:
        problems.append("state.pt is missing")
    if run.status == "running" and live_writer(run.path) is None:
        notes.append(f"its writer died: resume with fastpop run --resume {run.path}")
    if run.diverged:
        notes.append(f"{len(run.diverged)} network(s) diverged: seeds {sorted(run.diverged)[:10]}")
    return run, problems, notes
