"""Test-time-training layers (Sun et al. 2024, "Learning to (Learn at Test Time)"), docs/design.md §9.

The hidden state of a TTT layer is the weight θ of an inner model f, trained while the layer reads the
sequence. Per head h (head dim d = d_model / H; row vectors), with k_t = θ_K x_t, v_t = θ_V x_t,
q_t = θ_Q x_t and the inner model wrapped as f̃(u) = u + LN(f(u)) (a per-head LayerNorm with learnable
γ, β):

    ℓ_t(θ) = ½ ‖f̃(k_t; θ) − v_t‖²                                   self-supervised loss of token t
    θ_t    = θ_p − Σ_{s ≤ t in t's mini-batch} η_s ∇ℓ_s(θ_p)          mini-batch TTT, b tokens per step
    z_t    = f̃(q_t; θ_t)                                             the output (the update includes t)
    η_t    = (η_base / d) · sigmoid(w_η·x_t + b_η)                   learned per-token, per-head rate

θ_p is the weight at the end of the previous mini-batch; the first mini-batch starts from the learned
θ_0. ``linear``: f(u) = u W + b (W: d×d). ``mlp``: f(u) = gelu_tanh(u W1 + b1) W2 + b2 with hidden width
4d. The ½ in ℓ makes ∇ℓ the plain residual, and the 1/d scales the rate to the head size, as in the
paper's released code; η_base = 1 (linear) and 0.1 (MLP) are the paper's defaults. The layer's output is
``proj(concat_h z_t)``.

The update runs in C++ in the dual form (``torch.ops.eqprop.ttt_linear`` / ``ttt_mlp``: masked b×b
matmuls inside a mini-batch, weights written once per mini-batch); ``eqprop.reference.ttt`` is the
primal twin with explicit per-token weights. The inner loop always runs in float32 or wider (autocast is
switched off around it: a bf16 inner gradient step is not a gradient step).
"""

from __future__ import annotations

import torch
import torch.nn as nn

import eqprop  # noqa: F401  (loads eqprop._C, which registers torch.ops.eqprop.ttt_*)

__all__ = ["TTT_KINDS", "TTTLayer", "ttt_linear", "ttt_mlp"]

TTT_KINDS = ("linear", "mlp")
ETA_BASE = {"linear": 1.0, "mlp": 0.1}


def ttt_linear(q, k, v, eta, W, b, ln_weight, ln_bias, *, mini_batch: int = 16, eps: float = 1e-6) -> torch.Tensor:
    """TTT-Linear in the dual form (C++; autograd-capable). Equations in the module docstring.

    Args:
        q, k, v: ``[B, H, T, d]``; eta: ``[B, H, T]`` the per-token inner learning rates η_t.
        W: ``[H, d, d]``, b: ``[H, d]`` the initial inner weights θ_0; ln_weight, ln_bias: ``[H, d]``.
        mini_batch: b ≥ 1, tokens per inner gradient step (T need not be a multiple of b).
        eps: the inner LayerNorm's ε.

    Returns:
        z ``[B, H, T, d]``.

    Example: ``z = ttt_linear(q, k, v, eta, W0, b0, torch.ones(H, d), torch.zeros(H, d), mini_batch=16)``
    """
    return torch.ops.eqprop.ttt_linear(q, k, v, eta, W, b, ln_weight, ln_bias, mini_batch, eps)


def ttt_mlp(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, *, mini_batch: int = 16, eps: float = 1e-6):
    """TTT-MLP in the dual form (C++; autograd-capable): f(u) = gelu_tanh(u W1 + b1) W2 + b2.

    Args:
        q, k, v: ``[B, H, T, d]``; eta: ``[B, H, T]``.
        W1: ``[H, d, h]``, b1: ``[H, h]``, W2: ``[H, h, d]``, b2: ``[H, d]``; ln_weight, ln_bias: ``[H, d]``.

    Returns:
        z ``[B, H, T, d]``.

    Example: ``z = ttt_mlp(q, k, v, eta, W1, b1, W2, b2, g, beta, mini_batch=16)``
    """
    return torch.ops.eqprop.ttt_mlp(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, mini_batch, eps)


