"""The training recipe: augmentation drawn per network, example and epoch (the reference transform against a naive
one, every backend against the reference), label smoothing as F.cross_entropy's, SGD with Nesterov and Adam/AdamW
as torch.optim's, the population against plain nn.Modules under each, resume bit for bit, and bad input refused."""

import numpy as np
import pytest
import torch

import fastpop
from fastpop.archs import build_arch
from fastpop.cli import main
from fastpop.config import Config
from fastpop.data import load_dataset
from fastpop.data.augment import Augment, AugmentBatch, apply, draws
from fastpop.data.orders import epoch_orders
from fastpop.ops import get_backend, numba_cpu, reference
from fastpop.population import Population, init_network
from fastpop.trainer import train_step

from test_backends import _case, _check_grads

CPU = torch.device("cpu")
NUMBA = get_backend("numba", CPU)


def _naive(aug, img, d):
    """One image [C, H, W] transformed pixel by pixel: crop (translate, zero padding), flip, cutout."""
    c, h, w = img.shape
    flip, dy, dx, cy, cx = (int(v) for v in d)
    out = torch.zeros_like(img)
    for y in range(h):
        for x in range(w):
            top, left = cy - aug.cutout // 2, cx - aug.cutout // 2
            if aug.cutout and top <= y < top + aug.cutout and left <= x < left + aug.cutout:
                continue
            sy, sx = y + dy, (w - 1 - x if flip else x) + dx
            if 0 <= sy < h and 0 <= sx < w:
                out[:, y, x] = img[:, sy, sx]
    return out


@pytest.mark.parametrize("text", ["flip", "crop:2", "cutout:3", "flip,crop:3,cutout:2"])
def test_reference_transform_equals_a_naive_one(text):
    aug = Augment.parse(text)
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(2, 5, 2, 7, 6, generator=g)
    idx = torch.randint(0, 1000, (2, 5), generator=g)
    d = draws(aug, torch.tensor([3, 2**40 + 7]), 4, idx, 7, 6)
    out = apply(aug, batch, d)
    for p in range(2):
        for b in range(5):
            torch.testing.assert_close(out[p, b], _naive(aug, batch[p, b], d[p, b]), rtol=0, atol=0)


def test_draws_are_uniform_and_depend_on_seed_epoch_and_example_only():
    aug = Augment.parse("flip,crop:2,cutout:4")
    idx = torch.arange(20000).view(1, -1)
    d = draws(aug, torch.tensor([5]), 0, idx, 8, 8)[0]
    assert abs(d[:, 0].float().mean() - 0.5) < 0.02
    counts = torch.bincount(d[:, 1] + 2, minlength=5).float() / len(idx[0])
    assert (counts - 0.2).abs().max() < 0.02 and d[:, 3].min() == 0 and d[:, 3].max() == 7
    # the same example gets the same draw in any batch and company, another epoch or seed another draw
    again = draws(aug, torch.tensor([9, 5]), 0, torch.stack([idx[0, :50].flip(0), idx[0, 100:150]]), 8, 8)
    assert torch.equal(again[0].flip(0), draws(aug, torch.tensor([9]), 0, idx[:, :50], 8, 8)[0])
    assert torch.equal(again[1], d[100:150])
    assert not torch.equal(draws(aug, torch.tensor([5]), 1, idx, 8, 8), d.unsqueeze(0))
    assert not torch.equal(draws(aug, torch.tensor([6]), 0, idx, 8, 8), d.unsqueeze(0))


@pytest.mark.parametrize("spec, text", [("c5-mp-c6-gap", "flip,crop:2,cutout:3"), ("d9", "crop:1"),
                                        ("c4k5-ap-flat-d6", "cutout:2")])
def test_numba_augmented_gradients_match_reference(spec, text):
    arch = build_arch(spec, (3, 7, 5), 4)
    pop, x, y, idx, mean, std = _case(arch, 3, 6, 11)
    aug = AugmentBatch(Augment.parse(text), torch.tensor([4, 8, 2**33]), 3)
    _check_grads(arch, pop, x, y, idx, mean, std, aug=aug)


