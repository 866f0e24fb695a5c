"""The statistics a reviewer asks for: the class-conditional null and within-class agreement against brute force and
populations of known structure, bootstrap intervals that reach their coverage, the chance baselines, and how they
reach analyze and compare. Coverage is checked over 100 seeded repetitions of a model whose true value is known
in closed form (or by Monte Carlo): at a nominal 95% the count of hits is Binomial(100, 0.95), sd 2.2, and the
tests accept 88 to 100 hits (3 sd below nominal: a percentile bootstrap runs slightly short on a few hundred
examples)."""

import itertools
from math import exp, lgamma

import numpy as np
import pytest
from handmade_run import random_correct, write_run
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from fastpop import metrics as M
from fastpop.cli import main
from fastpop.metrics import bootstrap as B
from fastpop.metrics import stats as S

REPS, LOW = 100, 0.88


def brute_pmf(q):
    """The pmf of a sum of independent Bernoulli(q) by enumerating every outcome."""
    out = np.zeros(len(q) + 1)
    for o in itertools.product([0, 1], repeat=len(q)):
        o = np.array(o)
        out[o.sum()] += np.prod(np.where(o, q, 1 - q))
    return out


def test_class_conditional_summary_against_brute_force():
    rng = np.random.default_rng(0)
    labels = np.array([3, 3, 7, 7, 7, 9, 3, 9, 9, 9, 7, 3])  # any ids; three classes of 4
    c = rng.random((4, 12)) < 0.6
    s = M.class_conditional(c, labels)
    classes = np.unique(labels)
    acc = np.stack([c[:, labels == k].mean(1) for k in classes], 1)  # [P, C]
    w = np.array([(labels == k).mean() for k in classes])
    pmf = sum(w[i] * brute_pmf(acc[:, i]) for i in range(3))
    hist = np.bincount(c.sum(0), minlength=5) / 12
    assert s["classes"] == 3
    assert s["mass0_class_conditional"] == pytest.approx(pmf[0])
    assert s["mass1_class_conditional"] == pytest.approx(pmf[4])
    assert s["tv_class_conditional"] == pytest.approx(0.5 * np.abs(hist - pmf).sum())
    tpa = c.mean(0)
    num = den = 0.0
    for i, k in enumerate(classes):
        t, v0 = tpa[labels == k], (acc[:, i] * (1 - acc[:, i])).sum() / 16
        num += len(t) * (t.var() - v0)
        den += len(t) * (t.mean() * (1 - t.mean()) - v0)
    assert s["rho_within_class"] == pytest.approx(num / den)
    pairs = [np.mean([c[i, n] == c[j, n] for i, j in itertools.permutations(range(4), 2)]) for n in range(12)]
    pe = sum(w[i] * (tpa[labels == k].mean() ** 2 + (1 - tpa[labels == k].mean()) ** 2) for i, k in enumerate(classes))
    assert s["kappa_within_class"] == pytest.approx((np.mean(pairs) - pe) / (1 - pe))


def test_identical_networks_within_classes():
    one = np.random.default_rng(1).random(300) < 0.7
    s = M.class_conditional(np.broadcast_to(one, (20, 300)).copy(), np.arange(300) % 4)
    assert s["rho_within_class"] == pytest.approx(1.0) and s["kappa_within_class"] == pytest.approx(1.0)


def test_independent_errors_at_per_class_accuracies_show_no_excess_over_the_class_conditional_null():
    """Networks right independently with probability a[p, class]: the plain nulls see agreement (the classes'
    difficulty), the class-conditional null explains it, and within-class rho and kappa are 0 within their
    intervals."""
    rng = np.random.default_rng(2)
    p, n, k = 40, 3000, 5
    labels = rng.integers(0, k, n)
    a = np.clip(rng.uniform(0.3, 0.95, k)[None] + rng.normal(0, 0.03, (p, k)), 0, 1)
    c = rng.random((p, n)) < a[:, labels]
    plain = M.agreement_summary(c.sum(0), c.mean(1))
    s = M.class_conditional(c, labels)
    assert plain["rho"] > 0.1 and plain["tv_poisson_binomial"] > 0.1
    assert abs(s["rho_within_class"]) < 0.02 and abs(s["kappa_within_class"]) < 0.03
    assert s["tv_class_conditional"] < 0.1
    assert plain["mass1_poisson_binomial"] < 0.2 * plain["mass1"]  # the plain null misses the easy classes
    assert s["mass1_class_conditional"] == pytest.approx(plain["mass1"], abs=0.01)
    iv = M.agreement_intervals(c, M.class_index(labels, n)[1], draws=300)
    for unit in ("networks", "examples"):
        lo, hi = iv[unit]["rho_within_class"]
        assert lo <= 0 <= hi or abs(lo) < 0.01