class TTTLayer(nn.Module):
    """A TTT layer as a drop-in sequence mixer: ``[B, T, C] -> [B, T, C]``, causal.

    Args:
        d_model: C (divisible by ``n_head``).
        n_head: H heads, each with its own inner model of width d = C / H.
        kind: ``"linear"`` (TTT-Linear) or ``"mlp"`` (TTT-MLP, hidden width ``mlp_ratio``·d).
        mini_batch: b, tokens per inner gradient step (default 16).
        eta_base: η_base (default 1.0 for linear, 0.1 for mlp).
        mlp_ratio: hidden width of the MLP inner model / d (default 4).
        eps: ε of the inner LayerNorm.

    Parameters: ``qkv`` (θ_Q, θ_K, θ_V stacked), ``lr`` (w_η, b_η: one rate per head), the initial inner
    weights (``W``, ``b`` or ``W1``, ``b1``, ``W2``, ``b2``, per head), ``ln_weight``, ``ln_bias`` (the
    inner LayerNorm) and ``proj`` (the output projection).

    Example: ``TTTLayer(64, 4, "linear")(torch.randn(2, 100, 64))  # [2, 100, 64]``
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        kind: str = "linear",
        *,
        mini_batch: int = 16,
        eta_base: float | None = None,
        mlp_ratio: int = 4,
        eps: float = 1e-6,
    ):
        super().__init__()
        if kind not in TTT_KINDS:
            raise ValueError(f"kind must be one of {TTT_KINDS}, got {kind!r}")
        if d_model < 1 or n_head < 1 or d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of n_head ({n_head})")
        if isinstance(mini_batch, bool) or not isinstance(mini_batch, int) or mini_batch < 1:
            raise ValueError(f"mini_batch must be an int >= 1, got {mini_batch!r}")
        eta_base = ETA_BASE[kind] if eta_base is None else float(eta_base)
        if not eta_base > 0:
            raise ValueError(f"eta_base must be > 0, got {eta_base}")
        H, d = n_head, d_model // n_head
        self.kind, self.n_head, self.head_dim, self.mini_batch = kind, H, d, mini_batch
        self.eta_base, self.eps = eta_base, eps
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.lr = nn.Linear(d_model, H)
        if kind == "linear":
            self.W = nn.Parameter(torch.randn(H, d, d) * 0.02)
            self.b = nn.Parameter(torch.zeros(H, d))
        else:
            hidden = mlp_ratio * d
            self.W1 = nn.Parameter(torch.randn(H, d, hidden) * 0.02)
            self.b1 = nn.Parameter(torch.zeros(H, hidden))
            self.W2 = nn.Parameter(torch.randn(H, hidden, d) * 0.02)
            self.b2 = nn.Parameter(torch.zeros(H, d))
        self.ln_weight = nn.Parameter(torch.ones(H, d))
        self.ln_bias = nn.Parameter(torch.zeros(H, d))
        self.proj = nn.Linear(d_model, d_model)

    def inner_weights(self) -> list[torch.Tensor]:
        """θ_0: ``[W, b]`` or ``[W1, b1, W2, b2]``."""
        return [self.W, self.b] if self.kind == "linear" else [self.W1, self.b1, self.W2, self.b2]

    def inner_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The arguments of ``ttt_linear`` / ``ttt_mlp`` for input ``x [B, T, C]``: q, k, v ``[B, H, T, d]``,
        η ``[B, H, T]``, θ_0, γ, β, in float32 or wider."""
        B, T, C = x.shape
        H, d = self.n_head, self.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, d]
        eta = (self.eta_base / d) * torch.sigmoid(self.lr(x)).transpose(1, 2)  # [B, H, T]
        dtype = torch.promote_types(x.dtype, torch.float32)
        return [a.to(dtype) for a in (q, k, v, eta, *self.inner_weights(), self.ln_weight, self.ln_bias)]

    def mix(self, x: torch.Tensor, fn) -> torch.Tensor:
        """``proj(concat_h fn(*inner_inputs(x)))``: the layer with another implementation of the inner loop
        (``fn`` takes ttt_linear's / ttt_mlp's arguments, e.g. the primal reference in a benchmark)."""
        B, T, C = x.shape
        with torch.autocast(x.device.type, enabled=False):
            z = fn(*self.inner_inputs(x), mini_batch=self.mini_batch, eps=self.eps)  # [B, H, T, d]
        return self.proj(z.to(x.dtype).transpose(1, 2).reshape(B, T, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, C] -> [B, T, C]``; output t depends on x_0..x_t only."""
        return self.mix(x, ttt_linear if self.kind == "linear" else ttt_mlp)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, n_head={self.n_head}, head_dim={self.head_dim}, mini_batch={self.mini_batch}, "
            f"eta_base={self.eta_base}"
        )
