"""Metrics on a generated record: each numba metric against its numpy dense-bool reference and against the
memory-read floor (bytes of packed record read, divided by a copy bandwidth measured in the same run).

    python bench/bench_metrics.py [--p 1000] [--n 10000] [--t 50]

The numpy references get the record already unpacked to bool (the unpacking is not charged to them).
"""

import argparse
import time

import numpy as np

from fastpop import metrics as M


def best(f, reps=5):
    f()  # compile / warm
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--p", type=int, default=1000)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--t", type=int, default=50)
    args = ap.parse_args()
    p, n, t = args.p, args.n, args.t
    rng = np.random.default_rng(0)
    # correlated, learning-like record: example difficulty x network skill x time
    skill = rng.normal(0, 0.5, p)[None, :, None]
    ease = rng.normal(0, 1.5, n)[None, None, :]
    time_ = np.linspace(-2, 3, t)[:, None, None]
    c = rng.random((t, p, n)) < 1 / (1 + np.exp(-(time_ + skill + ease)))
    bits = np.zeros((t, p, 8 * -(-n // 64)), np.uint8)
    bits[..., : -(-n // 8)] = np.packbits(c, axis=-1, bitorder="little")

    big = np.ones(bits.nbytes // 8 * 4, np.uint64)
    dst = np.empty_like(big)
    copy_bw = big.nbytes / best(lambda: np.copyto(dst, big))
    floor = bits.nbytes / copy_bw

    def ref_learned():
        stays = np.logical_and.accumulate(c[::-1], axis=0)[::-1]
        return t - stays.sum(0)

    cf = c[-1].astype(np.float32)
    rows = [
        ("TPA counts [T, N]", lambda: M.tpa_counts(bits, n), lambda: c.sum(1), True),
        ("speed counts [P, N]", lambda: M.speed_counts(bits, n), lambda: c.sum(0), True),
        ("learned-at [P, N]", lambda: M.learned_at(bits, n), ref_learned, True),
        ("forgetting [P, N] x2", lambda: M.forgetting(bits, n), lambda: ((c[:-1] & ~c[1:]).sum(0), ~c.any(0)), True),
        ("accuracy [T, P]", lambda: M.accuracy(bits, n), lambda: c.mean(-1), True),
        (f"all-pairs kappa P={p}", lambda: M.error_consistency(bits, n), lambda: cf @ cf.T, False),
    ]
    print(f"record P={p} N={n} T={t}: {bits.nbytes / 1e6:.1f} MB packed; copy bandwidth {copy_bw / 1e9:.1f} GB/s; "
          f"read floor {floor * 1e3:.1f} ms")
    print(f"{'metric':26s} {'fastpop ms':>11s} {'numpy ms':>10s} {'speed-up':>9s} {'x floor':>8s}")
    for name, ours, ref, streaming in rows:
        a, b = best(ours), best(ref, reps=1)
        fl = f"{a / floor:8.1f}" if streaming else f"{'':>8s}"
        print(f"{name:26s} {a * 1e3:11.1f} {b * 1e3:10.1f} {b / a:8.1f}x {fl}")
    # the numpy kappa reference above is only its GEMM (both-right counts); ours includes the kappa arithmetic


if __name__ == "__main__":
    main()
