"""Markov-k benchmark: exact Bayes NLL, oracle NLL, log evidence, sampler statistics (docs/design.md §8)."""

import math
from fractions import Fraction

import pytest
import torch
from scipy import stats

from eqprop import markov
from eqprop.reference import markov as ref
from testing import devices

# ---- hand-computed cases: (tokens, k, V, alpha, P_Bayes(x_t | x_<t) for every t as fractions) ----
# For t >= k: P = (N(c, a) + alpha) / (N(c) + V alpha) with counts over targets in [k, t).
HAND_CASES = [
    # k=1, V=2, alpha=1: t=2 sees context 0 once (->0): P(1) = 1/3; t=4: N(0,0)=N(0,1)=1 -> 2/4.
    ([0, 0, 1, 0, 0], 1, 2, Fraction(1), [Fraction(1, 2)] * 2 + [Fraction(1, 3), Fraction(1, 2), Fraction(1, 2)]),
    # k=2, V=3, alpha=1/2: three new contexts (1/3 each), then each repeats its symbol: 1.5/2.5.
    ([2, 1, 0, 2, 1, 0, 2, 1], 2, 3, Fraction(1, 2), [Fraction(1, 3)] * 5 + [Fraction(3, 5)] * 3),
    # k=1, V=2, alpha=2, a run of ones: 2/4, 3/5, 4/6.
    ([1, 1, 1, 1], 1, 2, Fraction(2), [Fraction(1, 2), Fraction(1, 2), Fraction(3, 5), Fraction(2, 3)]),
    # k=3, V=2, alpha=1, period-3 pattern: three new contexts, then each seen once before: 2/3.
    ([0, 1, 1, 0, 1, 1, 0, 1, 1], 3, 2, Fraction(1), [Fraction(1, 2)] * 6 + [Fraction(2, 3)] * 3),
]


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("case", range(len(HAND_CASES)))
def test_bayes_nll_hand_computed(case, device):
    x, k, V, alpha, probs = HAND_CASES[case]
    tokens = torch.tensor([x], device=device)
    expected = torch.tensor([[-math.log(p) for p in probs]], dtype=torch.float64)
    got = markov.bayes_nll(tokens, k, vocab_size=V, alpha=float(alpha), dtype=torch.float64)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=1e-14)
    # the closed-form evidence is the same sum (in exact arithmetic: -ln prod P)
    evidence = markov.log_evidence(tokens, k, vocab_size=V, alpha=float(alpha))
    exact = -math.log(math.prod(probs[k:]))
    assert abs(evidence.item() - exact) < 1e-12


