"""A GPT-style decoder-only transformer (pre-LN) for next-token prediction, the Markov-k baseline.

Attention goes through ``F.scaled_dot_product_attention``, so on a GPU the flash / memory-efficient
kernels run whenever the mask allows (every positional encoding but ``alibi``, which needs an additive
``[H, L, L]`` bias and therefore the math or memory-efficient kernel).

It follows the models' shared interface (``eqprop.models.interface``): ``forward`` returns logits
``[B, L, V]`` with ``logits[:, t]`` predicting ``x_{t+1}``; ``token_nll(tokens)`` returns ``[B, L]`` with
``nll[:, t] = -ln p(x_t | x_<t)`` and ``nll[:, 0] = ln V`` (the layout ``eqprop.markov.gap_pct`` scores).
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import sliding_window_attention
from .interface import next_token_nll
from .ttt import TTTLayer

POS_ENCODINGS = ("learned", "sinusoidal", "rope", "alibi", "none")
#: The sequence-mixing layer of every block (docs/design.md §9); the rest of the model is the same for all.
ATTENTIONS = ("full", "sliding", "ttt_linear", "ttt_mlp")


def sinusoidal_table(seq_len: int, dim: int, *, base: float = 10000.0, device=None) -> torch.Tensor:
    """Fixed sinusoidal position table of Vaswani et al. (2017).

    ``PE[p, 2i] = sin(p / base^(2i/dim))``, ``PE[p, 2i+1] = cos(p / base^(2i/dim))``.

    Returns:
        ``[seq_len, dim]`` float32 (``dim`` must be even).

    Example: ``sinusoidal_table(400, 64)[1, 0]  # sin(1)``
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even d_model, got {dim}")
    pos = torch.arange(seq_len, dtype=torch.float64, device=device)[:, None]  # [L, 1]
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)  # [dim/2]
    angle = pos * inv_freq  # [L, dim/2]
    table = torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(seq_len, dim)  # interleave sin, cos
    return table.float()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, *, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021), half-split (GPT-NeoX) pairing.

    Channel ``i`` is paired with ``i + d/2`` and the pair is rotated by angle ``p * base^(-2i/d)``,
    so ``<rope(q, m), rope(k, n)>`` depends on ``m - n`` only.

    Args:
        x: ``[..., L, d]`` with ``d`` even (queries or keys per head).
        positions: ``[L]`` integer or float positions.

    Returns:
        ``[..., L, d]``, same dtype as ``x``.

    Example: ``q = apply_rope(q, torch.arange(L))  # q: [B, H, L, d]``
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rope needs an even head dimension, got {d}")
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)  # [d/2]
    angle = positions.to(device=x.device, dtype=torch.float32)[:, None] * inv_freq  # [L, d/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): ``2^(-8h/H)``, h = 1..H, for H a power of two;
    otherwise the slopes of the nearest lower power of two plus every other slope of the next one.

    Returns:
        ``[n_head]`` float32. Example: ``alibi_slopes(4)  # [1/4, 1/16, 1/64, 1/256]``
    """

    def power_of_two(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    m = 2 ** int(math.floor(math.log2(n_head)))
    slopes = power_of_two(m) + power_of_two(2 * m)[0::2][: n_head - m]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(n_head: int, seq_len: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Causal ALiBi attention bias: ``-slope_h * (i - j)`` for key ``j <= i``, ``-inf`` for ``j > i``.

    Returns:
        ``[n_head, L, L]`` additive float mask for ``scaled_dot_product_attention``.

    Example: ``alibi_bias(4, 3)[0]  # [[0, -inf, -inf], [-1/4, 0, -inf], [-1/2, -1/4, 0]]``
    """
    i = torch.arange(seq_len, device=device)
    dist = (i[:, None] - i[None, :]).float()  # [L, L], query minus key
    bias = -alibi_slopes(n_head).to(device)[:, None, None] * dist  # [H, L, L]
    bias = bias.masked_fill(dist < 0, float("-inf"))
    return bias.to(dtype)


