"""Data for the trainers: text corpora and their tokenizers (docs/design.md §10).

The Markov-k sequences live in ``eqprop.markov``; this package holds the text pipeline and the
shipped tiny Shakespeare corpus (``tinyshakespeare/``, with its provenance note).
"""

from .text import SHAKESPEARE_PATH, TextCorpus, Tokenizer, load_tokenizer, make_tokenizer, read_text

__all__ = ["SHAKESPEARE_PATH", "TextCorpus", "Tokenizer", "load_tokenizer", "make_tokenizer", "read_text"]
