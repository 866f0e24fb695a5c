"""Every metric against a naive numpy reference on dense bool records, plus closed forms."""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy.stats import spearmanr

from fastpop import metrics as M
from fastpop.errors import UsageError
from fastpop.metrics import agree as agree_module, record as record_module

pack = M.pack


@pytest.fixture(params=["numpy", "numba"])
def path(request, monkeypatch):
    """Every metric runs once on its numpy path and once on its numba kernels (thresholds forced to zero). The
    patch holds for all of a test's hypothesis examples, which is what is wanted here."""
    if request.param == "numba":
        monkeypatch.setattr(record_module, "NUMPY_MAX_CELLS", 0)
        monkeypatch.setattr(agree_module, "KAPPA_NUMPY_MAX_MACS", 0)
    return request.param


@st.composite
def records(draw):
    t, p, n = draw(st.integers(1, 5)), draw(st.integers(1, 7)), draw(st.integers(1, 200))
    kind = draw(st.sampled_from(["random", "all-right", "all-wrong", "sparse"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "all-right":
        return np.ones((t, p, n), bool)
    if kind == "all-wrong":
        return np.zeros((t, p, n), bool)
    return rng.random((t, p, n)) < (0.1 if kind == "sparse" else rng.random())


def naive_learned_at(c):
    t_, p_, n_ = c.shape
    out = np.full((p_, n_), np.nan, np.float32)  # NaN: wrong at the last checkpoint
    for p, n in itertools.product(range(p_), range(n_)):
        t = t_
        while t > 0 and c[t - 1, p, n]:
            t -= 1
        if t < t_:
            out[p, n] = t
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records())
def test_counts_order_and_forgetting(path, c):
    t, p, n = c.shape
    for src, kw in ((pack(c), {"n": n}), (c, {})):  # the packed record and any trainer's bool array
        assert M.tpa_counts(src, **kw).split == "test"
        np.testing.assert_array_equal(M.tpa_counts(src, **kw).counts, c.sum(1))
        np.testing.assert_array_equal(M.speed_counts(src, **kw).counts, c.sum(0))
        np.testing.assert_allclose(M.accessibility(src, **kw).values, c.mean((0, 1)))
        np.testing.assert_allclose(M.accuracy(src, **kw).values, c.mean(-1))
        np.testing.assert_array_equal(M.learned_at(src, **kw).checkpoint, naive_learned_at(c))
        f = M.forgetting(src, **kw)
        assert f.split == "test"
        np.testing.assert_array_equal(f.events, (c[:-1] & ~c[1:]).sum(0))
        np.testing.assert_array_equal(f.never, ~c.any(0))
    assert M.speed_counts(c).counts.dtype == np.uint16 and M.tpa_counts(c).counts.dtype == np.int32


def test_learned_at_never_is_not_a_checkpoint():
    """An example wrong at the last checkpoint has no learning checkpoint: NaN, which no mean takes silently and
    no index accepts (it was T, which reads as the last epoch of a T-epoch run)."""
    c = np.array([[[1, 0, 1]], [[1, 1, 0]], [[1, 1, 0]]], bool)  # T = 3, P = 1, N = 3
    at = M.learned_at(pack(c), 3).checkpoint
    np.testing.assert_array_equal(at, [[0, 1, np.nan]])
    assert np.isnan(at.mean()) and np.nanmean(at) == 0.5
    with pytest.raises(IndexError):
        np.arange(3)[at]


def naive_kappa(c):
    p, n = c.shape
    a = c.mean(1)
    out = np.empty((p, p))
    for i, j in itertools.product(range(p), range(p)):
        obs = (c[i] == c[j]).mean()
        exp = a[i] * a[j] + (1 - a[i]) * (1 - a[j])
        out[i, j] = 1.0 if obs == 1 else (obs - exp) / (1 - exp)
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records())
def test_error_consistency(path, c):
    n = c.shape[-1]
    for t in (0, -1):
        got = M.error_consistency(pack(c), n, t=t)
        assert got.checkpoint == t % len(c) and got.split == "test"
        np.testing.assert_allclose(got.kappa, naive_kappa(c[t]), atol=1e-12)
    np.testing.assert_allclose(M.error_consistency(c[-1]).kappa, naive_kappa(c[-1]), atol=1e-12)


def naive_fleiss(c):
    """Textbook Fleiss' kappa from the subjects x categories table."""
    p, n = c.shape
    table = np.stack([c.sum(0), p - c.sum(0)], 1).astype(float)  # [N, 2]
    pi = ((table**2).sum(1) - p) / (p * (p - 1))
    pj = table.sum(0) / (n * p)
    pe = (pj**2).sum()
    return (pi.mean() - pe) / (1 - pe)


@settings(max_examples=60, deadline=None)
@given(records())
def test_agreement_summary(c):
    t, p, n = c.shape
    counts, acc = c[-1].sum(0), c[-1].mean(1)
    s = M.agreement_summary(counts, acc)
    hist = np.bincount(counts, minlength=p + 1) / n
    assert s["mass0"] == pytest.approx(hist[0]) and s["mass1"] == pytest.approx(hist[p])
    pb = M.poisson_binomial_pmf(acc)
    assert s["tv_poisson_binomial"] == pytest.approx(0.5 * np.abs(hist - pb).sum())
    pbar = acc.mean()
    v0 = (acc * (1 - acc)).sum() / p**2
    if p > 1 and pbar * (1 - pbar) - v0 > 1e-12:
        assert s["rho"] == pytest.approx(((counts / p).var() - v0) / (pbar * (1 - pbar) - v0))
        assert s["fleiss_kappa"] == pytest.approx(naive_fleiss(c[-1]))
    else:
        assert np.isnan(s["rho"])


def test_identical_networks_give_tpa_0_or_1_and_rho_1():
    rng = np.random.default_rng(1)
    one = rng.random(777) < 0.7
    c = np.broadcast_to(one, (3, 40, 777)).copy()
    counts = M.tpa_counts(pack(c), 777).counts[-1]
    assert set(np.unique(counts)) <= {0, 40}
    s = M.agreement_summary(counts, c[-1].mean(1))
    assert s["rho"] == pytest.approx(1.0) and s["fleiss_kappa"] == pytest.approx(1.0)
    assert s["mass0"] + s["mass1"] == pytest.approx(1.0)


def test_independent_networks_give_rho_near_0():
    rng = np.random.default_rng(2)
    acc = rng.uniform(0.5, 0.95, 60)
    c = rng.random((1, 60, 20_000)) < acc[None, :, None]
    s = M.agreement(c, split="mine").summary
    assert M.agreement(c, split="mine").split == "mine"
    assert abs(s["rho"]) < 0.03  # sampling sd ~ 1/sqrt(N) = 0.007
    assert s["tv_poisson_binomial"] < 0.05 and abs(s["fleiss_kappa"]) < 0.03


@pytest.mark.parametrize("p", [1, 2, 5, 11])
def test_poisson_binomial_matches_brute_force(p):
    q = np.random.default_rng(p).random(p)
    brute = np.zeros(p + 1)
    for outcome in itertools.product([0, 1], repeat=p):
        o = np.array(outcome)
        brute[o.sum()] += np.prod(np.where(o, q, 1 - q))
    np.testing.assert_allclose(M.poisson_binomial_pmf(q), brute, atol=1e-14)


def test_poisson_binomial_is_stable_at_100k_and_equals_binomial_for_equal_q():
    q = np.random.default_rng(3).uniform(0.8, 0.99, 100_000)
    pmf = M.poisson_binomial_pmf(q)
    assert (pmf >= 0).all() and pmf.sum() == pytest.approx(1.0, abs=1e-9)
    assert (np.arange(len(pmf)) * pmf).sum() == pytest.approx(q.sum(), rel=1e-9)
    np.testing.assert_allclose(M.poisson_binomial_pmf(np.full(30, 0.3)), M.binomial_pmf(30, 0.3), atol=1e-13)


def test_spearman_family_against_scipy():
    rng = np.random.default_rng(4)
    speed = rng.integers(0, 6, (9, 300))
    a, b = speed[0], speed[1]
    assert M.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    pw = M.pairwise_spearman(speed, max_pairs=10_000)
    assert pw["split"] == "test" and M.split_half(speed, split="x")["split"] == "x"
    want = np.mean([spearmanr(speed[i], speed[j]).statistic for i, j in itertools.combinations(range(9), 2)])
    assert pw["pairs"] == 36 and pw["mean"] == pytest.approx(want)
    assert M.pairwise_spearman(speed, max_pairs=5)["pairs"] == 5
    c = np.random.default_rng(5).random((4, 9, 50)) < 0.5  # a record gives the same as its speed counts
    assert M.split_half(c) == M.split_half(M.speed_counts(c)) == M.split_half(c.sum(0))
    assert M.pairwise_spearman(M.pack(c), 50) == M.pairwise_spearman(c.sum(0))
    with pytest.raises(UsageError, match="speed counts"):
        M.split_half(np.zeros((2, 3), np.float32))
    sh = M.split_half(speed, seed=0, splits=1)  # the first split: the generator's first permutation
    perm = np.random.default_rng(0).permutation(9)
    r = spearmanr(speed[perm[:4]].sum(0), speed[perm[4:]].sum(0)).statistic
    assert sh["r"] == pytest.approx(r) and sh["spearman_brown"] == pytest.approx(2 * r / (1 + r))


def test_containment():
    a = np.array([0.9, 0.1, 0.6, 0.0])
    b = np.array([1.0, 0.7, 0.2, 0.0])
    c = M.containment(a, b)
    assert c["a_in_b"] == pytest.approx(0.5) and c["b_in_a"] == pytest.approx(0.5)
    assert c["learned_a"] == 2 and c["learned_b"] == 2 and c["learned_both"] == 1 and c["examples"] == 4


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 50), st.integers(2, 12), st.integers(0, 2**32 - 1))
def test_consensus_agreement(t, p, n, k, seed):
    labels = np.random.default_rng(seed).integers(0, k, (t, p, n)).astype(np.uint8)
    want = np.array([[np.bincount(labels[i, :, j]).max() / p for j in range(n)] for i in range(t)])
    np.testing.assert_allclose(M.consensus_agreement(labels).agreement, want)
    np.testing.assert_allclose(M.consensus_agreement(labels.astype(np.uint16) * 300).agreement, want)