class CausalSelfAttention(nn.Module):
    """Causal softmax attention; ``window`` (``attention="sliding"``) restricts query t to the keys
    ``t − window < s ≤ t`` (``eqprop.models.attention``, O(T·window) memory)."""

    def __init__(self, d_model: int, n_head: int, pos_enc: str, rope_base: float, window: int | None = None):
        super().__init__()
        self.n_head, self.pos_enc, self.rope_base, self.window = n_head, pos_enc, rope_base, window
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, d]
        if self.pos_enc == "rope":
            pos = torch.arange(L, device=x.device)
            q, k = apply_rope(q, pos, base=self.rope_base), apply_rope(k, pos, base=self.rope_base)
        if self.window is not None:
            slopes = alibi_slopes(self.n_head).to(x.device) if self.pos_enc == "alibi" else None
            y = sliding_window_attention(q, k, v, self.window, alibi_slopes=slopes)
        elif self.pos_enc == "alibi":
            bias = alibi_bias(self.n_head, L, device=x.device, dtype=q.dtype)  # [H, L, L]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, L, d]
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    """Pre-LN block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        mlp_ratio: float,
        pos_enc: str,
        rope_base: float,
        attention: str = "full",
        window: int | None = None,
        ttt_batch: int = 16,
    ):
        super().__init__()
        hidden = int(round(mlp_ratio * d_model))
        self.ln1 = nn.LayerNorm(d_model)
        if attention == "full":
            self.attn = CausalSelfAttention(d_model, n_head, pos_enc, rope_base)
        elif attention == "sliding":
            self.attn = CausalSelfAttention(d_model, n_head, pos_enc, rope_base, window=window)
        else:
            self.attn = _ttt_layer(attention, d_model, n_head, ttt_batch)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _ttt_layer(attention: str, d_model: int, n_head: int, ttt_batch: int) -> nn.Module:
    # ttt_linear -> TTTLayer(kind="linear"), ttt_mlp -> kind="mlp"; its output projection is named
    # `proj` like attention's, so the GPT-2 residual scaling below applies to it too
    return TTTLayer(d_model, n_head, attention.removeprefix("ttt_"), mini_batch=ttt_batch)


class Transformer(nn.Module):
    """GPT-style decoder-only transformer (pre-LN) for next-token prediction.

    Args:
        vocab_size: V.
        n_layer, n_head, d_model: depth, heads, width (``d_model`` divisible by ``n_head``).
        mlp_ratio: MLP hidden width / ``d_model``.
        max_len: longest sequence for ``pos_enc="learned"`` (the other encodings take any length).
        pos_enc: ``learned`` | ``sinusoidal`` (added to the token embedding), ``rope`` (rotates q, k),
            ``alibi`` (additive attention bias) or ``none`` (causal mask only).
        grad_checkpointing: recompute each block in the backward pass (activation memory O(1 block)).
        rope_base: base of the rope / sinusoidal frequencies.
        attention: the sequence-mixing layer of every block (docs/design.md §9), the only thing that
            differs between the architectures: ``full`` (causal softmax attention), ``sliding``
            (query t sees keys ``t − window < s ≤ t``, O(L·window) memory), ``ttt_linear`` /
            ``ttt_mlp`` (a test-time-training layer whose state is a linear / 2-layer MLP inner
            model, updated once per mini-batch of ``ttt_batch`` tokens).
        window: W of ``attention="sliding"`` (required there; ignored by the other layers, so one
            config can name the training window for every architecture).
        ttt_batch: inner mini-batch size b of the TTT layers (default 16).

    Length generalization (training on W tokens, evaluating on 20·W) needs positions that mean
    something beyond the training length: ``rope``, ``alibi`` or ``none``. ``learned`` cannot go past
    ``max_len`` and ``sinusoidal`` adds vectors the model never saw in training. The TTT layers apply no
    ``rope`` / ``alibi`` of their own (their recurrence is ordered); docs/layers.md has the details.

    ``forward(tokens [B, L] int64) -> logits [B, L, V]``; ``token_nll(tokens) -> [B, L]`` float32 (see the
    module docstring for the convention). Under ``torch.autocast(dtype=torch.bfloat16)`` the blocks run
    in bf16 and the NLL is computed from float32 logits.

    Example: ``Transformer(2, n_layer=2, n_head=4, d_model=64).token_nll(x)[:, k:].mean()``
    """

    def __init__(
        self,
        vocab_size: int = 2,
        *,
        n_layer: int = 2,
        n_head: int = 4,
        d_model: int = 64,
        mlp_ratio: float = 4.0,
        max_len: int = 400,
        pos_enc: str = "learned",
        grad_checkpointing: bool = False,
        rope_base: float = 10000.0,
        attention: str = "full",
        window: int | None = None,
        ttt_batch: int = 16,
    ):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if attention == "sliding":
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise ValueError(f"window must be an int >= 1 for attention='sliding', got {window!r}")
        if isinstance(ttt_batch, bool) or not isinstance(ttt_batch, int) or ttt_batch < 1:
            raise ValueError(f"ttt_batch must be an int >= 1, got {ttt_batch!r}")
        if pos_enc not in POS_ENCODINGS:
            raise ValueError(f"pos_enc must be one of {POS_ENCODINGS}, got {pos_enc!r}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if n_layer < 1 or n_head < 1 or d_model < 1:
            raise ValueError(f"n_layer, n_head, d_model must be >= 1, got {n_layer}, {n_head}, {d_model}")
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        if pos_enc == "rope" and (d_model // n_head) % 2:
            raise ValueError(f"rope needs an even head dimension, got d_model/n_head = {d_model // n_head}")
        if pos_enc == "sinusoidal" and d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {d_model}")
        self.config = dict(
            vocab_size=vocab_size,
            n_layer=n_layer,
            n_head=n_head,
            d_model=d_model,
            mlp_ratio=mlp_ratio,
            max_len=max_len,
            pos_enc=pos_enc,
            grad_checkpointing=grad_checkpointing,
            rope_base=rope_base,
            attention=attention,
            window=window,
            ttt_batch=ttt_batch,
        )
        self.vocab_size, self.pos_enc, self.max_len = vocab_size, pos_enc, max_len
        self.grad_checkpointing = grad_checkpointing
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model) if pos_enc == "learned" else None
        self.attention = attention
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, mlp_ratio, pos_enc, rope_base, attention, window, ttt_batch) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.apply(self._init_weights)
        # GPT-2: scale the residual-stream output projections so the stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, L, V]``: ``logits[:, t]`` predicts ``x_{t+1}`` from ``x_<=t``."""
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be [B, L] int64, got {tuple(tokens.shape)} {tokens.dtype}")
        B, L = tokens.shape
        x = self.tok_emb(tokens)  # [B, L, C]
        if self.pos_enc == "learned":
            if L > self.max_len:
                raise ValueError(
                    f"sequence length {L} exceeds max_len={self.max_len} of the learned "
                    "positional embedding; build the model with a larger max_len"
                )
            x = x + self.pos_emb.weight[:L]
        elif self.pos_enc == "sinusoidal":
            x = x + sinusoidal_table(L, x.shape[-1], base=self.config["rope_base"], device=x.device).to(x.dtype)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.ln_f(x))  # [B, L, V]

    def token_nll(self, tokens: torch.Tensor) -> torch.Tensor:
        """NLL of every token given its prefix, ``[B, L]`` float32 (nats); column 0 is ``ln V``.

        Example: ``model.token_nll(x)[:, k:].mean()  # the training loss on Markov-k``
        """
        return next_token_nll(self(tokens), tokens)
