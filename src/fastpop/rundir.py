"""The run directory format, owned here and nowhere else: file names, the manifest's schema and its checks, row
sizes, checksums, the state file, the writer lock, and the integrity checks that every reader runs. Readable with
numpy and json alone (state.pt with torch); the layout is documented in README.md.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ResourceError, UsageError
from .lock import LOCK, _alive, acquire_lock, live_writer, release_lock  # noqa: F401 (part of the format's API)

FORMAT = 2
SPLITS = ("train", "test")
MANIFEST = "run.json"
STATE = "state.pt"
DIVERGED = "diverged.npy"
MEMBER = "train.member.npy"
STATUSES = ("running", "complete", "interrupted", "failed")
STATE_TENSORS = ("params", "momentum", "diverged_at")  # and "second_moment" with Adam/AdamW
# errors of the machine rather than of the input: a full disk or quota, an I/O error
RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EFBIG}


def bytes_per_row(n: int) -> int:
    """R = 8 * ceil(N / 64): rows are whole uint64 words."""
    return 8 * -(-n // 64)


def array_file(split: str, kind: str) -> str:
    return f"{split}.{kind}.npy"


def checkpoint_plan(epochs: int, steps_per_epoch: int, record_every: int) -> list[dict]:
    """Record after the last step of every epoch, and after every `record_every` steps when that is set."""
    total = epochs * steps_per_epoch
    steps = {e * steps_per_epoch for e in range(1, epochs + 1)}
    if record_every:
        steps |= set(range(record_every, total + 1, record_every))
    return [{"step": s, "epoch": s / steps_per_epoch} for s in sorted(steps)]


def steps_per_epoch(config, n_train: int) -> int:
    return round(config.subset_fraction * n_train) // config.batch_size


# ---------------------------------------------------------------- writing files atomically

def atomic_write(path: Path, data: bytes | Callable) -> None:
    """Write (bytes, or a function that writes into the open file), fsync, rename, fsync the folder: readers see
    the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


def write_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write(path, buf.getvalue())


def file_sha256(data: bytes | np.ndarray) -> str:
    return hashlib.sha256(data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()).hexdigest()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# ---------------------------------------------------------------- the manifest

def manifest_digest(m: dict) -> str:
    """sha256 of the manifest's content without its own checksum, keys sorted (what json.load gives back)."""
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(folder: Path, m: dict) -> None:
    """Seal the manifest with its checksum and write it atomically."""
    m["manifest_sha256"] = manifest_digest(m)
    write_json(folder / MANIFEST, m)


def read_manifest(folder: Path) -> dict:
    """The manifest of a run directory, every field checked (see manifest_problem); UsageError otherwise."""
    path = folder / MANIFEST
    try:
        m = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UsageError(f"{folder} is not a run directory (no {MANIFEST})") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8; RecursionError: deep nesting
        raise UsageError(f"cannot read {path}: {type(e).__name__}: {str(e)[:200]}") from None
    problem = manifest_problem(m)
    if problem:
        raise UsageError(f"{path} is damaged: {problem}")
    return m


