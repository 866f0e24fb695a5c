"""Training throughput at CIFAR's shape, side by side in one run: random 3x32x32 images, B = 32, P networks; the
trainer's step on the numba and torch backends and the torch.func vmap ensemble (per-network BatchNorm buffers),
as `fastpop bench` builds them, without its module loop and evaluation passes (the torch backend's take
minutes per step at this shape). One warm-up step, then `steps` timed, the providers taking turns step by step.

    python bench/bench_32x32.py --nets 100 --steps 2 small-cnn wide-cnn resnet8
"""

import argparse
import time

import torch

from fastpop.archs import build_arch
from fastpop.benchmark import _fastpop_step, _vmap_step, bench_data, sgemm_ceiling
from fastpop.ops import get_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="+")
    parser.add_argument("--nets", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--providers", default="numba,torch,vmap")
    args = parser.parse_args()
    data = bench_data((3, 32, 32))
    x_all = (data.train.x.float() - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1)
    seeds = list(range(args.nets))
    print(f"sgemm ceiling {sgemm_ceiling():.0f} GFLOP/s", flush=True)
    for name in args.archs:
        arch = build_arch(name, data.in_shape, data.classes)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, len(data.train), (args.nets, 32), generator=g) for _ in range(args.steps + 1)]
        steps = {p: (_vmap_step(arch, seeds, x_all, data.train.y) if p == "vmap"
                     else _fastpop_step(arch, data, seeds, 32, get_backend(p, torch.device("cpu"))))
                 for p in args.providers.split(",")}
        seconds = dict.fromkeys(steps, 0.0)
        for i, idx in enumerate(batches):  # the providers take turns, so that a shared machine's load falls on all
            for provider, step in steps.items():
                t = time.perf_counter()
                step(idx)
                seconds[provider] += (time.perf_counter() - t) if i else 0.0  # step 0 warms up
        rates = {p: args.nets * 32 * args.steps / s for p, s in seconds.items()}
        ratios = {f"numba/{k}": f"{rates['numba'] / v:.2f}" for k, v in rates.items() if k != "numba"}
        print(name, {k: round(v) for k, v in rates.items()}, ratios if "numba" in rates else "", flush=True)


if __name__ == "__main__":
    main()
