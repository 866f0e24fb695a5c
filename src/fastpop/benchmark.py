"""Training throughput, side by side in one run: fastpop's population step (its CPU default, the numba backend,
and the op-by-op torch reference) against the usual ways to train many small networks in PyTorch: a torch.func
ensemble (stack_module_state + functional_call + vmap + grad), all networks as one grouped convolution
(F.conv2d with groups = P), and a plain loop over nn.Modules. Every provider does the same work per step: gather
each network's batch, forward, backward, SGD with momentum and weight decay. Figures are net-images/s (networks x
examples per second) and achieved FLOP/s (3x the forward FLOPs) as a fraction of an sgemm ceiling measured in
the same run. Evaluation (the recorder's pass: every network on the same examples, bits and losses) is timed for
fastpop's backends. Data: digits, or random images of any shape (`input_shape`, e.g. 3x32x32 for CIFAR-sized
networks); BatchNorm trains in training mode everywhere, each network with its own running statistics.
"""

from __future__ import annotations

import copy
import math
import resource
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .archs import build_arch
from .config import Config
from .data import load_dataset
from .data.orders import epoch_orders
from .ops import get_backend
from .blocks import load_network
from .population import Population, init_network
from .recorder import evaluate
from .trainer import chunk_size, train_step

WARMUP = 2
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


@dataclass
class Row:
    provider: str
    p: int
    net_images_per_s: float
    gflops: float
    ceiling_gflops: float
    peak_rss_gib: float  # the process's peak resident memory after this provider ran (a running maximum)
    arch: str = ""
    data: str = "digits"


