"""Training throughput at CIFAR's shape: random 3x32x32 images, B = 32, P networks; the trainer's step on the numba
and torch backends and the torch.func vmap ensemble (per-network BatchNorm buffers), as `fastpop bench` builds them,
without its module loop and evaluation passes (the torch backend's take minutes per step at this shape). One
warm-up step, then `steps` timed. Each provider runs in its own process, one after the other: in one process,
numba's worker threads still spinning after its kernels slowed the torch providers that followed (2 cores). The
providers take turns for `rounds` rounds and each keeps its best rate (the machine may be shared).

    python bench/bench_32x32.py --nets 100 --steps 1 --rounds 2 small-cnn wide-cnn resnet8
"""

import argparse
import subprocess
import sys
import time

import torch

PROVIDERS = ("numba", "torch", "vmap")


def rate(arch_name: str, provider: str, nets: int, steps: int) -> float:
    """net-images/s of `provider` training `arch_name`, in this process."""
    from fastpop.archs import build_arch
    from fastpop.benchmark import _fastpop_step, _vmap_step, bench_data
    from fastpop.ops import get_backend

    data = bench_data((3, 32, 32))
    arch = build_arch(arch_name, data.in_shape, data.classes)
    seeds = list(range(nets))
    if provider == "vmap":
        x_all = (data.train.x.float() - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1)
        step = _vmap_step(arch, seeds, x_all, data.train.y)
    else:
        step = _fastpop_step(arch, data, seeds, 32, get_backend(provider, torch.device("cpu")))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, len(data.train), (nets, 32), generator=g) for _ in range(steps + 1)]
    step(batches[0])
    t = time.perf_counter()
    for idx in batches[1:]:
        step(idx)
    return nets * 32 * steps / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="+")
    parser.add_argument("--nets", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--provider", choices=PROVIDERS, help="time this provider alone, in this process")
    args = parser.parse_args()
    if args.provider:
        print(rate(args.archs[0], args.provider, args.nets, args.steps))
        return
    from fastpop.benchmark import sgemm_ceiling

    print(f"sgemm ceiling {sgemm_ceiling():.0f} GFLOP/s", flush=True)
    for name in args.archs:
        rates = dict.fromkeys(PROVIDERS, 0.0)
        for _ in range(args.rounds):
            for provider in PROVIDERS:
                out = subprocess.run([sys.executable, __file__, name, "--nets", str(args.nets), "--steps",
                                      str(args.steps), "--provider", provider], capture_output=True, text=True,
                                     check=True)
                rates[provider] = max(rates[provider], float(out.stdout.split()[-1]))
        ratios = {f"numba/{k}": f"{rates['numba'] / v:.2f}" for k, v in rates.items() if k != "numba"}
        print(name, {k: round(v) for k, v in rates.items()}, ratios, flush=True)


if __name__ == "__main__":
    main()