def test_bad_records_are_refused():
    c = np.ones((2, 3, 70), bool)
    bits = pack(c)
    with pytest.raises(UsageError, match="bool array"):
        M.tpa_counts(bits.astype(np.int16), 70)
    with pytest.raises(UsageError, match="needs n"):
        M.tpa_counts(bits)
    with pytest.raises(UsageError, match="n = 71"):
        M.tpa_counts(c, 71)
    with pytest.raises(UsageError, match="needs R"):
        M.tpa_counts(bits[..., :8], 70)
    with pytest.raises(UsageError, match="padding"):
        M.tpa_counts(bits, 65)
    with pytest.raises(UsageError, match="T, P, R"):
        M.tpa_counts(bits[0, 0], 70)
    with pytest.raises(UsageError, match="out of range"):
        M.error_consistency(bits, 70, t=5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 40), st.integers(0, 5), st.integers(0, 2**32 - 1))
def test_rank_matches_scipy(rows, n, levels, seed):
    from scipy.stats import rankdata

    x = np.random.default_rng(seed).integers(0, levels + 1, (rows, n))
    np.testing.assert_allclose(M.rank(x, axis=1), rankdata(x, axis=1))
    np.testing.assert_allclose(M.rank(x.T, axis=0), rankdata(x.T, axis=0))


