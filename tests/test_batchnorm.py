"""BatchNorm, strided convs and residual blocks: the grammar, the population against plain nn.Modules (nn.Conv2d,
nn.BatchNorm2d, the basic block) trained with torch.optim.SGD, train and evaluation semantics as torch, network k
alone or in company, and the running statistics as training state (resume, merge, Run.module)."""

import numpy as np
import pytest
import torch

import fastpop
from fastpop.archs import Arch, build_arch, parse_arch
from fastpop.blocks import load_network
from fastpop.cli import main
from fastpop.config import Config
from fastpop.data import load_dataset
from fastpop.data.orders import epoch_orders
from fastpop.errors import UsageError
from fastpop.ops import get_backend
from fastpop.population import Population, init_network
from fastpop.trainer import train_step

CPU = torch.device("cpu")
SPECS = ["c6b-r6-r9s2-gap", "c5s2b-mp-r7s2-flat-d6", "c4k5s2-c6k1b-r6-ap-gap", "resnet8", "vgg-small"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset(Config(), CPU)


@pytest.mark.parametrize("spec, layers", [
    ("c16b", "conv 3x3 16 bn"), ("c16k5s2b", "conv 5x5 16 stride 2 bn"), ("c8s2", "conv 3x3 8 stride 2"),
    ("r16", "res block 16"), ("r32s2", "res block 32 stride 2 (projection)")])
def test_tokens_round_trip_and_describe(spec, layers):
    arch = build_arch(spec + "-gap", (3, 9, 9), 4)
    assert arch.spec == spec + "-gap" and arch.describe().startswith(layers)


@pytest.mark.parametrize("spec, message", [
    ("c16s3-gap", "token 'c16s3' has stride 3"), ("r0-gap", "token 'r0' has width 0"),
    ("c16bb-gap", "unknown token 'c16bb'"), ("gap-r8", "r8 after gap/flat"), ("r8", "ends with a conv or pool"),
    ("c8b2-gap", "unknown token 'c8b2'")])
def test_bad_tokens_get_one_line(spec, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        parse_arch(spec)


def test_strides_shrink_to_ceil_and_blocks_project_only_when_needed():
    arch = build_arch("c4s2-r4-r6-r6s2-gap", (1, 7, 5), 3)
    assert [op.out_hw for op in arch.ops[:4]] == [(4, 3), (4, 3), (4, 3), (2, 2)]
    assert [op.projects for op in arch.ops[1:4]] == [False, True, True]
    module = arch.to_module()
    assert [tuple(p.shape) for p in module.parameters()] == [s for _, s in arch.param_shapes()]
    assert sum(p.numel() for p in module.parameters()) == arch.params_per_network()
    assert module(torch.zeros(2, 1, 7, 5)).shape == (2, 3)


def test_init_is_torch_default_and_leaves_other_layers_draws_alone():
    arch = build_arch("c4b-r4-gap", (1, 6, 6), 3)
    flat = init_network(arch, 3)
    named = dict(zip([n for n, _ in arch.param_shapes()],
                     torch.split(flat, [int(np.prod(s)) for _, s in arch.param_shapes()])))
    assert torch.equal(named["bn0.weight"], torch.ones(4)) and torch.equal(named["res0.bn2.bias"], torch.zeros(4))
    assert named["conv0.weight"].abs().max() <= 1 / 3 and named["conv0.weight"].std() > 0.1
    pop = Population(arch, [3, 4], CPU)
    assert torch.equal(pop.networks()[0], flat)
    assert [v[1].tolist() for v in pop.stat_views()[:2]] == [[0.0] * 4, [1.0] * 4]  # running mean 0, variance 1


def _modules(arch, seeds):
    return [load_network(arch.to_module(), init_network(arch, s)) for s in seeds]


def _module_stats(module) -> torch.Tensor:
    return torch.cat([torch.cat([m.running_mean, m.running_var]) for m in module.modules()
                      if isinstance(m, torch.nn.BatchNorm2d)])


@pytest.mark.parametrize("spec", SPECS)
def test_population_equals_plain_modules_in_training_and_evaluation(digits, spec):
    """Each network per step as nn.Module + torch.optim.SGD: loss, weights, running statistics (train mode), then
    evaluation with the running statistics (eval mode): bits, loss and predictions."""
    backend = get_backend("numba", CPU)  # the default; its kernels equal the reference (tests/test_backends.py)
    config = Config(arch=spec, seeds=3, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3)
    arch = build_arch(spec, digits.in_shape, digits.classes)
    pop = Population(arch, config.init_seeds(), CPU)
    orders = epoch_orders(config.order_seeds(), 0, len(digits.train))
    modules = _modules(arch, config.init_seeds())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3) for m in modules]
    x = (digits.train.x.float() - digits.mean.view(1, -1, 1, 1)) / digits.std.view(1, -1, 1, 1)
    for s in range(4):
        idx = orders[:, s * 16:(s + 1) * 16]
        losses = train_step(pop, backend, digits, idx, 0.05, config)
        for k, (m, opt) in enumerate(zip(modules, opts)):
            m.train()
            loss = torch.nn.functional.cross_entropy(m(x[idx[k]]), digits.train.y[idx[k]])
            opt.zero_grad()
            loss.backward()
            opt.step()
            torch.testing.assert_close(losses[k], loss.detach(), rtol=1e-5, atol=1e-6)
    stats = torch.cat([v.reshape(pop.p, -1) for v in pop.stat_views()], 1)
    for k, m in enumerate(modules):
        torch.testing.assert_close(pop.networks()[k], torch.nn.utils.parameters_to_vector(m.parameters()).detach(),
                                   rtol=1e-4, atol=1e-5, msg=f"weights of network {k}")
        torch.testing.assert_close(stats[k], _module_stats(m), rtol=1e-4, atol=1e-5, msg=f"statistics of {k}")
    from fastpop.recorder import evaluate

    bits, loss, pred = evaluate(arch, backend, pop, digits.test, digits.mean, digits.std)
    xt = (digits.test.x.float() - digits.mean.view(1, -1, 1, 1)) / digits.std.view(1, -1, 1, 1)
    for k, m in enumerate(modules):
        with torch.no_grad():
            logits = m.eval()(xt)
        torch.testing.assert_close(loss[k], torch.nn.functional.cross_entropy(logits, digits.test.y), rtol=1e-4,
                                   atol=1e-5)
        assert (pred[k] == logits.argmax(1)).float().mean() > 0.995  # near-ties may round either way


