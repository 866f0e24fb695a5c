"""The numba backend's whole-network kernels and fused SGD against the torch reference: loss, every gradient and the
evaluation (bits, loss, predictions) on fresh random inputs and odd shapes, with the outputs poisoned before each
run."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastpop.archs import Arch, Conv, Dense, build_arch
from fastpop.ops import numba_cpu, reference
from fastpop.population import Population, loss as population_loss, score

CPU = torch.device("cpu")

# odd sizes: 7x5 images with 3 channels pool to 3x2 (floor drops a row and a column), then 1x1
ODD = Arch("odd", (3, 7, 5), (Conv(3, 5, True), Conv(5, 6, True), Conv(6, 7, False)), (Dense(7, 4, False),))


def _case(arch, p, bsz, seed, constant=False):
    g = torch.Generator().manual_seed(seed)
    c, h, w = arch.in_shape
    n = 40
    x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    if constant:  # flat images: every 2x2 pooling window is a tie, resolved as nn.MaxPool2d does
        x[:] = 7
    y = torch.randint(0, arch.classes, (n,), generator=g)
    idx = torch.randint(0, n, (p, bsz), generator=g)
    mean, std = torch.rand(c, generator=g) * 100, torch.rand(c, generator=g) * 50 + 20
    pop = Population(arch, list(range(seed, seed + p)), CPU)
    pop.params.mul_(3)  # larger weights than init: more positive activations, ReLU and pool paths both taken
    return pop, x, y, idx, mean, std


def _reference_grads(pop, x, y, idx, mean, std):
    pop.grads.zero_()
    loss = population_loss(pop.arch, reference, pop.leaves(0, pop.p), x, idx, y[idx], mean, std)
    loss.sum().backward()
    return loss.detach(), pop.grads.clone()


@pytest.mark.parametrize("arch", [ODD, build_arch("small-cnn", (1, 8, 8), 10), build_arch("wide-cnn", (1, 8, 8), 10)],
                         ids=["odd", "small-cnn", "wide-cnn"])
@pytest.mark.parametrize("p, bsz", [(1, 1), (3, 5), (4, 33)])
def test_loss_and_every_gradient_match_reference(arch, p, bsz):
    for seed in (1, 2):  # fresh inputs each time
        pop, x, y, idx, mean, std = _case(arch, p, bsz, seed * 100 + p)
        want_loss, want_grads = _reference_grads(pop, x, y, idx, mean, std)
        pop.grads.fill_(float("nan"))  # the kernel must write every gradient entry
        loss = numba_cpu.network_grads(pop, 0, x, idx, y[idx], mean, std)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for name, got, want in zip([n for n, _ in arch.param_shapes()], pop.views(pop.grads), pop.views(want_grads)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


@pytest.mark.parametrize("arch", [ODD, build_arch("small-cnn", (1, 8, 8), 10)], ids=["odd", "small-cnn"])
@pytest.mark.parametrize("nb", [7, 150])  # 150: two kernel calls of 80 and 70 examples
@pytest.mark.parametrize("shared", [False, True], ids=["own-batches", "same-examples"])
def test_score_matches_reference(arch, nb, shared):
    pop, x, y, idx, mean, std = _case(arch, 5, nb, 5)
    if shared:  # as in evaluation: the kernel gathers the input layer once per thread
        idx = idx[:1].expand(5, -1)
    labels = y[idx]
    labels[:, ::5] = -1  # classes the networks were not trained on: wrong, no loss
    dense_w, dense_b = pop.views(pop.params)[-2:]
    dense_w[2].zero_()  # network 2: every logit equal, ties to class 0
    dense_b[2].fill_(0.5)
    want_bits = torch.zeros(5, 8 + -(-nb // 64) * 8, dtype=torch.uint8)
    want_loss, want_pred = score(arch, reference, pop.views(pop.params), x, idx, labels, mean, std, want_bits, 64)
    bits = torch.full_like(want_bits, 0xFF)  # the kernel writes every byte of its examples, and only those
    bits[:, 8:] = 0xAB
    loss, pred = numba_cpu.network_score(arch, pop.views(pop.params), x, idx, labels, mean, std, bits, 64)
    assert torch.equal(pred, want_pred)
    assert (pred[2] == 0).all()
    assert torch.equal(bits[:, :8], torch.full_like(bits[:, :8], 0xFF))
    n_bytes = -(-nb // 8)
    assert torch.equal(bits[:, 8:8 + n_bytes], want_bits[:, 8:8 + n_bytes])
    assert (bits[:, 8 + n_bytes:] == 0xAB).all()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)


def test_pool_ties_route_the_gradient_as_max_pool2d():
    arch = build_arch("small-cnn", (1, 8, 8), 10)
    pop, x, y, idx, mean, std = _case(arch, 2, 6, 3, constant=True)
    want_loss, want_grads = _reference_grads(pop, x, y, idx, mean, std)
    loss = numba_cpu.network_grads(pop, 0, x, idx, y[idx], mean, std)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pop.grads, want_grads, rtol=1e-4, atol=1e-6)


def test_network_is_bit_identical_alone_or_in_company():
    arch = build_arch("small-cnn", (1, 8, 8), 10)
    pop, x, y, idx, mean, std = _case(arch, 5, 9, 8)
    loss = numba_cpu.network_grads(pop, 0, x, idx, y[idx], mean, std)
    alone = Population(arch, [0], CPU)
    alone.set_networks(pop.networks()[3:4])  # network 3, alone
    loss_alone = numba_cpu.network_grads(alone, 0, x, idx[3:4], y[idx[3:4]], mean, std)
    assert torch.equal(loss[3:4], loss_alone)
    assert torch.equal(pop.networks(pop.grads)[3], alone.networks(alone.grads)[0])
    # a chunk (lo > 0) of the population writes the same gradients
    grads = pop.grads.clone()
    pop.grads.fill_(float("nan"))
    numba_cpu.network_grads(pop, 0, x, idx[:2], y[idx[:2]], mean, std)
    numba_cpu.network_grads(pop, 2, x, idx[2:], y[idx[2:]], mean, std)
    assert torch.equal(pop.grads, grads)


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
@pytest.mark.parametrize("with_frozen", [False, True])
def test_sgd_is_bit_identical_to_reference(weight_decay, with_frozen):
    g = torch.Generator().manual_seed(4)
    n = 1001  # odd: the threads' slices are uneven
    params, grads, mom = (torch.randn(n, generator=g) for _ in range(3))
    frozen = torch.rand(n, generator=g) < 0.3 if with_frozen else None
    want = [t.clone() for t in (params, grads, mom)]
    reference.sgd_step(*want, 0.05, 0.9, weight_decay, frozen)
    numba_cpu.sgd_step(params, grads, mom, 0.05, 0.9, weight_decay, frozen)
    for got, w in zip((params, grads, mom), want):
        assert torch.equal(got, w)


def test_nan_network_stays_nan_and_alone():
    arch = build_arch("small-cnn", (1, 8, 8), 10)
    pop, x, y, idx, mean, std = _case(arch, 3, 4, 9)
    clean = numba_cpu.network_grads(pop, 0, x, idx, y[idx], mean, std)
    grads = pop.networks(pop.grads)
    pop.views(pop.params)[0][1].fill_(float("nan"))
    loss = numba_cpu.network_grads(pop, 0, x, idx, y[idx], mean, std)
    assert np.isnan(loss[1].item())
    assert torch.equal(loss[[0, 2]], clean[[0, 2]])
    assert torch.equal(pop.networks(pop.grads)[[0, 2]], grads[[0, 2]])


def test_backend_choice():
    from fastpop.errors import UsageError
    from fastpop.ops import get_backend

    assert get_backend("auto", CPU) is numba_cpu
    assert get_backend("torch", CPU) is reference
    assert numba_cpu.runs_whole(build_arch("small-cnn", (1, 8, 8), 10))
    assert not numba_cpu.runs_whole(build_arch("mlp", (1, 8, 8), 10))
    with pytest.raises(UsageError, match="runs on the CPU"):
        get_backend("numba", torch.device("cuda"))


def test_results_do_not_depend_on_the_thread_count(tmp_path):
    """The cached parallel kernels, loaded in a process with 3 threads, give the bits of this process."""
    import subprocess
    import sys

    arch = build_arch("small-cnn", (1, 8, 8), 10)
    pop, x, y, idx, mean, std = _case(arch, 5, 9, 12)
    loss = numba_cpu.network_grads(pop, 0, x, idx, y[idx], mean, std)
    script = f"""
import torch, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_numba_backend import _case, build_arch, numba_cpu
import numba
assert numba.get_num_threads() == 3
pop, x, y, idx, mean, std = _case(build_arch("small-cnn", (1, 8, 8), 10), 5, 9, 12)
loss = numba_cpu.network_grads(pop, 0, x, idx, y[idx], mean, std)
torch.save((loss, pop.grads), {str(tmp_path / "out.pt")!r})
"""
    env = dict(os.environ, NUMBA_NUM_THREADS="3")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    other_loss, other_grads = torch.load(tmp_path / "out.pt")
    assert torch.equal(other_loss, loss)
    assert torch.equal(other_grads, pop.grads)
