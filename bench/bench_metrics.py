"""Metrics: the numba kernels against numpy dense-bool references and the memory-read floor; the margin scores
beside them; where the numpy path hands over to numba (the size threshold); the first call of every metric in a
fresh process (numba cache cold and warm); and `fastpop analyze`, `report` and `compare` timed as subprocesses on
real runs.

    python bench/bench_metrics.py [--p 1000] [--n 10000] [--t 50] [--runs RUN_A RUN_B] [--sections ...]

--runs: two run directories of the same data (default: `fastpop run --seeds 1000` and the same with
--seed-offset 1000, trained into a temporary folder first when not given). The numpy references get the record
already unpacked to bool (the unpacking is not charged to them).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fastpop import metrics as M
from fastpop.metrics import record as record_module


FASTPOP = [sys.executable, "-m", "fastpop"]


def best(f, reps=5, warm=True):
    if warm:
        f()  # compile / load / warm
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def learning_record(t, p, n, seed=0):
    """Correlated, learning-like record: example difficulty x network skill x time."""
    rng = np.random.default_rng(seed)
    skill = rng.normal(0, 0.5, p)[None, :, None]
    ease = rng.normal(0, 1.5, n)[None, None, :]
    time_ = np.linspace(-2, 3, t)[:, None, None]
    c = np.empty((t, p, n), bool)
    for i in range(t):  # one checkpoint at a time: the float64 draw of the whole record would not fit
        c[i] = rng.random((p, n)) < 1 / (1 + np.exp(-(time_[i] + skill[0] + ease[0])))
    return c


def copy_bandwidth(nbytes):
    big = np.ones(max(nbytes // 8, 1 << 20), np.uint64)
    dst = np.empty_like(big)
    return big.nbytes / best(lambda: np.copyto(dst, big))


def kernels(p, n, t):
    c = learning_record(t, p, n)
    bits = M.pack(c)
    bw = copy_bandwidth(bits.nbytes * 4)
    floor = bits.nbytes / bw

    def ref_learned():
        stays = np.logical_and.accumulate(c[::-1], axis=0)[::-1]
        return np.where(stays[-1], t - stays.sum(0), np.nan).astype(np.float32)

    cf = c[-1].astype(np.float32)
    rows = [
        ("TPA counts [T, N]", lambda: M.tpa_counts(bits, n), lambda: c.sum(1), True),
        ("speed counts [P, N]", lambda: M.speed_counts(bits, n), lambda: c.sum(0), True),
        ("learned-at [P, N]", lambda: M.learned_at(bits, n), ref_learned, True),
        ("forgetting [P, N] x2", lambda: M.forgetting(bits, n), lambda: ((c[:-1] & ~c[1:]).sum(0), ~c.any(0)), True),
        ("accuracy [T, P]", lambda: M.accuracy(bits, n), lambda: c.mean(-1), True),
        (f"all-pairs kappa P={p}", lambda: M.error_consistency(bits, n), lambda: cf @ cf.T, False),
    ]
    print(f"\n## kernels: record P={p} N={n} T={t}: {bits.nbytes / 1e6:.1f} MB packed; copy bandwidth "
          f"{bw / 1e9:.1f} GB/s; read floor {floor * 1e3:.1f} ms; {M.as_record(bits, n).cells:,} cells "
          f"(numba path above {record_module.NUMPY_MAX_CELLS:,})")
    print("| metric | fastpop ms | numpy ms | speed-up | x read floor |\n|---|---:|---:|---:|---:|")
    for name, ours, ref, streaming in rows:
        a, b = best(ours), best(ref, reps=1, warm=False)
        fl = f"{a / floor:.1f}" if streaming else ""
        print(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.1f}x | {fl} |")
    # the numpy kappa reference above is only its GEMM (both-right counts); ours includes the kappa arithmetic
    return c


def margins(c):
    """The margin scores on float16 [T, P, N] margins and losses of the same shape as the record."""
    t, p, n = c.shape
    rng = np.random.default_rng(1)
    m = np.empty(c.shape, np.float16)
    for i in range(t):
        m[i] = np.where(c[i], 1, -1) * rng.uniform(0.01, 4, (p, n))
    xent = np.log1p(np.exp(-m[: min(t, 4)].astype(np.float32))).astype(np.float16)  # a few checkpoints' worth
    xent = np.concatenate([xent] * -(-t // len(xent)))[:t]
    floor = m.nbytes / copy_bandwidth(m.nbytes // 4)
    rows = [("AUM [N]", lambda: M.aum(m)),
            ("cartography [N] x3 (with correctness)", lambda: M.cartography(xent, correct=c)),
            ("EL2N-style [N] at one checkpoint", lambda: M.el2n(xent)),
            ("margin forgetting [P, N] x2", lambda: M.margin_forgetting(m, delta=0.1))]
    print(f"\n## margin scores on float16 [T, P, N] = {m.shape}: {m.nbytes / 1e6:.0f} MB per array; read floor "
          f"{floor * 1e3:.0f} ms")
    print("| score | ms | x read floor of one array |\n|---|---:|---:|")
    for name, f in rows:
        a = best(f, reps=1)
        print(f"| {name} | {a * 1e3:.0f} | {a / floor:.1f} |")


def threshold():
    """Warm in-process times of the numpy path and of the numba path at growing sizes (T = 10, N = 1,000)."""
    print("\n## numpy path vs numba path (warm, in process), T = 10, N = 1000; ms")
    print("| cells | numpy: tpa / speed / learned-at / forgetting | numba: the same |\n|---:|---|---|")
    for p in (10, 100, 1000, 4000):
        c = learning_record(10, p, 1000)
        bits = M.pack(c)
        fs = (M.tpa_counts, M.speed_counts, M.learned_at, M.forgetting)
        out = []
        for cells in (1 << 62, 0):  # threshold above everything (numpy), then zero (numba)
            record_module.NUMPY_MAX_CELLS = cells
            out.append(" / ".join(f"{best(lambda: f(bits, 1000), reps=3) * 1e3:.1f}" for f in fs))
        record_module.NUMPY_MAX_CELLS = 1 << 24
        print(f"| {c.size:,} | {out[0]} | {out[1]} |")


FIRST_CALLS = """
import sys, time
t0 = time.perf_counter()
import numpy as np
import fastpop.metrics as M
from fastpop.metrics import record as R, agree as A
if {force_numba}:
    R.NUMPY_MAX_CELLS = 0; A.KAPPA_NUMPY_MAX_MACS = 0
