"""`fastpop verify RUN`: check a run directory against its manifest (the manifest's own checksum and fields, every
record array's shape and completed rows, membership, the state, divergence) and say everything that is wrong."""

from __future__ import annotations

from .run import Run
from .rundir import integrity_problems, live_writer


def verify(path) -> tuple[Run, list[str], list[str]]:
    """(run, problems, notes). Problems make the directory untrustworthy; notes are facts a user should know.
    A manifest that fails its own checks raises UsageError (nothing else can be trusted then)."""
    run = Run(path)
    problems, state = integrity_problems(run.path, run.manifest)
    notes = []
    done = run.manifest["checkpoints_done"]
    if state is not None and state["checkpoints_done"] == done + 1:
        notes.append("the state is one checkpoint ahead of run.json (killed while saving): --resume counts it")
    if run.status == "complete" and state is not None and state["step"] != run.manifest["total_steps"]:
        problems.append(f"status complete, but state.pt is at step {state['step']} of {run.manifest['total_steps']}")
    holder = live_writer(run.path)
    if run.status == "running" and holder is None:
        notes.append(f"its writer died: resume with fastpop run --resume {run.path}")
    if run.diverged:
        notes.append(f"{len(run.diverged)} network(s) diverged: seeds {sorted(run.diverged)[:10]}")
    return run, problems, notes
