"""Training loops (thin Python): ``eqprop.train.markov`` trains transformers on the Markov-k benchmark."""

from . import markov

__all__ = ["markov"]