def sgemm_ceiling(n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of one n x n fp32 matmul on this device: the ceiling our FLOP fractions refer to."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def _time(step, batches) -> float:
    for idx in batches[:WARMUP]:
        step(idx)
    t = time.perf_counter()
    for idx in batches[WARMUP:]:
        step(idx)
    return (time.perf_counter() - t) / (len(batches) - WARMUP)


def _modules(arch, seeds):
    return [load_network(arch.to_module(), init_network(arch, s)) for s in seeds]


SYNTHETIC_TRAIN = 1024  # random images of --input-shape: enough for the batches of a benchmark


def bench_data(input_shape: tuple[int, int, int] | None = None):
    """Digits, or random uint8 images of input_shape (C, H, W) with 10 random classes (seed 0)."""
    cpu = torch.device("cpu")
    if input_shape is None:
        return load_dataset(Config(), cpu)
    import numpy as np

    from .data.arrays import ArrayData

    rng = np.random.default_rng(0)
    n = SYNTHETIC_TRAIN + SYNTHETIC_TRAIN // 4  # and a test split a quarter its size
    x = rng.integers(0, 256, (n, *input_shape), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    arrays = ArrayData(x[:SYNTHETIC_TRAIN], y[:SYNTHETIC_TRAIN], x[SYNTHETIC_TRAIN:], y[SYNTHETIC_TRAIN:],
                       name="random", layout="nchw")
    return load_dataset(Config(dataset="arrays:random"), cpu, arrays)


def run_benchmark(nets: list[int], steps: int, arch_name: str = "small-cnn", batch_size: int = 32,
                  loop_max_nets: int = 1000, input_shape: tuple[int, int, int] | None = None,
                  isolate: bool = True, rounds: int = 1) -> list[Row]:
    """Every provider at every P. isolate: each in a process of its own, one after the other, with its own peak
    RSS. In one process, numba's OpenMP workers still spinning after its kernels made the torch providers that
    followed up to 8x slower on 2 cores (the mlp at P = 1000: torch backend 95k net-images/s after numba, 770k
    alone). rounds: the providers take turns this many times and each keeps its best rate (on a shared machine
    one turn's rate swung 1.3x from run to run)."""
    data = bench_data(input_shape)
    arch = build_arch(arch_name, data.in_shape, data.classes)
    ceiling = sgemm_ceiling()
    rows = []
    for p in nets:
        names = ["fastpop-numba", "fastpop-torch", "torch.func vmap"]
        if not arch.batchnorm and all(op.stride == 1 for op in arch.ops):  # plain convs, pools and dense layers
            names.append("grouped conv")
        if p <= loop_max_nets:
            names.append("module loop")
        names += ["fastpop-numba eval", "fastpop-torch eval"]
        best = dict.fromkeys(names, (0.0, 0.0))
        for _ in range(rounds):
            for name in names:
                args = (name, arch_name, p, steps, batch_size, input_shape)
                rate, rss = in_own_process(args) if isolate else provider_rate(*args)
                best[name] = (max(best[name][0], rate), max(best[name][1], rss))
        for name in names:
            rate, rss = best[name]
            flops = arch.flops_per_example() * (1 if name.endswith("eval") else 3)
            rows.append(Row(name, p, rate, flops * rate / 1e9, ceiling, rss, str(arch), data.name))
    return rows


def in_own_process(args) -> tuple[float, float]:
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fastpop.benchmark", json.dumps(args)], capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"benchmark provider {args[0]} failed:\n{proc.stderr[-2000:]}")
    return tuple(json.loads(proc.stdout.splitlines()[-1]))


def provider_rate(name: str, arch_name: str, p: int, steps: int, batch_size: int, input_shape=None
                  ) -> tuple[float, float]:
    """(net-images/s, peak RSS GiB of this process) of one provider: a training step, or (name "... eval") the
    recorder's evaluation checkpoint."""
    cpu = torch.device("cpu")
    data = bench_data(None if input_shape is None else tuple(input_shape))
    arch = build_arch(arch_name, data.in_shape, data.classes)
    seeds = list(range(p))
    if name.endswith(" eval"):
        rate = _eval_rate(arch, data, seeds, get_backend(name.split("-")[1].split()[0], cpu))
        return rate, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    orders = epoch_orders(seeds, 0, len(data.train))
    n_batches = min(WARMUP + steps, len(data.train) // batch_size)
    batches = [orders[:, i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]
    x_all = (data.train.x.float() - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1)
    if name.startswith("fastpop-"):
        step = _fastpop_step(arch, data, seeds, batch_size, get_backend(name.removeprefix("fastpop-"), cpu))
    else:
        make = {"torch.func vmap": _vmap_step, "grouped conv": _grouped_step, "module loop": _loop_step}[name]
        step = make(arch, seeds, x_all, data.train.y)
    rate = p * batch_size / _time(step, batches)
    return rate, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _eval_rate(arch, data, seeds, backend) -> float:
    """net-images/s of the recorder's evaluation checkpoint (both splits), best of two."""
    pop = Population(arch, seeds, torch.device("cpu"))
    chunk = chunk_size("auto", arch, 32, len(seeds), torch.device("cpu"), backend)
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        for split in (data.train, data.test):
            evaluate(arch, backend, pop, split, data.mean, data.std, chunk)
        best = min(best, time.perf_counter() - t)
    return len(seeds) * (len(data.train) + len(data.test)) / best


def _fastpop_step(arch, data, seeds, batch_size, backend):
    """The trainer's own step, with its default (auto) network chunks."""
    config = Config(seeds=len(seeds), batch_size=batch_size, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    pop = Population(arch, seeds, torch.device("cpu"))
    chunk = chunk_size(config.max_nets_per_chunk, arch, batch_size, len(seeds), torch.device("cpu"), backend)
    return lambda idx: train_step(pop, backend, data, idx, LR, config, chunk)


def _vmap_step(arch, seeds, x_all, y_all):
    """stack_module_state + functional_call + vmap(grad), BatchNorm's running statistics as per-network buffers
    that the batched forward updates in place."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    modules = _modules(arch, seeds)
    params, buffers = stack_module_state(modules)
    base = copy.deepcopy(modules[0]).to("meta")
    names = list(params)
    bufs = [torch.zeros_like(params[n]) for n in names]

    def loss(prm, bfr, x, y):
        return F.cross_entropy(functional_call(base, (prm, bfr), (x,)), y)

    grads_of = vmap(grad(loss))

    def step(idx):
        g = grads_of(params, buffers, x_all[idx], y_all[idx])
        with torch.no_grad():
            ps, gs = [params[n] for n in names], [g[n] for n in names]
            torch._foreach_add_(gs, ps, alpha=WD)
            torch._foreach_mul_(bufs, MOMENTUM)
            torch._foreach_add_(bufs, gs)
            torch._foreach_add_(ps, bufs, alpha=-LR)

    step.state = {**params, **buffers}  # the networks' stacked parameters and buffers, for tests
    return step


def _grouped_step(arch, seeds, x_all, y_all):
    """All networks as one model: each conv one F.conv2d with groups = P over the networks' channels stacked,
    [B, P * C, H, W]; each dense layer one batched GEMM; torch.optim.SGD over the stacked parameters."""
    p = len(seeds)
    flat = torch.stack([init_network(arch, s) for s in seeds])  # [P, D]
    params, start = [], 0
    for _, shape in arch.param_shapes():
        n = math.prod(shape)
        params.append(flat[:, start:start + n].reshape(p, *shape).clone().requires_grad_())
        start += n
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)

    def step(idx):
        bsz = idx.shape[1]
        h = x_all[idx].transpose(0, 1).flatten(1, 2)  # [B, P * C, H, W]
        if arch.flat_input:
            h = x_all[idx].flatten(2)  # [P, B, C*H*W]
        it = iter(params)
        for op in arch.ops:
            if op.kind == "conv":
                w, b = next(it), next(it)
                h = F.relu(F.conv2d(h, w.flatten(0, 1), b.flatten(), padding=op.k // 2, groups=p))
            elif op.kind in ("maxpool", "avgpool"):
                h = F.max_pool2d(h, 2) if op.kind == "maxpool" else F.avg_pool2d(h, 2)
            elif op.kind == "gap":
                h = h.mean((2, 3)).view(bsz, p, -1).transpose(0, 1)  # [P, B, C]
            elif op.kind == "flat":
                h = h.reshape(bsz, p, -1).transpose(0, 1)  # [P, B, C*H*W]
            else:
                w, b = next(it), next(it)
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
                h = F.relu(h) if op.relu else h
        loss = F.cross_entropy(h.flatten(0, 1), y_all[idx].flatten(), reduction="sum") / bsz
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()  # the networks' mean losses summed

    return step


def _loop_step(arch, seeds, x_all, y_all):
    modules = _modules(arch, seeds)
    opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD) for m in modules]

    def step(idx):
        for k, (m, opt) in enumerate(zip(modules, opts)):
            opt.zero_grad()
            F.cross_entropy(m(x_all[idx[k]]), y_all[idx[k]]).backward()
            opt.step()

    return step


def print_table(rows: list[Row], batch_size: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"training step and evaluation, {rows[0].arch if rows else ''} on "
                  f"{rows[0].data if rows else ''}, B={batch_size}; "
                  f"sgemm ceiling "
                  f"{rows[0].ceiling_gflops:.0f} GFLOP/s"
                  if rows else "no rows")
    for col in ("provider", "P", "net-images/s", "GFLOP/s", "% ceiling", "fastpop speed-up", "peak RSS GiB"):
        table.add_column(col, justify="left" if col == "provider" else "right")
    ours = {(r.p, r.provider.endswith("eval")): r.net_images_per_s for r in rows
            if r.provider.startswith("fastpop-numba")}
    for r in rows:
        speed_up = ours[r.p, r.provider.endswith("eval")] / r.net_images_per_s
        table.add_row(r.provider, str(r.p), f"{r.net_images_per_s:,.0f}", f"{r.gflops:.1f}",
                      f"{100 * r.gflops / r.ceiling_gflops:.1f}", f"{speed_up:.2f}x", f"{r.peak_rss_gib:.2f}")
    Console(width=120).print(table)
    from . import __version__
    from .machine import describe, machine_facts

    facts = machine_facts()
    print(f"machine: {describe(facts)}; fastpop {__version__}, commit {facts['commit']}, torch {torch.__version__}")


if __name__ == "__main__":  # one provider in this process (run_benchmark's isolation): prints [rate, peak RSS]
    import json
    import sys

    print(json.dumps(provider_rate(*json.loads(sys.argv[1]))))
