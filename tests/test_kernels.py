"""Triton kernels against the torch reference, under TRITON_INTERPRET=1 on the CPU (tests/conftest.py) or on a
GPU. Tiny, odd shapes; outputs filled with NaN before each launch so an unwritten element fails; one random
grad_output per comparison; fp32 tolerance."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastpop.data import augment as A
from fastpop.kernels.triton import augment as KA, conv as K, dense as D, head as H, loss as L, optim as O, pool as P
from fastpop.ops import reference as R

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get(
    "TRITON_INTERPRET") != "1", reason="needs CUDA or TRITON_INTERPRET=1")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = not torch.cuda.is_available()
TOL = dict(rtol=2e-5, atol=2e-5)


def poison(fn):
    """Make every torch.empty in the kernel launchers NaN-filled (int dtypes: filled with a sentinel)."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else 77)

    torch.empty = empty
    try:
        return fn()
    finally:
        torch.empty = real


def _images(gen, p, bsz, c, h, w, levels=17):
    """A uint8 data set of 11 images [11, C, H, W], batch indices [P, B] and per-channel mean and std."""
    data = torch.randint(0, levels, (11, c, h, w), generator=gen, dtype=torch.uint8).to(DEV)
    idx = torch.randint(0, 11, (p, bsz), generator=gen).to(DEV)
    mean, std = torch.rand(c, generator=gen).to(DEV) * 8, torch.rand(c, generator=gen).to(DEV) + 2
    return data, idx, mean, std


def _gathered(gen, p, bsz, c, h, w, flat, aug_text=None, levels=17):
    """(data, idx, mean, std, the kernels' aug or None, the reference's gathered batch), augmented by aug_text
    with seeds that need both 31-bit halves."""
    data, idx, mean, std = _images(gen, p, bsz, c, h, w, levels)
    if aug_text is None:
        return data, idx, mean, std, None, R.gather_images(data, idx, mean, std, flat)
    aug = A.AugmentBatch(A.Augment.parse(aug_text), torch.arange(p) * (2**33 + 5) + 3, 7)
    draws = KA.draws(aug.augment, aug.seeds, aug.epoch, idx, h, w, INTERPRET)
    assert torch.equal(draws.long(), A.draws(aug.augment, aug.seeds.to(DEV), aug.epoch, idx, h, w))
    return data, idx, mean, std, (draws, aug.augment.cutout), R.gather_images(data, idx, mean, std, flat, aug)


@pytest.mark.parametrize("text", ["flip,crop:3,cutout:4", "crop:1", "cutout:1"])
def test_augmentation_draws_are_the_reference_integers(text):
    aug = A.Augment.parse(text)
    seeds = torch.tensor([0, 3, 2**40 + 7, 2**62 + 11, -5])
    idx = torch.randint(0, 2**31 - 1, (5, 37), generator=torch.Generator().manual_seed(2)).to(DEV)
    for epoch in (0, 9, 2**31 + 4):
        got = poison(lambda: KA.draws(aug, seeds, epoch, idx, 7, 9, INTERPRET))
        assert torch.equal(got.long(), A.draws(aug, seeds.to(DEV), epoch, idx, 7, 9)), f"epoch {epoch}"


@pytest.mark.parametrize("p, bsz, cin, cout, hw, k, pool, gather, aug", [
    (1, 3, 5, 7, (7, 6), 3, "max", False, None), (3, 3, 5, 6, (7, 7), 1, None, False, None),
    (3, 2, 1, 5, (7, 5), 5, "avg", True, None), (1, 3, 3, 4, (6, 5), 7, None, True, None),
    (2, 5, 2, 3, (5, 5), 3, "avg", False, None), (2, 2, 3, 4, (5, 6), 5, "max", True, None),
    (3, 4, 3, 5, (7, 6), 3, "max", True, "flip,crop:2,cutout:3"), (2, 3, 2, 3, (5, 7), 1, None, True, "crop:3")])