@pytest.mark.parametrize("backend_name", ["torch", "numba"])
def test_network_k_is_bit_identical_alone_or_in_company(digits, backend_name):
    """(Widths of 8 and 16: the torch backend's batched GEMMs are bit-identical across P there, see reference.)"""
    backend = get_backend(backend_name, CPU)
    arch = build_arch("c8b-r8-r16s2-gap", digits.in_shape, digits.classes)
    config = Config(arch=arch.spec, seeds=5, batch_size=32)
    orders = epoch_orders(config.order_seeds(), 0, len(digits.train))
    pops = {}
    for name, nets in (("all", list(range(5))), ("alone", [3])):
        pop = Population(arch, [config.init_seeds()[k] for k in nets], CPU)
        for s in range(3):
            train_step(pop, backend, digits, orders[nets, s * 32:(s + 1) * 32], 0.1, config)
        pops[name] = pop
    assert torch.equal(pops["all"].networks()[3], pops["alone"].networks()[0])
    assert torch.equal(torch.cat([v[3] for v in pops["all"].stat_views()]),
                       torch.cat([v[0] for v in pops["alone"].stat_views()]))


def test_running_statistics_resume_merge_and_load_bit_identical(tmp_path):
    common = dict(arch="c4b-r6s2-gap", epochs=1, batch_size=256, record_every=3)
    whole = fastpop.train(fastpop.Config(seeds=3, out=str(tmp_path / "whole"), **common))
    assert whole.weights("stats").shape == (3, 2 * (4 + 6 + 6 + 6))
    steps = []
    with pytest.raises(fastpop.Interrupted):
        fastpop.train(fastpop.Config(seeds=3, out=str(tmp_path / "cut"), **common), progress=lambda p: steps.append(1),
                      should_stop=lambda: len(steps) == 2)
    cut = fastpop.resume(tmp_path / "cut")
    for key in ("params", "stats"):
        assert torch.equal(cut.weights(key), whole.weights(key))
    np.testing.assert_array_equal(cut.bits("test"), whole.bits("test"))
    for i in range(2):
        fastpop.train(fastpop.Config(seeds=3, shard=f"{i}/2", out=str(tmp_path / f"s{i}"), **common))
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "merged")]) == 0
    assert torch.equal(fastpop.load_run(tmp_path / "merged").weights("stats"), whole.weights("stats"))
    data = load_dataset(Config(), CPU)
    xt = (data.test.x.float() - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1)
    with torch.no_grad():
        right = whole.module(1)(xt).argmax(1) == data.test.y
    assert abs(right.float().mean().item() - whole.accuracy("test")[-1, 1]) < 2 / len(data.test)


def test_a_state_without_its_statistics_is_refused(tmp_path, capsys):
    run = fastpop.train(fastpop.Config(arch="c4b-gap", seeds=2, epochs=1, batch_size=256, out=str(tmp_path / "r")))
    from fastpop.rundir import STATE, save_state

    state = run.state()
    save_state(run.path, state["step"], state["checkpoints_done"], state["shapes"], state["params"],
               state["momentum"], state["diverged_at"])
    assert main(["run", "--resume", str(run.path), "--epochs", "2", "--quiet"]) == 2
    assert f"{run.path / STATE} is corrupt or does not fit this run: its BatchNorm statistics" in \
        capsys.readouterr().err


