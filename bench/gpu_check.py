"""One prepared GPU check (bench/gpu_check.sh runs it): kernels against the torch reference at real shapes, then a
full training step timed for every provider, with ceilings measured in the same run; the training recipe
(augmentation in the first layer's gather, label smoothing, fused Nesterov and AdamW grid updates) checked the same
way and timed against plain SGD.

    python bench/gpu_check.py            # on a CUDA GPU: checks at P = 1000 / 200, then timings
    python bench/gpu_check.py --small    # tiny shapes, checks only: runs on the CPU under TRITON_INTERPRET=1 (CI)

Architectures: small-cnn (the fused head), CNN5 (a spec no preset has: five convs with 5x5 and 1x1 kernels,
max and average pools, a hidden dense layer), the mlp (dense layers on the flattened image) and ResNet-8
(BatchNorm with per-network running statistics, strided convs, residual blocks with identity and projection skips;
checked at P = 1000 against the reference run 250 networks at a time). Providers:
fastpop-triton (CUDA graph and eager), fastpop-torch (the reference: im2col + batched GEMM), torch.func vmap (cuDNN
grouped convolution; each network's own BatchNorm buffers for ResNet-8), a loop over nn.Modules (P = 100 only).
Targets (issue 7): >= 10x vmap and >= 5M net-images/s for small-cnn on 3x32x32 at P = 1000.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastpop.archs import build_arch
from fastpop.benchmark import _loop_step, _vmap_step
from fastpop.config import Config
from fastpop.data import Dataset, Split, channel_stats
from fastpop.data.augment import Augment, AugmentBatch
from fastpop.data.orders import epoch_orders
from fastpop.ops import chain, get_backend, reference, triton as triton_ops
from fastpop.population import Population
from fastpop.trainer import network_groups, train_step

CNN5 = "c32-c32-mp-c64k5-ap-c64-c64k1-gap-d128"


def synthetic(shape, n, classes, device) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=gen)
    mean, std = channel_stats(x)
    return Dataset("synthetic", Split(x, y), Split(x[:256], y[:256]), list(range(classes)), mean, std).to(device)


def check(data: Dataset, p: int, bsz: int, device, spec: str = "small-cnn", ref_chunk: int | None = None) -> None:
    """Loss, every gradient and the BatchNorm running statistics of one population step, triton against reference,
    and the eval bits. ref_chunk: the reference takes the networks that many at a time (its im2col of a ResNet at
    P = 1000 would not fit), the kernels all at once; network k's result does not depend on its company."""
    arch = build_arch(spec, data.in_shape, data.classes)
    pop = Population(arch, list(range(p)), device)
    idx = epoch_orders(list(range(p)), 0, len(data.train))[:, :bsz].to(device)
    grads = {}
    for name, backend, chunk in (("torch", reference, ref_chunk or p), ("triton", triton_ops, p)):
        pop.grads.zero_()
        stats = [v.clone() for v in pop.stat_views()]
        losses = []
        for lo in range(0, p, chunk):
            hi = min(p, lo + chunk)
            loss = chain.loss(arch, backend, pop.leaves(lo, hi), data.train.x, idx[lo:hi], data.train.y[idx[lo:hi]],
                              data.mean, data.std, stats=[v[lo:hi] for v in stats])
            loss.sum().backward()
            losses.append(loss.detach())
        grads[name] = (torch.cat(losses), pop.grads.clone(), stats)
    (lr_, gr, sr), (lt, gt, st) = grads["torch"], grads["triton"]
    torch.testing.assert_close(lt, lr_, rtol=1e-4, atol=1e-5, msg=f"loss, P={p} {data.in_shape}")
    for (name, shape), want, got in zip(arch.param_shapes(), pop.views(gr), pop.views(gt)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=f"gradient of {name}")
    for (name, _), want, got in zip(arch.stat_shapes(), sr, st):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"running statistic {name}")
    for view, got in zip(pop.stat_views(), st):  # evaluation normalizes with the statistics of this step
        view.copy_(got)
    from fastpop.recorder import evaluate

    bits = {name: evaluate(arch, get_backend(name, device), pop, data.test, data.mean, data.std)[0]
            for name in ("torch", "triton")}
    agree = (bits["torch"] == bits["triton"]).float().mean().item()
    assert agree > 0.999, f"eval bits agree on {agree:.5f} of bytes"
    print(f"ok: P={p} B={bsz} {spec} input {data.in_shape}: loss, {len(arch.param_shapes())} gradients, "
          f"{len(arch.stat_shapes())} running statistics, eval bits")
    del pop, grads
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_recipe(data: Dataset, p: int, bsz: int, device, spec: str = "small-cnn") -> None:
    """The training recipe on the kernels: an augmented batch with label smoothing (loss and every gradient, triton
    against reference), then one fused update of a two-group grid against the reference's ops, for Nesterov (bit
    for bit) and AdamW (within fp32 rounding)."""
    arch = build_arch(spec, data.in_shape, data.classes)
    pop = Population(arch, list(range(p)), device, second_moment=True)
    idx = epoch_orders(list(range(p)), 0, len(data.train))[:, :bsz].to(device)
    aug = AugmentBatch(Augment.parse("flip,crop:2,cutout:3"), torch.arange(p, device=device) + 11, 3)
    grads = {}
    for name, ops in (("torch", reference), ("triton", triton_ops)):
        pop.grads.zero_()
        loss = chain.loss(arch, ops, pop.leaves(0, p), data.train.x, idx, data.train.y[idx], data.mean, data.std,
                          aug, 0.1)
        loss.sum().backward()
        grads[name] = (loss.detach().clone(), pop.grads.clone())
    (lr_, gr), (lt, gt) = grads["torch"], grads["triton"]
    torch.testing.assert_close(lt, lr_, rtol=1e-4, atol=1e-5, msg=f"augmented loss, P={p} {data.in_shape}")
    for (name, _), want, got in zip(arch.param_shapes(), pop.views(gr), pop.views(gt)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=f"augmented gradient of {name}")
    for recipe in (dict(nesterov=True), dict(optimizer="adamw", weight_decay=0.05)):
        cfgs = [Config(lr=lr, momentum=mo, **recipe) for lr, mo in ((0.1, 0.9), (0.02, 0.5))]
        groups = [(0, p // 2, cfgs[0], 0.1), (p // 2, p, cfgs[1], 0.02)]
        frozen = torch.zeros_like(pop.params, dtype=torch.bool)
        frozen[: pop.sizes[0]] = True  # the first layer of the first networks: diverged, must not move
        states = []
        for step in (chain.optimizer_step, triton_ops.optimizer_step):
            torch.manual_seed(0)
            for buf in (pop.params, pop.grads, pop.momentum, pop.second):
                buf.copy_(torch.randn_like(buf))
            pop.second.abs_()
            for s in (1, 2):
                step(pop, groups, frozen, s)
            states.append([t.clone() for t in (pop.params, pop.momentum, pop.second)])
        for want, got, what in zip(*states, ("params", "momentum", "second moment")):
            if "optimizer" not in recipe:
                assert torch.equal(got, want), f"Nesterov {what}: not bit-identical to the reference"
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"{recipe} {what}")
    print(f"ok: P={p} B={bsz} {spec} input {data.in_shape}: augmented and smoothed loss and gradients, grid "
          f"updates (Nesterov bit for bit, AdamW)")


def recipe_timings(data: Dataset, p: int, bsz: int, device, spec: str = "small-cnn") -> None:
    """Eager triton training steps under each recipe, against plain SGD in the same run."""
    arch = build_arch(spec, data.in_shape, data.classes)
    backend = get_backend("triton", device)
    rates = {}
    for name, recipe in (("sgd", {}), ("nesterov", dict(nesterov=True)), ("adamw", dict(optimizer="adamw")),
                         ("augment", dict(augment="flip,crop:4,cutout:8")),
                         ("grid 3x2", dict(grid={"lr": [0.4, 0.2, 0.1], "weight_decay": [5e-4, 0]}))):
        config = Config(seeds=p // 6 if "grid" in recipe else p, batch_size=bsz, **recipe)  # P networks in all
        pop = Population(arch, config.init_seeds(), device, config.optimizer != "sgd")
        idx = epoch_orders(config.order_seeds(), 0, len(data.train))[:, :bsz].to(device)
        groups = network_groups(config)
        lrs = [cfg.lr for _, _, cfg in groups]
        order_seeds = torch.tensor(config.order_seeds(), device=device)
        rates[name] = pop.p * bsz / _time(lambda: train_step(pop, backend, data, idx, lrs, config, pop.p, 1, 0,
                                                             order_seeds, groups), reps=10)
        print(f"triton eager {name:9s} {spec} P={pop.p} {data.in_shape}: {rates[name]:14,.0f} net-images/s "
              f"({rates[name] / rates['sgd']:.2f}x plain SGD)")
    del pop
    torch.cuda.empty_cache()


def check_graph(data: Dataset, p: int, bsz: int, device, spec: str = "small-cnn") -> None:
    """Five steps replayed from a CUDA graph equal five eager steps."""
    from fastpop.graphs import GraphedStep

    arch = build_arch(spec, data.in_shape, data.classes)
    config = Config(seeds=p, batch_size=bsz)
    pops = [Population(arch, list(range(p)), device) for _ in range(2)]
    graphed = GraphedStep(pops[1], get_backend("triton", device), data, config, p, (p, bsz))
    orders = epoch_orders(list(range(p)), 0, len(data.train)).to(device)
    for s in range(5):
        idx = orders[:, s * bsz:(s + 1) * bsz]
        eager = train_step(pops[0], get_backend("triton", device), data, idx, 0.05, config, p, s + 1)
        replay = graphed(idx, 0.05, s + 1)
        torch.testing.assert_close(replay, eager, msg=f"graph loss at step {s}")
    torch.testing.assert_close(pops[1].params, pops[0].params, msg="graph parameters after 5 steps")
    torch.testing.assert_close(pops[1].stats, pops[0].stats, msg="graph running statistics after 5 steps")
    print(f"ok: CUDA graph == eager over 5 steps, P={p} {spec}")


def ceilings(device) -> dict:
    n = 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = {}
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        out["tf32" if tf32 else "fp32"] = 2 * n**3 / _time(lambda: a @ b) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    big = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(big)
    out["copy_TBps"] = 2 * big.numel() / _time(lambda: dst.copy_(big)) / 1e12
    return out


def _time(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def timings(data: Dataset, p: int, bsz: int, device, ceil: dict, spec: str = "small-cnn",
            reference_too: bool = True) -> None:
    from fastpop.graphs import GraphedStep

    arch = build_arch(spec, data.in_shape, data.classes)
    config = Config(seeds=p, batch_size=bsz)
    seeds = list(range(p))
    idx = epoch_orders(seeds, 0, len(data.train))[:, :bsz].to(device)
    x_all = ((data.train.x.float() - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1))
    providers = {}
    pop_g = Population(arch, seeds, device)
    graphed = GraphedStep(pop_g, get_backend("triton", device), data, config, p, (p, bsz))
    providers["fastpop-triton (graph)"] = lambda: graphed(idx, 0.05, 1)
    pop_t = Population(arch, seeds, device)
    providers["fastpop-triton (eager)"] = lambda: train_step(pop_t, get_backend("triton", device), data, idx, 0.05, config, p, 1)
    if reference_too:  # im2col of a wide CNN at P = 1000 needs tens of GB
        pop_r = Population(arch, seeds, device)
        providers["fastpop-torch"] = lambda: train_step(pop_r, get_backend("torch", device), data, idx, 0.05, config,
                                                        p, 1)
    vmap_step = _vmap_step(arch, seeds, x_all, data.train.y)
    providers["torch.func vmap"] = lambda: vmap_step(idx)
    if p <= 100:
        modules_step = _loop_step(arch, seeds, x_all, data.train.y)
        providers["module loop"] = lambda: modules_step(idx)
    flops = 3 * arch.flops_per_example() * p * bsz
    rates = {}
    for name, fn in providers.items():
        try:
            dt = _time(fn, reps=10)
        except Exception as e:  # report and go on: one provider's failure must not hide the others
            print(f"{name}: failed ({type(e).__name__}: {e})")
            continue
        rates[name] = p * bsz / dt
        print(f"{name:24s} {spec} P={p:5d} {data.in_shape}: {rates[name]:14,.0f} net-images/s  "
              f"{flops / dt / 1e12:6.2f} TFLOP/s ({100 * flops / dt / 1e12 / ceil['fp32']:.1f}% of fp32 matmul)")
    if "fastpop-triton (graph)" in rates:
        for name, r in rates.items():
            print(f"  fastpop-triton (graph) / {name}: {rates['fastpop-triton (graph)'] / r:.2f}x")
    providers.clear()
    torch.cuda.empty_cache()


def attempt(failures: list, fn, *args) -> None:
    """Run one check; a mismatch is printed and counted, and the checks and timings after it still run."""
    try:
        fn(*args)
    except AssertionError as e:
        failures.append(f"{fn.__name__}{args[1:]}")
        print(f"FAILED: {fn.__name__} {args[1:]}: {str(e)[:2000]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny shapes, correctness only (CPU interpreter)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, device "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (interpreter)'}")
    if args.small:
        check(synthetic((3, 9, 9), 64, 10, device), 3, 8, device)
        check(synthetic((3, 8, 6), 16, 10, device), 3, 4, device, CNN5)
        check(synthetic((1, 8, 8), 64, 10, device), 3, 8, device, "mlp")
        check_recipe(synthetic((2, 7, 6), 16, 10, device), 4, 4, device, "c3-ap-c4-flat-d5")
        check(synthetic((3, 5, 3), 8, 10, device), 2, 2, device, "resnet8", ref_chunk=1)
        return 0
    if device.type != "cuda":
        print("no CUDA device: run with --small for the interpreter checks")
        return 2
    digits, cifar = synthetic((1, 8, 8), 2048, 10, device), synthetic((3, 32, 32), 4096, 10, device)
    failures: list[str] = []
    for data in (digits, cifar):
        attempt(failures, check, data, 1000, 32, device)
        attempt(failures, check, data, 1000, 32, device, "mlp")
    attempt(failures, check, digits, 1000, 32, device, CNN5)
    attempt(failures, check, cifar, 200, 32, device, CNN5)
    attempt(failures, check, cifar, 1000, 32, device, "resnet8", 250)
    attempt(failures, check_recipe, cifar, 1000, 32, device)
    attempt(failures, check_recipe, digits, 1000, 32, device, "mlp")
    attempt(failures, check_graph, cifar, 64, 32, device)
    attempt(failures, check_graph, cifar, 64, 32, device, CNN5)
    attempt(failures, check_graph, cifar, 64, 32, device, "resnet8")
    ceil = ceilings(device)
    print(f"ceilings: fp32 matmul {ceil['fp32']:.1f} TFLOP/s, tf32 {ceil['tf32']:.1f} TFLOP/s, "
          f"device copy {ceil['copy_TBps']:.2f} TB/s")
    for data in (cifar, digits):
        for p in (100, 1000):
            timings(data, p, 32, device, ceil)
            sys.stdout.flush()
    for data in (cifar, digits):
        timings(data, 1000, 32, device, ceil, "mlp")
    timings(digits, 1000, 32, device, ceil, CNN5)
    recipe_timings(cifar, 1000, 32, device)
    timings(cifar, 1000, 32, device, ceil, CNN5, reference_too=False)
    timings(cifar, 1000, 32, device, ceil, "resnet8", reference_too=False)  # vmap: per-network BN buffers
    print(f"{len(failures)} checks failed: {failures}" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