def test_conv_block_forward_and_every_gradient(p, bsz, cin, cout, hw, k, pool, gather, aug):
    gen = torch.Generator().manual_seed(p * 100 + cin + k)
    w = torch.randn(p, cout, cin, k, k, generator=gen).to(DEV) / k
    b = torch.randn(p, cout, generator=gen).to(DEV) * 0.1
    if gather:
        data, idx, mean, std, kaug, x = _gathered(gen, p, bsz, cin, *hw, False, aug)
    else:
        x = torch.randn(p, bsz, *hw, cin, generator=gen).to(DEV)
        data, idx, mean, std, kaug = x, None, None, None, None
    # reference
    xr, wr, br = x.clone().requires_grad_(not gather), w.clone().requires_grad_(), b.clone().requires_grad_()
    ref = R.conv_block(xr, wr, br, pool)
    g = torch.randn(ref.shape, generator=gen).to(DEV)
    ref.backward(g)
    # kernels
    out, arg = poison(lambda: K.conv_fwd(data, idx, mean, std, w, b, pool, gather, INTERPRET, kaug))
    torch.testing.assert_close(out, ref.detach(), **TOL, msg="forward output")
    dx, dw, db = poison(lambda: K.conv_bwd(data, idx, mean, std, w, out, arg, g, pool, gather, not gather,
                                           INTERPRET, splits=2, aug=kaug))
    torch.testing.assert_close(dw, wr.grad, **TOL, msg="weight gradient")
    torch.testing.assert_close(db, br.grad, **TOL, msg="bias gradient")
    if not gather:
        torch.testing.assert_close(dx, xr.grad, **TOL, msg="input gradient")


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_pool_and_relu_ties_route_like_the_reference(pool):
    """Equal values in a pool window (and zeros after ReLU) send the gradient where nn.MaxPool2d / nn.AvgPool2d
    and ReLU send it."""
    p, bsz, c = 2, 2, 16
    x = torch.zeros(p, bsz, 4, 4, c, device=DEV)
    w = torch.zeros(p, c, c, 3, 3, device=DEV)
    w[:, :, :, 1, 1] = torch.eye(c, device=DEV)  # identity conv: output = relu(x + b)
    b = torch.zeros(p, c, device=DEV)
    x[..., :8] = 1.0  # whole windows of ties; channels 8+ are all zero (ReLU ties at 0)
    x[:, :, 0, 0, 4:8] = -1.0  # a window with one position cut by the ReLU
    xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    ref = R.conv_block(xr, wr, br, pool)
    g = torch.randn(ref.shape, device=DEV)
    ref.backward(g)
    out, arg = K.conv_fwd(x, None, None, None, w, b, pool, False, INTERPRET)
    dx, dw, db = K.conv_bwd(x, None, None, None, w, out, arg, g, pool, False, True, INTERPRET)
    torch.testing.assert_close(out, ref.detach(), msg="pooled output")
    torch.testing.assert_close(dx, xr.grad, **TOL, msg="input gradient with ties")
    torch.testing.assert_close(dw, wr.grad, **TOL, msg="weight gradient with ties")


@pytest.mark.parametrize("p, bsz, c, hw, kind, gather, aug", [
    (2, 3, 5, (7, 5), "max", False, None), (1, 2, 3, (6, 7), "avg", False, None),
    (3, 2, 2, (5, 4), "gap", False, None), (2, 3, 3, (7, 5), "max", True, None), (2, 2, 1, (3, 2), "avg", True, None),
    (1, 3, 2, (5, 3), "gap", True, None), (3, 3, 3, (7, 5), "max", True, "flip,crop:2,cutout:3"),
    (2, 4, 2, (6, 7), "avg", True, "flip,cutout:2"), (3, 3, 2, (5, 6), "gap", True, "flip,crop:1,cutout:4")])
def test_pools_forward_and_gradient(p, bsz, c, hw, kind, gather, aug):
    """Standalone 2x2 pools and the global average pool, on activations or on the images read by index (the
    first layer), augmented or not. Integer-valued inputs: many ties in the max pool's windows."""
    gen = torch.Generator().manual_seed(p * 10 + c)
    if gather:
        data, idx, mean, std, kaug, x = _gathered(gen, p, bsz, c, *hw, False, aug, levels=3)
    else:
        x = torch.randint(-2, 3, (p, bsz, *hw, c), generator=gen).float().to(DEV)
        data, idx, mean, std, kaug = x, None, None, None, None
    xr = x.clone().requires_grad_(not gather)
    ref = R.global_avg_pool(xr) if kind == "gap" else R.pool2x2(xr, kind)
    if kind == "gap":
        out = poison(lambda: P.gap_fwd(data, idx, mean, std, gather, INTERPRET, kaug))
    else:
        out, arg = poison(lambda: P.pool_fwd(data, idx, mean, std, kind, gather, INTERPRET, kaug))
    torch.testing.assert_close(out, ref.detach(), **TOL, msg="forward output")
    if gather:
        return  # the images need no gradient
    g = torch.randn(ref.shape, generator=gen).to(DEV)
    ref.backward(g)
    if kind == "gap":
        dx = poison(lambda: P.gap_bwd(g, x.shape, INTERPRET))
    else:
        dx = poison(lambda: P.pool_bwd(g, arg, kind, x.shape, INTERPRET))
    torch.testing.assert_close(dx, xr.grad, **TOL, msg="input gradient")


