"""The benchmark's baselines do the work fastpop does, and `run_benchmark` times every provider."""

import torch
import torch.nn.functional as F

from fastpop.archs import build_arch
from fastpop.benchmark import _grouped_step, _modules, run_benchmark
from fastpop.cli import main


def test_grouped_conv_baseline_computes_the_networks_losses():
    arch = build_arch("small-cnn", (1, 8, 8), 10)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 1, 8, 8, generator=g), torch.randint(0, 10, (50,), generator=g)
    seeds = [3, 1, 4]
    idx = torch.randint(0, 50, (3, 8), generator=g)
    want = sum(F.cross_entropy(m(x[idx[k]]), y[idx[k]]) for k, m in enumerate(_modules(arch, seeds)))
    torch.testing.assert_close(_grouped_step(arch, seeds, x, y)(idx), want.detach(), rtol=1e-5, atol=1e-5)


def test_every_provider_is_timed():
    rows = run_benchmark([2], steps=1, loop_max_nets=2, isolate=False)
    assert [r.provider for r in rows] == ["fastpop-numba", "fastpop-torch", "torch.func vmap", "grouped conv",
                                          "module loop", "fastpop-numba eval", "fastpop-torch eval"]
    assert all(r.net_images_per_s > 0 and r.p == 2 and r.ceiling_gflops > 0 for r in rows)


def test_rounds_keep_each_providers_best_rate(monkeypatch):
    import fastpop.benchmark as bench

    turns = iter(range(100))
    monkeypatch.setattr(bench, "provider_rate", lambda name, *a: (float(next(turns) % 7), 0.1))
    monkeypatch.setattr(bench, "sgemm_ceiling", lambda: 1.0)
    rows = run_benchmark([2], steps=1, arch_name="mlp", loop_max_nets=1, isolate=False, rounds=3)
    # 6 providers take turns 0-5, 6-11, 12-17: each keeps the largest of its three rates modulo 7
    assert [r.net_images_per_s for r in rows] == [max(t % 7 for t in (i, i + 6, i + 12)) for i in range(6)]
    assert main(["bench", "--rounds", "0"]) == 2


def test_a_provider_runs_in_a_process_of_its_own():
    from fastpop.benchmark import in_own_process

    rate, rss = in_own_process(("torch.func vmap", "mlp", 2, 1, 32, None))
    assert rate > 0 and 0.05 < rss < 8


def test_vmap_baseline_trains_batchnorm_with_per_network_running_statistics():
    """Two steps of the vmap ensemble on random 3x12x12 images equal the modules trained one by one in training
    mode: weights and running statistics."""
    from fastpop.benchmark import LR, MOMENTUM, WD, _vmap_step, bench_data

    data = bench_data((3, 12, 12))
    assert data.in_shape == (3, 12, 12) and len(data.train) == 1024
    arch = build_arch("c4b-r6s2-gap", data.in_shape, data.classes)
    x, y = data.train.x.float() / 255, data.train.y
    seeds, idx = [2, 7], torch.randint(0, 1024, (2, 2, 8), generator=torch.Generator().manual_seed(1))
    step = _vmap_step(arch, seeds, x, y)
    modules = _modules(arch, seeds)
    opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD) for m in modules]
    for s in range(2):
        step(idx[s])
        for k, (m, opt) in enumerate(zip(modules, opts)):
            opt.zero_grad()
            F.cross_entropy(m(x[idx[s, k]]), y[idx[s, k]]).backward()
            opt.step()
    for k, m in enumerate(modules):
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            torch.testing.assert_close(step.state[name][k].to(t.dtype), t.detach(), rtol=1e-4, atol=1e-5,
                                       msg=f"{name} of network {k}")


def test_batchnorm_spec_on_an_image_shape_is_timed(monkeypatch):
    from fastpop import benchmark

    monkeypatch.setattr(benchmark, "SYNTHETIC_TRAIN", 96)  # 3 batches of 32: two warm-up steps, one timed
    rows = run_benchmark([2], steps=1, arch_name="c4b-r4s2-gap", loop_max_nets=2, input_shape=(3, 10, 10),
                         isolate=False)
    assert [r.provider for r in rows] == ["fastpop-numba", "fastpop-torch", "torch.func vmap", "module loop",
                                          "fastpop-numba eval", "fastpop-torch eval"]
    assert all(r.net_images_per_s > 0 and r.data == "arrays:random" for r in rows)
