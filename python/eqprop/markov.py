"""The Markov-k in-context-learning benchmark with its exact Bayes NLL (docs/design.md §8).

Every sequence has its own transition table: each of the V^k rows is drawn from Dirichlet(alpha);
the first k tokens are uniform, then ``x_t ~ P(. | x_{t-k..t-1})``. Under this generative model
the Bayes-optimal predictive is the Dirichlet-multinomial posterior mean,

    P(x_t = a | x_<t) = (N_<t(c, a) + alpha) / (N_<t(c) + V alpha),   c = x_{t-k..t-1},

which gives every model an absolute yardstick: its gap in percent to the Bayes NLL.

Context indices put the oldest symbol first: ``c = sum_i x_{t-k+i} V^(k-1-i)``, so
``tables[b, c]`` is the next-symbol distribution after that context.

All ops run in the C++ core (``torch.ops.eqprop.markov_*``) on CPU, and with CUDA kernels on GPU.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

__all__ = [
    "BAYES_NLL_ANCHORS",
    "BayesAnchor",
    "default_seq_len",
    "sample",
    "bayes_nll",
    "oracle_nll",
    "log_evidence",
    "gap_pct",
    "context_coverage",
    "context_visits",
]

_ops = torch.ops.eqprop


class BayesAnchor(NamedTuple):
    """A Monte-Carlo Bayes NLL anchor: ``nll`` nats per token and its standard error ``se``."""

    nll: float
    se: float


#: Mean Bayes NLL per token (nats) at V=2, alpha=1, uniform first k tokens, L=100*2^k, positions
#: t >= k, with its Monte-Carlo standard error: 10^6 sequences per k drawn by ``sample`` and scored by
#: ``bayes_nll`` (benchmarks/bayes_anchors.py, benchmarks/results/bayes_anchors.json; docs/design.md §8).
#: Example: ``BAYES_NLL_ANCHORS[3].nll``
BAYES_NLL_ANCHORS: dict[int, BayesAnchor] = {
    1: BayesAnchor(0.49967, 0.00017),
    2: BayesAnchor(0.48780, 0.00014),
    3: BayesAnchor(0.48780, 0.00012),
    4: BayesAnchor(0.49149, 0.000095),
    5: BayesAnchor(0.49786, 0.000075),
    6: BayesAnchor(0.50344, 0.000058),
}


def default_seq_len(k: int) -> int:
    """The benchmark's default sequence length, ``100 * 2**k`` (train length = eval length)."""
    return 100 * 2**k