def test_flatten_forward_and_gradient():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 5, 3, 4, generator=gen).to(DEV)
    xr = x.clone().requires_grad_()
    ref = R.flatten(xr)
    out = poison(lambda: D.flatten_fwd(x, INTERPRET))
    assert torch.equal(out, ref.detach())
    g = torch.randn(ref.shape, generator=gen).to(DEV)
    ref.backward(g)
    assert torch.equal(poison(lambda: D.flatten_bwd(g, x.shape, INTERPRET)), xr.grad)


@pytest.mark.parametrize("p, bsz, fin, fout, relu, gather, splits, aug", [
    (1, 3, 5, 7, True, False, 1, None), (3, 5, 37, 6, False, False, 2, None), (2, 33, 20, 3, True, False, 3, None),
    (2, 4, (3, 5, 3), 9, True, True, 2, None), (1, 3, (1, 7, 5), 4, False, True, 1, None),
    (3, 5, (2, 5, 6), 4, True, True, 2, "flip,crop:2,cutout:3")])
def test_dense_forward_and_every_gradient(p, bsz, fin, fout, relu, gather, splits, aug):
    """Dense layers; with gather, the first layer of an mlp on the flattened images read by index, augmented or
    not."""
    gen = torch.Generator().manual_seed(p + bsz + fout)
    if gather:
        data, idx, mean, std, kaug, x = _gathered(gen, p, bsz, *fin, True, aug)
        fin = x.shape[-1]
    else:
        x = torch.randn(p, bsz, fin, generator=gen).to(DEV)
        data, idx, mean, std, kaug = x, None, None, None, None
    w = torch.randn(p, fout, fin, generator=gen).to(DEV) / fin ** 0.5
    b = torch.randn(p, fout, generator=gen).to(DEV) * 0.1
    xr, wr, br = x.clone().requires_grad_(not gather), w.clone().requires_grad_(), b.clone().requires_grad_()
    ref = R.dense(xr, wr, br, relu)
    g = torch.randn(ref.shape, generator=gen).to(DEV)
    ref.backward(g)
    out = poison(lambda: D.dense_fwd(data, idx, mean, std, w, b, relu, gather, INTERPRET, kaug))
    torch.testing.assert_close(out, ref.detach(), **TOL, msg="forward output")
    dx, dw, db = poison(lambda: D.dense_bwd(data, idx, mean, std, w, out, g, relu, gather, not gather, INTERPRET,
                                            splits=splits, aug=kaug))
    torch.testing.assert_close(dw, wr.grad, **TOL, msg="weight gradient")
    torch.testing.assert_close(db, br.grad, **TOL, msg="bias gradient")
    if not gather:
        torch.testing.assert_close(dx, xr.grad, **TOL, msg="input gradient")


