"""The Triton kernels of the CIFAR-style layers against the torch reference, under TRITON_INTERPRET=1 on the CPU
(tests/conftest.py) or on a GPU: strided convs and the plain conv a BatchNorm takes, BatchNorm (batch statistics,
running statistics, evaluation) with its ReLU, pool and residual skip fused, forward and every gradient with the
outputs poisoned; the chain over the triton op set on random specs with BatchNorm, stride and residual tokens;
network k bit-identical alone or in company, at the interpreter's and the GPU's block sizes."""

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from fastpop.archs import build_arch
from fastpop.kernels.triton import batchnorm as KB, conv as K
from fastpop.ops import chain, get_backend, reference as R
from fastpop.ops import triton as T
from fastpop.population import Population
from test_backends import _case
from test_kernels import DEV, INTERPRET, TOL, _gathered, poison, train_on_both_backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
TRITON = get_backend("triton", DEV)


@pytest.mark.parametrize("p, bsz, cin, cout, hw, k, pool, kind, gather, aug", [
    (2, 3, 3, 5, (7, 6), 3, None, "block", False, None), (1, 2, 2, 3, (8, 7), 5, "max", "block", False, None),
    (2, 2, 3, 4, (9, 9), 1, "avg", "block", True, "flip,crop:2"), (2, 3, 4, 3, (7, 5), 3, None, "plain", False, None),
    (1, 3, 2, 4, (6, 7), 1, None, "plain", True, "crop:1,cutout:2"),
    (2, 2, 3, 2, (5, 6), 3, None, "bias", False, None)])
def test_strided_conv_forward_and_every_gradient(p, bsz, cin, cout, hw, k, pool, kind, gather, aug):
    """Stride 2 (output ceil(H / 2)): the conv block (bias, ReLU, pool), the plain conv a BatchNorm takes (no bias,
    no ReLU), and the plain conv with a bias."""
    gen = torch.Generator().manual_seed(p * 10 + cin + k)
    w = torch.randn(p, cout, cin, k, k, generator=gen).to(DEV) / k
    bias, relu = kind != "plain", kind == "block"
    b = torch.randn(p, cout, generator=gen).to(DEV) * 0.1 if bias else None
    if gather:
        data, idx, mean, std, kaug, x = _gathered(gen, p, bsz, cin, *hw, False, aug)
    else:
        x = torch.randn(p, bsz, *hw, cin, generator=gen).to(DEV)
        data, idx, mean, std, kaug = x, None, None, None, None
    xr, wr = x.clone().requires_grad_(not gather), w.clone().requires_grad_()
    br = b.clone().requires_grad_() if bias else None
    ref = R.conv_stride_block(xr, wr, br, 2, True, pool) if relu else R.conv(xr, wr, br, 2)
    g = torch.randn(ref.shape, generator=gen).to(DEV)
    ref.backward(g)
    out, arg = poison(lambda: K.conv_fwd(data, idx, mean, std, w, b, pool, gather, INTERPRET, kaug, 2, relu))
    torch.testing.assert_close(out, ref.detach(), **TOL, msg="forward output")
    dx, dw, db = poison(lambda: K.conv_bwd(data, idx, mean, std, w, out, arg, g, pool, gather, not gather, INTERPRET,
                                           splits=2, aug=kaug, stride=2, bias=bias, relu=relu))
    torch.testing.assert_close(dw, wr.grad, **TOL, msg="weight gradient")
    if bias:
        torch.testing.assert_close(db, br.grad, **TOL, msg="bias gradient")
    else:
        assert db is None
    if not gather:
        torch.testing.assert_close(dx, xr.grad, **TOL, msg="input gradient")


def _bn_case(gen, p, bsz, c, hw):
    y = torch.randn(p, bsz, *hw, c, generator=gen).to(DEV) * 2 + 0.5
    gamma = torch.randn(p, c, generator=gen).to(DEV)
    beta = torch.randn(p, c, generator=gen).to(DEV) * 0.3
    stats = [torch.randn(p, c, generator=gen).to(DEV), torch.rand(p, c, generator=gen).to(DEV) + 0.5]
    return y, gamma, beta, stats