def _is_int(v, lo=0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


SCHEMA = {  # key -> check of its value; "arch" stays open to new keys (a spec string, say)
    "format": lambda v: v == FORMAT,
    "config": lambda v: isinstance(v, dict),
    "seeds": lambda v: isinstance(v, list) and v and all(_is_int(s) for s in v),
    "checkpoints": lambda v: isinstance(v, list) and all(
        isinstance(c, dict) and _is_int(c.get("step"), 1) and isinstance(c.get("epoch"), (int, float)) for c in v),
    "checkpoints_done": _is_int,
    "steps_per_epoch": lambda v: _is_int(v, 1),
    "total_steps": _is_int,
    "status": lambda v: v in STATUSES,
    "splits": lambda v: isinstance(v, dict) and set(v) == set(SPLITS) and all(
        isinstance(s, dict) and _is_int(s.get("n"), 1) and s.get("bytes_per_row") == bytes_per_row(s["n"])
        and isinstance(s.get("images_sha256"), str) and isinstance(s.get("labels_sha256"), str)
        for s in v.values()),
    "arch": lambda v: isinstance(v, dict) and _is_int(v.get("params_per_network"), 1),
    "checksums": lambda v: isinstance(v, dict) and all(
        isinstance(x, dict) and all(isinstance(c, str) for c in x.values()) for x in v.values()),
    "files": lambda v: isinstance(v, dict) and all(isinstance(c, str) for c in v.values()),
    "diverged": lambda v: isinstance(v, dict) and all(isinstance(k, str) and k.isascii() and k.isdigit()
                                                      and _is_int(s, 1) for k, s in v.items()),
    "predictions": lambda v: isinstance(v, bool),
    "backend": lambda v: isinstance(v, str),
    "device": lambda v: isinstance(v, str),
    "manifest_sha256": lambda v: isinstance(v, str),
}


def manifest_problem(m) -> str | None:
    """What is wrong with a manifest, or None: its schema, its checksum, and its fields against each other
    (seeds, checkpoint count, status, divergence). What every reader checks."""
    if not isinstance(m, dict):
        return "not a JSON object"
    for key, ok in SCHEMA.items():
        if key not in m:
            return f"no {key!r}" if key != "format" else "no 'format': written by an older fastpop"
        if not ok(m[key]):
            return f"bad {key!r}" if key != "format" else f"format {m[key]!r}, this fastpop reads format {FORMAT}"
    if m["manifest_sha256"] != manifest_digest(m):
        return "its content does not match its checksum (edited or damaged)"
    seeds, plan, done = m["seeds"], m["checkpoints"], m["checkpoints_done"]
    if len(set(seeds)) != len(seeds):
        return "duplicated seeds"
    if done > len(plan):
        return "checkpoints_done exceeds the checkpoint plan"
    if m["status"] == "complete" and done != len(plan):
        return f"status complete with {done} of {len(plan)} checkpoints done"
    last_step, known = plan[done - 1]["step"] if done else 0, set(seeds)
    if any(int(k) not in known or s > last_step for k, s in m["diverged"].items()):
        return "'diverged' names unknown seeds or steps past the last checkpoint"
    return None


def consistency_problem(m: dict) -> str | None:
    """What in a (well-formed) manifest does not follow from its config, or None: seeds, steps, the checkpoint
    plan, predictions. What verify, resume and merge check besides what every reader checks."""
    from .config import Config

    try:
        config = Config.from_dict(m["config"])
    except Exception as e:  # UsageError, or a type a hand-edited config was never meant to hold
        return f"bad config: {' '.join(str(e).split())[:200]}"
    if m["seeds"] != config.shard_seeds():
        return "its seeds are not the ones its config describes"
    spe = steps_per_epoch(config, m["splits"]["train"]["n"])
    if m["steps_per_epoch"] != spe or m["total_steps"] != config.epochs * spe:
        return "steps per epoch or total steps do not follow from the config and the train split"
    if m["checkpoints"] != checkpoint_plan(config.epochs, spe, config.record_every):
        return "the checkpoint plan does not follow from the config"
    if config.record_predictions and not m["predictions"]:
        return "'predictions' is off, but the config records them"
    return None


def same_data(a: dict, b: dict, split: str) -> bool:
    """Two manifests' split holds the same images and labels (by sha256)."""
    sa, sb = a["splits"][split], b["splits"][split]
    return (sa["n"], sa["images_sha256"], sa["labels_sha256"]) == (sb["n"], sb["images_sha256"], sb["labels_sha256"])


# ---------------------------------------------------------------- record arrays

def record_arrays(manifest: dict) -> list[tuple[str, str, tuple, type, float]]:
    """(split, kind, shape, dtype, fill) of every record array a manifest implies."""
    t, p = len(manifest["checkpoints"]), len(manifest["seeds"])
    out = []
    for split, info in manifest["splits"].items():
        out += [(split, "bits", (t, p, info["bytes_per_row"]), np.uint8, 0),
                (split, "loss", (t, p), np.float32, np.nan), (split, "acc", (t, p), np.float32, np.nan)]
        asked = set(manifest["config"].get("record") or [])
        if "pred" in asked or (split == "test" and manifest.get("predictions")):
            out.append((split, "pred", (t, p, info["n"]), pred_dtype(manifest.get("class_ids")), 0))
        for kind, name in (("margin", "margin"), ("loss", "xent")):
            if kind in asked:
                out.append((split, name, (t, p, info["n"]), np.float16, np.nan))
    return out


def pred_dtype(class_ids) -> type:
    """Predicted labels are stored as original class ids in the smallest unsigned type that holds them."""
    return np.uint8 if not class_ids or max(class_ids) < 256 else np.uint16


def row_checksum(row: np.ndarray, m: dict, split: str, kind: str, t: int) -> str:
    """sha256 of a row with what it must mean (file, checkpoint, N and P): a row moved to another checkpoint, or
    a manifest whose N was edited, fails it too."""
    h = hashlib.sha256(f"{split}.{kind} t={t} n={m['splits'][split]['n']} p={len(m['seeds'])}".encode())
    h.update(memoryview(np.ascontiguousarray(row)).cast("B"))
    return h.hexdigest()[:32]


def array_spec(m: dict) -> dict:
    """(split, kind) -> (shape, dtype, fill) of every record array of a manifest."""
    return {(s, k): (shape, dtype, fill) for s, k, shape, dtype, fill in record_arrays(m)}


def open_array(folder: Path, m: dict, split: str, kind: str, mode: str = "r") -> np.ndarray:
    """A record array (memory-mapped), its shape and dtype checked against the manifest. For reading, an array
    with fewer rows than the plan but all the completed ones is accepted (a run extended by --epochs, killed before
    its arrays grew); for writing (mode "r+") it is first grown to the plan, its new rows filled."""
    shape, dtype, fill = array_spec(m)[split, kind]
    path = folder / array_file(split, kind)
    try:
        arr = np.load(path, mmap_mode=mode)
    except FileNotFoundError:
        raise UsageError(f"{path} is missing") from None
    except Exception as e:  # np.load raises many kinds on a damaged header
        raise UsageError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    short = arr.shape[1:] == tuple(shape[1:]) and m["checkpoints_done"] <= arr.shape[0] < shape[0]
    if short and arr.dtype == dtype and mode == "r+":
        del arr
        _grow(path, shape, dtype, fill)
        arr = np.load(path, mmap_mode=mode)
    elif short and arr.dtype == dtype:
        return arr
    if arr.shape != tuple(shape) or arr.dtype != dtype:
        raise UsageError(f"{path} holds {arr.dtype} {arr.shape}, but run.json says {np.dtype(dtype)} {shape}")
    return arr


def _grow(path: Path, shape, dtype, fill) -> None:
    """Grow a record array to `shape` (more checkpoint rows): a new file with the old rows, swapped in."""
    old = np.load(path, mmap_mode="r")
    tmp = path.with_name(path.name + ".grow")
    _new_array(tmp, shape, dtype, fill)
    grown = np.load(tmp, mmap_mode="r+")
    grown[:old.shape[0]] = old
    grown.flush()
    del grown, old
    os.replace(tmp, path)


def row_problems(m: dict, split: str, kind: str, arr: np.ndarray, upto: int | None = None) -> list[str]:
    """Rows 0..upto-1 (default: the checkpoints done) against their checksums in the manifest."""
    sums = m["checksums"].get(f"{split}.{kind}", {})
    out = []
    for t in range(m["checkpoints_done"] if upto is None else upto):
        want = sums.get(str(t))
        if want is None:
            out.append(f"{array_file(split, kind)} checkpoint {t} has no checksum in run.json")
        elif row_checksum(arr[t], m, split, kind, t) != want:
            out.append(f"{array_file(split, kind)} checkpoint {t} does not match its checksum")
    if kind == "bits" and upto is None and m["checkpoints_done"] and m["splits"][split]["n"] % 64:
        n = m["splits"][split]["n"]
        pad = np.asarray(arr[:m["checkpoints_done"]]).view(np.uint64)[..., -1] >> np.uint64(n % 64)
        if pad.any():
            out.append(f"{array_file(split, kind)} has nonzero padding bits past N = {n}")
    return out


def member_problems(folder: Path, m: dict) -> list[str]:
    """train.member.npy: present exactly when the config trains on subsets, [P, R] uint8, matching its checksum."""
    from .config import Config

    path, want = folder / MEMBER, m["files"].get(MEMBER)
    if Config.from_dict(m["config"]).subset_fraction >= 1:
        return [f"run.json lists {MEMBER} but the run trains on whole splits"] if want else []
    if want is None:
        return [f"{MEMBER} has no checksum in run.json"]
    try:
        data = path.read_bytes()
    except OSError as e:
        return [f"{MEMBER} cannot be read ({e.strerror or e}); the run trains on subsets"]
    return [] if file_sha256(data) == want else [f"{MEMBER} does not match its checksum"]


def file_problems(folder: Path, m: dict) -> list[str]:
    """Every file run.json lists besides the membership (each split's example indices and labels, a saved copy of
    in-memory data) readable and matching its checksum."""
    out = []
    for name, want in m["files"].items():
        if name == MEMBER:
            continue
        try:
            data = (folder / name).read_bytes()
        except OSError as e:
            out.append(f"{name} cannot be read ({e.strerror or e})")
            continue
        if file_sha256(data) != want:
            out.append(f"{name} does not match its checksum")
    return out


def load_file(folder: Path, m: dict, name: str) -> np.ndarray | None:
    """A file run.json lists, checked against its checksum; None when it lists no file of that name."""
    if name not in m.get("files", {}):
        return None
    problems = file_problems(folder, {"files": {name: m["files"][name]}})
    if problems:
        raise UsageError(f"{folder}: {problems[0]}")
    return np.load(folder / name)


def pack_member(subset: np.ndarray, n: int) -> np.ndarray:
    """int [P, M] each network's train examples -> uint8 [P, R] membership bits in the record's layout (with
    numpy's packbits: about P * N bytes of scratch, where the record's bit packer takes several times more)."""
    p = len(subset)
    member = np.zeros((p, n), bool)
    member[np.arange(p)[:, None], subset] = True
    packed = np.packbits(member, axis=-1, bitorder="little")
    out = np.zeros((p, bytes_per_row(n)), np.uint8)
    out[:, :packed.shape[1]] = packed
    return out


def load_member(folder: Path, m: dict) -> np.ndarray | None:
    """uint8 [P, R] membership bits, checked; None for a run on whole splits."""
    problems = member_problems(folder, m)
    if problems:
        raise UsageError(f"{folder}: {problems[0]}")
    if MEMBER not in m["files"]:
        return None
    return np.load(folder / MEMBER)


def diverged_row(m: dict) -> np.ndarray:
    """int64 [P]: what diverged.npy must hold for this manifest (step, or -1)."""
    steps = {int(k): s for k, s in m["diverged"].items()}
    return np.array([steps.get(s, -1) for s in m["seeds"]], np.int64)


def diverged_map(seeds: list[int], diverged_at: np.ndarray, upto_step: int) -> dict[str, int]:
    """{seed: step} of the networks that diverged at or before `upto_step`."""
    return {str(seeds[k]): int(diverged_at[k]) for k in np.flatnonzero((diverged_at >= 0) & (diverged_at <= upto_step))}


# ---------------------------------------------------------------- the state

def state_digest(state: dict) -> str:
    """sha256 over the state's counters, layout and tensors' bytes (no copy of the tensors)."""
    head = [state["step"], state["checkpoints_done"], state["shapes"], "second_moment" in state]
    if "stats" in state:
        head.append(state["stat_shapes"])
    h = hashlib.sha256(json.dumps(head).encode())
    for key in (*STATE_TENSORS, "second_moment", "stats"):
        if key in state:
            h.update(memoryview(state[key].contiguous().numpy()).cast("B"))
    return h.hexdigest()


def save_state(folder: Path, step: int, checkpoints_done: int, shapes: list, params: "torch.Tensor",  # noqa: F821
               momentum, diverged_at, second_moment=None, stats=None, stat_shapes=()) -> None:
    """state.pt: params, momentum (Adam's first moment), Adam's second moment and BatchNorm's running
    statistics (stats, in `stat_shapes` order) as the population's flat layer-major buffers (parameter i of every
    network as one block [P, *shape_i], in `shapes` order), written straight from them: no network-major copy."""
    state = {"format": FORMAT, "step": step, "checkpoints_done": checkpoints_done,
             "shapes": [list(s) for s in shapes], "params": params.detach().cpu(),
             "momentum": momentum.detach().cpu(), "diverged_at": diverged_at.detach().cpu()}
    if second_moment is not None:
        state["second_moment"] = second_moment.detach().cpu()
    if stat_shapes:
        state["stats"], state["stat_shapes"] = stats.detach().cpu(), [list(s) for s in stat_shapes]
    state["sha256"] = state_digest(state)
    import torch  # here, so that readers of run directories do not load torch

    atomic_write(folder / STATE, lambda f: torch.save(state, f))


def load_state(folder: Path, m: dict) -> dict:
    """state.pt checked against its checksum and the manifest; UsageError naming the file otherwise."""
    import torch

    path = folder / STATE
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path} is missing") from None
    except Exception as e:  # torch.load raises many kinds on a damaged file
        raise UsageError(f"{path} is corrupt ({type(e).__name__})") from None
    problem = _state_problem(state, m)
    if problem:
        raise UsageError(f"{path} is corrupt or does not fit this run: {problem}")
    return state