@pytest.mark.parametrize("p, bsz, k, smoothing", [(1, 3, 7, 0.0), (3, 13, 2, 0.2), (2, 21, 11, 0.1)])
def test_cross_entropy_gradient_and_bits(p, bsz, k, smoothing):
    """The loss after dense layers: each network's mean cross-entropy and its gradient; in evaluation the bits
    at a word offset of a wider row, the predictions and the summed loss, labels -1 wrong and out of the loss."""
    gen = torch.Generator().manual_seed(bsz)
    logits = (torch.randn(p, bsz, k, generator=gen) * 3).to(DEV)
    y = torch.randint(0, k, (p, bsz), generator=gen).to(DEV)
    lr = logits.clone().requires_grad_()
    ref = R.cross_entropy(lr, y, smoothing)
    dloss = torch.randn(p, generator=gen).to(DEV)
    ref.backward(dloss)
    torch.testing.assert_close(poison(lambda: L.ce_fwd(logits, y, INTERPRET, smoothing)), ref.detach(), **TOL,
                               msg="loss")
    torch.testing.assert_close(poison(lambda: L.ce_bwd(logits, y, dloss, INTERPRET, smoothing)), lr.grad, **TOL,
                               msg="logit gradient")
    y_eval = y.clone()
    y_eval[:, 1] = -1
    logits[0, 0] = 0.5  # every logit equal: ties go to class 0
    bits = torch.full((p, 16), 0xAB, dtype=torch.uint8, device=DEV)
    want_bits = torch.zeros_like(bits)
    want_loss, want_pred = R.score_logits(logits, y_eval, want_bits, 64)
    summed, pred = poison(lambda: L.ce_fwd(logits, y_eval, INTERPRET, bits=bits, bit_offset=64))
    n_bytes = -(-bsz // 8)
    assert torch.equal(bits[:, 8:8 + n_bytes], want_bits[:, 8:8 + n_bytes])
    assert (bits[:, :8] == 0xAB).all() and (bits[:, 8 + n_bytes:] == 0xAB).all(), "only the batch's bytes written"
    assert torch.equal(pred, want_pred) and pred[0, 0] == 0
    torch.testing.assert_close(summed, want_loss, **TOL)


@pytest.mark.parametrize("p, bsz, c, hw, k, smoothing", [(1, 3, 5, 3, 7, 0.0), (3, 13, 6, 2, 10, 0.15)])
def test_head_loss_gradients_and_bits(p, bsz, c, hw, k, smoothing):
    gen = torch.Generator().manual_seed(bsz)
    h = torch.randn(p, bsz, hw, hw, c, generator=gen).to(DEV)
    w = torch.randn(p, k, c, generator=gen).to(DEV)
    b = torch.randn(p, k, generator=gen).to(DEV)
    y = torch.randint(0, k, (p, bsz), generator=gen).to(DEV)
    hr, wr, br = h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    logits = R.dense(R.global_avg_pool(hr), wr, br, False)
    ref = torch.stack([F.cross_entropy(logits[i], y[i], label_smoothing=smoothing) for i in range(p)])
    dloss = torch.randn(p, generator=gen).to(DEV)
    ref.backward(dloss)
    loss, g, saved = poison(lambda: H.head_fwd(h, w, b, y, INTERPRET, smoothing))
    torch.testing.assert_close(loss, ref.detach(), **TOL, msg="loss")
    dh, dw, db = poison(lambda: H.head_bwd(g, saved, y, w, dloss, h.shape, INTERPRET, smoothing))
    torch.testing.assert_close(dh, hr.grad, **TOL, msg="feature gradient")
    torch.testing.assert_close(dw, wr.grad, **TOL, msg="weight gradient")
    torch.testing.assert_close(db, br.grad, **TOL, msg="bias gradient")
    # evaluation: bits written at a word offset of a wider row, against np.packbits
    y_eval = y.clone()
    y_eval[:, 0] = -1  # a class the network never saw: wrong, and out of the loss
    bits = torch.full((p, 16), 0xAB, dtype=torch.uint8, device=DEV)
    summed, pred = poison(lambda: H.head_fwd(h, w, b, y_eval, INTERPRET, bits=bits, bit_offset=64))
    right = (logits.argmax(-1) == y_eval).cpu().numpy()
    want = np.packbits(right, axis=-1, bitorder="little")
    np.testing.assert_array_equal(bits[:, 8:8 + want.shape[1]].cpu().numpy(), want)
    assert (bits[:, :8] == 0xAB).all(), "bytes before the offset are untouched"
    torch.testing.assert_close(pred, logits.argmax(-1))
    ce = F.cross_entropy(logits.reshape(-1, k), y_eval.reshape(-1).clamp_min(0), reduction="none").view(p, bsz)
    torch.testing.assert_close(summed, torch.where(y_eval >= 0, ce, 0.0).sum(1).detach(), **TOL)


@pytest.mark.parametrize("frozen_net", [None, 1])
def test_sgd_step_matches_torch_optim(frozen_net):
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=gen).to(DEV) for n in (7, 7, 7)]  # three "networks" of 7 numbers
    grads = [torch.randn(7, generator=gen).to(DEV) for _ in range(3)]
    flat, gflat, mom = torch.cat(params), torch.cat(grads), torch.zeros(21, device=DEV)
    ref = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    frozen = None
    if frozen_net is not None:
        frozen = torch.zeros(21, dtype=torch.bool, device=DEV)
        frozen[7 * frozen_net:7 * frozen_net + 7] = True
    for _ in range(3):
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        O.sgd(flat, gflat.clone(), mom, 0.1, 0.9, 1e-2, frozen, INTERPRET, nesterov=True)
    want = torch.cat([r.detach() for r in ref])
    if frozen_net is not None:
        want[7 * frozen_net:7 * frozen_net + 7] = params[frozen_net]
    torch.testing.assert_close(flat, want, **TOL, msg="parameters after 3 steps")


