"""What the training recipe costs, as ratios measured in one run: the trainer's step (numba backend, the CPU default)
with augmentation against without, Adam and AdamW against SGD, and a grid of G groups of S seeds against G·S plain
seeds. Images are digits (1x8x8) or synthetic 3x32x32 ones.

    python bench/bench_recipe.py --nets 1000 --steps 20 [--shape 3x32x32] [--arch small-cnn]
"""

from __future__ import annotations

import argparse
import time

import torch

from fastpop.archs import build_arch
from fastpop.config import Config
from fastpop.data import Dataset, Split, channel_stats, load_dataset
from fastpop.data.orders import epoch_orders
from fastpop.ops import get_backend
from fastpop.population import Population
from fastpop.trainer import network_groups, train_step

CPU = torch.device("cpu")


def synthetic(shape, n=4096, classes=10) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=g)
    mean, std = channel_stats(x)
    return Dataset("synthetic", Split(x, y), Split(x[:256], y[:256]), list(range(classes)), mean, std)


def rate(config: Config, data: Dataset, steps: int) -> float:
    """net-images/s of the trainer's step for `config` (best of two passes over the same batches)."""
    arch = build_arch(config.arch, data.in_shape, data.classes)
    backend = get_backend("numba", CPU)
    pop = Population(arch, config.init_seeds(), CPU, config.optimizer != "sgd")
    seeds = torch.tensor(config.order_seeds())
    orders = epoch_orders(config.order_seeds(), 0, len(data.train))
    groups = network_groups(config)
    lrs = [cfg.lr for _, _, cfg in groups]
    b = config.batch_size
    batches = [orders[:, i * b:(i + 1) * b] for i in range(steps + 2)]
    for idx in batches[:2]:
        train_step(pop, backend, data, idx, lrs, config, None, 1, 0, seeds, groups)
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        for s, idx in enumerate(batches[2:]):
            train_step(pop, backend, data, idx, lrs, config, None, s + 2, 0, seeds, groups)
        best = min(best, time.perf_counter() - t)
    return pop.p * b * steps / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shape", default=None, help="CxHxW synthetic images (default: digits)")
    parser.add_argument("--arch", default="small-cnn")
    args = parser.parse_args()
    data = synthetic(tuple(int(v) for v in args.shape.split("x"))) if args.shape else load_dataset(Config(), CPU)
    p = args.nets
    crop = 4 if args.shape else 2
    cases = {
        "sgd (baseline)": dict(seeds=p),
        f"sgd + flip,crop:{crop},cutout:{2 * crop}": dict(seeds=p, augment=f"flip,crop:{crop},cutout:{2 * crop}"),
        "adam": dict(seeds=p, optimizer="adam", lr=1e-3),
        "adamw": dict(seeds=p, optimizer="adamw", lr=1e-3, weight_decay=0.05),
        "grid 3 lr x 2 wd": dict(seeds=p // 6, grid={"lr": [0.2, 0.1, 0.05], "weight_decay": [5e-4, 0.0]}),
    }
    base = None
    shape = "x".join(map(str, data.in_shape))
    print(f"{args.arch} on {shape}, P = {p} (grid: 6 x {p // 6}), B = 32, numba backend, {args.steps} steps")
    print(f"{'case':<36} {'net-images/s':>14} {'vs baseline':>12}")
    for name, kw in cases.items():
        r = rate(Config(arch=args.arch, batch_size=32, **kw), data, args.steps)
        base = base or r
        print(f"{name:<36} {r:>14,.0f} {r / base:>11.3f}x")


if __name__ == "__main__":
    main()
