"""Text data for the trainers (docs/design.md §10): one way to load, check and save a run's corpus.

A text trainer's config has the fields ``data`` (None: the shipped tiny Shakespeare), ``tokenizer``
(``"char"`` or ``"bpe"``), ``bpe_vocab_size``, ``val_fraction`` and ``resume``. Its task calls

- ``open_corpus(cfg, run)`` in ``Task.prepare`` -- before the core writes anything -- so a missing
  file, an empty corpus or, on ``resume``, a tokenizer that differs from the run's saved one is an
  error before the first step. A fresh run trains its tokenizer in memory only;
- ``save_tokenizer(cfg, corpus, run)`` in ``Task.build_model`` -- after the core has prepared the run
  folder (an old run moved aside) -- which writes ``tokenizer.json`` and ``data.json`` there;
- ``load_corpus(cfg, run_dir)`` to evaluate a checkpoint with the run's own tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["open_corpus", "save_tokenizer", "load_corpus"]


def _prepare(cfg: Any, tokenizer, run_dir):
    from eqprop.data import TextCorpus

    return TextCorpus.prepare(
        data=cfg.data,
        tokenizer=tokenizer,
        vocab_size=cfg.bpe_vocab_size if tokenizer == "bpe" else None,
        run_dir=None if run_dir is None else str(run_dir),
        val_fraction=cfg.val_fraction,
    )


def open_corpus(cfg: Any, run) -> tuple:
    """``(corpus, fresh)``: the run's ``eqprop.data.TextCorpus``; ``fresh`` is True when its tokenizer was
    just trained (save it with ``save_tokenizer`` once the run folder is ready), False on a resume, where
    the run's saved tokenizer was loaded and checked against the config.

    Example: ``corpus, fresh = open_corpus(cfg, run)`` in ``Task.prepare``."""
    resuming = bool(cfg.resume) and (Path(run.out_dir) / "last.pt").exists()
    return _prepare(cfg, cfg.tokenizer, run.out_dir if resuming else None), not resuming


def save_tokenizer(cfg: Any, corpus, run) -> None:
    """Write the corpus's tokenizer and its record (``tokenizer.json``, ``data.json``) into ``run.out_dir``
    on the main rank. Call after the core has prepared the folder: files there are left from a start that
    failed before its first step and are replaced, not checked as if this were a resume."""
    from eqprop.data.text import DATA_META_FILE, TOKENIZER_FILE

    if not run.dist.is_main:
        return
    out_dir = Path(run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (TOKENIZER_FILE, DATA_META_FILE):
        (out_dir / name).unlink(missing_ok=True)
    _prepare(cfg, corpus.tokenizer, out_dir)


def load_corpus(cfg: Any, run_dir) -> Any:
    """The corpus of a finished or running run, tokenized with the tokenizer saved in ``run_dir``
    (ValueError if it does not match the config).

    Example: ``load_corpus(cfg, Path("runs/eqlm")).tokenizer.decode(ids)``"""
    from eqprop.data.text import TOKENIZER_FILE

    if not (Path(run_dir) / TOKENIZER_FILE).exists():
        raise FileNotFoundError(f"run_dir={str(run_dir)!r} holds no {TOKENIZER_FILE}: not the folder of a text run")
    return _prepare(cfg, cfg.tokenizer, run_dir)
