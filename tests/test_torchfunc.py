"""Any nn.Module through the torch.func backend: P copies trained as P plain modules would be (same init, batch
order and SGD), network k bit-identical alone or in company, the record, resume and analysis as for any run, and a
clear error for modules this path cannot take."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fastpop
from fastpop.data import load_dataset
from fastpop.data.orders import epoch_orders


def small_conv():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 5, padding=2),
                         nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))


def with_batchnorm():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))


def with_dropout():
    return nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 10))


def wrong_output():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 7))


HERE = Path(__file__).parent
COMMON = dict(epochs=1, batch_size=256, lr=0.05, momentum=0.9, weight_decay=1e-3, record_every=2)


def test_population_equals_plain_modules(tmp_path):
    seeds = [3, 4, 5]
    run = fastpop.train(fastpop.Config(seeds=seeds, out=str(tmp_path / "r"), **COMMON), model=small_conv)
    assert run.manifest["backend"] == "torch.func"
    assert run.config.arch == "module:test_torchfunc:small_conv"
    config = run.config
    data = load_dataset(config, torch.device("cpu"))
    arch = fastpop.trainer.resolve_arch(config, data, torch.device("cpu"), small_conv)[0]
    x = (data.train.x.float() - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1)
    steps = len(data.train) // config.batch_size
    orders = epoch_orders(seeds, 0, len(data.train))
    for k, seed in enumerate(seeds):
        module = small_conv()
        with torch.no_grad():  # network k's init is the module's own, drawn under its seed
            torch.nn.utils.vector_to_parameters(arch.init_network(seed), module.parameters())
        opt = torch.optim.SGD(module.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
        for s in range(steps):
            for group in opt.param_groups:
                group["lr"] = config.lr_at(s, steps, steps)
            idx = orders[k, s * 256:(s + 1) * 256]
            opt.zero_grad()
            nn.functional.cross_entropy(module(x[idx]), data.train.y[idx]).backward()
            opt.step()
        want = torch.nn.utils.parameters_to_vector(module.parameters()).detach()
        torch.testing.assert_close(run.weights()[k], want, rtol=1e-4, atol=1e-5, msg=f"weights of network {k}")


def test_init_is_the_modules_own_under_the_seed():
    data = load_dataset(fastpop.Config(), torch.device("cpu"))
    arch = fastpop.trainer.resolve_arch(fastpop.Config(arch="module:test_torchfunc:small_conv"), data,
                                        torch.device("cpu"), small_conv)[0]
    a, b = arch.init_network(7), arch.init_network(8)
    assert torch.equal(a, arch.init_network(7)) and not torch.equal(a, b)
    bound = 1 / 3  # nn.Conv2d(1, 4, 3): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in 9
    assert a[:36].abs().max() <= bound and a[:36].abs().max() > 0.8 * bound


def test_network_is_bit_identical_alone_or_in_company(tmp_path):
    runs = {name: fastpop.train(fastpop.Config(seeds=seeds, out=str(tmp_path / name), **COMMON), model=small_conv)
            for name, seeds in {"alone": [5], "with": list(range(1, 19))}.items()}  # 18: two vmap blocks
    k = runs["with"].seeds.index(5)
    assert torch.equal(runs["with"].weights()[k], runs["alone"].weights()[0])
    for split in ("train", "test"):
        np.testing.assert_array_equal(runs["with"].bits(split)[:, k], runs["alone"].bits(split)[:, 0])
        np.testing.assert_array_equal(runs["with"].loss(split)[:, k], runs["alone"].loss(split)[:, 0])


def test_cli_module_arch_resume_and_analyze(tmp_path):
    """--arch module:..., interrupted after its first checkpoint and resumed from the CLI, equals an uninterrupted
    run; verify and analyze read it in other processes."""
    os = __import__("os")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    config = dict(COMMON, seeds=3, epochs=2, record_every=0)
    whole = fastpop.train(fastpop.Config(out=str(tmp_path / "whole"), **config), model=small_conv)
    steps = []
    with pytest.raises(fastpop.Interrupted):
        fastpop.train(fastpop.Config(out=str(tmp_path / "cut"), **config), model=small_conv,
                      progress=lambda p: steps.append(p.step), should_stop=lambda: len(steps) == 7)
    for cmd in (["run", "--resume", str(tmp_path / "cut"), "--quiet"], ["verify", str(tmp_path / "cut")],
                ["analyze", str(tmp_path / "cut")]):
        proc = subprocess.run([sys.executable, "-m", "fastpop", *cmd], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
    cut = fastpop.load_run(tmp_path / "cut")
    assert cut.status == "complete" and torch.equal(cut.weights(), whole.weights())
    np.testing.assert_array_equal(cut.bits("test"), whole.bits("test"))


@pytest.mark.parametrize("factory, message", [
    (with_batchnorm, "has buffers"), (with_dropout, "draws random numbers"), (wrong_output, "must give logits")])
def test_modules_this_path_cannot_take_are_refused(tmp_path, factory, message):
    with pytest.raises(fastpop.UsageError, match=message):
        fastpop.train(fastpop.Config(seeds=2, out=str(tmp_path / "r"), **COMMON), model=factory)
    assert not (tmp_path / "r").exists()


def test_module_arch_needs_the_torch_func_backend(tmp_path):
    with pytest.raises(fastpop.UsageError, match="torch.func"):
        fastpop.train(fastpop.Config(seeds=2, backend="numba", out=str(tmp_path / "r"), **COMMON), model=small_conv)
    with pytest.raises(fastpop.UsageError, match="trains module archs"):
        fastpop.train(fastpop.Config(seeds=2, backend="torch.func", out=str(tmp_path / "r"), **COMMON))
