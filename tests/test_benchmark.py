"""The benchmark's baselines do the work fastpop does, and `run_benchmark` times every provider."""

import torch
import torch.nn.functional as F

from fastpop.archs import build_arch
from fastpop.benchmark import _grouped_step, _modules, run_benchmark


def test_grouped_conv_baseline_computes_the_networks_losses():
    arch = build_arch("small-cnn", (1, 8, 8), 10)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 1, 8, 8, generator=g), torch.randint(0, 10, (50,), generator=g)
    seeds = [3, 1, 4]
    idx = torch.randint(0, 50, (3, 8), generator=g)
    want = sum(F.cross_entropy(m(x[idx[k]]), y[idx[k]]) for k, m in enumerate(_modules(arch, seeds)))
    torch.testing.assert_close(_grouped_step(arch, seeds, x, y)(idx), want.detach(), rtol=1e-5, atol=1e-5)


def test_every_provider_is_timed():
    rows = run_benchmark([2], steps=1, loop_max_nets=2)
    assert [r.provider for r in rows] == ["fastpop-numba", "fastpop-torch", "torch.func vmap", "grouped conv",
                                          "module loop", "fastpop-numba eval", "fastpop-torch eval"]
    assert all(r.net_images_per_s > 0 and r.p == 2 and r.ceiling_gflops > 0 for r in rows)
