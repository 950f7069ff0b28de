"""``assert_markov_gap``: a model's gap to the exact Bayes NLL on the Markov-k benchmark, judged with
its standard error (docs/design.md §8)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["assert_markov_gap"]


def _gap_breakdown(model: torch.Tensor, bayes: torch.Tensor, tokens: torch.Tensor, k: int, vocab_size: int) -> list:
    """Rows (label, gap, se, share of tokens) by position thirds of [k, L) and by context visits
    (``eqprop.markov.gap_breakdowns``)."""
    from ..markov import gap_breakdowns

    by_position, by_visits = gap_breakdowns(model, bayes, tokens, k, vocab_size=vocab_size)
    L = tokens.shape[1]
    rows = []
    for name in ("early", "middle", "late"):
        lo, hi = by_position[name]["positions"]
        rows.append(
            (
                f"positions {lo}..{hi - 1}",
                by_position[name]["gap_pct"],
                by_position[name]["gap_se"],
                (hi - lo) / (L - k),
            )
        )
    for b in by_visits:
        lo, hi = b["visits"]
        label = f"visits {lo}" if hi == lo + 1 else (f"visits >= {lo}" if hi is None else f"visits {lo}..{hi - 1}")
        rows.append((label, b["gap_pct"], b["gap_se"], b["frac_tokens"]))
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
    lines = [
        f"  {label.ljust(width)}  "
        + ("(no tokens)" if g is None else f"{g:+8.2f}% ± {s:.2f}")
        + f"  ({100 * share:.1f}% of tokens)"
        for label, g, s, share in rows
    ]
    raise AssertionError(
        f"Markov-{k} gap to Bayes {gap:+.2f}% ± {se:.2f} (SE, {n_sequences} sequences, L = {tokens.shape[1]}, "
        f"seed {seed}): gap - 2 SE = {gap - 2 * se:.2f}% > max_gap_pct = {max_gap_pct}%\n"
        f"  model NLL {float(nll[:, k:].mean()):.4f} vs Bayes {float(bayes[:, k:].mean()):.4f} nats/token\n"
        + "\n".join(lines)
    )
