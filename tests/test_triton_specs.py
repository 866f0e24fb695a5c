"""The whole Triton backend against the torch reference on specs of the architecture grammar, under
TRITON_INTERPRET=1 on the CPU (tests/conftest.py) or on a GPU: loss and every gradient with the gradients poisoned,
the evaluation's bits, predictions and summed loss; every first layer (conv, pool, gap, flatten, dense) reading
its images by index; network k bit-identical alone or in company; no op borrowed from the reference."""

import inspect
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from fastpop.archs import build_arch
from fastpop.config import Config
from fastpop.data import load_dataset
from fastpop.data.orders import epoch_orders
from fastpop.ops import chain, get_backend, reference
from fastpop.ops import triton as triton_ops
from fastpop.population import Population
from fastpop.trainer import network_groups, train_step
from test_backends import _case, _check_grads, specs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
CPU = torch.device("cpu")
TRITON = get_backend("triton", CPU)

# every kind of first layer, pools not after a conv, pool chains, every kernel size, dense after gap and flat
FIRST_LAYERS = ["mp-c3-gap", "ap-ap-c2k5-flat-d4", "gap", "gap-d5", "flat-d6", "d7-d5", "c3k1-mp-mp-c4k7-gap",
                "c2k5-ap-c3-flat-d5-d4", "mp-flat"]


