"""Plain PyTorch twin of the equilibrium transformer block (docs/design.md §4): the test oracle and the
benchmark baseline for ``eqprop.EquilibriumBlock`` (whose F runs in the C++ core). Nothing else in
the library imports it.

Written for reading, not speed: every option is an ``if``, attention is an explicit masked softmax,
and the energy attention is obtained by *autograd* from its energy (the C++ core uses the closed
form), so the two are independent implementations of the same math.

    coupled     F(z; x) = x + Attn(LN1(z)) + FFN(LN2(z))
    sequential  F(z; x) = h + FFN(LN2(h)),   h = x + Attn(LN1(z))

Complex z, x run the holomorphic extension: parameters are promoted to complex, no abs / conj is
used outside detached constants.

Example: ``F = block(z, x, dict(blk.named_parameters()), n_heads=2, sn_u=blk.sn_u_dict())``
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import Tensor

from .. import _C

__all__ = ["block", "attention", "ffn", "energy", "effective_weights", "layer_norm"]


def layer_norm(z: Tensor, w: Tensor, b: Optional[Tensor], eps: float) -> Tensor:
    """``(z − μ)·(mean((z − μ)²) + ε)^(−1/2)·w + b`` over the last dim (principal-branch rsqrt)."""
    zc = z - z.mean(-1, keepdim=True)
    y = zc * torch.rsqrt((zc * zc).mean(-1, keepdim=True) + eps) * w
    return y if b is None else y + b


def _gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _causal_exp(S: Tensor) -> Tensor:
    """exp(S − m) on the causal triangle (s ≤ t), exactly 0 above it; m = detached max of Re S."""
    T = S.shape[-1]
    mask = torch.ones(T, T, dtype=torch.bool, device=S.device).tril()
    m = torch.where(mask, S.real, torch.tensor(-math.inf, dtype=S.real.dtype, device=S.device))
    m = m.amax(-1, keepdim=True).detach()
    zero = torch.zeros((), dtype=S.dtype, device=S.device)
    return torch.where(mask, torch.exp(torch.where(mask, S - m, zero)), zero), m


def _causal_softmax(S: Tensor) -> Tensor:
    e, _ = _causal_exp(S)
    return e / e.sum(-1, keepdim=True)


def _causal_logsumexp(S: Tensor) -> Tensor:
    e, m = _causal_exp(S)
    return torch.log(e.sum(-1)) + m.squeeze(-1)


def _heads(a: Tensor, n_heads: int) -> Tensor:
    B, T, C = a.shape
    return a.reshape(B, T, n_heads, C // n_heads).transpose(1, 2)  # [B, T, C] -> [B, H, T, d]


def _rope(a: Tensor, base: float) -> Tensor:
    """Rotate-half RoPE on [B, H, T, d]: pair (i, i + d/2) at position t turned by t·base^(−2i/d)."""
    T, d = a.shape[-2], a.shape[-1]
    inv_freq = base ** (-torch.arange(0, d // 2, dtype=torch.float64, device=a.device) * (2.0 / d))
    ang = torch.outer(torch.arange(T, dtype=torch.float64, device=a.device), inv_freq)  # [T, d/2]
    ang = torch.cat([ang, ang], -1)  # [T, d]
    real = a.real.dtype if a.is_complex() else a.dtype
    cos, sin = ang.cos().to(real), ang.sin().to(real)
    a1, a2 = a.chunk(2, -1)
    return a * cos + torch.cat([-a2, a1], -1) * sin


def _qk(
    u: Tensor,
    p: Mapping[str, Tensor],
    which: str,
    n_heads: int,
    qk_norm: bool,
    rope: bool,
    rope_base: float,
    qk_eps: float,
) -> Tensor:
    a = _heads(u @ p[f"{which}_weight"].T + (p[f"{which}_bias"] if f"{which}_bias" in p else 0), n_heads)
    if qk_norm:  # RMS per head vector, learnable scale shared across heads
        a = a * torch.rsqrt((a * a).mean(-1, keepdim=True) + qk_eps) * p[f"{which}_norm_weight"]
    return _rope(a, rope_base) if rope else a


def energy(
    u: Tensor,
    p: Mapping[str, Tensor],
    *,
    n_heads: int,
    qk_norm: bool = True,
    rope: bool = False,
    rope_base: float = 10000.0,
    qk_eps: float = 1e-6,
) -> Tensor:
    """Attention energy ``E(u) = −Σ_h (γ_h/β) Σ_t log Σ_{s≤t} exp(β q_t^h·k_s^h)``, β = 1/√d.

    u: [B, T, C] (post-LN1); p: effective weights by name (``q_weight``, ``k_weight``, optional
    biases and ``*_norm_weight``, ``energy_gain`` [H]). Returns [B].
    """
    q = _qk(u, p, "q", n_heads, qk_norm, rope, rope_base, qk_eps)  # [B, H, T, d]
    k = _qk(u, p, "k", n_heads, qk_norm, rope, rope_base, qk_eps)
    beta = 1.0 / math.sqrt(q.shape[-1])
    lse = _causal_logsumexp(beta * q @ k.transpose(-1, -2))  # [B, H, T]
    return -(p["energy_gain"].view(1, -1, 1) * lse).sum((1, 2)) / beta


def attention(
    u: Tensor,
    p: Mapping[str, Tensor],
    *,
    n_heads: int,
    attention: str = "softmax",
    qk_norm: bool = True,
    rope: bool = False,
    rope_base: float = 10000.0,
    qk_eps: float = 1e-6,
) -> Tensor:
    """Attention branch at u = LN1(z), [B, T, C] -> [B, T, C]; energy mode is −∇_u E(u) by autograd."""
    if attention == "energy":
        with torch.enable_grad():
            uu = u if u.requires_grad else u.detach().requires_grad_(True)
            E = energy(uu, p, n_heads=n_heads, qk_norm=qk_norm, rope=rope, rope_base=rope_base, qk_eps=qk_eps)
            # autograd returns conj(∂E/∂u) for holomorphic E (Wirtinger form); conj back for the plain gradient
            (g,) = torch.autograd.grad(E, uu, torch.ones_like(E), create_graph=True)
        g = g.conj() if u.is_complex() else g
        return -g
    if attention != "softmax":
        raise ValueError(f'attention must be "softmax" or "energy", got {attention!r}')
    q = _qk(u, p, "q", n_heads, qk_norm, rope, rope_base, qk_eps)  # [B, H, T, d]
    k = _qk(u, p, "k", n_heads, qk_norm, rope, rope_base, qk_eps)
    v = _heads(u @ p["v_weight"].T + p.get("v_bias", 0), n_heads)
    P = _causal_softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))  # [B, H, T, T]
    o = (P @ v).transpose(1, 2).flatten(2)  # [B, H, T, d] -> [B, T, C]
    return o @ p["o_weight"].T + p.get("o_bias", 0)


def ffn(u: Tensor, p: Mapping[str, Tensor], *, ffn: str = "mlp") -> Tensor:
    """FFN branch: mlp ``W2 gelu_tanh(W1 u + b1) + b2`` or monotone ``tanh(W̃ u + b)``."""
    if ffn == "mlp":
        return _gelu_tanh(u @ p["ffn_in_weight"].T + p.get("ffn_in_bias", 0)) @ p["ffn_out_weight"].T + p.get(
            "ffn_out_bias", 0
        )
    if ffn == "monotone":
        return torch.tanh(u @ p["mono_W"].T + p.get("mono_bias", 0))
    raise ValueError(f'ffn must be "mlp" or "monotone", got {ffn!r}')


_attention_branch, _ffn_branch = attention, ffn  # block() takes options of the same names

# The spectrally normalized weights, by name, from the block's one parameter table (names only: the
# math here stays independent of the C++ core it checks).
_SPECTRAL = tuple(row["name"] for row in _C.block_param_table() if row["spectral"])


def effective_weights(
    params: Mapping[str, Tensor],
    *,
    spectral_rho: Optional[float] = None,
    sn_u: Optional[Mapping[str, Tensor]] = None,
    monotone_m: float = 0.1,
) -> dict:
    """The weights F uses, from raw parameters (docs/design.md §4, csrc/block/block.h):

    spectral: ``W / max(1, ‖Wᵀu‖/ρ)``; monotone: ``W̃ = c·((1−m)I − AᵀA + B − Bᵀ)`` with
    ``c = min(1, min(1−m, ρ)/β)``, ``β = max(1−m, ‖A‖_F² − (1−m)) + ‖B − Bᵀ‖_F``.
    """
    p = dict(params)
    if spectral_rho is not None:
        for name in _SPECTRAL:
            if name in p:
                sigma = torch.linalg.vector_norm(sn_u[name] @ p[name])
                p[name] = p[name] / torch.clamp(sigma / spectral_rho, min=1.0)
    if "mono_A" in p:
        A, B, m = p.pop("mono_A"), p.pop("mono_B"), monotone_m
        K = B - B.T
        W = (1 - m) * torch.eye(A.shape[0], dtype=A.dtype, device=A.device) - A.T @ A + K
        bound = torch.clamp((A * A).sum() - (1 - m), min=1 - m) + torch.linalg.vector_norm(K)
        cap = min(1 - m, spectral_rho) if spectral_rho is not None else 1 - m
        p["mono_W"] = W * torch.clamp(cap / bound, max=1.0)
    return p


def block(
    z: Tensor,
    x: Tensor,
    params: Mapping[str, Tensor],
    *,
    n_heads: int,
    coupling: str = "coupled",
    attention: str = "softmax",
    ffn: str = "mlp",
    qk_norm: bool = True,
    rope: bool = False,
    rope_base: float = 10000.0,
    spectral_rho: Optional[float] = None,
    sn_u: Optional[Mapping[str, Tensor]] = None,
    monotone_m: float = 0.1,
    ln_eps: float = 1e-5,
    qk_eps: float = 1e-6,
) -> Tensor:
    """F(z; x) of the equilibrium block, z, x: [B, T, C] (real or complex) -> [B, T, C].

    params: raw parameters by name (as ``EquilibriumBlock.named_parameters()``); biases are used
    when present. sn_u: power-iteration vectors by weight name when ``spectral_rho`` is set.
    """
    p = effective_weights(params, spectral_rho=spectral_rho, sn_u=sn_u, monotone_m=monotone_m)
    if z.is_complex():
        p = {k: v.to(z.dtype) for k, v in p.items()}
    attn_opts = dict(
        n_heads=n_heads, attention=attention, qk_norm=qk_norm, rope=rope, rope_base=rope_base, qk_eps=qk_eps
    )
    a = _attention_branch(layer_norm(z, p["ln1_weight"], p.get("ln1_bias"), ln_eps), p, **attn_opts)
    if coupling == "coupled":
        return x + a + _ffn_branch(layer_norm(z, p["ln2_weight"], p.get("ln2_bias"), ln_eps), p, ffn=ffn)
    if coupling == "sequential":
        h = x + a
        return h + _ffn_branch(layer_norm(h, p["ln2_weight"], p.get("ln2_bias"), ln_eps), p, ffn=ffn)
    raise ValueError(f'coupling must be "coupled" or "sequential", got {coupling!r}')
