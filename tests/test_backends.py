"""Backends against the torch reference: loss, every gradient and the evaluation (bits, loss, predictions) on fresh
random inputs, odd shapes and random specs of the architecture grammar, with the outputs poisoned before each run;
the numba backend's fused SGD bit for bit; network k alone or in company."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from fastpop.archs import build_arch
from fastpop.ops import chain, get_backend, numba_cpu, reference
from fastpop.population import Population

CPU = torch.device("cpu")
NUMBA = get_backend("numba", CPU)

# odd sizes: 7x5 images with 3 channels pool to 3x2 (floor drops a row and a column), then 1x1
ODD = build_arch("c5-mp-c6-mp-c7-gap", (3, 7, 5), 4)


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


def _reference_grads(pop, x, y, idx, mean, std, aug=None, smoothing=0.0):
    """The reference's losses and gradients, and the running statistics it leaves (pop.stats stays as it was)."""
    pop.grads.zero_()
    stats = [v.clone() for v in pop.stat_views()]
    loss = chain.loss(pop.arch, reference, pop.leaves(0, pop.p), x, idx, y[idx], mean, std, aug, smoothing, stats)
    loss.sum().backward()
    return loss.detach(), pop.grads.clone(), stats


def _check_grads(arch, pop, x, y, idx, mean, std, backend=NUMBA, rtol=1e-4, aug=None, smoothing=0.0):
    want_loss, want_grads, want_stats = _reference_grads(pop, x, y, idx, mean, std, aug, smoothing)
    pop.grads.fill_(float("nan"))  # the kernel must write every gradient entry
    loss = backend.gradients(pop, 0, pop.p, x, idx, y[idx], mean, std, aug, smoothing)
    torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=1e-5)
    # BatchNorm's input gradient is a difference of terms that nearly cancel (exactly, for two values per channel):
    # its rounding is measured against the largest gradient of the network, not against the tiny result
    floor = float(want_grads.abs().max()) if arch.batchnorm else 0.0
    for name, got, want in zip([n for n, _ in arch.param_shapes()], pop.views(pop.grads), pop.views(want_grads)):
        scale = max(float(want.abs().max()), floor) + 1e-6
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=f"gradient of {name} ({arch.spec})")
    for (name, _), got, want in zip(arch.stat_shapes(), pop.stat_views(), want_stats):
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5, msg=f"running statistic {name} ({arch.spec})")


@pytest.mark.parametrize("arch", [ODD, build_arch("small-cnn", (1, 8, 8), 10), build_arch("wide-cnn", (1, 8, 8), 10),
                                  build_arch("mlp", (3, 7, 5), 4)], ids=["odd", "small-cnn", "wide-cnn", "mlp"])
@pytest.mark.parametrize("p, bsz", [(1, 1), (3, 5), (4, 33)])
def test_loss_and_every_gradient_match_reference(arch, p, bsz):
    for seed in (1, 2):  # fresh inputs each time
        _check_grads(arch, *_case(arch, p, bsz, seed * 100 + p))


