"""``assert_markov_gap``: a model's gap to the exact Bayes NLL on the Markov-k benchmark, judged with
its standard error (docs/design.md §8)."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = ["assert_markov_gap"]

#: context-visit bins of the breakdown: [lo, hi) visits of the context before position t
_VISIT_BINS = ((0, 1), (1, 4), (4, 16), (16, 64), (64, math.inf))


def _context_visits(tokens: torch.Tensor, k: int, vocab_size: int) -> torch.Tensor:
    """[B, L] int64: at t >= k, how often the context c_t = x_{t-k..t-1} occurred before t (as the
    context of a target t' >= k, t' < t), i.e. N_<t(c_t) of the Bayes rule; -1 at t < k.

    Rank of each position among the positions with the same context: a stable sort by context, then
    the index within each run of equal contexts.
    """
    B, L = tokens.shape
    w = vocab_size ** torch.arange(k - 1, -1, -1, device=tokens.device)  # oldest symbol first
    ctx = (tokens.unfold(1, k, 1)[:, : L - k] * w).sum(-1)  # [B, L-k], context of targets t = k..L-1
    srt, order = torch.sort(ctx, dim=1, stable=True)
    pos = torch.arange(L - k, device=tokens.device).expand(B, -1)
    start = torch.ones_like(srt, dtype=torch.bool)
    start[:, 1:] = srt[:, 1:] != srt[:, :-1]
    first = torch.where(start, pos, torch.zeros_like(pos)).cummax(1).values
    visits = torch.full((B, L), -1, dtype=torch.int64, device=tokens.device)
    visits[:, k:] = torch.empty_like(ctx).scatter_(1, order, pos - first)
    return visits


def _masked_gap(model: torch.Tensor, bayes: torch.Tensor, mask: torch.Tensor):
    """Gap % ± SE over the masked positions: the per-sequence means over the mask go through
    ``eqprop.markov.gap_pct`` (one column each); sequences with no masked position are left out.
    Returns (gap, se, positions)."""
    from ..markov import gap_pct

    cnt = mask.sum(1)
    keep = cnt > 0
    if int(keep.sum()) == 0:
        return math.nan, math.nan, 0
    m = (model * mask).sum(1)[keep] / cnt[keep]
    b = (bayes * mask).sum(1)[keep] / cnt[keep]
    if not float(b.mean()) > 0:
        return math.nan, math.nan, int(cnt.sum())
    gap, se = gap_pct(m[:, None], b[:, None], 0)
    return gap, se, int(cnt.sum())


def _gap_breakdown(model: torch.Tensor, bayes: torch.Tensor, tokens: torch.Tensor, k: int, vocab_size: int) -> list:
    """Rows (label, gap, se, positions) by position thirds of [k, L) and by context visits."""
    B, L = tokens.shape
    rows = []
    edges = [k + round(i * (L - k) / 3) for i in range(4)]
    t = torch.arange(L, device=model.device)
    for i in range(3):
        mask = ((t >= edges[i]) & (t < edges[i + 1])).expand(B, -1).double()
        rows.append((f"positions {edges[i]}..{edges[i + 1] - 1}",) + _masked_gap(model, bayes, mask))
    visits = _context_visits(tokens, k, vocab_size).to(model.device)
    for lo, hi in _VISIT_BINS:
        mask = ((visits >= lo) & (visits < hi)).double()
        label = f"visits {lo}" if hi == lo + 1 else (f"visits >= {lo}" if hi == math.inf else f"visits {lo}..{hi - 1}")
        rows.append((label,) + _masked_gap(model, bayes, mask))
    return rows


def assert_markov_gap(
    model_nll_fn: Callable[[torch.Tensor], torch.Tensor],
    k: int,
    *,
    max_gap_pct: float,
    n_sequences: int,
    seed: int,
    vocab_size: int = 2,
    alpha: float = 1.0,
    seq_len: Optional[int] = None,
    device="cpu",
) -> None:
    """Assert that a model's NLL is within ``max_gap_pct`` percent of the exact Bayes NLL on the
    Markov-k benchmark (docs/design.md §8), judged with the standard error.

    Draws ``n_sequences`` fresh sequences (``eqprop.markov.sample(..., seed=seed)``, length
    ``seq_len``, default ``100·2^k``), scores them with ``model_nll_fn(tokens [B, L] int64) ->
    [B, L]`` per-token NLL in nats (position t is the NLL of x_t given x_<t) and compares with
    ``eqprop.markov.bayes_nll`` through ``eqprop.markov.gap_pct`` (paired ratio, positions t >= k).
    Fails only when gap − 2·SE > max_gap_pct: a gap within two standard errors of the bound is not
    evidence of a regression (a noisy pass/fail is worse than none).

    Raises:
        AssertionError with gap ± SE against the bound and the gap by position thirds and by how often
        the context had been visited before (the Bayes rule's count N_<t(c)), where models stall.
    Example: ``assert_markov_gap(lambda x: model.nll(x), 3, max_gap_pct=5, n_sequences=64, seed=0)``
    """
    from .. import markov

    if not callable(model_nll_fn):
        raise TypeError(f"model_nll_fn must be callable tokens [B, L] -> NLL [B, L], got {type(model_nll_fn).__name__}")
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 2:
        raise ValueError(f"n_sequences must be an int >= 2 (the standard error needs two), got {n_sequences!r}")
    tokens = markov.sample(
        n_sequences, k, seq_len=seq_len, vocab_size=vocab_size, alpha=alpha, seed=seed, device=device
    )
    nll = model_nll_fn(tokens)
    if not isinstance(nll, torch.Tensor) or nll.shape != tokens.shape:
        raise ValueError(
            f"model_nll_fn(tokens) must return a tensor of the tokens' shape {tuple(tokens.shape)}, "
            f"got {type(nll).__name__} {tuple(getattr(nll, 'shape', ()))}"
        )
    nll = nll.detach().double()
    bayes = markov.bayes_nll(tokens, k, vocab_size=vocab_size, alpha=alpha, dtype=torch.float64).to(nll.device)
    gap, se = markov.gap_pct(nll, bayes, k)
    if gap - 2 * se <= max_gap_pct:
        return
    rows = _gap_breakdown(nll, bayes, tokens.to(nll.device), k, vocab_size)
    width = max(len(r[0]) for r in rows)
    lines = [f"  {label.ljust(width)}  {g:+8.2f}% ± {s:.2f}  ({n} positions)" for label, g, s, n in rows]
    raise AssertionError(
        f"Markov-{k} gap to Bayes {gap:+.2f}% ± {se:.2f} (SE, {n_sequences} sequences, L = {tokens.shape[1]}, "
        f"seed {seed}): gap - 2 SE = {gap - 2 * se:.2f}% > max_gap_pct = {max_gap_pct}%\n"
        f"  model NLL {float(nll[:, k:].mean()):.4f} vs Bayes {float(bayes[:, k:].mean()):.4f} nats/token\n"
        + "\n".join(lines)
    )