BLOCKS = [(0, 5), (5, 40), (40, 41), (41, 97)]  # a grid's groups: each block with its own scalars


def _opt_buffers(n=97, seed=5):
    g = torch.Generator().manual_seed(seed)
    p, grad, m, v = (torch.randn(n, generator=g) for _ in range(4))
    frozen = torch.rand(n, generator=g) < 0.3
    return [t.to(DEV) for t in (p, grad, m, v.abs(), frozen)]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("with_blocks", [False, True])
def test_sgd_kernel_is_bit_identical_to_reference(nesterov, with_blocks):
    params, grads, mom, _, frozen = _opt_buffers()
    lr, mo, wd = [0.1, 0.05, 0.2, 0.01], [0.9, 0.0, 0.5, 0.99], [1e-2, 0.0, 5e-4, 1e-3]
    want = [t.clone() for t in (params, grads, mom)]
    for _ in range(3):
        g = grads.clone()
        ref_g = grads.clone()
        if with_blocks:
            O.sgd(params, g, mom, lr, mo, wd, frozen, INTERPRET, nesterov, torch.tensor(BLOCKS))
            for j, (lo, hi) in enumerate(BLOCKS):
                R.sgd_step(want[0][lo:hi], ref_g[lo:hi], want[2][lo:hi], lr[j], mo[j], wd[j], frozen[lo:hi],
                           nesterov)
        else:
            O.sgd(params, g, mom, lr[0], mo[0], wd[0], frozen, INTERPRET, nesterov)
            R.sgd_step(want[0], ref_g, want[2], lr[0], mo[0], wd[0], frozen, nesterov)
        assert torch.equal(params, want[0]) and torch.equal(mom, want[2]) and torch.equal(g, ref_g)
    assert torch.equal(params[frozen], _opt_buffers()[0][frozen]), "frozen entries do not move"


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("with_blocks", [False, True])
def test_adam_kernel_matches_reference(decoupled, with_blocks):
    params, grads, m, v, frozen = _opt_buffers()
    lr, wd = [0.01, 0.002, 0.05, 0.001], [0.05, 0.0, 1e-3, 0.2]
    want = [t.clone() for t in (params, m, v)]
    for step in range(1, 4):
        g, ref_g = grads * step, grads * step
        if with_blocks:
            O.adam(params, g, m, v, lr, (0.8, 0.99), 1e-6, wd, decoupled, step, frozen, INTERPRET,
                   torch.tensor(BLOCKS))
            for j, (lo, hi) in enumerate(BLOCKS):
                R.adam_step(want[0][lo:hi], ref_g[lo:hi], want[1][lo:hi], want[2][lo:hi], lr[j], (0.8, 0.99), 1e-6,
                            wd[j], decoupled, step, frozen[lo:hi])
        else:
            O.adam(params, g, m, v, lr[0], (0.8, 0.99), 1e-6, wd[0], decoupled, step, frozen, INTERPRET)
            R.adam_step(want[0], ref_g, want[1], want[2], lr[0], (0.8, 0.99), 1e-6, wd[0], decoupled, step, frozen)
        for got, ref, name in zip((params, m, v), want, ("params", "exp_avg", "exp_avg_sq")):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7, msg=f"{name} at step {step}")
    assert torch.equal(params[frozen], _opt_buffers()[0][frozen]), "frozen entries do not move"
    assert (m[frozen] == 0).all() and (v[frozen] == 0).all()


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_adam_kernel_matches_torch_optim(decoupled):
    params, grads, _, _, _ = _opt_buffers()
    ref = torch.nn.Parameter(params.clone())
    opt = (torch.optim.AdamW if decoupled else torch.optim.Adam)([ref], lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                                                                  weight_decay=0.05)
    m, v = torch.zeros_like(params), torch.zeros_like(params)
    for step in range(1, 4):
        ref.grad = grads * step
        opt.step()
        O.adam(params, grads * step, m, v, 0.01, (0.8, 0.99), 1e-6, 0.05, decoupled, step, None, INTERPRET)
    torch.testing.assert_close(params, ref.detach(), rtol=1e-6, atol=1e-7)