@st.composite
def specs(draw, blocks=False):
    """Random specs of the grammar: 0-4 convs (widths 1-64, kernels 1/3/5) with max or average pools where they fit,
    gap or flat, 0-2 hidden dense layers, on odd image shapes. With blocks: convs also strided and with BatchNorm,
    and residual blocks (identity or projection skips, strided or not)."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    h, w = shape[1:]
    layers = []
    for _ in range(draw(st.integers(1 if blocks else 0, 4))):
        width = draw(st.sampled_from([1, 2, 3, 5, 8, 64]))
        stride = draw(st.sampled_from(["", "s2"])) if blocks else ""
        if blocks and draw(st.booleans()):
            layers.append(f"r{width}{stride}")
        else:
            layers.append(f"c{width}{draw(st.sampled_from(['', 'k1', 'k5']))}{stride}"
                          f"{draw(st.sampled_from(['', 'b'])) if blocks else ''}")
        if stride:
            h, w = -(-h // 2), -(-w // 2)
        if h >= 2 and w >= 2 and draw(st.booleans()):
            layers.append(draw(st.sampled_from(["mp", "ap"])))
            h, w = h // 2, w // 2
    if layers:
        layers.append(draw(st.sampled_from(["gap", "flat"])))
    layers += [f"d{draw(st.integers(1, 64))}" for _ in range(draw(st.integers(0 if layers else 1, 2)))]
    return build_arch("-".join(layers), shape, draw(st.integers(2, 11)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=specs(), p=st.integers(1, 3), bsz=st.integers(1, 6), seed=st.integers(0, 1000))
def test_random_specs_match_reference(arch, p, bsz, seed):
    pop, x, y, idx, mean, std = _case(arch, p, bsz, seed)
    pop.params.div_(3)  # deep random nets: default scale, so that activations stay finite
    _check_grads(arch, pop, x, y, idx, mean, std, rtol=2e-3)
    _check_score(arch, pop, x, y, idx, mean, std)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=specs(blocks=True), p=st.integers(1, 3), bsz=st.integers(1, 6), seed=st.integers(0, 1000))
def test_random_specs_with_batchnorm_strides_and_blocks_match_reference(arch, p, bsz, seed):
    """Training: loss, gradients and the running statistics left behind; evaluation with the running statistics
    (drawn away from their initial 0 and 1)."""
    pop, x, y, idx, mean, std = _case(arch, p, bsz, seed)
    pop.params.div_(3)
    g = torch.Generator().manual_seed(seed)
    pop.stats.copy_(torch.rand(pop.stats.shape, generator=g) + 0.5)
    _check_grads(arch, pop, x, y, idx, mean, std, rtol=2e-3)
    _check_score(arch, pop, x, y, idx, mean, std)


def test_conv_kernels_in_bands_match_numpy():
    """The 3 x 3 conv, its transpose and its weight gradient on planes of several BAND and WBAND floats (9 x 7
    pixels, 600 examples), six outputs (four at a time, then two), against a float64 numpy correlation."""
    from fastpop.kernels.numba import network as k

    cin, cout, h, w, nb = 5, 6, 9, 7, 600
    assert h * w * nb > 2 * k.WBAND >= 2 * k.BAND
    rng = np.random.default_rng(0)
    src, dz = rng.standard_normal((cin, h, w, nb)), rng.standard_normal((cout, h, w, nb))
    wgt = rng.standard_normal((cout, cin, 3, 3))
    pad = np.pad(src, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = np.stack([pad[:, ky:ky + h, kx:kx + w] for ky in range(3) for kx in range(3)], 1)  # [cin, 9, h, w, nb]
    want_out = np.einsum("oit,ityxb->oyxb", wgt.reshape(cout, cin, 9), windows)
    want_gw = np.einsum("oyxb,ityxb->oit", dz, windows).reshape(cout, cin, 3, 3)
    dpad = np.pad(dz, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want_din = sum(np.einsum("oi,oyxb->iyxb", wgt[:, :, ky, kx], dpad[:, 2 - ky:2 - ky + h, 2 - kx:2 - kx + w])
                   for ky in range(3) for kx in range(3))

    def f32(a):
        return np.ascontiguousarray(a, np.float32).reshape(-1)

    def shifted(a, c):
        out = np.empty(2 * a.size, np.float32)
        k._shift(f32(a), c, h, w, nb, 1, out)
        return out

    out = np.zeros(cout * h * w * nb, np.float32)
    k._conv(f32(src), shifted(src, cin), f32(wgt), False, cin, cout, h, w, nb, 3, out)
    din = np.zeros(cin * h * w * nb, np.float32)
    k._conv(f32(dz), shifted(dz, cout), f32(wgt), True, cout, cin, h, w, nb, 3, din)
    gw, gb = np.full(wgt.size, np.nan, np.float32), np.full(cout, np.nan, np.float32)
    k._weight_grad(f32(dz), f32(src), shifted(src, cin), cin, cout, h, w, nb, 3, gw, gb)
    for got, want in ((out, want_out), (din, want_din), (gw, want_gw), (gb, dz.sum((1, 2, 3)))):
        np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_dense_product_in_register_tiles_is_the_plain_loop_bit_for_bit():
    """`gemm_rows` (whole tiles of ROWS rows x VECS vectors, then single vectors and single rows, the lanes left
    over in the plain loop) against the plain loop over every row and lane, on shapes that reach every one of those
    cases, with W read as is (a forward) and transposed (an input gradient); and within rounding of numpy. The
    tile shapes of both ISAs (AVX-512's 8 x 2 vectors, AVX2's 4 x 1) alone, on this machine, the same way."""
    from numba import njit

    from fastpop.kernels.numba import network as k

    rng = np.random.default_rng(0)
    wide = k.VECS * k.LANES
    for nin, nout, nb in ((7, 1, 5), (13, k.ROWS + 3, wide + k.LANES + 5), (64, 2 * k.ROWS, wide),
                          (3, k.ROWS - 1, k.LANES)):
        src = rng.standard_normal(nin * nb).astype(np.float32)
        start = rng.standard_normal(nout * nb).astype(np.float32)
        for so, sj in ((nin, 1), (1, nout)):
            w = rng.standard_normal(nin * nout).astype(np.float32)
            got, plain = start.copy(), start.copy()
            k.gemm_rows(w, so, sj, src, nin, nout, nb, got)
            k._rows_plain(w, so, sj, src, nin, 0, nout, nb, 0, plain)
            np.testing.assert_array_equal(got, plain)
            wmat = w.reshape(nout, nin) if so == nin else w.reshape(nin, nout).T
            want = start.reshape(nout, nb) + wmat.astype(np.float64) @ src.reshape(nin, nb)
            np.testing.assert_allclose(got.reshape(nout, nb), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for rows, vecs in ((8, 2), (4, 1)):
        tile = k._tile_intrinsic(rows, vecs)

        @njit
        def one_tile(dst, src, w, nb, nin):
            tile(dst, 0, src, 0, nb, w, 0, nin, 1, nin)

        nin, nb = 11, vecs * k.LANES
        src, w = rng.standard_normal(nin * nb).astype(np.float32), rng.standard_normal(rows * nin).astype(np.float32)
        got = rng.standard_normal(rows * nb).astype(np.float32)
        plain = got.copy()
        one_tile(got, src, w, nb, nin)
        k._rows_plain(w, nin, 1, src, nin, 0, rows, nb, 0, plain)
        np.testing.assert_array_equal(got, plain)


@pytest.mark.parametrize("spec", ["c5s2b-r8-r8s2-ap-gap", "c4b-r4-flat-d5"])
def test_batchnorm_strides_and_blocks_on_planes_of_several_bands(spec):
    """Planes over BAND floats (13 x 11 images, 17 examples): the convs' bands, four outputs at a time, with
    BatchNorm, strides and blocks; gradients, running statistics and the evaluation against the reference."""
    arch = build_arch(spec, (3, 13, 11), 5)
    pop, x, y, idx, mean, std = _case(arch, 2, 17, 6)
    pop.params.div_(3)
    pop.stats.copy_(torch.rand(pop.stats.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
    _check_grads(arch, pop, x, y, idx, mean, std, rtol=1e-3)
    _check_score(arch, pop, x, y, idx, mean, std)


def _check_score(arch, pop, x, y, idx, mean, std):
    """Bits, predictions and summed loss of the numba evaluation against the reference, where the reference's top
    two logits differ by more than fp32 noise."""
    p, nb = idx.shape
    labels = y[idx]
    params = pop.views(pop.params)
    stats = pop.stat_views()
    logits, _ = chain._features(arch, reference, params, x, idx, mean, std, len(arch.ops), stats=stats)
    top2 = logits.topk(2, -1).values if arch.classes > 1 else None
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3 * (logits.abs().amax(-1) + 1)
    labels[:, ::4] = -1  # classes the networks were not trained on: NaN margin and loss
    want_bits = torch.zeros(p, 8 * -(-nb // 64), dtype=torch.uint8)
    want_extra = tuple(torch.empty(p, nb) for _ in range(2))
    want_loss, want_pred = chain.score(arch, reference, params, x, idx, labels, mean, std, want_bits, 0, want_extra,
                                       stats)
    bits = torch.full_like(want_bits, 0xAB)
    extra = tuple(torch.full((p, nb), 7.0) for _ in range(2))
    loss, pred = NUMBA.score(arch, params, x, idx, labels, mean, std, bits, 0, extra, stats)
    for name, got, want in zip(("margin", "loss"), extra, want_extra):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4, equal_nan=True, msg=f"per-example {name}")
    assert torch.isnan(extra[0][:, ::4]).all() and not torch.isnan(extra[0][:, 1::4]).any()
    assert torch.equal(pred[clear], want_pred[clear])
    right = np.unpackbits(bits.numpy(), axis=-1, count=nb, bitorder="little").astype(bool)
    want_right = np.unpackbits(want_bits.numpy(), axis=-1, count=nb, bitorder="little").astype(bool)
    np.testing.assert_array_equal(right[clear.numpy()], want_right[clear.numpy()])
    torch.testing.assert_close(loss, want_loss, rtol=1e-3, atol=1e-4)


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
    want_loss, want_pred = chain.score(arch, reference, pop.views(pop.params), x, idx, labels, mean, std, want_bits,
                                       64)
    bits = torch.full_like(want_bits, 0xFF)  # the kernel writes every byte of its examples, and only those
    bits[:, 8:] = 0xAB
    loss, pred = NUMBA.score(arch, pop.views(pop.params), x, idx, labels, mean, std, bits, 64)
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
    _check_grads(arch, pop, x, y, idx, mean, std)


@pytest.mark.parametrize("spec", ["c3-ap-c4-gap", "c3-mp-mp-c4-gap", "ap-c3-gap"])
def test_avg_pools_and_pool_chains_match_reference_on_ties(spec):
    arch = build_arch(spec, (2, 8, 6), 3)
    _check_grads(arch, *_case(arch, 2, 6, 3, constant=True))


@pytest.mark.parametrize("spec", ["small-cnn", "c4k5-ap-c3k1-flat-d7-d5", "c4s2b-r4-r6s2-gap"])
def test_network_is_bit_identical_alone_or_in_company(spec):
    arch = build_arch(spec, (1, 8, 8), 10)
    pop, x, y, idx, mean, std = _case(arch, 5, 9, 8)
    loss = NUMBA.gradients(pop, 0, pop.p, x, idx, y[idx], mean, std)
    alone = Population(arch, [0], CPU)
    alone.set_networks(pop.networks()[3:4])  # network 3, alone
    loss_alone = NUMBA.gradients(alone, 0, 1, x, idx[3:4], y[idx[3:4]], mean, std)
    assert torch.equal(loss[3:4], loss_alone)
    assert torch.equal(pop.networks(pop.grads)[3], alone.networks(alone.grads)[0])
    for got, want in zip(pop.stat_views(), alone.stat_views()):  # BatchNorm's running statistics
        assert torch.equal(got[3], want[0])
    # evaluation (BatchNorm on the running statistics just updated)
    bits, bits_alone = torch.zeros(5, 8, dtype=torch.uint8), torch.zeros(1, 8, dtype=torch.uint8)
    scored = NUMBA.score(arch, pop.views(pop.params), x, idx, y[idx], mean, std, bits, 0, stats=pop.stat_views())
    scored_alone = NUMBA.score(arch, alone.views(alone.params), x, idx[3:4], y[idx[3:4]], mean, std, bits_alone, 0,
                               stats=alone.stat_views())
    assert torch.equal(bits[3], bits_alone[0])
    assert torch.equal(scored[0][3:4], scored_alone[0]) and torch.equal(scored[1][3:4], scored_alone[1])
    # a chunk (lo > 0) of the population writes the same gradients
    grads = pop.grads.clone()
    pop.grads.fill_(float("nan"))
    NUMBA.gradients(pop, 0, 2, x, idx[:2], y[idx[:2]], mean, std)
    NUMBA.gradients(pop, 2, 5, x, idx[2:], y[idx[2:]], mean, std)
    assert torch.equal(pop.grads, grads)


def test_8_bit_images_normalized_by_table_are_the_division_bit_for_bit():
    """numba normalizes 8-bit images by a table of each channel's 256 values; the same images as float32 take the
    division per pixel: the same loss, gradient and scores bit for bit."""
    arch = build_arch("c4-mp-flat-d5", (3, 6, 5), 4)
    pop, x, y, idx, mean, std = _case(arch, 3, 7, 11)
    out = []
    for images in (x, x.float()):
        loss = NUMBA.gradients(pop, 0, pop.p, images, idx, y[idx], mean, std)
        bits = torch.zeros(3, 1, dtype=torch.uint8)
        scored = NUMBA.score(arch, pop.views(pop.params), images, idx, y[idx], mean, std, bits, 0)
        out.append((loss, pop.grads.clone(), bits, *scored))
    for a, b in zip(*out):
        assert torch.equal(a, b)


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
    clean = NUMBA.gradients(pop, 0, pop.p, x, idx, y[idx], mean, std)
    grads = pop.networks(pop.grads)
    pop.views(pop.params)[0][1].fill_(float("nan"))
    loss = NUMBA.gradients(pop, 0, pop.p, x, idx, y[idx], mean, std)
    assert np.isnan(loss[1].item())
    assert torch.equal(loss[[0, 2]], clean[[0, 2]])
    assert torch.equal(pop.networks(pop.grads)[[0, 2]], grads[[0, 2]])


def test_backend_choice():
    from fastpop.errors import UsageError

    assert get_backend("auto", CPU).name == "numba"
    assert get_backend("torch", CPU).name == "torch"
    for spec in ("small-cnn", "mlp", "c3k5-ap-c2k1-flat-d4", "resnet8", "vgg-small", "c4s2-c4k5s2b-r4-gap"):
        assert get_backend("numba", CPU).native(build_arch(spec, (3, 32, 32), 10)) is None
    with pytest.raises(UsageError, match="runs on the CPU"):
        get_backend("numba", torch.device("cuda"))


def test_results_do_not_depend_on_the_thread_count(tmp_path):
    """The cached parallel kernels, loaded in a process with 3 threads, give the bits of this process."""
    import subprocess
    import sys

    arch = build_arch("small-cnn", (1, 8, 8), 10)
    pop, x, y, idx, mean, std = _case(arch, 5, 9, 12)
    loss = NUMBA.gradients(pop, 0, pop.p, x, idx, y[idx], mean, std)
    script = f"""
