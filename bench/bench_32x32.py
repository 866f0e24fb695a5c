"""Training throughput at CIFAR's shape: random 3x32x32 images, B = 32, P networks; the trainer's step on the numba
and torch backends and the torch.func vmap ensemble (per-network BatchNorm buffers), as `fastpop bench` builds them,
without its module loop and evaluation passes (the torch backend's take minutes per step at this shape). Two
warm-up steps, then `steps` timed, each provider in its own process (`fastpop.benchmark.in_own_process`). The
providers take turns for `rounds` rounds and each keeps its best rate (the machine may be shared).

    python bench/bench_32x32.py --nets 100 --steps 1 --rounds 2 small-cnn wide-cnn resnet8
"""

import argparse

from fastpop.benchmark import in_own_process, sgemm_ceiling

PROVIDERS = ("fastpop-numba", "fastpop-torch", "torch.func vmap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="+")
    parser.add_argument("--nets", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"sgemm ceiling {sgemm_ceiling():.0f} GFLOP/s", flush=True)
    for name in args.archs:
        rates = dict.fromkeys(PROVIDERS, 0.0)
        for _ in range(args.rounds):
            for provider in PROVIDERS:
                rate, _ = in_own_process((provider, name, args.nets, args.steps, 32, (3, 32, 32)))
                rates[provider] = max(rates[provider], rate)
        ratios = {f"numba/{k}": f"{rates['fastpop-numba'] / v:.2f}" for k, v in rates.items()
                  if k != "fastpop-numba"}
        print(name, {k: round(v) for k, v in rates.items()}, ratios, flush=True)


if __name__ == "__main__":
    main()
