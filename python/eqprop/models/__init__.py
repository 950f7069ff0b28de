"""Plain PyTorch models that the trainers in ``eqprop.train`` fit (the baselines equilibrium models are
measured against), and the interface they share with ``eqprop.EquilibriumLM`` (``interface``)."""

from .interface import next_token_nll
from .transformer import POS_ENCODINGS, Transformer, alibi_bias, alibi_slopes, apply_rope, sinusoidal_table

__all__ = [
    "POS_ENCODINGS",
    "Transformer",
    "next_token_nll",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "sinusoidal_table",
]