@pytest.mark.parametrize("spec", ["c4b-gap", "c3s2-mp-flat-d5", "r4s2-gap", "c3-r4-gap"])
def test_triton_backend_equals_the_torch_backend_with_blocks_first_or_later(digits, spec):
    """Under TRITON_INTERPRET=1 (conftest) or on a GPU: the loss, gradients and running statistics of the triton
    backend equal the torch backend's, a BatchNorm conv, strided conv or block reading the images by index."""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    arch = build_arch(spec, digits.in_shape, digits.classes)
    idx = torch.randint(0, len(digits.train), (2, 6), generator=torch.Generator().manual_seed(0))
    out = {}
    for name in ("torch", "triton"):
        pop = Population(arch, [1, 2], CPU)
        pop.grads.fill_(float("nan"))
        loss = get_backend(name, CPU).gradients(pop, 0, 2, digits.train.x, idx, digits.train.y[idx], digits.mean,
                                                digits.std)
        out[name] = (loss, pop.grads, pop.stats)
    for want, got in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_an_op_set_without_a_block_borrows_the_reference_and_says_so(digits):
    """An op set that lacks conv_bn_block, and whose gather hands its kernels a marker rather than a batch: the
    chain runs that layer on the reference's ops with the reference's batch, and `native` names it."""
    from types import SimpleNamespace

    from fastpop.ops import chain, reference

    marker = object()
    ops = SimpleNamespace(**{k: getattr(reference, k) for k in dir(reference) if not k.startswith("_")})
    del ops.conv_bn_block
    ops.gather_images = lambda *args: marker
    arch = build_arch("c4b-r4-gap", digits.in_shape, digits.classes)
    assert "conv_bn_block of c4b-r4-gap runs on the reference's torch ops" in chain.native(arch, ops)
    assert chain.native(arch, reference) is None
    pop = Population(arch, [1, 2], CPU)
    idx = torch.randint(0, len(digits.train), (2, 6), generator=torch.Generator().manual_seed(0))
    args = (pop.views(pop.params), digits.train.x, idx, digits.train.y[idx], digits.mean, digits.std)
    stats = [v.clone() for v in pop.stat_views()]
    torch.testing.assert_close(chain.loss(arch, ops, *args, stats=stats),
                               chain.loss(arch, reference, *args, stats=[v.clone() for v in pop.stat_views()]))


def test_diverged_networks_keep_their_running_statistics(digits):
    arch = build_arch("c4b-c4b-gap-d8", digits.in_shape, digits.classes)
    config = Config(arch=arch.spec, seeds=2, batch_size=16)
    pop = Population(arch, config.init_seeds(), CPU)
    orders = epoch_orders(config.order_seeds(), 0, len(digits.train))
    backend = get_backend("torch", CPU)
    frozen_at = None
    for s in range(12):
        before = pop.stats.clone()
        train_step(pop, backend, digits, orders[:, s * 16:(s + 1) * 16], 1e4, config, step=s + 1)
        if frozen_at is not None:
            assert torch.equal(pop.stats, before), f"step {s + 1}: the diverged networks' statistics moved"
        elif (pop.diverged_at >= 0).all():
            frozen_at = s + 1
            assert torch.equal(pop.stats, before)  # not even the diverging step's batch moves them
    assert frozen_at is not None and pop.finite_stats().all()  # the statistics of the last finite step


def test_non_finite_running_statistics_mark_a_network_diverged(digits):
    arch = build_arch("c4b-gap", digits.in_shape, digits.classes)
    config = Config(arch=arch.spec, seeds=3, batch_size=16)
    pop = Population(arch, config.init_seeds(), CPU)
    pop.stat_views()[1][1, 2] = float("inf")  # network 1's running variance
    train_step(pop, get_backend("torch", CPU), digits, torch.zeros(3, 16, dtype=torch.long), 0.1, config, step=4)
    assert pop.diverged_at.tolist() == [-1, 4, -1]


def test_batchnorm_on_one_value_per_channel_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "--arch", "c4s2b-c4s2b-c4s2b-gap", "--batch-size", "1", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "token 'c4s2b' would normalize 1 value per channel at batch size 1" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("spec", ["resnet20", "vgg-small", "c4b-r6s2-c3s2-mp-flat-d5", "d7-d5"])
def test_each_layer_says_how_many_tensors_it_takes(spec):
    """Op.tensors, which the backends use to take a layer's parameters and statistics, agrees with the names."""
    arch = build_arch(spec, (3, 16, 16), 10)
    names = [(n, i) for n, _, i in arch._tensors()]
    for i, op in enumerate(arch.ops):
        stats = sum(1 for n, j in names if j == i and n.endswith(("running_mean", "running_var")))
        assert op.tensors == (sum(1 for _, j in names if j == i) - stats, stats), (i, op)
