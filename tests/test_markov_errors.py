"""Bad input to the Markov-k ops gives clean errors naming the argument; edge input gives right answers."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqprop import markov
from eqprop.reference import markov as ref

CLEAN = (ValueError, TypeError)  # a RuntimeError is not a clean error: it is what a crash looks like


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: markov.bayes_nll(x.float(), 2), "tokens must be int64"),
        (lambda x: markov.bayes_nll(x + 1, 2), r"tokens must lie in \[0, vocab_size=2\), got values in \[1, 2\]"),
        (lambda x: markov.bayes_nll(x, 0), "k .* must be >= 1, got 0"),
        (lambda x: markov.bayes_nll(x, 2, vocab_size=1), "vocab_size must be >= 2, got 1"),
        (lambda x: markov.bayes_nll(x, 2, alpha=0.0), "alpha .* must be finite and > 0, got 0"),
        (lambda x: markov.bayes_nll(x, 2, alpha=-math.inf), "alpha"),
        (lambda x: markov.bayes_nll(x[:, :2].contiguous(), 2), "need L > k, got L=2, k=2"),
        (lambda x: markov.bayes_nll(x, 40), "too large .* vocab_size=2, k=40"),
        (lambda x: markov.bayes_nll(x[0], 2), r"tokens must be \[B, L\], got shape \[400\]"),
        # L <= k is reported before the layout is looked at (a non-contiguous view of length 2)
        (lambda x: markov.bayes_nll(x[:, :4:2], 2), "need L > k, got L=2, k=2"),
        (lambda x: markov.context_visits(x[:, ::200], 2), "need L > k, got L=2, k=2"),
        (lambda x: markov.context_visits(x + 1, 2), r"tokens must lie in \[0, vocab_size=2\)"),
        (lambda x: markov.context_visits(x, 0), "k .* must be >= 1, got 0"),
        (lambda x: markov.context_visits(x.int(), 2), "tokens must be int64"),
        (lambda x: markov.bayes_nll(x, 2, dtype=torch.int32), "dtype must be torch.float32 or torch.float64"),
        (lambda x: markov.oracle_nll(x, torch.rand(2, 3, 2), 2), r"tables must be \[B, V\^k, V\] = \[2, 4, 2\]"),
        (lambda x: markov.oracle_nll(x, torch.rand(2, 4, 2).int(), 2), "tables dtype"),
        # rows that are not probability vectors
        (
            lambda x: markov.oracle_nll(x, torch.zeros(2, 4, 2), 2),
            r"probability vector .* 8 of 8 rows .* tables\[0, 0\] = \[0, 0\] with sum 0",
        ),
        (
            lambda x: markov.oracle_nll(x, _rows(x, 1, 0, [1.5, -0.5]), 2),
            r"1 of 8 rows .* tables\[1, 0\] = \[1.5, -0.5\]",
        ),
        (
            lambda x: markov.oracle_nll(x, _rows(x, 0, 3, [math.nan, 1.0]), 2),
            r"1 of 8 rows .* tables\[0, 3\] = \[nan, 1\]",
        ),
        (lambda x: markov.oracle_nll(x, _rows(x, 0, 2, [0.5, 0.6]), 2), r"tables\[0, 2\] = \[0.5, 0.6\] with sum 1.1"),
        (lambda x: markov.oracle_nll(x, _rows(x, 0, 1, [math.inf, 0.0]), 2), r"tables\[0, 1\] = \[inf, 0\]"),
        (lambda x: markov.log_evidence(x, 2, alpha=math.nan), "alpha"),
        (lambda x: markov.context_coverage(x, 2, vocab_size=1), "vocab_size must be >= 2"),
        (lambda x: markov.gap_pct(torch.rand(3, 4), torch.rand(3, 5), 1), "one shape"),
        (lambda x: markov.gap_pct(torch.rand(3, 4), torch.rand(3, 4), 4), r"k must be in \[0, L=4\)"),
        (lambda x: markov.sample(-1, 2), "batch must be >= 0, got -1"),
        (lambda x: markov.sample(2, 2, seq_len=2), "seq_len must be > k, got seq_len=2, k=2"),
        (lambda x: markov.sample(2, 2, device="meta"), "device must be cpu or cuda, got meta"),
        (lambda x: markov.sample(2, 2, seed=-3), "seed must be in"),
        (lambda x: markov.sample(2, 2, seed=1, generator=torch.Generator()), "seed or generator"),
        (lambda x: markov.sample(2, 2.5), "k must be an int, got float"),
        (lambda x: markov.sample(2, 2, alpha=0), "alpha"),
        (lambda x: markov.sample(2, 2, dtype=torch.float16), "table dtype"),
    ],
)
def test_bad_input_message(call, match):
    x = markov.sample(2, 2, seed=0)
    with pytest.raises(CLEAN, match=match):
        call(x)


def _rows(x, b, c, row, dtype=torch.float64):
    """Valid uniform tables for x (k=2, V=2) with row tables[b, c] replaced."""
    tables = torch.full((x.shape[0], 4, 2), 0.5, dtype=dtype)
    tables[b, c] = torch.tensor(row, dtype=dtype)
    return tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_oracle_accepts_rows_rounded_to_float32(dtype):
    """Rows normalized in float64 and rounded to float32 pass (also when cast back to float64);
    a row sum off by 100 V eps(float32), 12x the bound, is rejected."""
    x, tables = markov.sample(64, 3, vocab_size=5, seed=1, return_tables=True)
    tables = tables.to(dtype)
    markov.oracle_nll(x, tables, 3)
    # zero entries are probabilities too (a never-taken transition)
    sparse = torch.zeros(1, 2, 2, dtype=dtype)
    sparse[0, :, 1] = 1
    assert torch.equal(
        markov.oracle_nll(torch.ones(1, 5, dtype=torch.long), sparse, 1)[0, 1:], torch.zeros(4, dtype=dtype)
    )
    bad = tables.clone()
    bad[3, 7, 0] += 100 * 5 * torch.finfo(torch.float32).eps
    with pytest.raises(ValueError, match=r"1 of \d+ rows .* tables\[3, 7\]"):
        markov.oracle_nll(x, bad, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch without CUDA")
def test_sample_on_cuda_without_cuda_says_so():
    with pytest.raises(
        ValueError,
        match=r"sample on a CUDA device: this eqprop build has no CUDA|"
        r"CUDA is not available to this torch",
    ):
        markov.sample(2, 2, seed=0, device="cuda")


def test_empty_batch():
    x = torch.zeros(0, 10, dtype=torch.long)
    assert markov.bayes_nll(x, 2).shape == (0, 10)
    assert markov.log_evidence(x, 2).shape == (0,)
    assert markov.sample(0, 2, seq_len=5).shape == (0, 5)


token_arrays = st.builds(
    lambda dtype, shape, lo, hi, seed, transpose: (dtype, shape, lo, hi, seed, transpose),
    st.sampled_from([torch.long, torch.long, torch.long, torch.int32, torch.float32, torch.bool]),
    st.lists(st.integers(0, 7), min_size=0, max_size=3),
    st.integers(-2, 1),
    st.integers(1, 6),
    st.integers(0, 2**16),
    st.booleans(),
)


def _make_tokens(spec):
    dtype, shape, lo, hi, seed, transpose = spec
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(lo, max(hi, lo + 1), tuple(shape), generator=g).to(dtype)
    if transpose and x.dim() == 2:
        x = x.t()
    return x


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=token_arrays,
    k=st.integers(-1, 4),
    V=st.integers(-1, 5),
    alpha=st.sampled_from([-1.0, 0.0, 1e-3, 0.5, 1.0, 7.0, math.nan, math.inf]),
)
def test_fuzz_ops_fail_cleanly_or_agree_with_reference(spec, k, V, alpha):
    """Any input either raises a clean error or gives exactly the reference answer."""
    x = _make_tokens(spec)
    try:
        nll = markov.bayes_nll(x, k, vocab_size=V, alpha=alpha, dtype=torch.float64)
    except CLEAN:
        nll = None
    if nll is not None:
        torch.testing.assert_close(nll, ref.bayes_nll(x, k, V, alpha), rtol=0, atol=1e-12)
    try:
        ev = markov.log_evidence(x, k, vocab_size=V, alpha=alpha)
    except CLEAN:
        ev = None
    if ev is not None:
        torch.testing.assert_close(ev, ref.log_evidence(x, k, V, alpha), rtol=0, atol=1e-9)
    assert (nll is None) == (ev is None)  # one set of rules for both ops
    try:
        counts, _ = markov.context_coverage(x, k, vocab_size=V)
    except CLEAN:
        counts = None
    if counts is not None:
        assert torch.equal(counts, ref.context_counts(x, k, V))
    try:
        visits = markov.context_visits(x, k, vocab_size=V)
    except CLEAN:
        visits = None
    if visits is not None:
        assert torch.equal(visits, ref.context_visits(x, k, V))
    assert (counts is None) == (visits is None)  # one set of rules for both counting ops


@settings(max_examples=150, deadline=None)
@given(
    batch=st.integers(-2, 4),
    k=st.integers(-1, 4),
    seq_len=st.one_of(st.none(), st.integers(-1, 12)),
    V=st.integers(-1, 4),
    alpha=st.sampled_from([-1.0, 0.0, 1e-4, 1.0, math.nan, math.inf]),
    seed=st.integers(-5, 2**64),
)
def test_fuzz_sample_fails_cleanly_or_is_valid(batch, k, seq_len, V, alpha, seed):
    try:
        x, t = markov.sample(
            batch, k, seq_len=seq_len, vocab_size=V, alpha=alpha, seed=seed, return_tables=True, dtype=torch.float64
        )
    except CLEAN:
        return
    assert x.shape == (batch, seq_len or markov.default_seq_len(k)) and t.shape == (batch, V**k, V)
    assert x.min() >= 0 and x.max() < V if x.numel() else True
    assert torch.isfinite(t).all() and torch.allclose(t.sum(-1), torch.ones(()).double())


@settings(max_examples=100, deadline=None)
@given(spec=token_arrays, k=st.integers(0, 3), shape_b=st.lists(st.integers(0, 5), min_size=0, max_size=4))
def test_fuzz_oracle_fails_cleanly_or_agrees(spec, k, shape_b):
    x = _make_tokens(spec)
    tables = torch.rand(tuple(shape_b), dtype=torch.float64) + 0.1
    if tables.dim() >= 1 and tables.shape[-1] > 0 and spec[4] % 4:  # mostly probability rows
        tables = tables / tables.sum(-1, keepdim=True)
    try:
        got = markov.oracle_nll(x, tables, k)
    except CLEAN:
        return
    torch.testing.assert_close(got, ref.oracle_nll(x, tables, k), rtol=0, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(
    shape_m=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    shape_b=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    k=st.integers(-1, 4),
    poison=st.sampled_from([None, math.nan, math.inf]),
)
def test_fuzz_gap_pct_fails_cleanly_or_is_finite(shape_m, shape_b, k, poison):
    g = torch.Generator().manual_seed(len(shape_m) * 7 + k)
    model = torch.rand(tuple(shape_m), generator=g, dtype=torch.float64) + 0.5
    bayes = torch.rand(tuple(shape_b), generator=g, dtype=torch.float64) + 0.5
    if poison is not None and model.numel():
        model.view(-1)[-1] = poison
    try:
        gap, se = markov.gap_pct(model, bayes, k)
    except CLEAN:
        return
    assert math.isfinite(gap) and (math.isfinite(se) or model.shape[0] == 1)
    # matches the definition on the kept positions
    m, b = model[:, k:].mean(), bayes[:, k:].mean()
    assert gap == pytest.approx(100 * float((m - b) / b), rel=1e-9, abs=1e-9)