def _state_problem(state, m: dict) -> str | None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return "not a state of this format"
    try:
        if state.get("sha256") != state_digest(state):
            return "its content does not match its checksum"
    except (KeyError, TypeError, AttributeError, RuntimeError):
        return "fields missing"
    p, d = len(m["seeds"]), m["arch"]["params_per_network"]
    shapes = state["shapes"]
    if sum(int(np.prod(s)) for s in shapes) != d:
        return f"its layout holds {sum(int(np.prod(s)) for s in shapes)} parameters per network, run.json {d}"
    from .config import Config

    adam = Config.from_dict(m["config"]).optimizer != "sgd"
    if adam != ("second_moment" in state):
        return "its optimizer moments do not fit the config's optimizer"
    stat_shapes = m["arch"].get("stat_shapes", [])
    if [s for _, s in stat_shapes] != state.get("stat_shapes", []):
        return f"its BatchNorm statistics {state.get('stat_shapes', [])} are not run.json's"
    s = p * sum(int(np.prod(shape)) for _, shape in stat_shapes)
    for key, n in (("params", p * d), ("momentum", p * d), ("diverged_at", p), ("second_moment", p * d),
                   ("stats", s)):
        if key in state and (state[key].dim() != 1 or len(state[key]) != n):
            return f"{key} holds {tuple(state[key].shape)}, expected ({n},)"
    done, plan = state["checkpoints_done"], m["checkpoints"]
    if not (_is_int(done) and _is_int(state["step"])) or done > len(plan) or not (
            m["checkpoints_done"] <= done <= m["checkpoints_done"] + 1):
        return f"it counts {done} checkpoints, run.json {m['checkpoints_done']}"
    lo = plan[done - 1]["step"] if done else 0
    hi = plan[done]["step"] if done < len(plan) else m["total_steps"]
    if not lo <= state["step"] <= hi:
        return f"step {state['step']} does not lie between checkpoint {done} and the next"
    return None