import torch, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_backends import _case, build_arch, NUMBA
import numba
assert numba.get_num_threads() == 3
pop, x, y, idx, mean, std = _case(build_arch("small-cnn", (1, 8, 8), 10), 5, 9, 12)
loss = NUMBA.gradients(pop, 0, pop.p, x, idx, y[idx], mean, std)
torch.save((loss, pop.grads), {str(tmp_path / "out.pt")!r})
"""
    env = dict(os.environ, NUMBA_NUM_THREADS="3")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    other_loss, other_grads = torch.load(tmp_path / "out.pt")
    assert torch.equal(other_loss, loss)
    assert torch.equal(other_grads, pop.grads)


def test_reference_per_example_margin_and_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.5, 1.0], [0.0, 3.0, 3.0], [1.0, 1.0, 1.0]]])  # one network, three examples
    y = torch.tensor([[0, 2, -1]])
    margin, xent = torch.empty(1, 3), torch.empty(1, 3)
    bits = torch.zeros(1, 8, dtype=torch.uint8)
    reference.score_logits(logits, y, bits, 0, (margin, xent))
    torch.testing.assert_close(margin[0, :2], torch.tensor([1.0, 0.0]))  # 2 - 1; a tie with another class: 0
    lse = torch.logsumexp(logits[0, :2], -1)
    torch.testing.assert_close(xent[0, :2], lse - torch.tensor([2.0, 3.0]))
    assert torch.isnan(margin[0, 2]) and torch.isnan(xent[0, 2])
    assert bits[0, 0] == 0b001  # example 1: a tie goes to the lowest class, 1, not the label 2