def _leaves(*ts):
    return [t.clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("p, bsz, c, hw, pool, relu, skip", [
    (2, 3, 5, (5, 7), None, True, None), (1, 4, 3, (6, 5), "max", True, None), (2, 2, 4, (7, 6), "avg", True, None),
    (3, 2, 3, (4, 5), None, False, None), (2, 3, 4, (5, 6), None, True, "identity"),
    (2, 2, 3, (6, 5), None, True, "gathered"), (2, 3, 5, (4, 3), None, True, "projection")])
def test_batchnorm_forward_running_statistics_and_every_gradient(p, bsz, c, hw, pool, relu, skip, training):
    """BN (+ the skip) (+ ReLU) (+ pool) against reference.batch_norm and torch ops: the output, the running
    statistics (updated in training, untouched in evaluation), and the gradients of the conv output, gamma, beta,
    the identity skip, the projection's conv output and its gamma and beta."""
    gen = torch.Generator().manual_seed(p * 100 + c * 10 + bsz + training)
    y, gamma, beta, stats = _bn_case(gen, p, bsz, c, hw)
    yr, gr, br = _leaves(y, gamma, beta)
    ref_stats = [s.clone() for s in stats]
    ref = R.batch_norm(yr, gr, br, *ref_stats, training)
    leaves = [yr, gr, br]
    skip_t = yp = gp = bp = gathered = None
    if skip == "projection":
        yp, gp, bp, pstats = _bn_case(gen, p, bsz, c, hw)
        ypr, gpr, bpr = _leaves(yp, gp, bp)
        ref_pstats = [s.clone() for s in pstats]
        ref = ref + R.batch_norm(ypr, gpr, bpr, *ref_pstats, training)
        leaves += [ypr, gpr, bpr]
        stats, ref_stats = stats + pstats, ref_stats + ref_pstats
    elif skip == "identity":
        skip_t = torch.randn(y.shape, generator=gen).to(DEV)
        (sr,) = _leaves(skip_t)
        ref = ref + sr
        leaves.append(sr)
    elif skip == "gathered":
        data, idx, mean, std, kaug, images = _gathered(gen, p, bsz, c, *hw, False, "flip,crop:1,cutout:2")
        gathered = T.Gathered(data, idx, mean, std, False, kaug)
        ref = ref + images
    ref = torch.relu(ref) if relu else ref
    ref = R.pool2x2(ref, pool) if pool else ref
    g = torch.randn(ref.shape, generator=gen).to(DEV)
    ref.backward(g)
    ins = [t.clone().requires_grad_() if t is not None else None for t in (y, gamma, beta, skip_t, yp, gp, bp)]
    out = poison(lambda: T._BatchNorm.apply(*ins, gathered, tuple(stats), training, relu, pool))
    torch.testing.assert_close(out, ref.detach(), **TOL, msg="forward output")
    for got, want, name in zip(stats, ref_stats, ["mean", "var", "projection mean", "projection var"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"running {name}")
    poison(lambda: out.backward(g))
    for got, want in zip([t for t in ins if t is not None], leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


@st.composite
def block_specs(draw):
    """Random specs with BatchNorm convs, strided convs and residual blocks (identity and projection skips, stride
    2), pools where they fit, gap or flat and 0-1 dense layers, on odd image shapes."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(2, 9)), draw(st.integers(2, 9)))
    h, w = shape[1:]
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["cb", "cs", "csb", "r", "rs"]))
        width = draw(st.sampled_from([1, 2, 3, 5]))
        k = draw(st.sampled_from(["", "k1", "k5"]))
        stride = kind.endswith("s") or kind == "csb"
        if kind.startswith("c"):
            layers.append(f"c{width}{k}{'s2' if stride else ''}{'b' if 'b' in kind else ''}")
        else:
            layers.append(f"r{width}{'s2' if stride else ''}")
        if stride:
            h, w = -(-h // 2), -(-w // 2)
        if h >= 2 and w >= 2 and kind.startswith("c") and draw(st.booleans()):
            layers.append(draw(st.sampled_from(["mp", "ap"])))
            h, w = h // 2, w // 2
    layers.append(draw(st.sampled_from(["gap", "flat"])))
    layers += [f"d{draw(st.integers(1, 9))}" for _ in range(draw(st.integers(0, 1)))]
    return build_arch("-".join(layers), shape, draw(st.integers(2, 7)))


def _check_chain(arch, pop, x, y, idx, mean, std, rtol=2e-3):
    """Loss, every gradient (poisoned first) and the running statistics of one training pass, then the evaluation's
    bits, predictions and summed loss (with the running statistics), triton against the reference."""
    stats = [s.clone() for s in pop.stat_views()]
    pop.grads.zero_()
    loss = chain.loss(arch, R, pop.leaves(0, pop.p), x, idx, y[idx], mean, std, stats=stats)
    loss.sum().backward()
    want_loss, want_grads = loss.detach(), pop.grads.clone()
    pop.grads.fill_(float("nan"))
    got_loss = TRITON.gradients(pop, 0, pop.p, x, idx, y[idx], mean, std)
    torch.testing.assert_close(got_loss, want_loss, rtol=rtol, atol=1e-5)
    scale = float(want_grads.abs().max())
    for (name, _), got, want in zip(arch.param_shapes(), pop.views(pop.grads), pop.views(want_grads)):
        # a floor of 1e-5 of the network's largest gradient: what cancels to near zero is the others' rounding
        # (gamma's gradient, ~1e-6 from terms ~1e-2 in r1-gap; a conv's weight before BatchNorm, zero by its scale
        # invariance: 8e-7 against 4e-7, the largest 0.37, in c1k1b-mp-r3s2-gap)
        atol = max(rtol * float(want.abs().max()), 1e-5 * scale)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=f"gradient of {name} ({arch.spec})")
    for (name, _), got, want in zip(arch.stat_shapes(), pop.stat_views(), stats):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"running {name} ({arch.spec})")
    p, nb = idx.shape
    params = pop.views(pop.params)
    logits, _ = chain._features(arch, R, params, x, idx, mean, std, len(arch.ops), stats=stats)
    top2 = logits.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3 * (logits.abs().amax(-1) + 1)
    want_bits = torch.zeros(p, 8, dtype=torch.uint8)
    want_sum, want_pred = chain.score(arch, R, params, x, idx, y[idx], mean, std, want_bits, 0, stats=stats)
    bits = torch.full_like(want_bits, 0xAB)
    got_sum, got_pred = TRITON.score(arch, params, x, idx, y[idx], mean, std, bits, 0, stats=pop.stat_views())
    torch.testing.assert_close(got_sum, want_sum, rtol=rtol, atol=1e-4)
    assert torch.equal(got_pred[clear], want_pred[clear])
    got = np.unpackbits(bits.numpy(), axis=-1, count=nb, bitorder="little").astype(bool)
    want = np.unpackbits(want_bits.numpy(), axis=-1, count=nb, bitorder="little").astype(bool)
    np.testing.assert_array_equal(got[clear.numpy()], want[clear.numpy()])
    assert (bits[:, -(-nb // 8):] == 0xAB).all(), "bytes after the batch's are untouched"


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=block_specs(), p=st.integers(1, 2), bsz=st.integers(2, 4), seed=st.integers(0, 1000))
def test_random_block_specs_match_reference(arch, p, bsz, seed):
    # BatchNorm over 2 values per channel passes no gradient (both normalize to +-1): what comes through is rounding
    # (c1k5s2b-mp-r1s2-gap on 2x4x9 at B = 2: 1e-5 apart); from 4 values on it does
    assume(min((bsz * op.out_hw[0] * op.out_hw[1] for op in arch.ops if op.bn or op.kind == "res"), default=4) >= 4)
    pop, x, y, idx, mean, std = _case(arch, p, bsz, seed)
    pop.params.div_(3)
    _check_chain(arch, pop, x, y, idx, mean, std)


@pytest.mark.parametrize("spec", ["r3-gap", "c4s2b-ap-r4-r5s2-flat-d3", "r6s2-c3k5s2-mp-gap"])
def test_block_specs_match_reference(spec):
    """The residual block as the first layer (its identity skip or projection read from the images by index), a
    projection after a pooled BatchNorm conv, a strided conv block after a block."""
    arch = build_arch(spec, (3, 9, 7), 4)
    pop, x, y, idx, mean, std = _case(arch, 2, 3, 5)
    pop.params.div_(3)
    _check_chain(arch, pop, x, y, idx, mean, std)


def test_presets_run_natively():
    for spec in ["resnet8", "resnet20", "vgg-small", "c16k5s2b-mp-c8s2-r8-gap"]:
        assert TRITON.native(build_arch(spec, (3, 32, 32), 10)) is None, spec


def test_network_is_bit_identical_alone_or_in_company():
    """Loss, gradients and running statistics of network 1 of three equal those of network 1 alone."""
    arch = build_arch("c4b-mp-r4-r5s2-c3s2-gap", (2, 9, 8), 5)
    pop, x, y, idx, mean, std = _case(arch, 3, 4, 8)
    pop.params.div_(3)
    alone = Population(arch, [0], pop.params.device)
    alone.set_networks(pop.networks()[1:2])
    loss = TRITON.gradients(pop, 0, 3, x, idx, y[idx], mean, std)
    loss_alone = TRITON.gradients(alone, 0, 1, x, idx[1:2], y[idx[1:2]], mean, std)
    assert torch.equal(loss[1:2], loss_alone)
    assert torch.equal(pop.networks(pop.grads)[1], alone.networks(alone.grads)[0])
    for got, want in zip(pop.stat_views(), alone.stat_views()):
        assert torch.equal(got[1:2], want)


def test_gpu_sizing_keeps_network_k_alone_or_in_company():
    """The GPU's block sizes and reduction splits (run here in the interpreter, on a layer of 9,000 rows: two
    splits of 8,192): the reference's statistics and gradients, and network k's bits the same alone and in
    company."""
    gen = torch.Generator().manual_seed(4)
    y, gamma, beta, stats = _bn_case(gen, 3, 10, 3, (30, 30))

    def run(sl):
        st_ = [s[sl].clone() for s in stats]
        mean, invstd = KB.bn_stats(y[sl].contiguous(), *st_, True, 0.1, 1e-5, False)
        out, arg = KB.bn_apply(y[sl].contiguous(), mean, invstd, gamma[sl].contiguous(), beta[sl].contiguous(), True,
                               "max", False)
        g = torch.linspace(-1, 1, out[0].numel()).view_as(out[0]).expand_as(out).contiguous()
        grads = KB.bn_bwd(g, out, arg, y[sl].contiguous(), mean, invstd, gamma[sl].contiguous(), True, "max", True,
                          False)
        return [out, *st_, *grads[:3]], g
    full, g = run(slice(0, 3))
    one, _ = run(slice(2, 3))
    for a, b in zip(full, one):
        assert torch.equal(a[2:], b)
    yr, gr, br = _leaves(y, gamma, beta)
    ref_stats = [s.clone() for s in stats]
    ref = R.pool2x2(torch.relu(R.batch_norm(yr, gr, br, *ref_stats, True)), "max")
    ref.backward(g)
    for got, want in zip(full, [ref, *ref_stats, yr.grad, gr.grad, br.grad]):  # sums of 9,000 terms of size ~1
        torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=3e-3)


def test_op_set_has_its_own_block_ops_and_updates_strided_running_statistics():
    """conv_bn_block, conv_stride_block and residual_block are the op set's own; running statistics handed over as
    views that are not contiguous are updated in place as the reference updates them."""
    for name in ("conv", "conv_bn_block", "conv_stride_block", "residual_block"):
        assert getattr(T, name).__module__ == T.__name__, name
    gen = torch.Generator().manual_seed(9)
    h = torch.randn(2, 3, 5, 4, 3, generator=gen).to(DEV)
    w = torch.randn(2, 4, 3, 3, 3, generator=gen).to(DEV)
    gamma, beta = torch.randn(2, 4, generator=gen).to(DEV), torch.randn(2, 4, generator=gen).to(DEV)
    wide = torch.rand(2, 2, 8, generator=gen).to(DEV) + 0.5
    ref_wide, before = wide.clone(), wide.clone()
    out = T.conv_bn_block(h, w, gamma, beta, wide[:, 0, ::2], wide[:, 1, 1::2], 2, True, "avg")
    ref = R.conv_bn_block(h, w, gamma, beta, ref_wide[:, 0, ::2], ref_wide[:, 1, 1::2], 2, True, "avg")
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(wide, ref_wide, rtol=1e-6, atol=1e-6)
    assert not torch.equal(wide[:, 0, ::2], before[:, 0, ::2]), "the running mean moved"


def test_three_step_resnet_population_triton_vs_torch(tmp_path):
    """A population with BatchNorm, a strided conv and a projecting residual block trained 3 steps through the
    kernels and through the reference (digits 0 and 1): loss at every step, the saved parameters and running
    statistics, and the recorded bits (the evaluation normalizes with the running statistics)."""
    runs = train_on_both_backends(tmp_path, "c4s2b-r5s2-gap")
    (lt, rt), (lk, rk) = runs["torch"], runs["triton"]
    assert lt.shape == (3, 2)
    torch.testing.assert_close(lk, lt, rtol=1e-4, atol=1e-5, msg="loss at every step")
    torch.testing.assert_close(rk.weights(), rt.weights(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rk.weights("stats"), rt.weights("stats"), rtol=1e-4, atol=1e-5)
    assert (rt.correct("test") == rk.correct("test")).mean() > 0.99
    assert rk.manifest["backend"] == "triton" and not rk.manifest.get("backend_note")


def test_more_networks_than_a_launch_takes_keep_their_running_statistics(monkeypatch):
    """With the op set's network limit patched to 2, three networks train and score in pieces: the same loss,
    gradients, running statistics and bits as in one piece (each piece gets its networks' statistics)."""
    arch = build_arch("c2b-c3s2b-gap", (2, 5, 4), 3)
    pop, x, y, idx, mean, std = _case(arch, 3, 3, 2)
    pop.params.div_(3)
    stats0 = pop.stats.clone()
    runs = []
    for limit in (T.MAX_NETWORKS, 2):
        monkeypatch.setattr(T, "MAX_NETWORKS", limit)
        pop.stats.copy_(stats0)
        loss = TRITON.gradients(pop, 0, 3, x, idx, y[idx], mean, std)
        bits = torch.zeros(3, 8, dtype=torch.uint8)
        scored = TRITON.score(arch, pop.views(pop.params), x, idx, y[idx], mean, std, bits, 0,
                              stats=pop.stat_views())
        runs.append((loss, pop.grads.clone(), pop.stats.clone(), bits, *scored))
    for whole, pieces in zip(*runs):
        assert torch.equal(whole, pieces)
    assert not torch.equal(runs[0][2], stats0), "training moved the running statistics"