def networks(flat, p: int, shapes: list):
    """Layer-major flat [P * D] -> network-major [P, D] (row k is network k, parameters in `shapes` order)."""
    blocks, start = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        blocks.append(flat[start:start + p * n].view(p, n))
        start += p * n
    import torch

    return torch.cat(blocks, dim=1)


def layer_major(rows, shapes: list):
    """Network-major [P, D] -> layer-major flat [P * D]: the inverse of `networks`."""
    blocks, start = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        blocks.append(rows[:, start:start + n].reshape(-1))
        start += n
    import torch

    return torch.cat(blocks)


# ---------------------------------------------------------------- integrity of a whole directory

def integrity_problems(folder: Path, m: dict, rows: bool = True) -> tuple[list[str], dict | None]:
    """(problems, state or None): every record array's shape and completed rows, membership, the state, and
    diverged.npy against the manifest and the state. What `verify` prints, and what merge and resume refuse."""
    problem = consistency_problem(m)
    problems = [f"run.json: {problem}"] if problem else []
    if rows:
        for split, kind in array_spec(m):
            try:
                problems += row_problems(m, split, kind, open_array(folder, m, split, kind))
            except UsageError as e:
                problems.append(str(e))
    problems += member_problems(folder, m) + file_problems(folder, m)
    state = None
    if (folder / STATE).exists() or m["checkpoints_done"]:
        try:
            state = load_state(folder, m)
        except UsageError as e:
            problems.append(str(e))
    problems += diverged_problems(folder, m, state)
    return problems, state