def test_poisson_binomial_rows_dp_and_fft_agree_and_are_stable_at_100k(monkeypatch):
    q = np.random.default_rng(3).uniform(0, 1, (3, 300))
    dp = M.poisson_binomial_pmfs(q)
    np.testing.assert_allclose(dp[0], M.poisson_binomial_pmf(q[0]), atol=1e-15)
    monkeypatch.setattr(S, "POISSON_BINOMIAL_NUMPY_MAX", 10)  # the FFT product tree
    np.testing.assert_allclose(M.poisson_binomial_pmfs(q), dp, atol=1e-13)
    np.testing.assert_allclose(M.poisson_binomial_pmfs(q[:, :7]), np.stack([brute_pmf(r) for r in q[:, :7]]),
                               atol=1e-14)
    monkeypatch.undo()
    big = np.random.default_rng(4).uniform(0.8, 0.999, (2, 100_000))
    pmf = M.poisson_binomial_pmfs(big)
    assert (pmf >= 0).all() and np.allclose(pmf.sum(1), 1)
    np.testing.assert_allclose((pmf * np.arange(100_001)).sum(1), big.sum(1), rtol=1e-9)
    np.testing.assert_allclose(pmf[:, -1], np.exp(np.log(big).sum(1)), rtol=1e-9)


def test_a_population_of_100k_networks():
    rng = np.random.default_rng(5)
    q = rng.uniform(0.5, 1, 40)
    c = rng.random((100_000, 40)) < q
    labels = np.arange(40) % 2
    s = M.class_conditional(c, labels)
    assert all(np.isfinite(v) for v in s.values())
    iv = M.agreement_intervals(c, M.class_index(labels, 40)[1], draws=200)
    for unit in ("networks", "examples"):
        for lo, hi in iv[unit].values():
            assert lo <= hi


def test_network_draws_count_copies_as_the_brute_force_population(monkeypatch):
    """One draw over networks against the population it stands for, built with its copies: rho's independent
    variance counts a network's copies together, and kappa leaves out pairs of copies of one network."""
    rng = np.random.default_rng(6)
    c = rng.random((9, 50)) < rng.uniform(0.2, 0.9, 50)
    labels = np.arange(50) % 3
    draws = B._network_draws(c, c.mean(1), np.eye(3)[labels], 1, seed=11)
    w = B.multiplicities(np.random.default_rng(11), 9, 1)[0].astype(int)
    copies = np.repeat(np.arange(9), w)
    tpa = c[copies].mean(0)
    a = c.mean(1)
    v0 = (w**2 * a * (1 - a)).sum() / 81
    assert draws["rho"][0] == pytest.approx((tpa.var() - v0) / (tpa.mean() * (1 - tpa.mean()) - v0))
    agree = [np.mean([c[copies[i], n] == c[copies[j], n] for i, j in itertools.permutations(range(9), 2)
                      if copies[i] != copies[j]]) for n in range(50)]
    pe = tpa.mean() ** 2 + (1 - tpa.mean()) ** 2
    assert draws["fleiss_kappa"][0] == pytest.approx((np.mean(agree) - pe) / (1 - pe))
    plain = M.agreement_summary(c.sum(0), a)  # weights of 1 give the plain estimators
    monkeypatch.setattr(B, "multiplicities", lambda rng, size, d: np.ones((d, size)))
    ones = B._network_draws(c, a, None, 1, seed=0)
    assert ones["rho"][0] == pytest.approx(plain["rho"]) and ones["fleiss_kappa"][0] == pytest.approx(
        plain["fleiss_kappa"])


def test_intervals_are_seeded():
    c = random_correct(1, 12, 80)[0]
    one, two = M.agreement_intervals(c, draws=100, seed=3), M.agreement_intervals(c, draws=100, seed=3)
    assert one == two and one != M.agreement_intervals(c, draws=100, seed=4)


def _log_beta(a, b):
    return lgamma(a) + lgamma(b) - lgamma(a + b)


def test_example_intervals_reach_their_coverage():
    """Examples of difficulty q ~ Beta(a, b), networks right independently with probability q: the mass at TPA=1
    is E[q^P] = B(a + P, b) / B(a, b) and rho and kappa the intraclass correlation 1 / (a + b + 1)."""
    a, b, p, n = 0.6, 0.4, 12, 250  # masses at TPA 0 and 1 near 0.10 and 0.25
    truth = {"mass1": exp(_log_beta(a + p, b) - _log_beta(a, b)), "mass0": exp(_log_beta(a, b + p) - _log_beta(a, b)),
             "rho": 1 / (a + b + 1), "fleiss_kappa": 1 / (a + b + 1)}
    rng = np.random.default_rng(7)
    hits = dict.fromkeys(truth, 0)
    for r in range(REPS):
        q = rng.beta(a, b, n)
        iv = M.agreement_intervals(rng.random((p, n)) < q, draws=200, seed=r)["examples"]
        for k, v in truth.items():
            hits[k] += iv[k][0] <= v <= iv[k][1]
    assert all(LOW * REPS <= h <= REPS for h in hits.values()), hits