@pytest.mark.parametrize("p, q", [(1, 0.3), (30, 0.01), (1000, 0.97), (5, 0.0), (5, 1.0)])
def test_binomial_pmf_matches_scipy(p, q):
    from scipy.stats import binom

    np.testing.assert_allclose(M.binomial_pmf(p, q), binom.pmf(np.arange(p + 1), p, q), rtol=1e-9, atol=1e-300)


def test_cscore_from_bool_packed_and_words():
    rng = np.random.default_rng(5)
    p, n = 7, 90
    correct, member = rng.random((p, n)) < 0.6, rng.random((p, n)) < 0.5
    member[:, 0] = True  # example 0 is seen by every network
    held = ~member
    with np.errstate(invalid="ignore"):
        want = (correct & held).sum(0) / held.sum(0)
    for got in (M.cscore(correct, member), M.cscore(pack(correct), pack(member), n),
                M.cscore(pack(correct).view(np.uint64), pack(member).view(np.uint64), n)):
        assert got.split == "train"
        np.testing.assert_allclose(got.values, want)
        np.testing.assert_array_equal(got.held_out, held.sum(0))
    with pytest.raises(UsageError, match="same shape"):
        M.cscore(correct, member[:3])


def test_numba_path_gives_the_same_counts_under_any_thread_count(monkeypatch):
    monkeypatch.setattr(record_module, "NUMPY_MAX_CELLS", 0)
    c = np.random.default_rng(6).random((4, 13, 300)) < 0.5
    import numba

    results, before = [], numba.get_num_threads()
    try:  # at run time (NUMBA_NUM_THREADS is read once, when numba's pool starts: other tests may have started it)
        for k in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(k)
            results.append((M.speed_counts(c).counts, M.learned_at(c).checkpoint, M.accuracy(c).values))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