@pytest.mark.parametrize("smoothing", [0.1, 0.45])
def test_numba_label_smoothing_matches_reference(smoothing):
    arch = build_arch("c5-mp-c6-gap-d7", (3, 7, 5), 4)
    _check_grads(arch, *_case(arch, 3, 9, 12), smoothing=smoothing)


def _buffers(n=1001, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for _ in range(4)]


@pytest.mark.parametrize("with_frozen", [False, True])
def test_nesterov_is_bit_identical_to_torch_and_reference(with_frozen):
    params, grads, mom, _ = _buffers()
    mom.zero_()
    frozen = torch.rand(len(params), generator=torch.Generator().manual_seed(1)) < 0.3 if with_frozen else None
    p_ref, g_ref, m_ref = params.clone(), grads.clone(), mom.clone()
    for _ in range(3):
        reference.sgd_step(p_ref, g_ref, m_ref, 0.05, 0.9, 1e-3, frozen, nesterov=True)
        numba_cpu.sgd_step(params, grads, mom, 0.05, 0.9, 1e-3, frozen, nesterov=True)
        assert torch.equal(params, p_ref) and torch.equal(mom, m_ref)
    if frozen is None:  # torch.optim on the same gradients
        p, (_, grads0, _, _) = torch.nn.Parameter(_buffers()[0]), _buffers()
        opt = torch.optim.SGD([p], lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
        for _ in range(3):
            p.grad = grads0.clone()
            opt.step()
        q, g, m = _buffers()[0], grads0.clone(), torch.zeros_like(grads0)
        for _ in range(3):
            g.copy_(grads0)
            reference.sgd_step(q, g, m, 0.05, 0.9, 1e-3, None, nesterov=True)
        assert torch.equal(q, p.detach())


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_adam_matches_torch_optim(decoupled):
    p0, g0, _, _ = _buffers()
    p = torch.nn.Parameter(p0.clone())
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([p], lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    q, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    r, rm, rv = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for step in range(1, 4):
        g = g0 * step
        p.grad = g.clone()
        opt.step()
        reference.adam_step(q, g.clone(), m, v, 0.01, (0.8, 0.99), 1e-6, 0.05, decoupled, step)
        numba_cpu.adam_step(r, g.clone(), rm, rv, 0.01, (0.8, 0.99), 1e-6, 0.05, decoupled, step)
        assert torch.equal(q, p.detach()), f"reference vs torch.optim at step {step}"
        torch.testing.assert_close(r, q, rtol=1e-6, atol=1e-7, msg=f"numba vs reference at step {step}")
    frozen = torch.zeros(len(p0), dtype=torch.bool)
    frozen[::3] = True
    before = r.clone()
    numba_cpu.adam_step(r, g0.clone(), rm, rv, 0.01, (0.8, 0.99), 1e-6, 0.05, decoupled, 4, frozen)
    assert torch.equal(r[frozen], before[frozen]) and not torch.equal(r[~frozen], before[~frozen])


RECIPES = {
    "adam": dict(optimizer="adam", lr=0.01, weight_decay=1e-3),
    "adamw": dict(optimizer="adamw", lr=0.01, weight_decay=0.05, betas=[0.85, 0.99]),
    "nesterov+smoothing": dict(nesterov=True, label_smoothing=0.1),
    "augment": dict(augment="flip,crop:2,cutout:3"),
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset(Config(), CPU)


@pytest.mark.parametrize("backend", ["numba", "torch", "triton"])  # triton: under the interpreter on a CPU
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_population_equals_plain_modules_under_each_recipe(digits, backend, recipe):
    config = Config(arch="c4-mp-c6-gap-d8", seeds=[2, 9], batch_size=16, **RECIPES[recipe])
    arch = build_arch(config.arch, digits.in_shape, digits.classes)
    steps, b = (2 if backend == "triton" else 4), config.batch_size  # the interpreter's time: 2 steps
    pop = Population(arch, config.init_seeds(), CPU, config.optimizer != "sgd")
    orders = epoch_orders(config.order_seeds(), 0, len(digits.train))
    aug = Augment.parse(config.augment)
    losses = [train_step(pop, get_backend(backend, CPU), digits, orders[:, s * b:(s + 1) * b], config.lr, config,
                         step=s + 1, seeds=torch.tensor(config.order_seeds())) for s in range(steps)]
    for k, seed in enumerate(config.seed_list):
        module = arch.to_module()
        torch.nn.utils.vector_to_parameters(init_network(arch, seed), module.parameters())
        if config.optimizer == "sgd":
            opt = torch.optim.SGD(module.parameters(), lr=config.lr, momentum=config.momentum,
                                  weight_decay=config.weight_decay, nesterov=config.nesterov)
        else:
            cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
            opt = cls(module.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
                      weight_decay=config.weight_decay)
        for s in range(steps):
            idx = orders[k:k + 1, s * b:(s + 1) * b]
            one = AugmentBatch(aug, torch.tensor([config.order_seeds()[k]]), 0) if aug else None
            x = reference.gather_images(digits.train.x, idx, digits.mean, digits.std, False, one)
            loss = torch.nn.functional.cross_entropy(module(x[0].permute(0, 3, 1, 2)), digits.train.y[idx[0]],
                                                     label_smoothing=config.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            torch.testing.assert_close(losses[s][k], loss.detach(), rtol=1e-5, atol=1e-6,
                                       msg=f"loss of network {k} at step {s}")
        want = torch.nn.utils.parameters_to_vector(module.parameters()).detach()
        torch.testing.assert_close(pop.networks()[k], want, rtol=1e-5, atol=1e-6, msg=f"weights of network {k}")


def test_adam_and_augmented_run_resumes_bit_identical(tmp_path):
    common = dict(seeds=3, epochs=2, batch_size=256, optimizer="adamw", augment="flip,crop:1", label_smoothing=0.1)
    whole = fastpop.train(fastpop.Config(out=str(tmp_path / "whole"), **common))
    steps = []
    with pytest.raises(fastpop.Interrupted):
        fastpop.train(fastpop.Config(out=str(tmp_path / "cut"), **common), progress=lambda p: steps.append(1),
                      should_stop=lambda: len(steps) == 7)
    cut = fastpop.resume(tmp_path / "cut")
    assert torch.equal(cut.weights(), whole.weights())
    np.testing.assert_array_equal(cut.bits("test"), whole.bits("test"))


@pytest.mark.parametrize("flags, message", [
    (["--augment", "rotate"], "unknown or malformed 'rotate'"),
    (["--augment", "crop:8"], "crop:8 pads as much as the 8x8 image"),
    (["--augment", "flip,flip"], "flip given twice"),
    (["--label-smoothing", "-0.1"], "label_smoothing must be a number"),
    (["--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["--optimizer", "adam", "--nesterov"], "nesterov needs optimizer sgd"),
])
def test_bad_recipes_get_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["run", "--seeds", "2", "--epochs", "1", *flags, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_grid_network_equals_the_network_trained_alone_with_its_hyperparameters(tmp_path):
    common = dict(epochs=1, batch_size=256, record_every=2, augment="flip")
    grid = {"lr": [0.3, 0.05], "weight_decay": [5e-4, 0.0], "crop": [0, 2], "label_smoothing": [0.0, 0.2]}
    run = fastpop.train(fastpop.Config(seeds=2, grid=grid, out=str(tmp_path / "grid"), **common))
    assert len(run.seeds) == 32 and len(run.groups) == 16
    group = run.groups[11]  # lr 0.05, weight decay 5e-4, crop 2, smoothing 0.2
    assert (group["lr"], group["weight_decay"], group["crop"], group["label_smoothing"]) == (0.05, 5e-4, 2, 0.2)
    k = group["networks"][0] + 1
    alone = fastpop.train(fastpop.Config(seeds=[run.seeds[k]], lr=0.05, weight_decay=5e-4, label_smoothing=0.2,
                                         out=str(tmp_path / "alone"), **dict(common, augment="flip,crop:2")))
    assert torch.equal(run.weights()[k], alone.weights()[0])
    for split in ("train", "test"):
        np.testing.assert_array_equal(run.bits(split)[:, k], alone.bits(split)[:, 0])


def test_grid_shards_cut_groups_and_merge_to_the_whole(tmp_path):
    common = dict(seeds=3, epochs=1, batch_size=256, grid={"lr": [0.2, 0.05], "momentum": [0.9, 0.5]})
    whole = fastpop.train(fastpop.Config(out=str(tmp_path / "whole"), **common))
    for i in range(3):  # 12 networks in 3 shards of 4: shards cut the groups of 3
        fastpop.train(fastpop.Config(out=str(tmp_path / f"s{i}"), shard=f"{i}/3", **common))
    assert main(["merge", *(str(tmp_path / f"s{i}") for i in range(3)), "--out", str(tmp_path / "m")]) == 0
    merged = fastpop.load_run(tmp_path / "m")
    assert torch.equal(merged.weights(), whole.weights()) and merged.groups == whole.groups
    np.testing.assert_array_equal(merged.bits("test"), whole.bits("test"))


@pytest.mark.parametrize("flags, message", [
    (["--grid", "betas=0.9"], "grid: unknown key 'betas'"),
    (["--grid", "lr=0.1,0.1"], "grid: lr has a value twice"),
    (["--grid", "lr=20"], "lr must be a number in"),
    (["--grid", "lr=x"], "takes KEY=V1,V2"),
    (["--seeds", "1,2", "--grid", "lr=0.1"], "a grid takes a seed count"),
    (["--grid", "cutout=9"], "cutout:9 is larger than the 8x8 image"),
])
def test_bad_grids_get_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    args = ["run", "--epochs", "1", *flags, "--out", str(out), "--quiet"]
    assert main(args if "--seeds" in flags else ["run", "--seeds", "2", *args[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_more_epochs_equal_the_longer_run_trained_in_one_go(tmp_path, monkeypatch):
    common = dict(seeds=3, batch_size=256, schedule="constant", record_every=3)
    longer = fastpop.train(fastpop.Config(epochs=3, out=str(tmp_path / "longer"), **common))
    fastpop.train(fastpop.Config(epochs=1, out=str(tmp_path / "run"), **common))
    from fastpop import rundir

    real = rundir._new_array

    def crash(path, *args):  # the extension is killed while it grows the first record array
        if path.name.endswith(".grow"):
            raise OSError("killed")
        return real(path, *args)

    monkeypatch.setattr(rundir, "_new_array", crash)
    with pytest.raises(OSError):
        fastpop.resume(tmp_path / "run", epochs=3)
    monkeypatch.setattr(rundir, "_new_array", real)
    run = fastpop.resume(tmp_path / "run")  # the manifest already plans 3 epochs: resuming grows the arrays
    assert run.status == "complete" and run.checkpoints == longer.checkpoints
    assert torch.equal(run.weights(), longer.weights())
    for split in ("train", "test"):
        np.testing.assert_array_equal(run.bits(split), longer.bits(split))
        np.testing.assert_array_equal(run.loss(split), longer.loss(split))
    assert main(["verify", str(tmp_path / "run")]) == 0


def test_a_step_schedule_extends_only_before_its_first_milestone(tmp_path, capsys):
    common = dict(seeds=2, batch_size=256, schedule="step")
    steps = []
    with pytest.raises(fastpop.Interrupted):  # 5 steps per epoch; stopped in epoch 1 of 4 (milestone at step 10)
        fastpop.train(fastpop.Config(epochs=4, out=str(tmp_path / "early"), **common),
                      progress=lambda p: steps.append(1), should_stop=lambda: len(steps) == 4)
    assert fastpop.resume(tmp_path / "early", epochs=6).config.epochs == 6
    fastpop.train(fastpop.Config(epochs=2, out=str(tmp_path / "late"), **common))
    assert main(["run", "--resume", str(tmp_path / "late"), "--epochs", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "step schedule the learning rate of step 6" in err and err.count("\n") == 1
    assert main(["run", "--resume", str(tmp_path / "late"), "--epochs", "1", "--quiet"]) == 2
    assert "cannot be shortened" in capsys.readouterr().err
    assert fastpop.load_run(tmp_path / "late").config.epochs == 2 and main(["verify", str(tmp_path / "late")]) == 0


def test_analyze_and_compare_take_a_grid_group_by_group(tmp_path, capsys):
    from fastpop.analysis import analyze, compare

    run = fastpop.train(fastpop.Config(seeds=3, epochs=1, batch_size=256, grid={"lr": [0.3, 0.05]},
                                       record=["margin"], out=str(tmp_path / "grid")))
    whole = analyze(run)
    first, second = (analyze(run, group=g) for g in range(2))
    assert (first.identity["P"], first.identity["group"], second.identity["group"]) == (3, "lr=0.3", "lr=0.05")
    acc = run.accuracy("test")[-1]
    assert first.accuracy["mean"] == pytest.approx(float(acc[:3].mean()))
    assert second.accuracy["mean"] == pytest.approx(float(acc[3:].mean()))
    np.testing.assert_allclose(second.arrays["aum"], np.asarray(run.margins("test"), np.float64)[:, 3:].mean((0, 1)),
                               rtol=1e-6)
    assert whole.identity["P"] == 6 and "group" not in whole.identity
    result = compare([run])
    assert [r["P"] for r in result.runs] == [3, 3] and len(result.pairs) == 1
    assert main(["analyze", str(run.path), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "group-1" / "test.metrics.json").exists()
    assert main(["analyze", str(run.path), "--group", "2"]) == 2
    assert "no group 2" in capsys.readouterr().err


def test_added_seeds_and_merged_runs_equal_the_population_trained_in_one_go(tmp_path, capsys):
    common = dict(epochs=1, batch_size=256, record_every=3, subset_fraction=0.8)
    whole = fastpop.train(fastpop.Config(seeds=5, out=str(tmp_path / "whole"), **common))
    fastpop.train(fastpop.Config(seeds=3, out=str(tmp_path / "grow"), **common))
    assert main(["run", "--resume", str(tmp_path / "grow"), "--add-seeds", "2", "--quiet"]) == 0
    grown = fastpop.load_run(tmp_path / "grow")
    assert grown.seeds == whole.seeds and grown.config.seeds == 5
    assert torch.equal(grown.weights(), whole.weights())
    for split in ("train", "test"):
        np.testing.assert_array_equal(grown.bits(split), whole.bits(split))
    np.testing.assert_array_equal(grown.member_bits(), whole.member_bits())
    assert main(["verify", str(tmp_path / "grow")]) == 0 and sorted(p.name for p in tmp_path.iterdir()) == [
        "grow", "whole"]
    fastpop.train(fastpop.Config(seeds=[9, 2], out=str(tmp_path / "a"), **common))
    fastpop.train(fastpop.Config(seeds=[4], out=str(tmp_path / "b"), **common))
    assert main(["merge", str(tmp_path / "b"), str(tmp_path / "a"), "--out", str(tmp_path / "ab")]) == 0
    assert fastpop.load_run(tmp_path / "ab").seeds == [4, 9, 2]  # runs in order of their first seed
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "ab"), "--out", str(tmp_path / "x")]) == 2
    assert "share seed(s) 2, 9" in capsys.readouterr().err and not (tmp_path / "x").exists()
    fastpop.train(fastpop.Config(seeds=[7], out=str(tmp_path / "c"), **dict(common, lr=0.05)))
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "x")]) == 2
    assert "not of one population" in capsys.readouterr().err


def test_adding_seeds_killed_between_its_renames_is_finished_by_the_same_command(tmp_path, monkeypatch):
    from fastpop import distributed

    common = dict(epochs=1, batch_size=256)
    whole = fastpop.train(fastpop.Config(seeds=3, out=str(tmp_path / "whole"), **common))
    fastpop.train(fastpop.Config(seeds=2, out=str(tmp_path / "grow"), **common))
    real = distributed.os.rename

    def dies_before_the_new_run_moves_in(a, b):
        if str(b) == str(tmp_path / "grow"):
            raise KeyboardInterrupt  # killed after the old run was moved aside
        real(a, b)

    monkeypatch.setattr(distributed.os, "rename", dies_before_the_new_run_moves_in)
    with pytest.raises(KeyboardInterrupt):
        distributed.add_seeds(tmp_path / "grow", 1)
    monkeypatch.setattr(distributed.os, "rename", real)
    assert not (tmp_path / "grow").exists()
    grown = distributed.add_seeds(tmp_path / "grow", 1)
    assert torch.equal(grown.weights(), whole.weights())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grow", "whole"]
