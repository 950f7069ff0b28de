"""TTT-Linear and TTT-MLP in the primal form: explicit per-token weights, loops (docs/design.md §9).

The plain twin of ``torch.ops.eqprop.ttt_linear`` / ``ttt_mlp`` (csrc/ttt, dual form): tests check the
two agree, benchmarks measure the dual form against this. Per head (row vectors, head dim d), inner model
f(·; θ) wrapped as f̃(u) = u + LN(f(u)) (per-head LayerNorm γ, β over d):

    ℓ_s(θ) = ½ ‖f̃(k_s) − v_s‖²
    θ_t    = θ_p − Σ_{s ≤ t in t's mini-batch} η_s ∇ℓ_s(θ_p)      (θ_p: end of the previous mini-batch)
    z_t    = f̃(q_t; θ_t)

Here every token's weights θ_t are materialized, and every gradient is written out with the chain rule,
one token at a time.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ttt_linear", "ttt_mlp", "gelu_tanh", "gelu_tanh_grad"]

_C = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5·x·(1 + tanh(√(2/π)(x + 0.044715 x³))). Example: ``gelu_tanh(torch.zeros(3))  # zeros``"""
    return 0.5 * x * (1.0 + torch.tanh(_C * (x + 0.044715 * x**3)))


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d gelu_tanh / dx = ½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715 x²), u = √(2/π)(x + 0.044715 x³).

    Example: ``gelu_tanh_grad(torch.zeros(1))  # 0.5``
    """
    t = torch.tanh(_C * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _C * (1.0 + 3 * 0.044715 * x * x)


def _ln(z, gamma, beta, eps):
    """LN(z)·γ + β over the last dim, and the pieces its backward needs (x̂, r = (σ² + ε)^(−1/2))."""
    zc = z - z.mean(-1, keepdim=True)
    r = ((zc * zc).mean(-1, keepdim=True) + eps).rsqrt()
    xh = zc * r
    return xh * gamma + beta, xh, r


def _ln_l2_grad(z, target, gamma, beta, eps):
    """∂/∂z of ½‖LN(z)·γ + β − target‖²."""
    y, xh, r = _ln(z, gamma, beta, eps)
    g = (y - target) * gamma  # ∂ℓ/∂x̂
    d = z.shape[-1]
    # x̂ = (z − μ)·r:  ∂ℓ/∂z = r·(g − Σg/d − x̂·Σ(g x̂)/d)
    return r * (g - g.sum(-1, keepdim=True) / d - xh * (g * xh).sum(-1, keepdim=True) / d)


def _check(q, k, v, eta, mini_batch):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape or eta.shape != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be [B, H, T, d] and eta [B, H, T]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}, {tuple(eta.shape)}"
        )
    if mini_batch < 1:
        raise ValueError(f"mini_batch must be >= 1, got {mini_batch}")


def ttt_linear(q, k, v, eta, W, b, ln_weight, ln_bias, mini_batch: int = 16, eps: float = 1e-6) -> torch.Tensor:
    """TTT-Linear, primal form: f(u) = u W + b with one weight matrix per token.

    Args:
        q, k, v: ``[B, H, T, d]``; eta: ``[B, H, T]`` per-token inner learning rates.
        W: ``[H, d, d]``, b: ``[H, d]`` initial inner weights; ln_weight, ln_bias: ``[H, d]``.
        mini_batch: b, tokens per inner gradient step.

    Returns:
        ``[B, H, T, d]``.

    Example: ``z = ttt_linear(q, k, v, eta, W0, b0, g, beta, mini_batch=16)``
    """
    _check(q, k, v, eta, mini_batch)
    B, H, T, d = q.shape
    gamma, beta = ln_weight[:, None, :], ln_bias[:, None, :]  # [H, 1, d]: broadcast over [B, H, 1, d]
    Wp = W.expand(B, H, d, d)  # θ_p
    bp = b.expand(B, H, d)
    qs, ks, targets, etas = q.unbind(2), k.unbind(2), (v - k).unbind(2), eta.unbind(2)  # per token
    out = []
    for start in range(0, T, mini_batch):
        Wt, bt = Wp, bp  # θ_t, updated one token at a time
        for t in range(start, min(start + mini_batch, T)):
            kt, qt = ks[t], qs[t]  # [B, H, d]
            z = (kt[:, :, None, :] @ Wp)[:, :, 0] + bp  # f(k_t) at θ_p
            g = _ln_l2_grad(z[:, :, None], targets[t][:, :, None], gamma, beta, eps)[:, :, 0]  # [B, H, d]
            e = etas[t][:, :, None]
            Wt = Wt - e[..., None] * (kt[..., :, None] * g[..., None, :])  # ∇_W ℓ_t = k_tᵀ g_t
            bt = bt - e * g
            zq = (qt[:, :, None, :] @ Wt)[:, :, 0] + bt
            out.append(qt + _ln(zq[:, :, None], gamma, beta, eps)[0][:, :, 0])
        Wp, bp = Wt, bt
    return torch.stack(out, 2)


def ttt_mlp(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, mini_batch: int = 16, eps: float = 1e-6):
    """TTT-MLP, primal form: f(u) = gelu_tanh(u W1 + b1) W2 + b2 with one set of weights per token.

    Args:
        q, k, v: ``[B, H, T, d]``; eta: ``[B, H, T]``.
        W1: ``[H, d, h]``, b1: ``[H, h]``, W2: ``[H, h, d]``, b2: ``[H, d]``; ln_weight, ln_bias: ``[H, d]``.

    Returns:
        ``[B, H, T, d]``.

    Example: ``z = ttt_mlp(q, k, v, eta, W1, b1, W2, b2, g, beta, mini_batch=16)``
    """
    _check(q, k, v, eta, mini_batch)
    B, H, T, d = q.shape
    h = W1.shape[-1]
    gamma, beta = ln_weight[:, None, :], ln_bias[:, None, :]
    P = [W1.expand(B, H, d, h), b1.expand(B, H, h), W2.expand(B, H, h, d), b2.expand(B, H, d)]

    def mlp(u, w1, c1, w2, c2):  # u [B, H, d] -> (z1, x2, z2)
        z1 = (u[:, :, None, :] @ w1)[:, :, 0] + c1
        x2 = gelu_tanh(z1)
        return z1, x2, (x2[:, :, None, :] @ w2)[:, :, 0] + c2

    qs, ks, targets, etas = q.unbind(2), k.unbind(2), (v - k).unbind(2), eta.unbind(2)  # per token
    out = []
    for start in range(0, T, mini_batch):
        cur = list(P)
        for t in range(start, min(start + mini_batch, T)):
            kt, qt = ks[t], qs[t]
            z1, x2, z2 = mlp(kt, *P)  # at θ_p
            g2 = _ln_l2_grad(z2[:, :, None], targets[t][:, :, None], gamma, beta, eps)[:, :, 0]  # ∂ℓ/∂z2
            g1 = (g2[:, :, None, :] @ P[2].transpose(-1, -2))[:, :, 0] * gelu_tanh_grad(z1)  # ∂ℓ/∂z1
            e = etas[t][:, :, None]
            grads = [kt[..., :, None] * g1[..., None, :], g1, x2[..., :, None] * g2[..., None, :], g2]
            cur = [
                p - (e[..., None] if p.dim() == 4 else e) * gr  # θ_t = θ_{t−1} − η_t ∇ℓ_t(θ_p)
                for p, gr in zip(cur, grads)
            ]
            zq = mlp(qt, *cur)[2]
            out.append(qt + _ln(zq[:, :, None], gamma, beta, eps)[0][:, :, 0])
        P = cur
    return torch.stack(out, 2)