def _check_score(arch, pop, x, y, idx, mean, std, bit_offset=64):
    """Bits, predictions and summed loss of the Triton evaluation against the reference, where the reference's top
    two logits differ by more than fp32 noise; bytes outside the batch's are left alone."""
    p, nb = idx.shape
    labels = y[idx].clone()
    labels[:, ::3] = -1  # classes the networks were not trained on: wrong, no loss
    params = pop.views(pop.params)
    logits, _ = chain._features(arch, reference, params, x, idx, mean, std, len(arch.ops))
    top2 = logits.topk(2, -1).values
    clear = ((top2[..., 0] - top2[..., 1]) > 1e-3 * (logits.abs().amax(-1) + 1)).numpy()
    row = bit_offset // 8 + 8 * -(-nb // 64)
    want_bits = torch.zeros(p, row, dtype=torch.uint8)
    want_extra = tuple(torch.empty(p, nb) for _ in range(2))
    want_loss, want_pred = chain.score(arch, reference, params, x, idx, labels, mean, std, want_bits, bit_offset,
                                       want_extra)
    bits = torch.full_like(want_bits, 0xAB)
    extra = tuple(torch.full((p, nb + 3), 7.0)[:, 1:nb + 1] for _ in range(2))  # views, as into the record
    loss, pred = TRITON.score(arch, params, x, idx, labels, mean, std, bits, bit_offset, extra)
    for name, got, want in zip(("margin", "loss"), extra, want_extra):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4, equal_nan=True, msg=f"per-example {name}")
    assert (bits[:, :bit_offset // 8] == 0xAB).all(), "bytes before the batch's are untouched"
    n_bytes = -(-nb // 8)
    assert (bits[:, bit_offset // 8 + n_bytes:] == 0xAB).all(), "bytes after the batch's are untouched"
    assert torch.equal(pred[clear], want_pred[clear])
    got = np.unpackbits(bits[:, bit_offset // 8:].numpy(), axis=-1, count=nb, bitorder="little").astype(bool)
    want = np.unpackbits(want_bits[:, bit_offset // 8:].numpy(), axis=-1, count=nb, bitorder="little").astype(bool)
    np.testing.assert_array_equal(got[clear], want[clear])
    torch.testing.assert_close(loss, want_loss, rtol=1e-3, atol=1e-4)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=specs(), p=st.integers(1, 2), bsz=st.integers(1, 4), seed=st.integers(0, 1000))
def test_random_specs_match_reference(arch, p, bsz, seed):
    pop, x, y, idx, mean, std = _case(arch, p, bsz, seed)
    pop.params.div_(3)  # deep random nets: default scale, so that activations stay finite
    _check_grads(arch, pop, x, y, idx, mean, std, backend=TRITON, rtol=2e-3)
    _check_score(arch, pop, x, y, idx, mean, std)


@pytest.mark.parametrize("spec", FIRST_LAYERS)
def test_every_first_layer_reads_images_by_index(spec):
    arch = build_arch(spec, (2, 7, 5), 4)
    pop, x, y, idx, mean, std = _case(arch, 2, 5, 3)
    _check_grads(arch, pop, x, y, idx, mean, std, backend=TRITON, rtol=1e-3)
    _check_score(arch, pop, x, y, idx, mean, std)


@pytest.mark.parametrize("spec", ["c3-mp-c4-ap-c3-gap", "c3k5-ap-c4-flat-d5"])
def test_pool_ties_match_reference(spec):
    """Constant images: every 2x2 window a tie, resolved and routed as nn.MaxPool2d / nn.AvgPool2d do."""
    arch = build_arch(spec, (1, 8, 6), 3)
    _check_grads(arch, *_case(arch, 2, 4, 3, constant=True), backend=TRITON)


@pytest.mark.parametrize("spec", ["c3-mp-c4-gap", "c3k5-ap-c4-flat-d6"])
def test_augmentation_and_label_smoothing_match_reference(spec):
    """An augmented batch (transformed inside the first layer's gather) through the kernels, and label smoothing in
    the cross-entropy kernel (the chain leaves the fused head out when smoothing)."""
    from fastpop.data.augment import Augment, AugmentBatch

    arch = build_arch(spec, (2, 8, 7), 5)
    aug = AugmentBatch(Augment.parse("flip,crop:2,cutout:3"), torch.tensor([4, 2**33]), 3)
    _check_grads(arch, *_case(arch, 2, 5, 7), backend=TRITON, rtol=1e-3, aug=aug, smoothing=0.1)


@pytest.mark.parametrize("spec", ["c3k5-ap-c4-flat-d6", "mlp"])
def test_network_is_bit_identical_alone_or_in_company(spec):
    arch = build_arch(spec, (1, 8, 8), 10)
    pop, x, y, idx, mean, std = _case(arch, 3, 5, 8)
    loss = TRITON.gradients(pop, 0, pop.p, x, idx, y[idx], mean, std)
    alone = Population(arch, [0], CPU)
    alone.set_networks(pop.networks()[1:2])  # network 1, alone
    loss_alone = TRITON.gradients(alone, 0, 1, x, idx[1:2], y[idx[1:2]], mean, std)
    assert torch.equal(loss[1:2], loss_alone)
    assert torch.equal(pop.networks(pop.grads)[1], alone.networks(alone.grads)[0])


def test_gpu_sizing_keeps_network_k_alone_or_in_company():
    """The GPU's block sizes and weight-gradient splits (run here in the interpreter), on a layer big enough for
    several splits: the reference's gradients, and network k's bits the same alone and in company."""
    from fastpop.kernels.triton import conv, dense

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 15, 14, 2, generator=gen)  # 1050 rows of pixels: two splits of 1024
    w, b = torch.randn(2, 3, 2, 3, 3, generator=gen), torch.randn(2, 3, generator=gen)
    out, arg = conv.conv_fwd(x, None, None, None, w, b, "max", False, False)
    g = torch.randn(out.shape, generator=gen)
    full = conv.conv_bwd(x, None, None, None, w, out, arg, g, "max", False, True, False)
    one = conv.conv_bwd(x[1:2], None, None, None, w[1:2], out[1:2], arg[1:2], g[1:2], "max", False, True, False)
    for a, c in zip(full, one):
        assert torch.equal(a[1:2], c)
    xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    reference.conv_block(xr, wr, br, "max").backward(g)
    for got, want in zip(full, (xr.grad, wr.grad, br.grad)):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    h = torch.randn(3, 300, 9, generator=gen)  # 300 examples: two splits of 256
    wd, bd = torch.randn(3, 4, 9, generator=gen), torch.randn(3, 4, generator=gen)
    out = dense.dense_fwd(h, None, None, None, wd, bd, True, False, False)
    g = torch.randn(out.shape, generator=gen)
    full = dense.dense_bwd(h, None, None, None, wd, out, g, True, False, True, False)
    one = dense.dense_bwd(h[2:], None, None, None, wd[2:], out[2:], g[2:], True, False, True, False)
    for a, c in zip(full, one):
        assert torch.equal(a[2:], c)
    hr, wr, br = h.clone().requires_grad_(), wd.clone().requires_grad_(), bd.clone().requires_grad_()
    reference.dense(hr, wr, br, True).backward(g)
    for got, want in zip(full, (hr.grad, wr.grad, br.grad)):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_every_spec_runs_natively_with_no_reference_op():
    """native() is None, and the op set defines every op of the reference itself: none is the torch path."""
    for spec in ["small-cnn", "wide-cnn", "mlp", *FIRST_LAYERS]:
        assert TRITON.native(build_arch(spec, (3, 9, 7), 10)) is None
    ops = [name for name, fn in inspect.getmembers(reference, inspect.isfunction)
           if fn.__module__ == reference.__name__ and name in chain.__doc__]
    assert len(ops) >= 11, ops
    for name in ops:
        if name == "sgd_step":  # the op set's own optimizer_step takes every optimizer
            name = "optimizer_step"
        assert getattr(triton_ops, name).__module__ == triton_ops.__name__, f"{name} comes from the torch path"


def test_grid_network_equals_the_network_alone():
    """Each group's scalars in the one optimizer launch (and its smoothing and augmentation in the gradient pass):
    a network of a grid ends bit-identical to the same network trained alone with its group's hyperparameters."""
    data = load_dataset(Config(), CPU)
    config = Config(arch="c3-gap", seeds=1, batch_size=6, optimizer="adamw", weight_decay=0.05, augment="flip,crop:1",
                    grid={"lr": [0.01, 0.002], "label_smoothing": [0, 0.1]})
    arch = build_arch(config.arch, data.in_shape, data.classes)
    groups = network_groups(config)
    pop = Population(arch, config.init_seeds(), CPU, config.optimizer != "sgd")
    orders = epoch_orders(config.order_seeds(), 0, len(data.train))
    seeds = torch.tensor(config.order_seeds())
    for s in range(2):
        train_step(pop, TRITON, data, orders[:, s * 6:(s + 1) * 6], [g[2].lr for g in groups], config, step=s + 1,
                   seeds=seeds, groups=groups)
    k = len(groups) - 1  # the last group: its lr and smoothing differ from the first's
    cfg = groups[k][2]
    alone = Population(arch, config.init_seeds()[k:k + 1], CPU, config.optimizer != "sgd")
    for s in range(2):
        train_step(alone, TRITON, data, orders[k:k + 1, s * 6:(s + 1) * 6], cfg.lr, cfg, step=s + 1,
                   seeds=seeds[k:k + 1])
    assert torch.equal(pop.networks()[k], alone.networks()[0])


def test_more_networks_than_a_launch_takes_run_in_pieces(monkeypatch):
    """The op set says how many networks one launch takes (CUDA's 65,535 on grid axis 1); the chain never gives
    it more, in training or evaluation, and the optimizer slices its blocks: the same bits as in one piece."""
    from fastpop.data.augment import Augment, AugmentBatch
    from fastpop.kernels.triton import optim

    arch = build_arch("c3-ap-gap", (2, 5, 4), 3)
    pop, x, y, idx, mean, std = _case(arch, 5, 3, 2)
    aug = AugmentBatch(Augment.parse("flip,crop:1"), torch.arange(5) + 7, 1)
    labels = y[idx]
    whole = TRITON.gradients(pop, 0, 5, x, idx, labels, mean, std, aug), pop.grads.clone()
    bits, extra = torch.zeros(5, 8, dtype=torch.uint8), (torch.zeros(5, 3), torch.zeros(5, 3))
    scored = TRITON.score(arch, pop.views(pop.params), x, idx, labels, mean, std, bits, 0, extra), bits.clone()
    margins = [t.clone() for t in extra]
    seen, gather = [], triton_ops.gather_images
    monkeypatch.setattr(triton_ops, "MAX_NETWORKS", 2)
    monkeypatch.setattr(triton_ops, "gather_images", lambda x, idx, *a: seen.append(len(idx)) or gather(x, idx, *a))
    assert TRITON.chunk_size(arch, 4, 5, CPU) == 2
    assert torch.equal(TRITON.gradients(pop, 0, 5, x, idx, labels, mean, std, aug), whole[0])
    assert torch.equal(pop.grads, whole[1])
    extra[0].zero_(), extra[1].zero_()
    loss, pred = TRITON.score(arch, pop.views(pop.params), x, idx, labels, mean, std, bits, 0, extra)
    assert torch.equal(loss, scored[0][0]) and torch.equal(pred, scored[0][1]) and torch.equal(bits, scored[1])
    assert all(torch.equal(a, b) for a, b in zip(extra, margins))
    assert seen and max(seen) <= 2
    config = Config(arch="c3-ap-gap", seeds=1, optimizer="adam", grid={"lr": [0.1, 0.2, 0.3, 0.4, 0.5]})
    groups = [(lo, hi, cfg, cfg.lr) for lo, hi, cfg in network_groups(config)]
    frozen = torch.zeros_like(pop.params, dtype=torch.bool)
    one = Population(arch, config.init_seeds()[:5], CPU, True)
    one.grads.copy_(pop.grads)
    many = Population(arch, config.init_seeds()[:5], CPU, True)
    many.grads.copy_(pop.grads)
    triton_ops.optimizer_step(one, groups[:5], frozen, 1)
    monkeypatch.setattr(optim, "MAX_BLOCKS", 4)  # 4 parameter tensors x 5 groups: 20 blocks in 5 launches
    triton_ops.optimizer_step(many, groups[:5], frozen, 1)
    assert torch.equal(one.params, many.params)