def test_network_intervals_reach_their_coverage():
    """Fixed examples of ease q[n], networks drawn anew: rho over the networks estimates Var(q) / (qbar (1 -
    qbar)); the Spearman and containment of two populations estimate their mean over draws of P networks (by
    Monte Carlo)."""
    rng = np.random.default_rng(8)
    p, n = 20, 150
    z = rng.normal(size=n)
    qa, qb = (1 / (1 + np.exp(-(m + 1.5 * z + rng.normal(size=n)))) for m in (1.5, 2.0))
    rho_true = qa.var() / (qa.mean() * (1 - qa.mean()))

    def pops():
        return rng.random((p, n)) < qa, rng.random((p, n)) < qb

    mc = [pops() for _ in range(1000)]
    sp_true = np.mean([M.spearman(x.mean(0), y.mean(0)) for x, y in mc])
    cont_true = np.mean([M.containment(x.mean(0), y.mean(0))["a_in_b"] for x, y in mc])
    hits = np.zeros(3)
    for r in range(REPS):
        x, y = pops()
        lo, hi = M.agreement_intervals(x, draws=150, seed=r)["networks"]["rho"]
        hits[0] += lo <= rho_true <= hi
        lo, hi = M.spearman_intervals(x.astype(np.int64), y.astype(np.int64), draws=150, seed=r)["networks"]
        hits[1] += lo <= sp_true <= hi
        lo, hi = M.containment_intervals(x, y, 0.5, draws=150, seed=r)["networks"]["a_in_b"]
        hits[2] += lo <= cont_true <= hi
    assert (hits >= LOW * REPS).all(), hits


def test_split_half_is_the_mean_over_splits_with_its_spread():
    speed = np.random.default_rng(9).integers(0, 6, (11, 200))
    sh = M.split_half(speed, seed=2, splits=5, draws=100)
    rng = np.random.default_rng(2)
    sb = []
    for _ in range(5):
        perm = rng.permutation(11)
        r = spearmanr(speed[perm[:5]].sum(0), speed[perm[5:]].sum(0)).statistic
        sb.append(2 * r / (1 + r))
    assert sh["splits"] == 5 and sh["spearman_brown"] == pytest.approx(np.mean(sb))
    assert sh["spearman_brown_std"] == pytest.approx(np.std(sb)) and sh["spearman_brown_min"] == pytest.approx(min(sb))
    lo, hi = sh["spearman_brown_interval"]
    assert lo < sh["spearman_brown"] < hi
    assert "spearman_brown_interval" not in M.split_half(speed)


def test_permutation_nulls_plain_and_within_classes():
    rng = np.random.default_rng(10)
    labels = np.repeat(np.arange(5), 60)
    level = rng.normal(0, 2, 5)[labels]  # the classes' difficulty, shared; nothing else shared
    a, b = level + rng.normal(size=300), level + rng.normal(size=300)
    plain = M.permutation_null(a, b, draws=400)
    within = M.permutation_null(a, b, M.class_index(labels, 300)[1], draws=400)
    assert plain["observed"] == pytest.approx(M.spearman(a, b))
    assert abs(plain["null_mean"]) < 0.02 and plain["p_value"] < 0.01
    assert within["null_mean"] > 0.3 and within["p_value"] > 0.01  # the classes explain it
    perm_keeps_classes = M.permutation_null(labels.astype(float), labels.astype(float), labels, draws=20)
    assert perm_keeps_classes["null_mean"] == pytest.approx(1.0)  # shuffles never leave a class


def test_containment_expected_under_independent_overlap():
    la = np.array([1, 1, 0, 0, 1, 0], bool)
    lb = np.array([1, 0, 1, 1, 1, 1], bool)
    e = M.containment_expected(la, lb, np.array([0, 0, 0, 1, 1, 1]))
    assert e["a_in_b"] == pytest.approx(5 / 6) and e["b_in_a"] == pytest.approx(3 / 6)
    within = (2 * 2 / 3 + 1 * 3 / 3)  # sum_c |A_c| |B_c| / N_c
    assert e["a_in_b_within_class"] == pytest.approx(within / 3) and e["b_in_a_within_class"] == pytest.approx(
        within / 5)
    rng = np.random.default_rng(11)  # independent sets: the observed containment sits at the expectation
    la, lb = rng.random(20_000) < 0.3, rng.random(20_000) < 0.8
    assert M.containment(la.astype(float), lb.astype(float))["a_in_b"] == pytest.approx(
        M.containment_expected(la, lb)["a_in_b"], abs=0.02)