def _int_arg(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def sample(
    batch: int,
    k: int,
    *,
    seq_len: Optional[int] = None,
    vocab_size: int = 2,
    alpha: float = 1.0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    return_tables: bool = False,
):
    """Sample Markov-k sequences, each with its own Dirichlet(alpha) transition table.

    Args:
        batch: number of sequences B.
        k: Markov order (>= 1).
        seq_len: L, default ``100 * 2**k``.
        vocab_size: V (>= 2).
        alpha: Dirichlet concentration (> 0) of every table row.
        seed: fixes the output (same seed -> same tokens on the same device). If None, a seed is
            drawn from ``generator`` or, without one, from torch's global generator, so
            ``torch.manual_seed`` makes runs repeatable.
        generator: a ``torch.Generator`` to draw the seed from (not together with ``seed``).
        device: where to sample ("cpu" or a CUDA device; a CUDA device on a CPU-only torch or
            eqprop build raises ValueError).
        dtype: float dtype of the tables (tokens are drawn from the tables as returned).
        return_tables: also return the tables.

    Returns:
        tokens ``[B, L]`` int64, and with ``return_tables`` also tables ``[B, V^k, V]``.

    Example: ``x = eqprop.markov.sample(64, 3, seed=0)  # [64, 800]``
    """
    batch, k, vocab_size = _int_arg("batch", batch), _int_arg("k", k), _int_arg("vocab_size", vocab_size)
    if seq_len is None:
        if k < 1:
            raise ValueError(f"k (Markov order) must be >= 1, got {k}")
        seq_len = default_seq_len(k)
    seq_len = _int_arg("seq_len", seq_len)
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    seed = _int_arg("seed", seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    tokens, tables = _ops.markov_sample(batch, k, seq_len, vocab_size, float(alpha), seed, torch.device(device), dtype)
    return (tokens, tables) if return_tables else tokens


def bayes_nll(
    tokens: torch.Tensor,
    k: int,
    *,
    vocab_size: int = 2,
    alpha: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Exact Bayes-optimal NLL of every token, ``-ln P_Bayes(x_t | x_<t)`` in nats.

    Args:
        tokens: ``[B, L]`` int64 in ``[0, vocab_size)``, ``L > k`` (views such as ``x[:, :100]`` are fine).
        k, vocab_size, alpha: the generative model (order, V, Dirichlet concentration).
        dtype: float32 or float64 output (the arithmetic is float64 either way).

    Returns:
        ``[B, L]``; entries ``t < k`` are ``ln V``.

    Example: ``nll = bayes_nll(x, 3); nll[:, 3:].mean()  # ~0.488 at V=2, L=800``
    """
    return _ops.markov_bayes_nll(tokens, _int_arg("k", k), _int_arg("vocab_size", vocab_size), float(alpha), dtype)


def oracle_nll(tokens: torch.Tensor, tables: torch.Tensor, k: int) -> torch.Tensor:
    """NLL of every token under the true transition tables, ``-ln tables[b, c_t, x_t]``.

    Args:
        tokens: ``[B, L]`` int64; tables: ``[B, V^k, V]`` float32/float64 (as from ``sample(...,
        return_tables=True)``), on the tokens' device. Every row ``tables[b, c]`` must be a
        probability vector (finite entries >= 0 summing to 1 within ``8 V eps`` of float32, so
        float32 tables cast to float64 pass),
        else ValueError.

    Returns:
        ``[B, L]`` in the tables' dtype; entries ``t < k`` are ``ln V``.

    Example: ``x, P = sample(8, 2, seed=0, return_tables=True); oracle_nll(x, P, 2)``
    """
    return _ops.markov_oracle_nll(tokens, tables, _int_arg("k", k))


def log_evidence(tokens: torch.Tensor, k: int, *, vocab_size: int = 2, alpha: float = 1.0) -> torch.Tensor:
    """Closed-form Dirichlet-multinomial evidence term of each sequence (docs/design.md §8).

    ``sum_c [lnG(N_c + V alpha) - lnG(V alpha) - sum_a (lnG(N_ca + alpha) - lnG(alpha))]``, which is
    ``-ln p(x_k..x_{L-1} | x_<k)`` and equals ``bayes_nll(tokens, k)[:, k:].sum(1)``: an
    independent check of the sequential kernel (lgamma of final counts vs per-step logs).

    Returns:
        ``[B]`` float64, nats.

    Example: ``log_evidence(x, 3)``
    """
    return _ops.markov_log_evidence(tokens, _int_arg("k", k), _int_arg("vocab_size", vocab_size), float(alpha))


def gap_pct(model_nll: torch.Tensor, bayes_nll: torch.Tensor, k: int) -> tuple[float, float]:
    """Gap of a model to Bayes in percent, paired on the same sequences, with its standard error.

    ``gap = 100 * (mean model NLL - mean Bayes NLL) / mean Bayes NLL`` over positions ``t >= k``
    (``model_nll[:, t]`` is the model's NLL of ``x_t``). The estimate is a ratio of means; its
    standard error is the delta-method one over sequences, ``100 * sd(D_b - R B_b) / (sqrt(n) B)``
    with ``D_b``, ``B_b`` the per-sequence mean difference and Bayes NLL and ``R`` the ratio, so
    the sequence-to-sequence variation that both NLLs share cancels (pairing).

    Args:
        model_nll, bayes_nll: ``[B, L]`` per-token NLL (nats) on the same tokens.
        k: Markov order; positions ``t < k`` are left out.

    Returns:
        ``(gap_pct, standard_error_pct)``; the standard error is ``nan`` for one sequence.

    Example: ``gap_pct(model_nll, bayes_nll(x, 3), 3)  # (1.8, 0.1)``
    """
    if not isinstance(model_nll, torch.Tensor) or not isinstance(bayes_nll, torch.Tensor):
        raise TypeError("model_nll and bayes_nll must be tensors")
    if model_nll.shape != bayes_nll.shape or model_nll.dim() != 2:
        raise ValueError(
            f"model_nll and bayes_nll must both be [B, L] of one shape, got {tuple(model_nll.shape)} "
            f"and {tuple(bayes_nll.shape)}"
        )
    k = _int_arg("k", k)
    if not 0 <= k < model_nll.shape[1]:
        raise ValueError(f"k must be in [0, L={model_nll.shape[1]}), got {k}")
    if model_nll.shape[0] < 1:
        raise ValueError("need at least one sequence")
    m = model_nll[:, k:].double().mean(1)  # [B]
    b = bayes_nll[:, k:].to(m.device, torch.float64).mean(1)  # [B]
    if not (torch.isfinite(m).all() and torch.isfinite(b).all()):
        raise ValueError("model_nll and bayes_nll must be finite at positions t >= k")
    if not b.mean() > 0:
        raise ValueError(f"bayes_nll must have a positive mean over positions t >= k, got {float(b.mean())}")
    d = m - b
    ratio = d.mean() / b.mean()
    n = m.numel()
    se = (d - ratio * b).std(unbiased=True) / (math.sqrt(n) * b.mean()) if n > 1 else torch.tensor(math.nan)
    return 100.0 * float(ratio), 100.0 * float(se)


def context_coverage(tokens: torch.Tensor, k: int, *, vocab_size: int = 2):
    """How often each context is visited: data sparsity per context, where models stall.

    Args:
        tokens: ``[B, L]`` int64.

    Returns:
        ``(counts, summary)``: counts ``[B, V^k]`` int64 of contexts preceding targets ``t >= k``;
        summary a dict over all (sequence, context) cells: ``min``, ``p5`` (5th percentile),
        ``median``, ``frac_unvisited`` and ``frac_lt10`` (fraction with fewer than 10 visits).

    Example: ``counts, s = context_coverage(x, 6); s["frac_lt10"]``
    """
    counts = _ops.markov_context_counts(tokens, _int_arg("k", k), _int_arg("vocab_size", vocab_size))
    flat = counts.reshape(-1).double()
    if flat.numel() == 0:
        nan = math.nan
        return counts, {"min": nan, "p5": nan, "median": nan, "frac_unvisited": nan, "frac_lt10": nan}
    summary = {
        "min": float(flat.min()),
        # nearest-rank 5th percentile (torch.quantile refuses inputs over 2^24 elements)
        "p5": float(flat.kthvalue(max(1, math.ceil(0.05 * flat.numel())))[0]),
        "median": float(flat.median()),
        "frac_unvisited": float((flat == 0).double().mean()),
        "frac_lt10": float((flat < 10).double().mean()),
    }
    return counts, summary


def context_visits(tokens: torch.Tensor, k: int, *, vocab_size: int = 2) -> torch.Tensor:
    """How often the context of each target was seen before it: ``N_<t(c_t)``.

    ``visits[b, t]`` counts targets ``s`` in ``[k, t)`` with ``c_s == c_t`` (the count in the Bayes
    predictive, docs/design.md §8); ``-1`` for ``t < k``. Context index: oldest symbol most
    significant. A C++ op (``torch.ops.eqprop.markov_context_visits``); on CUDA tokens the counting
    runs on the CPU (one copy each way) and the result returns to the tokens' device.

    Args:
        tokens: ``[B, L]`` int64 in ``[0, vocab_size)``, ``L > k``.
        k: Markov order; vocab_size: V.

    Returns:
        ``[B, L]`` int64 on the tokens' device.

    Example: ``context_visits(torch.tensor([[0, 1, 0, 1, 0]]), 1)  # [[-1, 0, 0, 1, 1]]``
    """
    return _ops.markov_context_visits(tokens, _int_arg("k", k), _int_arg("vocab_size", vocab_size))


# Shapes for torch.compile / opcheck (the ops allocate their outputs from these rules).
@torch.library.register_fake("eqprop::markov_bayes_nll")
def _(tokens, k, vocab_size, alpha, dtype):
    return tokens.new_empty(tokens.shape, dtype=dtype)


@torch.library.register_fake("eqprop::markov_oracle_nll")
def _(tokens, tables, k):
    return tables.new_empty(tokens.shape)


@torch.library.register_fake("eqprop::markov_log_evidence")
def _(tokens, k, vocab_size, alpha):
    return tokens.new_empty(tokens.shape[:1], dtype=torch.float64)


@torch.library.register_fake("eqprop::markov_context_counts")
def _(tokens, k, vocab_size):
    return tokens.new_empty((tokens.shape[0], vocab_size**k))


@torch.library.register_fake("eqprop::markov_context_visits")
def _(tokens, k, vocab_size):
    return tokens.new_empty(tokens.shape)


@torch.library.register_fake("eqprop::markov_sample")
def _(batch, k, seq_len, vocab_size, alpha, seed, device, table_dtype):
    tokens = torch.empty((batch, seq_len), dtype=torch.long, device=device)
    return tokens, torch.empty((batch, vocab_size**k, vocab_size), dtype=table_dtype, device=device)


# ---- where a model's gap sits: by position and by context visit count (docs/design.md §8) ----------

__all__ += ["VISIT_BUCKETS", "gap_breakdowns"]

#: Buckets of the context visit count N_<t(c_t) for the "gap by visit count" report: [lo, hi), None = open.
VISIT_BUCKETS = ((0, 1), (1, 3), (3, 10), (10, 30), (30, 100), (100, None))


def _gap_on(model_nll: torch.Tensor, bayes: torch.Tensor, mask: torch.Tensor) -> tuple:
    """Gap% and SE over the masked tokens: zeroing both NLLs outside the mask turns ``gap_pct``'s per-sequence
    means into sums, whose common 1/L cancels in the ratio, so this is the pooled gap over the mask with
    the same paired delta-method SE. ``(None, None)`` for an empty mask."""
    if not bool(mask.any()):
        return None, None
    m = torch.where(mask, model_nll.double(), 0.0)
    b = torch.where(mask, bayes.to(model_nll.device).double(), 0.0)
    return gap_pct(m, b, 0)


def gap_breakdowns(
    model_nll: torch.Tensor,
    bayes_nll: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    *,
    vocab_size: int = 2,
    n_bins: int = 20,
) -> tuple:
    """Where a model's gap to Bayes sits: by position and by how often the target's context was seen before.

    Each entry is a pooled, paired gap over a subset of the tokens ``t >= k`` (as ``gap_pct``, with its
    delta-method SE over sequences); weighted by the Bayes NLL in each part, the gaps of a partition
    average back to the total gap.

    Args:
        model_nll, bayes_nll: ``[B, L]`` per-token NLLs (nats) of any model and of Bayes on ``tokens``.
        tokens: ``[B, L]`` int64; k, vocab_size: the Markov order and V.
        n_bins: position bins of the fine curve (at most ``L - k``).

    Returns:
        ``(by_position, by_visits)``. ``by_position``: ``{"early" | "middle" | "late": {"positions": [lo, hi],
        "gap_pct", "gap_se"}, "bins": [... n_bins such dicts]}`` (thirds of ``[k, L)``); ``by_visits``: one
        dict per ``VISIT_BUCKETS`` entry ``{"visits": [lo, hi], "frac_tokens", "gap_pct", "gap_se"}``
        (``None`` gaps for empty buckets), the visit count being ``N_<t(c_t)``, the count the Bayes
        predictive conditions on.

    Example: ``by_pos, by_visits = gap_breakdowns(model.token_nll(x), bayes_nll(x, 3), x, 3)``
    """
    if tokens.dim() != 2 or model_nll.shape != tokens.shape or bayes_nll.shape != tokens.shape:
        raise ValueError(
            f"model_nll, bayes_nll and tokens must all be [B, L] of one shape, got "
            f"{tuple(model_nll.shape)}, {tuple(bayes_nll.shape)} and {tuple(tokens.shape)}"
        )
    k = _int_arg("k", k)
    N, L = tokens.shape
    if not 0 < k < L:
        raise ValueError(f"k must be in [1, L={L}), got {k}")
    pos = torch.arange(L, device=model_nll.device).expand(N, L)
    edges = [k + round(i * (L - k) / 3) for i in range(4)]
    by_position = {}
    for name, lo, hi in zip(("early", "middle", "late"), edges[:-1], edges[1:]):
        gap, se = _gap_on(model_nll, bayes_nll, (pos >= lo) & (pos < hi))
        by_position[name] = {"positions": [lo, hi], "gap_pct": gap, "gap_se": se}
    n_bins = min(_int_arg("n_bins", n_bins), L - k)
    bin_edges = [k + round(i * (L - k) / n_bins) for i in range(n_bins + 1)]
    by_position["bins"] = []
    for lo, hi in zip(bin_edges[:-1], bin_edges[1:]):
        gap, se = _gap_on(model_nll, bayes_nll, (pos >= lo) & (pos < hi))
        by_position["bins"].append({"positions": [lo, hi], "gap_pct": gap, "gap_se": se})
    visits = context_visits(tokens, k, vocab_size=vocab_size).to(model_nll.device)
    by_visits = []
    for lo, hi in VISIT_BUCKETS:
        mask = (visits >= lo) & ((visits < hi) if hi is not None else True)
        gap, se = _gap_on(model_nll, bayes_nll, mask)
        by_visits.append(
            {
                "visits": [lo, hi],
                "frac_tokens": float(mask.double().sum() / (N * (L - k))),
                "gap_pct": gap,
                "gap_se": se,
            }
        )
    return by_position, by_visits
