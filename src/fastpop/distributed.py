"""Scale-out: shards of a population as independent runs, `merge` to join them, and torchrun.

Design: shards merged at the end. `--shard i/n` trains the i-th of n contiguous blocks of the seeds as an ordinary
run directory (a SLURM array job, say); `fastpop merge` joins complete shards into one run directory whose record
holds all networks in seed order. Under torchrun each rank trains shard RANK/WORLD_SIZE into RUN.shards/ on its
own device (cuda:LOCAL_RANK when CUDA is there), then rank 0 merges into RUN and removes RUN.shards/. Since a
network trains bit-identically whatever its company, the merged record equals a one-process run's.
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .errors import UsageError
from .run import Run
from .rundir import STATE, RunWriter, check_new_out, record_arrays

# what may differ between shards of one population
_SHARD_FIELDS = ("shard", "out", "device", "max_nets_per_chunk")


def merge(shard_paths: list[str | Path], out: str | Path) -> Run:
    """Join complete shard run directories into one new run directory at `out`."""
    out = Path(out)
    check_new_out(out)
    shards = [Run(p) for p in shard_paths]
    if not shards:
        raise UsageError("merge needs at least one shard")
    by_index = {}
    for run in shards:
        if run.status != "complete":
            raise UsageError(f"{run.path} is not complete (status {run.status}); finish it with --resume first")
        if run.config.shard is None:
            raise UsageError(f"{run.path} is not a shard (trained without --shard)")
        i, n = map(int, run.config.shard.split("/"))
        if i in by_index:
            raise UsageError(f"{run.path} and {by_index[i].path} are both shard {run.config.shard}")
        by_index[i] = run
    first = shards[0]
    n = int(first.config.shard.split("/")[1])
    if sorted(by_index) != list(range(n)):
        missing = sorted(set(range(n)) - set(by_index))
        raise UsageError(f"shards do not fit together: {n} expected, missing {missing or 'none'}, "
                         f"found {sorted(by_index)}")
    key = _population_key(first)
    for run in shards[1:]:
        if _population_key(run) != key:
            raise UsageError(f"{run.path} is not a shard of the same population as {first.path} "
                             "(config, data or checkpoints differ)")
    ordered = [by_index[i] for i in range(n)]
    manifest = dict(first.manifest)
    config = dict(first.manifest["config"], shard=None, out=str(out))
    manifest.update(config=config, shard=None, status="running", checkpoints_done=0, checksums={},
                    seeds=sum((r.seeds for r in ordered), []),
                    init_seeds=sum((r.manifest["init_seeds"] for r in ordered), []),
                    order_seeds=sum((r.manifest["order_seeds"] for r in ordered), []),
                    diverged={k: v for r in ordered for k, v in r.manifest.get("diverged", {}).items()},
                    merged_from=[str(r.path) for r in ordered])
    writer = RunWriter.create(out, manifest)
    try:
        t = len(first.checkpoints)
        for k in range(t):
            rows = {}
            for split, kind, *_ in record_arrays(manifest):
                rows.setdefault(split, {})[kind] = np.concatenate([r.record_array(split, kind)[k] for r in ordered])
            writer.write_rows(k, rows)
        states = [torch.load(r.path / STATE, map_location="cpu") for r in ordered]
        writer.save_state({"step": states[0]["step"], "checkpoints_done": t,
                           **{key: torch.cat([s[key] for s in states]) for key in ("params", "momentum",
                                                                                     "diverged_at")}})
        writer.save_array("diverged.npy", np.concatenate([np.load(r.path / "diverged.npy") for r in ordered]))
        if first.member_bits() is not None:
            writer.save_array("train.member.npy", np.concatenate([r.member_bits() for r in ordered]))
        writer.commit(t)
    except BaseException:
        writer.close("failed")
        raise
    writer.close("complete", timings={"merged_shards": n})
    return Run(out)


def _population_key(run: Run) -> tuple:
    config = {k: v for k, v in run.manifest["config"].items() if k not in _SHARD_FIELDS}
    return (repr(sorted(config.items())), repr(run.manifest["splits"]), repr(run.manifest["checkpoints"]),
            repr(run.manifest["dataset"]))


def torchrun_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def shard_dir(out: Path, rank: int, world: int) -> Path:
    return out.with_name(out.name + ".shards") / f"{rank}-of-{world}"


def run_torchrun(config: Config | None, resume_path: Path | None, progress, should_stop) -> Run | None:
    """This rank's shard, then (rank 0) the merge. Returns the merged Run on rank 0, None elsewhere."""
    import torch.distributed as dist

    from .trainer import resume, train

    rank, world, local = torchrun_world()
    out = Path(resume_path or config.out or "")
    if not out.name:
        raise UsageError("under torchrun, give --out (every rank must agree on it)")
    mine = shard_dir(out, rank, world)
    dist.init_process_group("gloo", timeout=timedelta(days=7))  # only barriers go through it
    try:
        if resume_path is None:
            check_new_out(out)  # every rank: all refuse together instead of leaving peers at the barrier
            device = config.device
            if device == "auto" and torch.cuda.is_available():
                device = f"cuda:{local}"
            shard_config = Config.from_dict(dict(config.to_dict(), shard=f"{rank}/{world}", out=str(mine),
                                                 device=device))
            mine.parent.mkdir(parents=True, exist_ok=True)
            train(shard_config, progress if rank == 0 else None, should_stop)
        elif not (mine / "run.json").exists() or Run(mine).status != "complete":
            resume(mine, progress if rank == 0 else None, should_stop)
        dist.barrier()
        if rank != 0:
            return None
        merged = merge([shard_dir(out, r, world) for r in range(world)], out)
        shutil.rmtree(mine.parent)
        return merged
    finally:
        dist.destroy_process_group()
