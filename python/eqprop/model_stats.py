"""Diagnostics of a model's predictions and of its block's branches (docs/design.md §7).

- :func:`per_position_ce`: mean next-token cross-entropy at every position, with its standard error
  over sequences, for any model with ``token_nll`` (``EquilibriumLM``, ``models.Transformer``).
- :func:`branch_stats`: how large the attention and FFN branches of an :class:`EquilibriumBlock`
  are against the injection x, how peaked its attention is (entropy per head, RMS of the logits),
  and the norms of the output weights.

Both return dataclasses with a ``.plot()`` (:mod:`eqprop.plots`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["PerPositionCE", "per_position_ce", "BranchStats", "branch_stats"]


# ---- per-position cross-entropy --------------------------------------------------------------------


@dataclass
class PerPositionCE:
    """Per-position next-token cross-entropy (nats), docs/design.md §7.

    ``mean`` [T]: mean over sequences of −ln p(x_t | x_<t); ``se`` [T]: its standard error
    std/√n (NaN for n = 1); ``n``: number of sequences. Position 0 is ln V by the models' convention
    (nothing predicts it, ``eqprop.models.interface``). float64.
    """

    mean: Tensor
    se: Tensor
    n: int

    @property
    def positions(self) -> Tensor:
        """0 .. T−1, int64 [T]."""
        return torch.arange(self.mean.numel())

    def plot(self, ax=None):
        """Mean CE against position with a ±1 SE band; returns the Figure
        (:func:`eqprop.plots.plot_per_position_ce`)."""
        from .plots import plot_per_position_ce

        return plot_per_position_ce(self, ax=ax)


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


def per_position_ce(model: Any, tokens: Tensor, *, batch_size: Optional[int] = None) -> PerPositionCE:
    """Mean next-token CE at every position with its standard error over sequences (docs/design.md §7).

    model: an ``nn.Module`` with ``token_nll(tokens [b, T]) -> [b, T]`` (nats; the models'
    interface, ``eqprop.models.interface``), evaluated in eval mode under ``torch.no_grad`` (its
    training flag is restored). tokens: int64 [B, T], B ≥ 1. batch_size: sequences per call
    (default: all at once). Returns :class:`PerPositionCE` with ``mean``, ``se`` [T].

    Example: ``ce = per_position_ce(lm, markov.sample(64, 1, seq_len=100)); ce.plot()``.
    """
    if not callable(getattr(model, "token_nll", None)):
        raise TypeError(
            f"model must have a token_nll(tokens) method (eqprop.models.interface), got {type(model).__name__}"
        )
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long or tokens.shape[0] < 1:
        got = f"{tokens.dtype} of shape {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an int64 tensor [B, T] with B >= 1, got {got}")
    B = tokens.shape[0]
    step = B if batch_size is None else _positive_int("batch_size", batch_size)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()  # training mode would also move a block's spectral-norm vectors
    try:
        with torch.no_grad():
            nll = torch.cat([model.token_nll(tokens[i : i + step]).to(torch.float64) for i in range(0, B, step)])
    finally:
        if was_training:
            model.train(True)
    if nll.shape != tokens.shape:
        raise ValueError(f"model.token_nll returned shape {tuple(nll.shape)}, expected {tuple(tokens.shape)}")
    mean = nll.mean(0)
    se = nll.std(0) / math.sqrt(B) if B > 1 else torch.full_like(mean, float("nan"))
    return PerPositionCE(mean=mean, se=se, n=B)


# ---- branches of the equilibrium block -------------------------------------------------------------


@dataclass
class BranchStats:
    """Branch sizes and attention statistics of an :class:`eqprop.EquilibriumBlock` at (z, x)
    (docs/design.md §7). With F(z; x) = x + a + f (a = Attn(LN1 z); f = FFN(LN2 z) coupled,
    FFN(LN2(x + a)) sequential):

    - ``attn_ratio``, ``ffn_ratio`` [B]: ‖a_b‖/‖x_b‖, ‖f_b‖/‖x_b‖ per sequence (Frobenius over
      positions and channels); ``attn_ratio_overall``, ``ffn_ratio_overall``: the same over the batch.
    - ``entropy`` [H]: attention entropy −Σ_s P_ts ln P_ts (nats), mean over samples and queries t;
      ``entropy_per_query`` [H, T] (mean over samples); query t attends to t + 1 keys, so
      entropy_t ≤ ln(t + 1) (uniform attention) and ``uniform_entropy`` [T] = ln(t + 1).
    - ``qk_rms`` [H]: RMS of the attention logits q_t·k_s/√d over samples and causal pairs s ≤ t
      (after qk-norm and RoPE, as the softmax sees them).
    - ``wo_fro``, ``wo_spectral``: ‖W_O‖_F, ‖W_O‖₂; ``ffn_out_fro``, ``ffn_out_spectral``: of the FFN's
      output weight (``ffn_out_weight``; the monotone FFN's one map W̃). Effective weights (after the
      spectral cap).
    - ``attn``, ``ffn`` [B, T, C]: the branch outputs a, f themselves.
    """

    attn_ratio: Tensor
    ffn_ratio: Tensor
    attn_ratio_overall: float
    ffn_ratio_overall: float
    entropy: Tensor
    entropy_per_query: Tensor
    qk_rms: Tensor
    wo_fro: float
    wo_spectral: float
    ffn_out_fro: float
    ffn_out_spectral: float
    attn: Tensor = field(repr=False)
    ffn: Tensor = field(repr=False)

    @property
    def uniform_entropy(self) -> Tensor:
        """ln(t + 1) for t = 0 .. T−1 [T]: the entropy of uniform causal attention (the maximum)."""
        T = self.entropy_per_query.shape[-1]
        return torch.log(torch.arange(1, T + 1, dtype=torch.float64))

    def plot(self, axes=None):
        """Four panels: branch ratios, entropy per head, qk RMS per head, weight norms; returns the
        Figure (:func:`eqprop.plots.plot_branch_stats`)."""
        from .plots import plot_branch_stats

        return plot_branch_stats(self, axes=axes)


def branch_stats(block: Any, z: Tensor, x: Tensor) -> BranchStats:
    """Branch norms and attention statistics of an :class:`eqprop.EquilibriumBlock` at (z, x)
    (docs/design.md §7); see :class:`BranchStats` for the quantities.

    block: an EquilibriumBlock with softmax attention (``attention="energy"`` has no attention
    matrix of its own: NotImplementedError). z, x: real [B, T, C] of the block's dtype, z
    typically the fixed point. Computed under ``torch.no_grad`` from the block's effective weights.

    The attention matrix lives inside the C++ kernel, which returns only the branch output; this
    reads it from the plain reference twin (``eqprop.reference.block``, an explicit masked softmax)
    run on the block's own effective weights; tests check its branches add up to the C++ F.

    Example: ``z, _ = eqprop.relax(blk, x); s = branch_stats(blk, z, x); s.entropy, s.attn_ratio``.
    """
    from .block import EquilibriumBlock
    from .reference import block as ref

    if not isinstance(block, EquilibriumBlock):
        raise TypeError(f"block must be an eqprop.EquilibriumBlock, got {type(block).__name__}")
    cfg = block.config
    if cfg.attention != "softmax":
        raise NotImplementedError(
            f'branch_stats supports attention="softmax" only, got attention="{cfg.attention}" (its update '
            "-∇E has no attention matrix or output projection of its own)"
        )
    for name, t in (("z", z), ("x", x)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_complex():
            raise NotImplementedError(f"branch_stats supports real z, x only, got {name} of dtype {t.dtype}")
    dtype = block.q_weight.dtype
    C = cfg.d_model
    if z.dim() != 3 or z.shape != x.shape or z.shape[-1] != C:
        raise ValueError(f"z and x must be [B, T, C={C}] of the same shape, got {tuple(z.shape)} and {tuple(x.shape)}")
    if z.dtype != dtype or x.dtype != dtype:
        raise TypeError(f"z and x must have the block's dtype {dtype}, got {z.dtype} and {x.dtype}")

    H = cfg.n_heads
    with torch.no_grad():
        p = {k: v.detach() for k, v in block.effective_weights().items()}
        opts = dict(n_heads=H, qk_norm=cfg.qk_norm, rope=cfg.rope, rope_base=cfg.rope_base, qk_eps=cfg.qk_eps)
        u1 = ref.layer_norm(z, p["ln1_weight"], p.get("ln1_bias"), cfg.ln_eps)
        a = ref.attention(u1, p, attention="softmax", **opts)  # [B, T, C]
        h = z if cfg.coupling == "coupled" else x + a  # docs/design.md §4: LN2 of z, or of h = x + a
        f = ref.ffn(ref.layer_norm(h, p["ln2_weight"], p.get("ln2_bias"), cfg.ln_eps), p, ffn=cfg.ffn)

        q = ref._qk(u1, p, "q", H, cfg.qk_norm, cfg.rope, cfg.rope_base, cfg.qk_eps)  # [B, H, T, d]
        k = ref._qk(u1, p, "k", H, cfg.qk_norm, cfg.rope, cfg.rope_base, cfg.qk_eps)
        S = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, T, d] @ [B, H, d, T] -> [B, H, T, T]
        P = ref._causal_softmax(S)  # exactly 0 above the diagonal
        ent = -torch.special.xlogy(P, P).sum(-1).to(torch.float64)  # [B, H, T]; 0·ln 0 = 0
        T = S.shape[-1]
        causal = torch.ones(T, T, dtype=torch.bool, device=S.device).tril()
        S2 = S.to(torch.float64).square()[..., causal]  # [B, H, T(T+1)/2]
        qk_rms = S2.mean(dim=(0, 2)).sqrt()

        def ratio(num: Tensor, den: Tensor, dims) -> Tensor:
            return torch.linalg.vector_norm(num.to(torch.float64), dim=dims) / torch.linalg.vector_norm(
                den.to(torch.float64), dim=dims
            )

        wo = p["o_weight"].to(torch.float64)
        w2 = (p["ffn_out_weight"] if cfg.ffn == "mlp" else p["mono_W"]).to(torch.float64)
        return BranchStats(
            attn_ratio=ratio(a, x, (1, 2)),
            ffn_ratio=ratio(f, x, (1, 2)),
            attn_ratio_overall=float(ratio(a, x, (0, 1, 2))),
            ffn_ratio_overall=float(ratio(f, x, (0, 1, 2))),
            entropy=ent.mean(dim=(0, 2)),
            entropy_per_query=ent.mean(0),
            qk_rms=qk_rms,
            wo_fro=float(torch.linalg.matrix_norm(wo, "fro")),
            wo_spectral=float(torch.linalg.matrix_norm(wo, 2)),
            ffn_out_fro=float(torch.linalg.matrix_norm(w2, "fro")),
            ffn_out_spectral=float(torch.linalg.matrix_norm(w2, 2)),
            attn=a,
            ffn=f,
        )