def train_on_both_backends(tmp_path, arch: str) -> dict:
    """backend -> (each step's losses [3, 2], the run): two networks trained 3 steps on digits 0 and 1 through the
    torch and the triton backend (the trainer's train_step watched)."""
    import fastpop
    from fastpop import trainer

    out = {}
    for backend in ("torch", "triton"):
        seen, real = [], trainer.train_step

        def spy(*args, **kwargs):
            loss = real(*args, **kwargs)
            seen.append(loss.clone())
            return loss

        trainer.train_step = spy
        try:
            run = fastpop.train(fastpop.Config(arch=arch, seeds=[3, 8], epochs=1, batch_size=96, classes=[0, 1],
                                               backend=backend, out=str(tmp_path / backend)))
        finally:
            trainer.train_step = real
        out[backend] = (torch.stack(seen), run)
    return out


@pytest.mark.parametrize("arch", ["c4-ap-c6k1-mp-flat-d16"])
def test_three_step_population_triton_vs_torch(tmp_path, arch):
    """A whole population trained 3 steps through the kernels and through the reference: loss at every step,
    then the recorded bits. Digits 0 and 1 only, to keep the interpreter's steps and evaluation short (the fused
    head is checked against the reference in tests/test_triton_specs.py)."""
    losses = train_on_both_backends(tmp_path, arch)
    (lt, rt), (lk, rk) = losses["torch"], losses["triton"]
    assert lt.shape == (3, 2)
    torch.testing.assert_close(lk, lt, rtol=1e-4, atol=1e-5, msg="loss at every step")
    agree = (rt.correct("test") == rk.correct("test")).mean()
    assert agree > 0.99, f"recorded bits agree on {agree:.4f} of test examples"
    assert rk.manifest["backend"] == "triton"


def test_gpu_check_script_cpu_part():
    """bench/gpu_check.sh --small: the prepared GPU check's correctness part, at tiny shapes."""
    import subprocess

    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--small"], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OUT": str(__import__("tempfile").mkdtemp())})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("\nok: P=") == 5 and "resnet8" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (not part of the CPU proof)")
def test_cuda_graph_step_equals_eager():
    from fastpop.archs import build_arch
    from fastpop.config import Config
    from fastpop.data import load_dataset
    from fastpop.data.orders import epoch_orders
    from fastpop.graphs import GraphedStep
    from fastpop.ops import get_backend
    from fastpop.population import Population
    from fastpop.trainer import train_step

    data = load_dataset(Config(), DEV)
    arch = build_arch("small-cnn", data.in_shape, data.classes)
    config = Config(seeds=8, batch_size=32)
    eager, graphed = (Population(arch, list(range(8)), DEV) for _ in range(2))
    T = get_backend("triton", DEV)
    step = GraphedStep(graphed, T, data, config, 8, (8, 32))
    orders = epoch_orders(list(range(8)), 0, len(data.train)).to(DEV)
    for s in range(4):
        idx = orders[:, s * 32:(s + 1) * 32]
        torch.testing.assert_close(step(idx, 0.05, s + 1), train_step(eager, T, data, idx, 0.05, config, 8, s + 1))
    torch.testing.assert_close(graphed.params, eager.params)


def test_every_kernel_compiles_for_a_gpu():
    """The real Triton compiler (not the interpreter) takes every kernel, in a representative set of its constexpr
    variants, to PTX for sm_90; no GPU needed."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "tests/kernel_compile.py"], capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = {line.split()[0] for line in proc.stdout.splitlines()}
    kernels = {name for f in (Path(__file__).parent.parent / "kernels" / "triton").glob("*.py")
               for name in re.findall(r"^def (_\w+_kernel)\(", f.read_text(), re.M)}
    assert len(kernels) > 10 and compiled == kernels, sorted(kernels ^ compiled)
