"""Plain PyTorch models that the trainers in ``eqprop.train`` fit (the baselines equilibrium models are
measured against)."""

from .transformer import POS_ENCODINGS, Transformer, TransformerOutput, alibi_bias, alibi_slopes, apply_rope, sinusoidal_table

__all__ = ["POS_ENCODINGS", "Transformer", "TransformerOutput", "alibi_bias", "alibi_slopes", "apply_rope",
           "sinusoidal_table"]
