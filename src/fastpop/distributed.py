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
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .errors import UsageError
from .machine import machine_mismatch
from .run import Run
from .rundir import (MEMBER, RunWriter, check_new_out, diverged_row, integrity_problems, layer_major, load_file,
                     networks, record_arrays, release_lock)

# what may differ between shards of one population
_SHARD_FIELDS = ("shard", "out", "device", "max_nets_per_chunk")


def merge(shard_paths: list[str | Path], out: str | Path, final: Path | None = None,
          allow_mixed_machines: bool = False) -> Run:
    """Join the complete shard run directories of one population into one new run directory at `out`.

    Every shard is verified first (rows, state, membership, divergence), and they must be the shards i/n of one n
    of one config on the same data whose seeds together are exactly the config's; anything else is refused
    before anything is written. Shards trained (or resumed) on different kinds of device, backends, instruction
    sets or GPU models are refused too unless `allow_mixed_machines`: their last bits depend on where each
    trained. The output is built under a temporary name and appears whole: a merge killed half-way leaves
    nothing at `out`, and running the same command again merges anew.

    Complete runs that are not shards merge too when they are of one population apart from their seeds, none
    shared (more networks for a population): the output holds the runs in order of their first seed."""
    out = Path(out)
    if not shard_paths:
        raise UsageError("merge needs at least one shard")
    real = check_new_out(out)
    runs = [Run(p) for p in shard_paths]
    if all(r.config.shard is None for r in runs) and len(runs) > 1:
        ordered, config = _check_disjoint(runs)
    else:
        ordered = _check_shards(runs)
        config = dict(ordered[0].manifest["config"], shard=None)
    first = ordered[0]
    mixed = machine_mismatch([(str(r.path), r.manifest) for r in ordered])
    if mixed and not allow_mixed_machines:
        raise UsageError(f"{mixed}; merge them anyway with --allow-mixed-machines")
    config = dict(config, out=str(final or real))  # final: where the output will be moved (add_seeds)
    manifest = {k: v for k, v in first.manifest.items() if k not in ("manifest_sha256", "timings")}
    manifest.update(config=config, shard=None, status="running", checkpoints_done=0, checksums={}, files={},
                    seeds=sum((r.seeds for r in ordered), []),
                    diverged={k: v for r in ordered for k, v in r.manifest["diverged"].items()},
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    merged_from=[str(r.path) for r in ordered])
    # where each block of networks trained: per shard, the machine of every session (created, then resumed)
    manifest["shard_hosts"] = [[r.manifest.get("host"), *r.manifest.get("resumed_on", [])] for r in ordered]
    manifest.pop("resumed_on", None)  # the first shard's own; the merged run was never resumed
    files = {name: load_file(first.path, first.manifest, name) for name in first.manifest["files"] if name != MEMBER}
    if first.member_bits() is not None:
        files[MEMBER] = np.concatenate([r.member_bits() for r in ordered])
    t = len(first.checkpoints)

    def fill(writer: RunWriter) -> None:
        for k in range(t):
            rows = {}
            for split, kind, *_ in record_arrays(manifest):
                rows.setdefault(split, {})[kind] = np.concatenate([r.record_array(split, kind)[k] for r in ordered])
            writer.write_rows(k, rows)
        states = [r.state() for r in ordered]
        shapes = states[0]["shapes"]
        stat_shapes = states[0].get("stat_shapes", [])
        layouts = {"params": shapes, "momentum": shapes, "second_moment": shapes, "stats": stat_shapes}
        rows = {key: layer_major(torch.cat([networks(s[key], len(r.seeds), layout) for s, r in zip(states, ordered)]),
                                 layout) for key, layout in layouts.items() if key in states[0]}
        writer.save_state(states[0]["step"], t, shapes, rows["params"], rows["momentum"],
                          torch.cat([s["diverged_at"] for s in states]), rows.get("second_moment"), rows.get("stats"),
                          stat_shapes)
        writer.save_diverged(diverged_row(manifest))
        writer.commit(t, status="complete", timings={"merged_shards": len(ordered)})

    writer = RunWriter.create(real, manifest, files, fill)
    release_lock(writer.path, writer.lock)
    return Run(real)


def _check_shards(shards: list[Run]) -> list[Run]:
    """The shards in index order, or UsageError: each complete and undamaged, all i/n of one n, of one population,
    their seeds together exactly the config's."""
    by_index, counts = {}, set()
    for run in shards:
        if run.status != "complete":
            raise UsageError(f"{run.path} is not complete (status {run.status}); finish it with --resume first")
        if run.config.shard is None:
            raise UsageError(f"{run.path} is not a shard (trained without --shard)")
        problems, _ = integrity_problems(run.path, run.manifest)
        if problems:
            raise UsageError(f"{run.path} is damaged: {problems[0]} (fastpop verify {run.path} lists all)")
        i, n = map(int, run.config.shard.split("/"))
        counts.add(n)
        if i in by_index:
            raise UsageError(f"{run.path} and {by_index[i].path} are both shard {i} ({run.config.shard})")
        by_index[i] = run
    if len(counts) > 1:
        raise UsageError(f"the shards split the seeds in different ways: {sorted(r.config.shard for r in shards)}")
    n = counts.pop()
    if sorted(by_index) != list(range(n)):
        missing = sorted(set(range(n)) - set(by_index))
        raise UsageError(f"shards do not fit together: {n} expected, missing {missing or 'none'}, "
                         f"found {sorted(by_index)}")
    ordered = [by_index[i] for i in range(n)]
    key = _population_key(ordered[0])
    for run in ordered[1:]:
        if _population_key(run) != key:
            raise UsageError(f"{run.path} is not a shard of the same population as {ordered[0].path} "
                             "(config, data, backend or checkpoints differ)")
    want = Config.from_dict(dict(ordered[0].manifest["config"], shard=None)).seed_list
    if sum((r.seeds for r in ordered), []) != want:
        raise UsageError("the shards' seeds together are not the config's seeds")
    return ordered