def diverged_problems(folder: Path, m: dict, state: dict | None) -> list[str]:
    """diverged.npy must hold the manifest's divergence, or (killed between the two) the state's one checkpoint
    ahead; and the state must agree with the manifest up to the last checkpoint."""
    seeds, done, plan = m["seeds"], m["checkpoints_done"], m["checkpoints"]
    want = [diverged_row(m)]
    out = []
    if state is not None:
        at = state["diverged_at"].numpy()
        if diverged_map(seeds, at, plan[done - 1]["step"] if done else 0) != m["diverged"]:
            out.append("state.pt and run.json disagree on which networks diverged")
        if state["checkpoints_done"] == done + 1:
            ahead = diverged_map(seeds, at, plan[done]["step"])
            want.append(diverged_row(dict(m, diverged=ahead)))
    path = folder / DIVERGED
    if not path.exists():
        return out + ([f"{DIVERGED} is missing"] if done else [])
    try:
        arr = np.load(path)
    except Exception as e:
        return out + [f"{path} is truncated or corrupt ({type(e).__name__})"]
    if not any(arr.dtype == w.dtype and arr.shape == w.shape and (arr == w).all() for w in want):
        out.append(f"{DIVERGED} disagrees with run.json's 'diverged'")
    return out


# ---------------------------------------------------------------- creating a run directory

