"""Plain PyTorch Markov-k formulas (docs/design.md §8): the oracle for the C++ kernels in eqprop.markov.

Each function follows the formula in the most direct way: one time step at a time, vectorized only
over the batch.
"""

from __future__ import annotations

import math

import torch


def context_index(tokens: torch.Tensor, k: int, vocab_size: int) -> torch.Tensor:
    """[B, L] -> [B, L-k]: context of target t = k + j, oldest symbol most significant."""
    B, L = tokens.shape
    ctx = torch.zeros(B, L - k, dtype=torch.long, device=tokens.device)
    for i in range(k):
        ctx = ctx * vocab_size + tokens[:, i : L - k + i]
    return ctx


def bayes_nll(tokens: torch.Tensor, k: int, vocab_size: int = 2, alpha: float = 1.0) -> torch.Tensor:
    """[B, L] float64: -ln (N_<t(c, a) + alpha) / (N_<t(c) + V alpha), ln V for t < k."""
    B, L = tokens.shape
    V = vocab_size
    nll = torch.full((B, L), math.log(V), dtype=torch.float64, device=tokens.device)
    pair = torch.zeros(B, V**k, V, dtype=torch.float64, device=tokens.device)  # N(c, a)
    ctx = context_index(tokens, k, V)
    rows = torch.arange(B, device=tokens.device)
    for t in range(k, L):
        c, a = ctx[:, t - k], tokens[:, t]
        n_ca = pair[rows, c, a]
        n_c = pair[rows, c].sum(-1)
        nll[:, t] = -torch.log((n_ca + alpha) / (n_c + V * alpha))
        pair[rows, c, a] += 1
    return nll


def oracle_nll(tokens: torch.Tensor, tables: torch.Tensor, k: int) -> torch.Tensor:
    """[B, L]: -ln tables[b, c_t, x_t], ln V for t < k."""
    B, L = tokens.shape
    V = tables.shape[-1]
    nll = torch.full((B, L), math.log(V), dtype=tables.dtype, device=tokens.device)
    ctx = context_index(tokens, k, V)
    rows = torch.arange(B, device=tokens.device)
    for t in range(k, L):
        nll[:, t] = -torch.log(tables[rows, ctx[:, t - k], tokens[:, t]])
    return nll


def log_evidence(tokens: torch.Tensor, k: int, vocab_size: int = 2, alpha: float = 1.0) -> torch.Tensor:
    """[B] float64: sum_c [lnG(N_c + V alpha) - lnG(V alpha) - sum_a (lnG(N_ca + alpha) - lnG(alpha))]."""
    V = vocab_size
    pair = context_counts(tokens, k, V, per_symbol=True).double()  # [B, V^k, V]
    a = torch.tensor(alpha, dtype=torch.float64)
    per_ctx = torch.lgamma(pair.sum(-1) + V * a) - torch.lgamma(V * a)
    per_ctx = per_ctx - (torch.lgamma(pair + a) - torch.lgamma(a)).sum(-1)
    return per_ctx.sum(-1)


def context_counts(tokens: torch.Tensor, k: int, vocab_size: int = 2, per_symbol: bool = False) -> torch.Tensor:
    """[B, V^k] visits of each context before targets t >= k ([B, V^k, V] with ``per_symbol``)."""
    B, L = tokens.shape
    V = vocab_size
    counts = torch.zeros(B, V**k, V, dtype=torch.long, device=tokens.device)
    ctx = context_index(tokens, k, V)
    rows = torch.arange(B, device=tokens.device)
    for t in range(k, L):
        counts[rows, ctx[:, t - k], tokens[:, t]] += 1
    return counts if per_symbol else counts.sum(-1)


def context_visits(tokens: torch.Tensor, k: int, vocab_size: int = 2) -> torch.Tensor:
    """[B, L] int64: visits[b, t] = #{s in [k, t) : c_s == c_t}, -1 for t < k (compared directly)."""
    B, L = tokens.shape
    visits = torch.full((B, L), -1, dtype=torch.long, device=tokens.device)
    ctx = context_index(tokens, k, vocab_size)
    for t in range(k, L):
        j = t - k
        visits[:, t] = (ctx[:, :j] == ctx[:, j : j + 1]).sum(1)
    return visits


def exact_mean_bayes_nll_k1(seq_len: int, alpha: float = 1.0) -> float:
    """Expected Bayes NLL per token over t >= 1 for k = 1, V = 2, exactly (no Monte Carlo).

    Under the generative model a sequence's probability is the product of its Bayes predictives, so
    E[-ln P_Bayes(x_t | x_<t)] = sum over count states of P(state) * H(predictive of the current
    row). By symmetry x_0 = 0; the state after t-1 targets is (c = x_{t-1}, N00, N01), with
    N10 = N01 - c (0->1 and 1->0 transitions alternate) and N11 = t-1 - N00 - N01 - N10.
    O(L^3) float64 work (L = 200, the benchmark's k = 1 length: about a second).
    """
    T = seq_len + 1
    f64 = torch.float64
    n00 = torch.arange(T, dtype=f64)[:, None].expand(T, T)
    n01 = torch.arange(T, dtype=f64)[None, :].expand(T, T)
    P = torch.zeros(2, T, T, dtype=f64)  # P[c, N00, N01]
    P[0, 0, 0] = 1.0

    def entropy(p):
        return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))

    total = 0.0
    for t in range(1, seq_len):
        p0 = (n00 + alpha) / (n00 + n01 + 2 * alpha)  # P(next = 0 | c = 0), row 0 = (N00, N01)
        n10, n11 = n01 - 1, (t - 1) - n00 - 2 * n01 + 1  # row 1 when c = 1
        valid = (n10 >= 0) & (n11 >= 0)
        p1 = torch.where(valid, (n10 + alpha) / (n10 + n11 + 2 * alpha), 0.5)  # P(next = 0 | c = 1)
        total += float((P[0] * entropy(p0)).sum() + (P[1] * torch.where(valid, entropy(p1), 0.0)).sum())
        Q = torch.zeros_like(P)
        Q[0, 1:] += (P[0] * p0)[:-1]  # 0 -> 0: N00 + 1
        Q[1, :, 1:] += (P[0] * (1 - p0))[:, :-1]  # 0 -> 1: N01 + 1
        Q[0] += P[1] * p1  # 1 -> 0: N10 + 1, i.e. N01 unchanged with c = 0
        Q[1] += P[1] * torch.where(valid, 1 - p1, 0.0)  # 1 -> 1: N11 + 1
        P = Q
    return total / (seq_len - 1)
