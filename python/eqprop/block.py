"""The equilibrium transformer block and the equilibrium LM built on it (docs/design.md §4).

``EquilibriumBlock`` holds the parameters; its F(z; x) runs in the C++ core
(``eqprop._C.block_forward``), differentiable by ordinary autograd, real or complex (holomorphic).
``block.vector_field(x)`` hands the same F to the C++ engine (solvers, estimators, diagnostics)
with no Python in the loop.

``EquilibriumLM`` is embedding -> injection x -> fixed point z* = F(z*; x) -> final LayerNorm ->
head, trained with ordinary autograd through ``eqprop.fixed_point``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import _C
from .models.interface import next_token_nll
from .solvers import fixed_point

__all__ = ["EquilibriumBlock", "EquilibriumLM"]


def _int_arg(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float_arg(name: str, value, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0) or (nonneg and value < 0):
        need = "> 0" if positive else ">= 0" if nonneg else "finite"
        raise ValueError(f"{name} must be a finite number {need}, got {value}")
    return value


class EquilibriumBlock(nn.Module):
    """One equilibrium transformer block F(z; x) (docs/design.md §4), computed by the C++ core.

        coupled     F(z; x) = x + Attn(LN1(z)) + FFN(LN2(z))
        sequential  F(z; x) = h + FFN(LN2(h)),   h = x + Attn(LN1(z))

    Args:
        d_model: width C; n_heads: H (C divisible by H).
        mlp_ratio: hidden width of the mlp FFN is ``round(C * mlp_ratio)``; unused by ``monotone``.
        coupling: ``"coupled"`` or ``"sequential"``.
        qk_norm: RMS-normalize q and k per head, with a learnable scale [d] shared across heads.
        bias: biases in every linear map and LayerNorm.
        resinit: output projections (``o_weight``, ``ffn_out_weight``) start at ``resinit`` times
            the N(0, 1/fan_in) scale; the energy gain γ starts at ``resinit``.
        attention: ``"softmax"`` (causal multi-head) or ``"energy"``: the update is −∇_u E(u) with
            ``E(u) = −Σ_h (γ_h/β) Σ_t log Σ_{s≤t} exp(β q_t·k_s)``, β = 1/√d, q = W_Q u, k = W_K u
            (tied: no value or output projection), so its Jacobian in u = LN1(z) is the symmetric
            −∇²E. A symmetric Jacobian cannot be causal (a symmetric block-lower-triangular matrix
            is block-diagonal): the sum over s ≤ t is causal inside E, but ∂E/∂k_s carries
            queries t > s back to token s. Use it for Jacobian-symmetry studies, not for causal LMs.
        ffn: ``"mlp"`` (Linear–GELU(tanh)–Linear) or ``"monotone"``: ``tanh(W̃ u + b)``,
            ``W̃ = c·((1−m)I − AᵀA + B − Bᵀ)`` with c ≤ 1 chosen from the bound
            ``‖W‖₂ ≤ max(1−m, ‖A‖_F² − (1−m)) + ‖B − Bᵀ‖_F`` so that ``‖W̃‖₂ ≤ 1 − m``: the branch is
            a contraction in its input (tanh is 1-Lipschitz on reals) and I − W̃ ⪰ m I.
        spectral_rho: if set, the attention / mlp weights are used as ``W / max(1, σ/ρ)``, σ = ‖Wᵀu‖
            with u from power iteration (updated off-graph on every training-mode forward and
            ``vector_field`` call, as ``torch.nn.utils.spectral_norm`` does); the monotone W̃ is
            capped at min(1 − m, ρ).
        rope: rotate q and k by their positions 0..T−1 (rotate-half RoPE, ``rope_base``) inside
            attention; the block then needs no positional term in x (``EquilibriumLM(pos_enc="rope")``).
        monotone_m: the margin m of the monotone FFN. ln_eps, qk_eps: LayerNorm / qk-norm ε.
        attn_kernel: ``"auto"`` (SDPA for real input when autograd is off) or ``"math"``.
        device, dtype: of the parameters (real floating dtype).

    ``block(z, x)``: z, x [B, T, C] -> F(z; x) [B, T, C]. Real input needs the parameters' dtype;
    complex input (complex64 with float32 parameters, complex128 with float64) runs the holomorphic
    extension.

    Hooks: ``register_forward_hook`` / ``register_forward_pre_hook`` fire on ``block(z, x)`` only.
    ``eqprop.relax``, ``eqprop.fixed_point``, the estimators and the diagnostics run F through
    ``block.vector_field(x)`` in the C++ loop, which never calls ``forward``, so hooks do not fire
    there (and ``register_full_backward_hook`` does not see the implicit backward). What works:
    the per-step residuals of every relaxation are in the returned ``RelaxInfo``
    (``info.trace_rel`` / ``info.trace_abs`` [T, B], ``info.steps``, ``info.status``; the adjoint
    solve's in ``info.backward``); to look at activations, call the block (and its hooks) once on
    the returned fixed point, ``block(z_star, x)``, or evaluate the native field there,
    ``block.vector_field(x).eval(z_star)``.

    Example: ``blk = EquilibriumBlock(64, 4); Fz = blk(torch.zeros(2, 10, 64), x)``
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        mlp_ratio: float = 4,
        coupling: str = "coupled",
        qk_norm: bool = True,
        bias: bool = False,
        resinit: float = 0.1,
        attention: str = "softmax",
        ffn: str = "mlp",
        spectral_rho: Optional[float] = None,
        rope: bool = False,
        rope_base: float = 10000.0,
        monotone_m: float = 0.1,
        ln_eps: float = 1e-5,
        qk_eps: float = 1e-6,
        attn_kernel: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        d_model, n_heads = _int_arg("d_model", d_model), _int_arg("n_heads", n_heads)
        mlp_ratio = _float_arg("mlp_ratio", mlp_ratio, positive=True)
        self.resinit = _float_arg("resinit", resinit, nonneg=True)
        for name, value in (
            ("coupling", coupling),
            ("attention", attention),
            ("ffn", ffn),
            ("attn_kernel", attn_kernel),
        ):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")
        if spectral_rho is not None:
            spectral_rho = _float_arg("spectral_rho", spectral_rho, positive=True)
        self.config = _C.BlockConfig(
            d_model=d_model,
            n_heads=n_heads,
            d_ff=max(1, round(d_model * mlp_ratio)),
            coupling=coupling,
            attention=attention,
            ffn=ffn,
            qk_norm=bool(qk_norm),
            bias=bool(bias),
            rope=bool(rope),
            rope_base=float(rope_base),
            spectral_rho=spectral_rho,
            monotone_m=float(monotone_m),
            ln_eps=float(ln_eps),
            qk_eps=float(qk_eps),
            attn_kernel=attn_kernel,
        )
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be a real floating dtype (float32/float64/bfloat16/float16), got {dtype}")
        self._specs = [(name, tuple(shape), spectral) for name, shape, spectral in _C.block_param_specs(self.config)]
        for name, shape, spectral in self._specs:
            self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
            if spectral:
                self.register_buffer(f"{name}_sn_u", torch.empty(shape[0], device=device, dtype=dtype))
        self.reset_parameters()

    # ---- parameters ---------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialize: LayerNorm / qk-norm scales 1, biases 0, weights N(0, 1/fan_in), output
        projections (``o_weight``, ``ffn_out_weight``) and the energy gain scaled by ``resinit``,
        monotone A, B ~ N(0, 1/C²); power iteration run to convergence (50 steps)."""
        C = self.config.d_model
        init = {row["name"]: row["init"] for row in _C.block_param_table()}  # the C++ parameter table
        for name, shape, spectral in self._specs:
            p = getattr(self, name)
            rule = init[name]
            if rule == "zero":
                p.zero_()
            elif rule == "one":
                p.fill_(1.0)
            elif rule == "resinit":
                p.fill_(self.resinit)
            elif rule == "monotone":
                p.normal_(0.0, 1.0 / C)
            elif rule in ("fan_in", "fan_in_resinit"):
                scale = self.resinit if rule == "fan_in_resinit" else 1.0
                p.normal_(0.0, scale / math.sqrt(shape[1]))
            else:
                raise NotImplementedError(f"no init rule {rule!r} (parameter {name})")
            if spectral:
                u = getattr(self, f"{name}_sn_u")
                u.normal_()
                u.div_(u.norm().clamp_min(1e-12))
        self.update_spectral_norm(50)

    def param_list(self) -> list[Tensor]:
        """The raw parameters in the core's order (``eqprop._C.block_param_specs``)."""
        return [getattr(self, name) for name, _, _ in self._specs]

    def param_names(self) -> list[str]:
        return [name for name, _, _ in self._specs]

    def sn_u_list(self) -> list[Tensor]:
        """Power-iteration vectors of the spectrally normalized weights (empty without spectral_rho)."""
        return [getattr(self, f"{name}_sn_u") for name, _, spectral in self._specs if spectral]

    def sn_u_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"{name}_sn_u") for name, _, spectral in self._specs if spectral}

    @torch.no_grad()
    def update_spectral_norm(self, n_iter: int = 1) -> None:
        """Run ``n_iter`` power-iteration steps on every spectrally normalized weight (off-graph)."""
        if self.config.spectral_rho is not None:
            _C.block_power_iteration_(self.config, self.param_list(), self.sn_u_list(), _int_arg("n_iter", n_iter, 0))

    def effective_weights(self) -> dict[str, Tensor]:
        """The weights F uses (spectral normalization applied; monotone W̃ as ``mono_W``), on the graph."""
        return _C.block_effective_weights(self.config, self.param_list(), self.sn_u_list())

    # ---- F ------------------------------------------------------------------------------------
    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """F(z; x): z, x [B, T, C] (real with the parameters' dtype, or complex) -> [B, T, C]."""
        if self.training and torch.is_grad_enabled():
            self.update_spectral_norm(1)
        return _C.block_forward(self.config, self.param_list(), self.sn_u_list(), z, x)

    def vector_field(self, x: Tensor):
        """F(·; x) as a native C++ vector field (``eqprop._C.BlockField``) for the engine's solvers,
        estimators and diagnostics: eval / vjp / jvp / param_vjp run with no Python in the loop.

        x: [B, T, C] (real with the parameters' dtype, or complex), finite; it is checked once here.
        In training mode one power-iteration step refreshes the spectral vectors first.

        Example: ``f = blk.vector_field(x); r = f.eval(z) - z``
        """
        if self.training and self.config.spectral_rho is not None:
            self.update_spectral_norm(1)
        return _C.block_field(self.config, self.param_list(), self.sn_u_list(), x)

    def _reference_options(self) -> dict:
        """Keyword arguments of ``eqprop.reference.block.block`` that describe this block."""
        c = self.config
        return dict(
            n_heads=c.n_heads,
            coupling=c.coupling,
            attention=c.attention,
            ffn=c.ffn,
            qk_norm=c.qk_norm,
            rope=c.rope,
            rope_base=c.rope_base,
            spectral_rho=c.spectral_rho,
            sn_u=self.sn_u_dict(),
            monotone_m=c.monotone_m,
            ln_eps=c.ln_eps,
            qk_eps=c.qk_eps,
        )

    def extra_repr(self) -> str:
        return repr(self.config)