c = np.random.default_rng(0).random((3, 100, 359)) < 0.9
bits = M.pack(c)
t1 = time.perf_counter()
for f in (M.tpa_counts, M.accuracy, M.agreement, M.error_consistency, M.speed_counts, M.accessibility,
          M.learned_at, M.forgetting):
    f(bits, 359)
M.split_half(M.speed_counts(c)), M.pairwise_spearman(M.speed_counts(c))
m = np.random.default_rng(1).normal(size=(3, 100, 359)).astype(np.float16)
M.aum(m), M.margin_forgetting(m), M.cartography(np.abs(m), correct=c), M.el2n(np.abs(m))
print(f"{{t1 - t0:.3f}} {{time.perf_counter() - t1:.3f}} {{time.perf_counter() - t0:.3f}} "
      f"torch={{'torch' in sys.modules}} numba={{'numba' in sys.modules}}")
"""


def first_calls():
    """Every metric's first call on 100 x 359 x 3 in a fresh process, with an empty numba cache (a fresh checkout)
    and then with the cache it left, on the default (numpy) path and with the numba path forced."""
    print("\n## first call of every metric in a fresh process, 100 x 359 x 3 (s: import / all metrics / total)")
    print("| path | numba cache | import | metrics | total | modules |\n|---|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for force in (False, True):
            for state in ("cold", "warm"):
                if force is False and state == "warm":
                    continue
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", FIRST_CALLS.format(force_numba=force)], env=env,
                                     capture_output=True, text=True, check=True).stdout.split()
                wall = time.perf_counter() - t0
                print(f"| {'numba (forced)' if force else 'default (numpy)'} | {state} | {out[0]} | {out[1]} | "
                      f"{out[2]} (process wall {wall:.2f}) | {out[3]} {out[4]} |")


def commands(runs):
    if not runs:
        root = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
        runs = [root / "a", root / "b"]
        for path, offset in zip(runs, (0, 1000)):
            subprocess.run([*FASTPOP, "run", "--seeds", "1000", "--seed-offset", str(offset), "--out", str(path),
                            "--quiet"], check=True, stdout=subprocess.DEVNULL)
    a, b = map(str, runs)
    out = Path(tempfile.mkdtemp(prefix="bench-metrics-out-"))
    steps = [("fastpop analyze A", ["analyze", a]),
             ("fastpop analyze A --draws 0 (no bootstrap intervals)", ["analyze", a, "--draws", "0"]),
             ("fastpop analyze A --split train", ["analyze", a, "--split", "train"]),
             ("fastpop report A (fresh)", ["report", a, "--out", str(out / "r")]),
             ("fastpop report A (reuses its analysis)", ["report", a, "--out", str(out / "r")]),
             ("fastpop compare A B", ["compare", a, b, "--out", str(out / "c")]),
             ("fastpop compare A B --draws 0", ["compare", a, b, "--out", str(out / "c0"), "--draws", "0"])]
    print(f"\n## commands, fresh processes, on {a} and {b}\n| command | wall s |\n|---|---:|")
    for name, args in steps:
        t0 = time.perf_counter()
        subprocess.run([*FASTPOP, *args], check=True, stdout=subprocess.DEVNULL)
        print(f"| {name} | {time.perf_counter() - t0:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--p", type=int, default=1000)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--t", type=int, default=50)
    ap.add_argument("--runs", nargs=2, metavar="RUN", help="two run directories of the same data")
    ap.add_argument("--sections", default="first,commands,threshold,kernels,margins")
    args = ap.parse_args()
    sections = args.sections.split(",")
    if "first" in sections:
        first_calls()
    if "commands" in sections:
        commands(args.runs)
    if "threshold" in sections:
        threshold()
    if "kernels" in sections or "margins" in sections:
        c = kernels(args.p, args.n, args.t) if "kernels" in sections else learning_record(args.t, args.p, args.n)
        if "margins" in sections:
            margins(c)


if __name__ == "__main__":
    main()
