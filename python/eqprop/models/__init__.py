"""Plain PyTorch models that the trainers in ``eqprop.train`` fit (the baselines equilibrium models are
measured against), the interface they share with ``eqprop.EquilibriumLM`` (``interface``), and the
sequence-mixing layers of the length-generalization study (``attention``: sliding-window attention;
``ttt``: TTT-Linear / TTT-MLP)."""

from .attention import sliding_window_attention, sliding_window_mask
from .interface import next_token_nll
from .transformer import (
    ATTENTIONS,
    POS_ENCODINGS,
    Transformer,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    sinusoidal_table,
)
from .ttt import TTT_KINDS, TTTLayer, ttt_linear, ttt_mlp

__all__ = [
    "ATTENTIONS",
    "POS_ENCODINGS",
    "Transformer",
    "next_token_nll",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "sinusoidal_table",
    "sliding_window_attention",
    "sliding_window_mask",
    "TTT_KINDS",
    "TTTLayer",
    "ttt_linear",
    "ttt_mlp",
]
