"""Population semantics: network k in a population trains exactly as network k alone, and as a plain nn.Module
with the same init and batch order trained by torch.optim.SGD."""

import pytest
import torch

from fastpop.ops import get_backend
from fastpop.archs import build_arch
from fastpop.config import Config
from fastpop.data import load_dataset
from fastpop.data.orders import epoch_orders
from fastpop.population import Population, init_network
from fastpop.trainer import accumulate_gradients, network_groups, train_step

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return load_dataset(Config(), CPU)


BACKENDS = pytest.mark.parametrize("backend", [get_backend(n, CPU) for n in ("torch", "numba")],
                                   ids=["torch", "numba"])


def _train_population(arch, data, config, steps, backend):
    pop = Population(arch, config.init_seeds(), CPU)
    orders = epoch_orders(config.order_seeds(), 0, len(data.train))
    losses = []
    for s in range(steps):
        idx = orders[:, s * config.batch_size:(s + 1) * config.batch_size]
        losses.append(train_step(pop, backend, data, idx, config.lr_at(s, steps, steps), config))
    return pop, torch.stack(losses)


@BACKENDS
@pytest.mark.parametrize("arch_name", ["small-cnn", "wide-cnn", "mlp", "c6k5-ap-c5k1-mp-flat-d12-d9", "gap-d7"])
def test_population_equals_plain_modules(digits, arch_name, backend):
    config = Config(arch=arch_name, seeds=4, batch_size=16, lr=0.1, momentum=0.9, weight_decay=1e-3,
                    schedule="cosine")
    arch = build_arch(arch_name, digits.in_shape, digits.classes)
    steps = 6
    pop, pop_losses = _train_population(arch, digits, config, steps, backend)
    orders = epoch_orders(config.order_seeds(), 0, len(digits.train))
    x = (digits.train.x.float() - digits.mean.view(1, -1, 1, 1)) / digits.std.view(1, -1, 1, 1)
    for k, seed in enumerate(config.seed_list):
        module = arch.to_module()
        with torch.no_grad():
            flat = init_network(arch, seed)
            start = 0
            for p in module.parameters():
                p.copy_(flat[start:start + p.numel()].view_as(p))
                start += p.numel()
        opt = torch.optim.SGD(module.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
        for s in range(steps):
            for group in opt.param_groups:
                group["lr"] = config.lr_at(s, steps, steps)
            idx = orders[k, s * 16:(s + 1) * 16]
            loss = torch.nn.functional.cross_entropy(module(x[idx]), digits.train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            torch.testing.assert_close(pop_losses[s, k], loss.detach(), rtol=1e-5, atol=1e-6,
                                       msg=f"loss of network {k} at step {s}")
        want = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        torch.testing.assert_close(pop.networks()[k], want, rtol=1e-5, atol=1e-6, msg=f"weights of network {k}")


def test_init_depends_on_seed_only(digits):
    arch = build_arch("small-cnn", digits.in_shape, digits.classes)
    alone = Population(arch, [7], CPU).networks()[0]
    among = Population(arch, [3, 7, 11], CPU).networks()[1]
    assert torch.equal(alone, among)
    assert not torch.equal(Population(arch, [8], CPU).networks()[0], alone)


def test_init_follows_torch_default_bounds(digits):
    arch = build_arch("small-cnn", digits.in_shape, digits.classes)
    pop = Population(arch, list(range(50)), CPU)
    for (name, shape), v in zip(arch.param_shapes(), pop.views(pop.params)):
        fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1) if name.endswith("weight") else None
        if fan_in:
            bound = fan_in ** -0.5
        assert v.abs().max() <= bound, name
        assert v.abs().max() > 0.9 * bound, name  # the whole range is used


@BACKENDS
def test_gradients_do_not_mix(digits, backend):
    """Each network's gradient is the gradient of its own mean loss alone."""
    arch = build_arch("small-cnn", digits.in_shape, digits.classes)
    config = Config(seeds=3, batch_size=8, momentum=0.0, weight_decay=0.0)
    pop = Population(arch, [1, 2, 3], CPU)
    idx = epoch_orders([1, 2, 3], 0, len(digits.train))[:, :8]
    accumulate_gradients(pop, backend, digits, idx, None, [(0, 3, config)])
    together = pop.networks(pop.grads)
    single = Population(arch, [2], CPU)
    accumulate_gradients(single, backend, digits, idx[1:2], None, [(0, 1, config)])
    torch.testing.assert_close(together[1], single.networks(single.grads)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spec, nesterov", [("c3b-mp-c4-flat-d6", False), ("d9-d6", True)])
def test_sgd_in_the_gradient_pass_is_the_separate_step_bit_for_bit(digits, spec, nesterov):
    """numba takes the SGD step in the pass that computes the gradient (`fuses_sgd`); against its gradients then
    its separate optimizer step, three steps of a grid (lr, momentum and weight decay per group): parameters,
    momentum, running statistics and divergence bit for bit, in chunks of two networks, with a network diverged
    from the start (NaN weights), one marked diverged before with finite weights (never moves), and those of a
    group that diverge at step 2 or 3 (lr 1e30)."""
    arch = build_arch(spec, digits.in_shape, digits.classes)
    config = Config(arch=spec, seeds=3, batch_size=8, nesterov=nesterov,
                    grid={"lr": [10.0, 0.1] if not nesterov else [0.2, 10.0], "momentum": [0.9, 0.5],
                          "weight_decay": [5e-4, 0.0]})
    groups = network_groups(config)
    idx = epoch_orders(config.order_seeds(), 0, len(digits.train))
    out = {}
    for fused in (True, False):
        backend = get_backend("numba", CPU)
        backend.fuses_sgd = fused
        pop = Population(arch, config.init_seeds(), CPU)
        pop.set_networks(torch.full((1, pop.d), float("nan")), lo=5)
        pop.set_diverged(torch.tensor([-1] * 9 + [0] + [-1] * (pop.p - 10)))  # finite weights, diverged before
        for step in range(3):
            lrs = [1e30 if cfg.lr == 10 and step else cfg.lr_at(step, 3, 3) for _, _, cfg in groups]
            train_step(pop, backend, digits, idx[:, step * 8:(step + 1) * 8], lrs, config, chunk=2, step=step + 1,
                       groups=groups)
        out[fused] = (pop.params, pop.momentum, pop.stats, pop.diverged_at)
    diverged = out[True][3]
    assert diverged[5] == 1 and diverged[9] == 0 and (diverged >= 0).sum() > 2  # and lr 1e30 at a later step
    assert torch.equal(pop.networks(out[True][0])[9], Population(arch, config.init_seeds(), CPU).networks()[9])
    for got, want in zip(out[True], out[False]):
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
