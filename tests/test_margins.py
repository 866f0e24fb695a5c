"""Scores from recorded margins and losses against naive per-(network, example) loops: cartography, area under
the margin, the EL2N-style error, margin-based forgetting; NaN (diverged) networks left out; block reading."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fastpop import metrics as M
from fastpop.errors import UsageError
from fastpop.metrics import margins as margins_module


def margins_of(t, p, n, seed):
    rng = np.random.default_rng(seed)
    m = rng.normal(0.5, 2, (t, p, n)).astype(np.float16)
    m[rng.random(m.shape) < 0.05] = 0  # exact ties
    return m


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 40),
       st.floats(0, 1) | st.sampled_from([1e-45, 1e-300, 0.1, 0.5]), st.integers(0, 2**32 - 1))
def test_margin_forgetting_against_a_loop(t, p, n, delta, seed):
    m = margins_of(t, p, n, seed)
    got = M.margin_forgetting(m, delta=delta)
    for q, j in itertools.product(range(p), range(n)):
        learned, ever, events = False, False, 0
        for v in m[:, q, j].astype(np.float64):
            if learned and v <= -delta:
                learned, events = False, events + 1
            elif v > delta:
                learned = ever = True
        assert got.events[q, j] == events and got.never[q, j] == (not ever)
    if delta == 0:  # the correctness definition, with ties counted wrong
        f = M.forgetting(m.astype(np.float64) > 0)
        np.testing.assert_array_equal(got.events, f.events)
        np.testing.assert_array_equal(got.never, f.never)


def test_aum_cartography_el2n_against_loops(monkeypatch):
    monkeypatch.setattr(margins_module, "BLOCK_CELLS", 7)  # one network per block: exercises the block loop
    t, p, n = 4, 5, 9
    m = margins_of(t, p, n, 3)
    xent = np.abs(margins_of(t, p, n, 4))
    xent[:, 2, :] = np.nan  # a diverged network
    correct = m.astype(np.float64) > 0
    ok = [q for q in range(p) if q != 2]
    prob = np.exp(-xent.astype(np.float64))
    np.testing.assert_allclose(M.aum(m).values, m.astype(np.float64).mean((0, 1)))
    cart = M.cartography(xent, correct=correct)  # p in float32: within 1e-6 of float64
    np.testing.assert_allclose(cart.confidence, prob[:, ok].mean(0).mean(0), rtol=1e-6)
    np.testing.assert_allclose(cart.variability, prob[:, ok].std(0).mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cart.correctness, correct.mean((0, 1)))
    np.testing.assert_array_equal(cart.networks, np.full(n, p - 1))
    for t_ in (0, -1):
        e = M.el2n(xent, checkpoint=t_)
        assert e.checkpoint == t_ % t and e.split == "test"
        np.testing.assert_allclose(e.values, (1 - prob[t_][ok]).mean(0), rtol=1e-6)
    assert M.cartography(xent).correctness is None


def test_el2n_style_bounds_the_original():
    """With the whole softmax, the original EL2N lies between sqrt(C/(C-1)) and sqrt(2) times our score."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (200, 7))
    y = rng.integers(0, 7, 200)
    s = np.exp(logits - logits.max(1, keepdims=True))
    s /= s.sum(1, keepdims=True)
    original = np.linalg.norm(s - np.eye(7)[y], axis=1)
    xent = -np.log(s[np.arange(200), y])
    ours = M.el2n(xent[None, None, :]).values
    assert (original >= np.sqrt(7 / 6) * ours - 1e-6).all() and (original <= np.sqrt(2) * ours + 1e-6).all()


def test_bad_margin_input_is_refused():
    with pytest.raises(UsageError, match="float"):
        M.aum(np.zeros((2, 3, 4), np.int32))
    with pytest.raises(UsageError, match="delta"):
        M.margin_forgetting(np.zeros((2, 3, 4), np.float16), delta=-1)
    with pytest.raises(UsageError, match="out of range"):
        M.el2n(np.zeros((2, 3, 4), np.float16), checkpoint=2)
    with pytest.raises(UsageError, match="differ in shape"):
        M.cartography(np.zeros((2, 3, 4), np.float16), correct=np.zeros((2, 3, 5), bool))