def _sinusoidal(max_len: int, d_model: int) -> Tensor:
    """The Transformer's fixed table: PE[t, 2i] = sin(t/10000^(2i/C)), PE[t, 2i+1] = cos(·). [L, C]."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv)
    pe[:, 1::2] = torch.cos(pos * inv)[:, : d_model // 2]
    return pe


class EquilibriumLM(nn.Module):
    """A causal language model whose body is one equilibrium block iterated to its fixed point.

        x = E[tokens] + P[positions]         injection, computed once    [B, L, C]
        z* = F(z*; x)                        eqprop.fixed_point(block, x, **fixed_point_options)
        logits = head(LayerNorm(z*))                                     [B, L, V]

    Constructor names, ``forward`` and ``token_nll`` follow the models' shared interface
    (``eqprop.models.interface``), so the trainers take it in place of ``eqprop.models.Transformer``.

    Args:
        vocab_size: V; d_model, n_head: the block's width and heads.
        max_len: longest sequence (size of the learned / sinusoidal position table).
        pos_enc: ``"learned"`` (a [max_len, C] embedding added to x), ``"sinusoidal"`` (the fixed
            Transformer table added to x) or ``"rope"``: nothing is added to x; q and k are rotated
            by their positions inside the block's attention at every iteration (``rope=True``), so
            positions enter through the attention scores only, as in a rope transformer layer.
        fixed_point: options for ``eqprop.fixed_point`` (solver, tolerances, ``backward``), kept
            as ``fixed_point_options``; default ``dict(max_steps=30, tol=1e-4)``.
        **block_kwargs: ``EquilibriumBlock`` options (mlp_ratio, coupling, qk_norm, bias, resinit,
            ffn, spectral_rho, ...). ``attention="energy"`` is refused: its update is not causal
            (see ``EquilibriumBlock``), so next-token training would read the future.

    ``lm(tokens)`` -> logits [B, L, V]; ``lm.loss(tokens)`` -> mean next-token cross-entropy (nats)
    over positions 1..L−1; ``lm.token_nll(tokens)`` -> [B, L], the NLL of each x_t given x_<t
    (column 0, which nothing predicts, is ln V), the layout ``eqprop.markov.gap_pct`` takes.

    Stability: with the implicit backward, training pushes the block toward non-contraction unless
    it is constrained. On Markov k = 1 (C = 32, H = 2, AdamW lr 1e-2) ``spectral_rho=1.0`` kept the
    relaxation converging in ~9 steps throughout, while without it the residual reached ~1 within
    25 steps and the loss went back to ln 2; start from ``spectral_rho=1.0``.

    Non-convergence: ``fixed_point_options`` may set ``on_nonconvergence`` ("warn" by default:
    one ``eqprop.NonConvergenceWarning`` per forward, and per backward, that ends above tol);
    ``self.last_info`` keeps the per-sample status. Forward hooks on ``self.block`` do not fire
    inside the relaxation (see ``EquilibriumBlock``).

    Example: ``lm = EquilibriumLM(2, 32, 2, max_len=200, pos_enc="rope", spectral_rho=1.0);
    lm.loss(eqprop.markov.sample(16, 1)).backward()``
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_head: int,
        *,
        max_len: int,
        pos_enc: str = "learned",
        fixed_point: Optional[dict] = None,
        **block_kwargs,
    ):
        super().__init__()
        self.vocab_size = _int_arg("vocab_size", vocab_size, 2)
        self.max_len = _int_arg("max_len", max_len)
        d_model = _int_arg("d_model", d_model)
        if pos_enc not in ("learned", "sinusoidal", "rope"):
            raise ValueError(f'pos_enc must be one of "learned", "sinusoidal", "rope"; got {pos_enc!r}')
        if "rope" in block_kwargs:
            raise TypeError('EquilibriumLM sets the block\'s rope option from pos_enc; pass pos_enc="rope" instead')
        if block_kwargs.get("attention", "softmax") == "energy":
            raise ValueError(
                'attention="energy" is not causal (its symmetric Jacobian sends information from later '
                'tokens back to earlier ones), so an LM trained on it reads the future; use "softmax"'
            )
        self.pos_enc = pos_enc
        dtype = block_kwargs.get("dtype")
        device = block_kwargs.get("device")
        self.tok_emb = nn.Embedding(self.vocab_size, d_model, device=device, dtype=dtype)
        if pos_enc == "learned":
            self.pos_emb = nn.Embedding(self.max_len, d_model, device=device, dtype=dtype)
        elif pos_enc == "sinusoidal":
            pe = _sinusoidal(self.max_len, d_model).to(device=device, dtype=dtype or torch.get_default_dtype())
            self.register_buffer("pos_table", pe, persistent=False)
        self.block = EquilibriumBlock(d_model, n_head, rope=(pos_enc == "rope"), **block_kwargs)
        self.ln_f = nn.LayerNorm(d_model, device=device, dtype=dtype)
        self.head = nn.Linear(d_model, self.vocab_size, bias=False, device=device, dtype=dtype)
        self.fixed_point_options = dict(max_steps=30, tol=1e-4) if fixed_point is None else dict(fixed_point)
        if "return_info" in self.fixed_point_options:
            raise TypeError("fixed_point options must not set return_info (the LM keeps the info in last_info)")
        self.last_info = None

    def inject(self, tokens: Tensor) -> Tensor:
        """The injection x = E[tokens] (+ positions): tokens [B, L] int64 -> [B, L, C]."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            got = (
                f"{tokens.dtype} of shape {tuple(tokens.shape)}"
                if isinstance(tokens, Tensor)
                else type(tokens).__name__
            )
            raise ValueError(f"tokens must be an int64 tensor [B, L], got {got}")
        L = tokens.shape[1]
        if not 1 <= L <= self.max_len:
            raise ValueError(f"tokens must have 1 <= L <= max_len={self.max_len} positions, got L={L}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(
                f"tokens must lie in [0, vocab_size={self.vocab_size}), got values in "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )
        x = self.tok_emb(tokens)
        if self.pos_enc == "learned":
            x = x + self.pos_emb.weight[:L]
        elif self.pos_enc == "sinusoidal":
            x = x + self.pos_table[:L]
        return x

    def equilibrium(self, x: Tensor) -> Tensor:
        """z* = F(z*; x) on the autograd graph, x [B, L, C] -> [B, L, C].

        Runs ``eqprop.fixed_point(self.block, x, **self.fixed_point_options)`` on the block's native
        field; its ``RelaxInfo`` (per-sample steps, residuals, status) is kept in ``self.last_info``.
        """
        z, self.last_info = fixed_point(self.block, x, return_info=True, **self.fixed_point_options)
        return z

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits [B, L, V]: position t predicts x_{t+1} from x_≤t."""
        return self.head(self.ln_f(self.equilibrium(self.inject(tokens))))

    def token_nll(self, tokens: Tensor) -> Tensor:
        """NLL of every token given its prefix, [B, L] (nats); column 0 is ln V."""
        return next_token_nll(self.forward(tokens), tokens)

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats) over positions 1..L−1 (needs L >= 2)."""
        if isinstance(tokens, Tensor) and tokens.dim() == 2 and tokens.shape[1] < 2:
            raise ValueError(f"loss needs sequences of L >= 2 tokens, got L={tokens.shape[1]}")
        logits = self.forward(tokens)[:, :-1]  # [B, L-1, V]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/half: CE in float32
        return nn.functional.cross_entropy(logits.reshape(-1, self.vocab_size), tokens[:, 1:].reshape(-1))