def test_recentred_intervals_stay_in_the_statistics_range():
    rng = np.random.default_rng(12)
    a = rng.random((15, 80)) < 0.97  # the weaker learns almost all; the stronger everything
    ci = M.containment_intervals(a, np.ones((15, 80), bool), 0.5, draws=200)
    for unit in ("networks", "examples"):
        for lo, hi in ci[unit].values():
            assert 0 <= lo <= hi <= 1
    assert S.percentile_interval([0.9, 0.95, 1.0], observed=1.0, bounds=(0, 1))[1] == 1.0


def test_chance_of_plurality_agreement_with_each_networks_own_frequencies():
    always = np.zeros((7, 30), np.int64)
    assert M.chance_agreement_own(always) == 1.0
    uniform = np.tile(np.arange(4), (6, 25))  # every network uses 4 labels equally
    assert M.chance_agreement_own(uniform, draws=4000) == pytest.approx(M.chance_agreement(4, 6), abs=0.02)
    two = np.array([[0] * 3 + [1], [0] * 1 + [1] * 3])  # P = 2: agreement 1 when they guess alike, else 1/2
    same = 0.75 * 0.25 + 0.25 * 0.75
    assert M.chance_agreement_own(two, draws=20_000) == pytest.approx(same + 0.5 * (1 - same), abs=0.01)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 7), st.integers(1, 40), st.integers(1, 4), st.integers(0, 2**16))
def test_shapes(p, n, k, seed):
    rng = np.random.default_rng(seed)
    c = rng.random((p, n)) < rng.random()
    labels = rng.integers(0, k, n)
    s = M.class_conditional(c, labels)
    assert 0 <= s["mass0_class_conditional"] <= 1 and 0 <= s["tv_class_conditional"] <= 1 + 1e-12
    iv = M.agreement_intervals(c, M.class_index(labels, n)[1], draws=30, seed=seed)
    for unit in ("networks", "examples"):
        for lo, hi in iv[unit].values():
            assert (np.isnan(lo) and np.isnan(hi)) or lo <= hi + 1e-12
    if p > 1:
        sh = M.split_half(c.astype(np.int64), splits=3, draws=20)
        assert sh["splits"] == 3


def test_analyze_and_compare_carry_the_statistics(tmp_path, capsys):
    c = random_correct(3, 10, 120)
    labels = {"train": np.arange(120) % 4, "test": np.arange(120) % 4}
    path = write_run(tmp_path / "r", {"train": c, "test": c}, [1, 2, 3], labels=labels, record=("pred",))
    bare = write_run(tmp_path / "bare", {"train": c, "test": c}, [1, 2, 3], seed=1)
    assert main(["analyze", str(path), "--draws", "50"]) == 0
    text = capsys.readouterr().out
    assert "class-conditional" in text and "within-class rho" in text and "95% CI" in text
    from fastpop.analysis import analyze, compare
    from fastpop.run import load_run

    run = load_run(path)
    r = analyze(run, draws=50)
    assert r.class_conditional == M.class_conditional(c[-1], labels["test"])
    assert r.intervals == M.agreement_intervals(c[-1], M.class_index(labels["test"], 120)[1], 50, 0)
    assert r.split_half["splits"] == 20 and "spearman_brown_interval" in r.split_half
    consensus = r.extra["consensus"]
    assert consensus["chance_own_frequencies"] == M.chance_agreement_own(load_run(path).predictions()[-1])
    assert consensus["interval"][0] <= consensus["mean"] <= consensus["interval"][1]
    off = analyze(load_run(bare), draws=0)  # a run without label files, no draws: neither
    assert off.class_conditional is None and off.intervals is None
    assert "spearman_brown_interval" not in off.split_half
    cmp = compare([run, run], draws=50).pairs[0]
    assert cmp["spearman_permutation_null_within_class"]["within_class"]
    assert cmp["containment_expected"]["weak_learned_also_by_strong"] == pytest.approx(
        (c[-1].mean(0) >= 0.5).mean())
    assert set(cmp["spearman_interval"]) >= {"networks", "examples"}
    assert main(["compare", str(path), str(path), "--draws", "40", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "permutation null" in out and "independent overlap" in out and "95% CI" in out


@pytest.mark.parametrize("flag", [["--draws", "-1"], ["--draws", "100001"], ["--seed", "-2"]])
def test_bad_bootstrap_options_are_one_line_errors(tmp_path, capsys, flag):
    c = random_correct(2, 4, 30)
    path = write_run(tmp_path / "r", {"train": c, "test": c}, [1, 2])
    assert main(["analyze", str(path), *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag[0] in err