FIRST_CALLS = """
import sys, time
t0 = time.perf_counter()
import numpy as np
import fastpop.metrics as M
c = np.random.default_rng(0).random((3, 100, 359)) < 0.9
bits = M.pack(c)
for src, kw in ((c, {}), (bits, {"n": 359})):
    for f in (M.tpa_counts, M.accuracy, M.agreement, M.error_consistency, M.speed_counts, M.accessibility,
              M.learned_at, M.forgetting):
        assert f(src, **kw).split == "test"
M.split_half(M.speed_counts(c)), M.pairwise_spearman(M.speed_counts(c))
M.consensus_agreement(np.zeros((3, 100, 359), np.uint8))
m = np.random.default_rng(1).normal(size=(3, 100, 359)).astype(np.float16)
M.aum(m), M.margin_forgetting(m), M.cartography(np.abs(m), correct=c), M.el2n(np.abs(m))
print(time.perf_counter() - t0, sorted(k for k in ("torch", "numba", "scipy", "matplotlib") if k in sys.modules))
"""


def test_metrics_stand_alone_and_answer_at_once(tmp_path):
    """In a fresh process: no torch, numba or scipy loaded, and every metric's first call on a 100 x 359 x 3
    record (bool and packed) within 1 s, import included."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FIRST_CALLS], capture_output=True, text=True, check=True).stdout
    seconds, loaded = out.split(" ", 1)
    assert loaded.strip() == "[]"
    assert float(seconds) < 1.0


@pytest.mark.parametrize("k, p", [(2, 1), (3, 3), (5, 4)])
def test_chance_agreement_against_enumeration(k, p):
    """The plurality agreement of independent uniform guesses, exactly, over all k^p outcomes."""
    exact = np.mean([np.bincount(g, minlength=k).max() / p for g in itertools.product(range(k), repeat=p)])
    assert M.chance_agreement(k, p) == pytest.approx(exact, abs=0.02)  # Monte Carlo, 4,000 draws
    with pytest.raises(UsageError):
        M.chance_agreement(0, p)


def test_pack_unpack_round_trip_and_refusals():
    c = np.random.default_rng(7).random((2, 3, 130)) < 0.5
    bits = M.pack(c)
    assert bits.shape == (2, 3, 24) and bits.dtype == np.uint8
    np.testing.assert_array_equal(M.unpack(bits, 130), c)
    with pytest.raises(UsageError, match="bool"):
        M.pack(c.astype(np.uint8))