def _check_disjoint(runs: list[Run]) -> tuple[list[Run], dict]:
    """Complete, undamaged runs of one population that differ only in their seeds, none shared: (the runs in
    order of their first seed, the config of all their networks: a seed count where the seeds run on without a
    gap, else the list), or UsageError."""
    for run in runs:
        if run.status != "complete":
            raise UsageError(f"{run.path} is not complete (status {run.status}); finish it with --resume first")
        if run.config.grid:
            raise UsageError(f"{run.path} trains a grid; its groups hold consecutive seeds, so only its own shards "
                             "merge into it")
        problems, _ = integrity_problems(run.path, run.manifest)
        if problems:
            raise UsageError(f"{run.path} is damaged: {problems[0]} (fastpop verify {run.path} lists all)")
    ordered = sorted(runs, key=lambda r: r.seeds[0])
    key = _population_key(ordered[0], seeds=False)
    for run in ordered[1:]:
        if _population_key(run, seeds=False) != key:
            raise UsageError(f"{run.path} and {ordered[0].path} are not of one population (config apart from the "
                             "seeds, data, backend or checkpoints differ)")
    seeds = sum((r.seeds for r in ordered), [])
    if len(set(seeds)) < len(seeds):
        shared = sorted({s for s in seeds if seeds.count(s) > 1})[:5]
        raise UsageError(f"the runs share seed(s) {', '.join(map(str, shared))}: each network may be merged once")
    contiguous = seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    config = dict(ordered[0].manifest["config"], shard=None, seeds=len(seeds) if contiguous else seeds,
                  seed_offset=seeds[0] if contiguous else 0)
    return ordered, config


def add_seeds(path: str | Path, count: int, progress=None, should_stop=None) -> Run:
    """Add `count` networks to a complete population: the seeds after its last, trained as a run of their own
    in PATH.add-COUNT (resumed by the same command if interrupted), then merged with it into PATH. The result is
    the population trained in one go. Swapped in by two renames; a kill between them is finished by the same
    command."""
    from .trainer import resume, train

    path = Path(path)
    merged, old = path.with_name(path.name + ".merged"), path.with_name(path.name + ".old")
    extra = path.with_name(f"{path.name}.add-{count}")
    if not path.exists() and merged.exists() and old.exists():  # killed between the two renames: finish them
        os.rename(merged, path)
        shutil.rmtree(old)
        shutil.rmtree(extra, ignore_errors=True)
        return Run(path)
    if not 1 <= count <= 10_000_000:
        raise UsageError(f"--add-seeds takes a count of networks, 1 to 10,000,000; got {count}")
    run = Run(path)
    if run.status != "complete":
        raise UsageError(f"{run.path} is not complete (status {run.status}); finish it with --resume first")
    if run.config.shard is not None or run.config.grid:
        raise UsageError(f"{run.path} is a shard or a grid; add seeds to a whole population without a grid")
    if extra.exists() and (extra / "run.json").exists():
        more = Run(extra)
        if more.status != "complete":
            more = resume(extra, progress, should_stop)
    else:
        start = max(run.seeds) + 1
        more = train(Config.from_dict(dict(run.config.to_dict(), seeds=count, seed_offset=start, out=str(extra))),
                     progress, should_stop)
    shutil.rmtree(merged, ignore_errors=True)
    merge([path, extra], merged, final=Path(os.path.realpath(path)))
    shutil.rmtree(old, ignore_errors=True)
    os.rename(path, old)
    os.rename(merged, path)
    shutil.rmtree(old)
    shutil.rmtree(extra)
    return Run(path)


def _population_key(run: Run, seeds: bool = True) -> tuple:
    m = run.manifest
    skip = _SHARD_FIELDS + (() if seeds else ("seeds", "seed_offset"))
    config = {k: v for k, v in m["config"].items() if k not in skip}
    return (repr(sorted(config.items())), repr(m["splits"]), repr(m["checkpoints"]), repr(m["dataset"]),
            m["backend"], m["device"].split(":")[0], repr(m["arch"]))


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
        if resume_path is not None and (out / "run.json").exists() and Run(out).status == "complete":
            # killed after the merge, while removing the shards: only the cleanup is left
            dist.barrier()
            if rank == 0:
                shutil.rmtree(mine.parent, ignore_errors=True)
                return Run(out)
            return None
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