def check_new_out(path: Path) -> Path:
    """Refuse an --out that exists and is not empty, that is or holds the working directory, or that cannot be
    created; returns it with symlinks resolved. Touches nothing."""
    real = Path(os.path.realpath(path))
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--out {path} exists and is not empty; choose a new directory")
    if real == Path.cwd().resolve() or real in Path.cwd().resolve().parents:
        raise UsageError(f"--out {path} is the working directory or holds it; give a new directory's name")
    parent = next(p for p in [real, *real.parents] if p.exists())
    if not parent.is_dir():
        raise UsageError(f"--out {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path} is not writable")
    return real


class RunWriter:
    """Writes a run directory's record, one checkpoint at a time. `create` makes a new one, `reopen` continues
    one for --resume; both hold the directory's lock until `close`."""

    def __init__(self, path: Path, manifest: dict, lock: str):
        self.path = path
        self.manifest = manifest
        self.lock = lock
        self.arrays = {(split, kind): open_array(path, manifest, split, kind, "r+")
                       for split, kind, *_ in record_arrays(manifest)}

    @classmethod
    def create(cls, path: Path, manifest: dict, files: dict[str, np.ndarray] | None = None,
               fill: Callable[["RunWriter"], None] | None = None) -> "RunWriter":
        """Build the directory under a temporary name, then rename it into place: --out appears whole or not at
        all. `files` (name -> array) are written first; `fill(writer)` may write rows and state before the
        rename (merge builds its whole output so). Space for every array is reserved before it is filled."""
        path = Path(os.path.realpath(path))
        host = socket.gethostname()
        tmp = path.with_name(f".{path.name}.tmp-{host}-{os.getpid()}")
        _remove_dead_temps(path, host)
        need = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for *_, shape, dtype, _ in record_arrays(manifest))
        free = shutil.disk_usage(next(p for p in [path, *path.parents] if p.exists())).free
        if need > free:
            raise ResourceError(f"--out {path} needs {need / 2**20:,.1f} MiB for its record, the disk has "
                                f"{free / 2**20:,.1f} MiB free")
        writer = None
        try:
            tmp.mkdir(parents=True)
            for split, kind, shape, dtype, value in record_arrays(manifest):
                _new_array(tmp / array_file(split, kind), shape, dtype, value)
            manifest.setdefault("files", {})
            for name, arr in (files or {}).items():
                data = npy_bytes(arr)
                atomic_write(tmp / name, data)
                manifest["files"][name] = file_sha256(data)
            write_manifest(tmp, manifest)
            writer = cls(tmp, manifest, acquire_lock(tmp))
            if fill:
                fill(writer)
            publish(tmp, path)
        except BaseException as e:
            if writer:
                writer.arrays.clear()
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise _os_error(e, f"cannot create --out {path}") from None
            raise
        writer.path = path
        return writer

    @classmethod
    def reopen(cls, path: Path, manifest: dict) -> "RunWriter":
        lock = acquire_lock(path)
        try:
            return cls(path, manifest, lock)
        except BaseException:
            release_lock(path, lock)
            raise

    def write_rows(self, t: int, records: dict[str, dict[str, np.ndarray]]) -> None:
        """records: split -> {"bits": uint8 [P, R], "loss": [P], "acc": [P], and "pred": uint8 or uint16 [P, N]
        where predictions are recorded}, flushed to disk. They count only once `commit` says so."""
        for split, rows in records.items():
            for kind, row in rows.items():
                arr = self.arrays[split, kind]
                arr[t] = row
                flush_rows(arr)
                self._checksum(split, kind, t)

    def adopt_rows(self, lo: int, hi: int) -> None:
        """Checksum rows lo..hi-1 that reached the disk (and the saved state) before a kill kept the manifest
        from counting them."""
        for split, kind in self.arrays:
            for t in range(lo, hi):
                self._checksum(split, kind, t)

    def _checksum(self, split: str, kind: str, t: int) -> None:
        sums = self.manifest.setdefault("checksums", {}).setdefault(f"{split}.{kind}", {})
        sums[str(t)] = row_checksum(self.arrays[split, kind][t], self.manifest, split, kind, t)

    def commit(self, checkpoints_done: int, **fields) -> None:
        self.manifest["checkpoints_done"] = checkpoints_done
        self.manifest.update(fields)
        write_manifest(self.path, self.manifest)

    def save_state(self, step: int, checkpoints_done: int, shapes, params, momentum, diverged_at,
                   second_moment=None, stats=None, stat_shapes=()) -> None:
        save_state(self.path, step, checkpoints_done, shapes, params, momentum, diverged_at, second_moment, stats,
                   stat_shapes)

    def save_diverged(self, diverged_at: np.ndarray) -> None:
        write_npy(self.path / DIVERGED, np.asarray(diverged_at, np.int64))

    def save_array(self, name: str, arr: np.ndarray) -> None:
        write_npy(self.path / name, arr)

    def close(self, status: str, **fields) -> None:
        self.manifest.update(status=status, **fields)
        write_manifest(self.path, self.manifest)
        release_lock(self.path, self.lock)


def flush_rows(arr: np.memmap) -> None:
    arr.flush()


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished temporary directory into place (onto a missing or empty directory)."""
    os.rename(tmp, path)
    _fsync_dir(path.parent)


def _new_array(path: Path, shape, dtype, fill) -> None:
    """A .npy of `shape`, its blocks reserved before the map is touched (a full disk raises ENOSPC here instead of
    a SIGBUS at the first write into the map), then filled."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)  # sparse: nothing written yet
    with open(path, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    if fill != 0:
        arr[...] = fill
    arr.flush()
    del arr
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


def _remove_dead_temps(path: Path, host: str) -> None:
    """Temporary directories of creations on this host whose process died (a kill or a full disk mid-way)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-{host}-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _os_error(e: OSError, what: str) -> Exception:
    """An OSError as the error the CLI reports: the machine's (exit 1) or the input's (exit 2)."""
    text = f"{what}: {e.strerror or e}"
    return ResourceError(text) if e.errno in RESOURCE_ERRNOS else UsageError(text)