@pytest.mark.parametrize("device", devices)
def test_oracle_nll_hand_computed(device):
    tables = torch.tensor([[[0.9, 0.1], [0.25, 0.75]]], dtype=torch.float64, device=device)  # k=1
    tokens = torch.tensor([[1, 1, 0, 0, 1]], device=device)
    expected = [math.log(2), -math.log(0.75), -math.log(0.25), -math.log(0.9), -math.log(0.1)]
    got = markov.oracle_nll(tokens, tables, 1)
    torch.testing.assert_close(got.cpu(), torch.tensor([expected], dtype=torch.float64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("k,V,alpha", [(1, 2, 1.0), (2, 3, 0.5), (4, 2, 1.0), (3, 5, 0.1), (6, 2, 2.0)])
def test_bayes_nll_sums_to_log_evidence(k, V, alpha, device):
    x = torch.randint(0, V, (16, 300), generator=torch.Generator().manual_seed(k * 10 + V)).to(device)
    nll = markov.bayes_nll(x, k, vocab_size=V, alpha=alpha, dtype=torch.float64)
    evidence = markov.log_evidence(x, k, vocab_size=V, alpha=alpha)
    torch.testing.assert_close(nll[:, k:].sum(1), evidence, rtol=0, atol=1e-9)
    assert torch.all(nll[:, :k] == math.log(V))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("k,V,alpha", [(1, 2, 1.0), (2, 3, 0.5), (3, 2, 1.0), (2, 4, 3.0)])
def test_agrees_with_reference(k, V, alpha, device):
    x, tables = markov.sample(
        8, k, seq_len=120, vocab_size=V, alpha=alpha, seed=7, device=device, dtype=torch.float64, return_tables=True
    )
    xc, tc = x.cpu(), tables.cpu()
    expected = ref.bayes_nll(xc, k, V, alpha)
    torch.testing.assert_close(
        markov.bayes_nll(x, k, vocab_size=V, alpha=alpha, dtype=torch.float64).cpu(), expected, rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        markov.bayes_nll(x, k, vocab_size=V, alpha=alpha).cpu(), expected.float(), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(markov.oracle_nll(x, tables, k).cpu(), ref.oracle_nll(xc, tc, k), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        markov.log_evidence(x, k, vocab_size=V, alpha=alpha).cpu(), ref.log_evidence(xc, k, V, alpha), rtol=0, atol=1e-9
    )
    counts, _ = markov.context_coverage(x, k, vocab_size=V)
    assert torch.equal(counts.cpu(), ref.context_counts(xc, k, V))


def test_bayes_below_oracle_above_zero():
    """Bayes pays for not knowing the table: oracle < Bayes on average, and the gap shrinks with L."""
    x, tables = markov.sample(512, 2, seq_len=2000, seed=3, return_tables=True, dtype=torch.float64)
    b = markov.bayes_nll(x, 2, dtype=torch.float64)
    o = markov.oracle_nll(x, tables, 2)
    regret_early = (b - o)[:, 2:200].mean()
    regret_late = (b - o)[:, 1800:].mean()
    # Regret per token of the Dirichlet-multinomial mixture ~ (V-1)/2 * V^k * ... / t: positive, decaying.
    assert regret_early > 0.01 and 0 < regret_late < regret_early / 5


# ---- sampler --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices)
def test_sample_shapes_and_determinism(device):
    x, t = markov.sample(5, 3, seed=11, device=device, return_tables=True)
    assert x.shape == (5, 800) and x.dtype == torch.long and x.device.type == device
    assert t.shape == (5, 8, 2) and t.dtype == torch.float32
    x2, t2 = markov.sample(5, 3, seed=11, device=device, return_tables=True)
    assert torch.equal(x, x2) and torch.equal(t, t2)
    assert not torch.equal(x, markov.sample(5, 3, seed=12, device=device))
    torch.testing.assert_close(t.sum(-1), torch.ones(5, 8, device=device), rtol=0, atol=1e-6)
    # a sequence does not depend on how many others are drawn with it
    assert torch.equal(markov.sample(2, 3, seed=11, device=device), x[:2])
    # seed=None draws from torch's global generator, so torch.manual_seed makes it repeatable
    torch.manual_seed(0)
    a = markov.sample(3, 1, device=device)
    torch.manual_seed(0)
    assert torch.equal(a, markov.sample(3, 1, device=device))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = markov.sample(3, 1, generator=g1, device=device), markov.sample(3, 1, generator=g2, device=device)
    assert torch.equal(a, b)


def _transition_chi2(tokens, tables, k):
    """Pooled chi-square of observed transitions against the tables (cells with E >= 5)."""
    V = tables.shape[-1]
    counts = ref.context_counts(tokens, k, V, per_symbol=True).double()  # [B, V^k, V]
    expected = counts.sum(-1, keepdim=True) * tables.double()
    keep = (expected >= 5).all(-1)  # whole rows, so each kept row has V-1 degrees of freedom
    o, e = counts[keep], expected[keep]
    chi2 = ((o - e) ** 2 / e).sum().item()
    dof = int(keep.sum()) * (V - 1)
    return stats.chi2.sf(chi2, dof), dof


@pytest.mark.parametrize("device", devices)
def test_sampled_transitions_follow_tables(device):
    x, tables = markov.sample(
        64, 2, seq_len=3000, vocab_size=3, alpha=5.0, seed=2024, device=device, return_tables=True
    )
    x, tables = x.cpu(), tables.cpu()
    p, dof = _transition_chi2(x, tables, 2)
    assert dof > 500 and p > 1e-3
    # the test has power: tables of other sequences are rejected
    p_wrong, _ = _transition_chi2(x, tables.roll(1, dims=0), 2)
    assert p_wrong < 1e-12


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("alpha", [0.3, 1.0, 4.0])
def test_dirichlet_row_moments(alpha, device):
    V = 3
    _, tables = markov.sample(
        4000, 1, seq_len=2, vocab_size=V, alpha=alpha, seed=99, device=device, dtype=torch.float64, return_tables=True
    )
    p = tables.reshape(-1, V).cpu()  # 8000 Dirichlet(alpha) rows
    n = p.shape[0]
    mean, var = 1 / V, (1 / V) * (1 - 1 / V) / (V * alpha + 1)
    # mean of each coordinate: SE = sqrt(var / n)
    assert torch.all((p.mean(0) - mean).abs() < 4 * math.sqrt(var / n))
    # variance: compare with the Dirichlet closed form; SE of the sample variance from 4th moments
    m4 = ((p - mean) ** 4).mean(0)
    se_var = torch.sqrt((m4 - var**2) / n)
    assert torch.all((p.var(0) - var).abs() < 4 * se_var)
    # covariance of two coordinates: -1/V^2 / (V alpha + 1)
    cov = ((p[:, 0] - mean) * (p[:, 1] - mean)).mean()
    assert abs(cov - (-(1 / V**2) / (V * alpha + 1))) < 4 * math.sqrt(var / n) * math.sqrt(var)


@pytest.mark.parametrize("device", devices)
def test_tiny_alpha_rows_are_valid(device):
    _, tables = markov.sample(
        200, 2, seq_len=3, vocab_size=4, alpha=1e-3, seed=1, device=device, dtype=torch.float64, return_tables=True
    )
    assert torch.isfinite(tables).all() and (tables >= 0).all()
    torch.testing.assert_close(tables.sum(-1), torch.ones_like(tables[..., 0]), rtol=0, atol=1e-12)
    # alpha -> 0 concentrates each row on one symbol: the largest entry is ~1 almost always
    assert (tables.max(-1).values > 0.99).double().mean() > 0.95


@pytest.mark.parametrize("device", devices)
def test_first_k_tokens_uniform(device):
    V, k = 4, 3
    x = markov.sample(20000, k, seq_len=k + 1, vocab_size=V, seed=5, device=device).cpu()
    first = x[:, :k].reshape(-1)
    observed = torch.bincount(first, minlength=V).double()
    assert stats.chisquare(observed.numpy()).pvalue > 1e-3
    # the first k tokens are independent: their joint (V^k cells) is uniform too
    joint = ref.context_index(x, k, V)[:, 0]
    assert stats.chisquare(torch.bincount(joint, minlength=V**k).double().numpy()).pvalue > 1e-3


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_monte_carlo_bayes_nll_matches_anchors(k):
    """2000 fresh sequences against the anchor: the difference of two independent means has SD
    sqrt(SE_fresh^2 + SE_anchor^2) (a coarse check; tests/test_markov_anchors.py has the tight one)."""
    x = markov.sample(2000, k, seed=1000 + k)
    per_seq = markov.bayes_nll(x, k, dtype=torch.float64)[:, k:].mean(1)
    se = per_seq.std().item() / math.sqrt(per_seq.numel())
    anchor = markov.BAYES_NLL_ANCHORS[k]
    assert abs(per_seq.mean().item() - anchor.nll) < 3 * math.hypot(se, anchor.se)


# ---- gap_pct and coverage -------------------------------------------------------------------------


def test_gap_pct_closed_form():
    bayes = torch.tensor([[9.0, 1.0, 1.0], [9.0, 3.0, 3.0]], dtype=torch.float64)
    model = bayes.clone()
    model[:, 1:] *= 1.10  # 10% worse at every position t >= 1
    gap, se = markov.gap_pct(model, bayes, 1)
    assert gap == pytest.approx(10.0, abs=1e-6) and se == pytest.approx(0.0, abs=1e-6)
    # a uniform offset d on sequences with means 1 and 3: gap = 100 d / 2; paired SE from D - R B
    model = bayes.clone()
    model[0, 1:] += 0.2
    model[1, 1:] += 0.4
    gap, se = markov.gap_pct(model, bayes, 1)
    R = 0.3 / 2.0
    resid = torch.tensor([0.2 - R * 1.0, 0.4 - R * 3.0], dtype=torch.float64)
    assert gap == pytest.approx(15.0, abs=1e-9)
    assert se == pytest.approx(100 * resid.std().item() / (math.sqrt(2) * 2.0), rel=1e-9)


def test_gap_pct_of_known_predictors():
    """Reading a gap (docs/design.md §8): Bayes with the wrong prior or order, and uniform, on Bayes' scale.

    The anchors are rounded in docs/markov.md; the tolerance is that rounding or 3 SE, whichever is larger.
    """
    k = 3
    x = markov.sample(2000, k, seed=8)
    bayes = markov.bayes_nll(x, k, dtype=torch.float64)
    for predictor, anchor, rounding in [
        (markov.bayes_nll(x, k, alpha=0.5, dtype=torch.float64), 0.26, 0.01),  # add-1/2 smoothing
        (markov.bayes_nll(x, k + 1, dtype=torch.float64), 1.8, 0.05),  # order-(k+1) counter
        (markov.bayes_nll(x, k - 1, dtype=torch.float64), 14.5, 0.05),  # one symbol of context lost
    ]:
        gap, se = markov.gap_pct(predictor, bayes, k)
        assert 0 < se < 0.5 and abs(gap - anchor) < max(3 * se, rounding)


@pytest.mark.parametrize("k", [1, 3])
def test_uniform_gap_follows_the_anchor(k):
    """The uniform predictor (ln 2 per token) sits at 100 (ln 2 / anchor - 1) percent above Bayes;
    the anchor's SE moves that by 100 ln 2 SE / anchor^2, independent of the fresh sample's SE."""
    x = markov.sample(4000 if k == 1 else 1000, k, seed=9)
    bayes = markov.bayes_nll(x, k, dtype=torch.float64)
    gap, se = markov.gap_pct(torch.full_like(bayes, math.log(2)), bayes, k)
    anchor = markov.BAYES_NLL_ANCHORS[k]
    expected = 100 * (math.log(2) / anchor.nll - 1)
    se_expected = 100 * math.log(2) * anchor.se / anchor.nll**2
    assert abs(gap - expected) < 3 * math.hypot(se, se_expected)


def test_context_coverage_summary():
    tokens = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])  # k=1 contexts of targets 1..6: 0,0,0,1,1,1
    counts, s = markov.context_coverage(tokens, 1)
    assert counts.tolist() == [[3, 3]]
    assert s["min"] == 3 and s["median"] == 3 and s["frac_unvisited"] == 0 and s["frac_lt10"] == 1
    counts, s = markov.context_coverage(torch.tensor([[0, 0, 0, 0]]), 2)  # only context 00 visited
    assert counts.tolist() == [[2, 0, 0, 0]] and s["frac_unvisited"] == 0.75 and s["p5"] == 0


# ---- torch.library integration --------------------------------------------------------------------


def test_opcheck():
    x = markov.sample(3, 2, seq_len=40, seed=0)
    _, tables = markov.sample(3, 2, seq_len=40, seed=0, return_tables=True)
    ops = torch.ops.eqprop
    torch.library.opcheck(ops.markov_bayes_nll, (x, 2, 2, 1.0, torch.float64))
    torch.library.opcheck(ops.markov_oracle_nll, (x, tables, 2))
    torch.library.opcheck(ops.markov_log_evidence, (x, 2, 2, 1.0))
    torch.library.opcheck(ops.markov_context_counts, (x, 2, 2))
    torch.library.opcheck(ops.markov_context_visits, (x, 2, 2))


# ---- context visits ---------------------------------------------------------------------------------


def test_context_visits_docstring_example():
    # k=1: contexts of t=1..4 are x_0..x_3 = 0,1,0,1: the 0 at t=3 and the 1 at t=4 were seen once.
    assert markov.context_visits(torch.tensor([[0, 1, 0, 1, 0]]), 1).tolist() == [[-1, 0, 0, 1, 1]]


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("k, V, L", [(1, 2, 50), (2, 3, 40), (3, 2, 64), (4, 4, 30)])
def test_context_visits_agree_with_reference(k, V, L, device):
    x = markov.sample(5, k, seq_len=L, vocab_size=V, seed=k + V).to(device)
    visits = markov.context_visits(x, k, vocab_size=V)
    assert visits.dtype == torch.long and visits.device == x.device
    assert torch.equal(visits.cpu(), ref.context_visits(x.cpu(), k, V))


def test_context_visits_end_in_the_context_counts():
    """The last visit count of each context plus one is its total count (over targets t >= k)."""
    k = 3
    x = markov.sample(4, k, seed=2)
    visits = markov.context_visits(x, k)
    counts, _ = markov.context_coverage(x, k)
    ctx = ref.context_index(x, k, 2)
    final = torch.zeros_like(counts).scatter_reduce(1, ctx, visits[:, k:] + 1, "amax")
    assert torch.equal(final, counts)


# ---- views and layouts are accepted --------------------------------------------------------------


@pytest.mark.parametrize("device", devices)
def test_ops_accept_views(device):
    """A prefix x[:, :100], a strided slice and a transposed copy give the answers of their contiguous copies."""
    k = 2
    x, tables = markov.sample(6, k, seed=5, return_tables=True, dtype=torch.float64)
    x, tables = x.to(device), tables.to(device)
    views = [x[:, :100], x[:, ::3], x.t().contiguous().t(), x[1::2]]
    for v in views:
        assert not v.is_contiguous()
        c = v.contiguous()
        assert torch.equal(markov.bayes_nll(v, k), markov.bayes_nll(c, k))
        assert torch.equal(markov.log_evidence(v, k), markov.log_evidence(c, k))
        assert torch.equal(markov.context_coverage(v, k)[0], markov.context_coverage(c, k)[0])
        assert torch.equal(markov.context_visits(v, k), markov.context_visits(c, k))
        t = tables[: v.shape[0]] if v.shape[0] == tables.shape[0] else tables[1::2]
        assert torch.equal(markov.oracle_nll(v, t, k), markov.oracle_nll(c, t, k))
    # non-contiguous tables: a transposed view of a [B, V, V^k] layout
    tt = tables.transpose(1, 2).contiguous().transpose(1, 2)
    assert not tt.is_contiguous()
    assert torch.equal(markov.oracle_nll(x, tt, k), markov.oracle_nll(x, tables, k))
