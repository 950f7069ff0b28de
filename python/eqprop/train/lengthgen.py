"""Length generalization: train on windows of W tokens, measure the per-position NLL out to 20·W.

``train(LengthGenConfig(...))`` runs one model through the shared loop (``eqprop.train.core``); this
module holds only what is specific to the question of docs/design.md §9 -- which architecture (full
causal attention, sliding-window attention of window W, a TTT layer) keeps its per-token loss as the
position grows past the training length:

- tasks: ``markov`` (Markov-k, docs/design.md §8: the Bayes NLL keeps falling with position because
  the counts keep growing, so the gap to Bayes per position shows what a W-token memory loses) and
  ``text`` (``eqprop.data.TextCorpus``: the shipped tiny Shakespeare or the user's files, char or BPE);
- training on windows of ``window`` tokens, with an optional length curriculum (``curriculum``: shorter
  train lengths first, ``curriculum_steps`` steps each; the length is a pure function of the step);
- every ``eval_every`` steps, and on ``best.pt`` at the end, the per-position NLL on ONE fixed held-out
  set of ``eval_seqs`` sequences of length ``eval_factor·W``, summarized per bucket: bucket ``b`` is the
  positions ``[(b-1)·W, b·W)`` (``buckets``, default 1, 2, 10, 20), with the mean NLL, its standard error
  over sequences and the PPL ``exp(mean NLL)`` (Markov: and the paired gap to Bayes, in percent);
- ``best.pt`` and early stopping on the log-PPL of bucket 1 (``nll_1w``): the run stops after
  ``patience`` evaluations without an improvement of more than ``min_delta`` nats;
- a data pipeline that fails before the first step (``LengthGenTask.prepare``): a missing file, an empty
  corpus, a tokenizer that differs from the run's on resume, a validation split shorter than
  ``eval_factor·W`` are ``ValueError`` / ``FileNotFoundError`` naming the option, before anything is written.

Positions scored: ``t >= first``, with ``first = k`` on Markov-k (the positions the gap is defined on,
docs/design.md §8) and ``first = 1`` on text (nothing predicts token 0).

Artifacts (rank 0) in ``out_dir``: ``config.json``, ``training_history.csv`` (bucket columns ``nll_<b>w``,
``nll_se_<b>w``, ``ppl_<b>w``; Markov also ``gap_<b>w`` / ``gap_se_<b>w`` in percent), ``evals/step_N.json``
(buckets and per-position means / SEs of every evaluation), ``ckpt_stepN.pt`` (the model at every
evaluation), ``best.pt``, ``last.pt``, ``final_eval.json`` and ``per_position.csv`` (best.pt),
``summary.json``, ``tokenizer.json`` (text), ``figures/{evolution,per_position,ratio_to_1w}.png``.

Example::

    from eqprop.train.lengthgen import LengthGenConfig, train
    s = train(LengthGenConfig(task="markov", k=2, window=64, attention="sliding", out_dir="runs/sw64"))
    print(s)                # bucket table: PPL +- SE at 1x, 2x, 10x, 20x W
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from eqprop import markov
from eqprop.models import POS_ENCODINGS, Transformer, next_token_nll
from eqprop.train.checkpoint import load_checkpoint_file, save_checkpoint, write_text_atomic
from eqprop.train.config import RunConfig, option
from eqprop.train import text as text_data
from eqprop.train.core import DistInfo, Run, RunResult, Task, derive_seed, fit

log = logging.getLogger(__name__)

__all__ = [
    "LengthGenConfig",
    "LengthGenTask",
    "Summary",
    "train",
    "build_model",
    "train_length_at",
    "position_stats",
    "bucket_stats",
    "binned_stats",
    "log_bin_edges",
    "evaluate_positions",
    "evolution_plot",
    "per_position_plot",
    "ratio_plot",
    "run_status",
    "compare_runs",
    "compare_plot",
    "EVAL_SET_KEYS",
    "load_checkpoint",
]

PosEnc = Literal["learned", "sinusoidal", "rope", "alibi", "none"]
assert POS_ENCODINGS == PosEnc.__args__
Attention = Literal["full", "sliding", "ttt_linear", "ttt_mlp"]


@dataclass
class LengthGenConfig(RunConfig):
    """Everything a length-generalization run depends on. Defaults: Markov k = 2, W = 64, full attention,
    a small CPU model; ``batch_size`` is the GLOBAL number of windows per micro-step."""

    options_title = "length generalization options"

    # the data
    task: Literal["markov", "text"] = option("markov", "Markov-k sequences or a text corpus")
    k: int = option(2, "Markov order (task markov)")
    vocab_size: int = option(2, "Markov vocabulary size V (task markov)")
    alpha: float = option(1.0, "Dirichlet concentration of each table row (task markov)")
    data: Optional[str] = option(None, "text file or folder (task text; default: the shipped tiny Shakespeare)")
    tokenizer: Literal["char", "bpe"] = option("char", "tokenizer (task text; saved in out_dir, reused on resume)")
    bpe_vocab_size: int = option(512, "BPE vocabulary size (tokenizer bpe; > 256)")
    val_fraction: float = option(0.1, "held-out fraction of the corpus (task text)")
    # lengths
    window: int = option(64, "W: the training length (and the sliding-attention window unless attn_window)")
    eval_factor: int = option(20, "evaluation length = eval_factor * W")
    buckets: tuple[int, ...] = option((1, 2, 10, 20), "buckets b: positions [(b-1)W, bW)", metavar="B", nargs="+")
    curriculum: tuple[int, ...] = option((), "train lengths before W, shortest first (empty: none)", metavar="LEN")
    curriculum_steps: int = option(0, "optimizer steps per curriculum stage")
    # the model
    attention: Attention = option("full", "the sequence-mixing layer")
    attn_window: Optional[int] = option(None, "sliding-attention window (default: W)")
    ttt_batch: int = option(16, "TTT mini-batch size b")
    n_layer: int = option(2, "transformer depth")
    n_head: int = option(4, "attention heads")
    d_model: int = option(64, "width")
    mlp_ratio: float = option(4.0, "MLP hidden width / d_model")
    pos_enc: PosEnc = option("rope", "positional encoding (see docs/lengthgen.md on extrapolation)")
    grad_checkpointing: bool = option(False, "recompute blocks in backward")
    # evaluation and early stopping
    eval_seqs: int = option(32, "sequences in the fixed held-out eval set")
    eval_batch_size: int = option(8, "sequences per eval forward pass")
    eval_seed: int = option(1_000_003, "seed of the held-out eval set")
    final_eval_seqs: int = option(0, "sequences of a second, fresh set scored on best.pt at the end (0: none)")
    final_eval_seed: int = option(2_000_003, "seed of that fresh set")
    patience: int = option(5, "early stop after this many evaluations without improvement of nll_1w")
    min_delta: float = option(0.0, "an improvement of nll_1w must exceed this many nats")
    keep_eval_checkpoints: bool = option(True, "write ckpt_stepN.pt at every evaluation")
    write_figures: bool = option(True, "draw figures/*.png at the end (the data behind them is written either way)")
    out_dir: str = option("runs/lengthgen", "where artifacts go", metavar="DIR")

    def checks(self) -> list:
        first = self.first_position
        return super().checks() + [
            ("k", self.k >= 1, ">= 1"),
            ("vocab_size", self.vocab_size >= 2, ">= 2"),
            ("bpe_vocab_size", self.bpe_vocab_size > 256, "> 256 (the byte alphabet)"),
            ("alpha", self.alpha > 0, "> 0"),
            ("val_fraction", 0 < self.val_fraction < 1, "in (0, 1)"),
            ("window", self.window > first + 1, f"> {first + 1} (positions t >= {first} are scored)"),
            ("eval_factor", self.eval_factor >= 1, ">= 1"),
            (
                "buckets",
                len(self.buckets) >= 1
                and 1 in self.buckets
                and list(self.buckets) == sorted(set(self.buckets))
                and all(1 <= b <= self.eval_factor for b in self.buckets),
                f"increasing, containing 1 (early stopping watches it), each in [1, eval_factor={self.eval_factor}]",
            ),
            (
                "curriculum",
                list(self.curriculum) == sorted(set(self.curriculum))
                and all(first + 1 < n < self.window for n in self.curriculum),
                f"increasing lengths, each in ({first + 1}, window={self.window})",
            ),
            (
                "curriculum_steps",
                self.curriculum_steps >= 1 if self.curriculum else self.curriculum_steps >= 0,
                ">= 1 when curriculum is set, else >= 0",
            ),
            ("attn_window", self.attn_window is None or self.attn_window >= 1, "None or >= 1"),
            ("ttt_batch", self.ttt_batch >= 1, ">= 1"),
            ("eval_seqs", self.eval_seqs >= 2, ">= 2 (a standard error needs 2 sequences)"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            ("final_eval_seqs", self.final_eval_seqs == 0 or self.final_eval_seqs >= 2, "0 or >= 2"),
            ("final_eval_seed", self.final_eval_seed != self.eval_seed, "different from eval_seed"),
            ("patience", self.patience >= 1, ">= 1"),
            ("min_delta", self.min_delta >= 0, ">= 0 (nats)"),
        ]

    @property
    def first_position(self) -> int:
        """The first scored position: ``k`` on Markov-k, ``1`` on text."""
        return self.k if self.task == "markov" else 1

    @property
    def eval_len(self) -> int:
        return self.eval_factor * self.window


def train_length_at(step: int, cfg: LengthGenConfig) -> int:
    """The training length of optimizer step ``step`` (0-based): ``curriculum[i]`` for the steps
    ``[i·curriculum_steps, (i+1)·curriculum_steps)``, then ``window``. A pure function of the step, so a
    resumed run trains on the lengths an uninterrupted one would.

    Example: ``train_length_at(150, LengthGenConfig(window=64, curriculum=(16, 32), curriculum_steps=100))  # 32``
    """
    if cfg.curriculum:
        stage = step // cfg.curriculum_steps
        if stage < len(cfg.curriculum):
            return cfg.curriculum[stage]
    return cfg.window


# ----------------------------------------------------------------------------------------------------
# per-position statistics (docs/design.md §9)


def position_stats(nll: torch.Tensor, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over sequences of every position's NLL and its standard error ``sd / sqrt(N)``.

    Args:
        nll: ``[N, L]`` per-token NLL (nats), ``N >= 2``.
        first: positions ``t < first`` are not scored (NaN in the output).

    Returns:
        ``(mean [L], se [L])`` float64.

    Example: ``mean, se = position_stats(model.token_nll(x).double(), first=1)``
    """
    if nll.dim() != 2 or nll.shape[0] < 2:
        raise ValueError(f"nll must be [N, L] with N >= 2 sequences, got {tuple(nll.shape)}")
    x = nll.double()
    mean, se = x.mean(0), x.std(0, unbiased=True) / math.sqrt(x.shape[0])
    mean[:first], se[:first] = math.nan, math.nan
    return mean, se


def _seq_means(nll: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return nll[:, lo:hi].double().mean(1)  # [N]: per-sequence mean over the positions [lo, hi)


def bucket_stats(
    nll: torch.Tensor, window: int, buckets, *, first: int = 0, bayes: Optional[torch.Tensor] = None
) -> list:
    """Bucket ``b`` = positions ``[(b-1)·W, b·W)`` (from ``first`` on): mean NLL, standard error over sequences
    (of the per-sequence bucket means), PPL = exp(mean NLL), and with ``bayes`` the paired gap to Bayes.

    Args:
        nll: ``[N, L]`` per-token NLL (nats), ``L >= max(buckets)·W``; bayes: the Bayes NLL ``[N, L]`` of the
            same sequences (Markov-k), or None.
        window: W; buckets: the multipliers b; first: the first scored position.

    Returns:
        one dict per bucket: ``b``, ``positions`` ``[lo, hi)``, ``nll``, ``nll_se``, ``ppl``, ``seq_nll`` (the ``N``
        per-sequence means), and with ``bayes``:
        ``bayes_nll``, ``gap_nats`` / ``gap_nats_se`` (mean of the paired differences), ``gap_pct`` /
        ``gap_se`` (``eqprop.markov.gap_pct`` on the bucket's positions).

    Example: ``bucket_stats(nll, 64, (1, 2, 10, 20), first=1)[0]["ppl"]``
    """
    n, length = nll.shape
    out = []
    for b in buckets:
        lo, hi = max((b - 1) * window, first), b * window
        if hi > length:
            raise ValueError(f"bucket {b} needs positions up to {hi}, but the sequences have length {length}")
        m = _seq_means(nll, lo, hi)
        row = {
            "b": b,
            "positions": [lo, hi],
            "nll": float(m.mean()),
            "nll_se": float(m.std(unbiased=True) / math.sqrt(n)),
            "ppl": math.exp(float(m.mean())),
            "seq_nll": m.tolist(),  # per sequence: runs scored on the same set compare paired (compare_runs)
        }
        if bayes is not None:
            mb = _seq_means(bayes, lo, hi)
            d = m - mb
            gap, gap_se = markov.gap_pct(nll[:, lo:hi], bayes[:, lo:hi], 0)
            row.update(
                bayes_nll=float(mb.mean()),
                gap_nats=float(d.mean()),
                gap_nats_se=float(d.std(unbiased=True) / math.sqrt(n)),
                gap_pct=gap,
                gap_se=gap_se,
            )
        out.append(row)
    return out


def log_bin_edges(first: int, length: int, per_decade: int = 12) -> list:
    """Bin edges from ``first`` to ``length`` spaced evenly in log(position), each bin at least one position
    wide (so the first bins are single positions): the bins of the figures' log-position axis.

    Example: ``log_bin_edges(1, 1280)[:5]  # [1, 2, 3, 4, 5]``
    """
    first = max(first, 1)
    edges, i = [first], 1
    while edges[-1] < length:
        edges.append(min(length, max(edges[-1] + 1, round(first * 10 ** (i / per_decade)))))
        i += 1
    return edges


def binned_stats(nll: torch.Tensor, edges) -> dict:
    """Per-position NLL averaged over the bins ``[edges[i], edges[i+1])``, with the standard error over
    sequences of the per-sequence bin means -- the smooth curves of the figures (per-position SEs cannot
    be pooled: neighbouring positions are correlated).

    Returns:
        ``{"lo": [...], "hi": [...], "mean": [...], "se": [...]}`` (float lists).

    Example: ``binned_stats(nll, log_bin_edges(1, nll.shape[1]))["mean"]``
    """
    n = nll.shape[0]
    lo, hi, mean, se = [], [], [], []
    for a, b in zip(edges[:-1], edges[1:]):
        m = _seq_means(nll, a, b)
        lo.append(a)
        hi.append(b)
        mean.append(float(m.mean()))
        se.append(float(m.std(unbiased=True) / math.sqrt(n)))
    return {"lo": lo, "hi": hi, "mean": mean, "se": se}


@torch.no_grad()
def token_nll_of(
    model: torch.nn.Module, tokens: torch.Tensor, *, batch_size: int, dist_info: Optional[DistInfo] = None, bf16=False
) -> torch.Tensor:
    """``model.token_nll`` of every sequence, ``[N, L]`` float64, in batches of ``batch_size`` shared out over
    the data-parallel ranks (round robin) and summed back.

    Example: ``token_nll_of(model, x, batch_size=8)``
    """
    dist_info = dist_info or DistInfo()
    was_training = model.training
    model.eval()
    out = torch.zeros(tokens.shape, dtype=torch.float64, device=tokens.device)
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
        for i, lo in enumerate(range(0, tokens.shape[0], batch_size)):
            if i % dist_info.world_size == dist_info.rank:
                out[lo : lo + batch_size] = model.token_nll(tokens[lo : lo + batch_size]).double()
    if dist_info.world_size > 1:
        torch.distributed.all_reduce(out)  # rows of other ranks are zero here
    model.train(was_training)
    return out


def _finite_or_none(values) -> list:
    return [None if not math.isfinite(v) else float(f"{v:.7g}") for v in values]


def evaluate_positions(
    nll: torch.Tensor, window: int, buckets, *, first: int, bayes: Optional[torch.Tensor] = None
) -> dict:
    """Everything one evaluation stores: buckets (``bucket_stats``), per-position mean / SE (``positions``;
    Markov also the Bayes curve and the paired gap per position), and ``bins`` (``binned_stats`` on
    ``log_bin_edges``; Markov also ``bins_bayes`` and ``bins_gap``). JSON-able (NaN -> None).

    Example: ``ev = evaluate_positions(token_nll_of(model, x, batch_size=8), 64, (1, 2, 10, 20), first=1)``
    """
    mean, se = position_stats(nll, first)
    edges = log_bin_edges(first, nll.shape[1])
    out = {
        "n_seqs": nll.shape[0],
        "seq_len": nll.shape[1],
        "window": window,
        "first": first,
        "buckets": bucket_stats(nll, window, buckets, first=first, bayes=bayes),
        "positions": {"nll_mean": _finite_or_none(mean.tolist()), "nll_se": _finite_or_none(se.tolist())},
        "bins": binned_stats(nll, edges),
    }
    if bayes is not None:
        bmean, bse = position_stats(bayes, first)
        gmean, gse = position_stats(nll.double() - bayes.double(), first)  # paired on the same sequences
        out["positions"].update(
            bayes_mean=_finite_or_none(bmean.tolist()),
            bayes_se=_finite_or_none(bse.tolist()),
            gap_mean=_finite_or_none(gmean.tolist()),
            gap_se=_finite_or_none(gse.tolist()),
        )
        out["bins_bayes"] = binned_stats(bayes, edges)
        out["bins_gap"] = binned_stats(nll.double() - bayes.double(), edges)
    return out


def _bucket_columns(buckets, with_gap: bool) -> tuple:
    cols = []
    for b in buckets:
        cols += [f"nll_{b}w", f"nll_se_{b}w", f"ppl_{b}w"] + ([f"gap_{b}w", f"gap_se_{b}w"] if with_gap else [])
    return tuple(cols)


def _metrics(ev: dict) -> dict:
    m = {}
    for row in ev["buckets"]:
        b = row["b"]
        m.update({f"nll_{b}w": row["nll"], f"nll_se_{b}w": row["nll_se"], f"ppl_{b}w": row["ppl"]})
        if "gap_pct" in row:
            m.update({f"gap_{b}w": row["gap_pct"], f"gap_se_{b}w": row["gap_se"]})
    return m


# ----------------------------------------------------------------------------------------------------
# the hooks


def build_model(cfg: LengthGenConfig, vocab_size: int) -> Transformer:
    """The ``Transformer`` a config describes, with ``attention`` the one layer that differs between the
    architectures compared (sized for ``eval_factor·W`` positions when ``pos_enc="learned"``)."""
    kwargs = dict(
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        d_model=cfg.d_model,
        mlp_ratio=cfg.mlp_ratio,
        max_len=cfg.eval_len,
        pos_enc=cfg.pos_enc,
        grad_checkpointing=cfg.grad_checkpointing,
    )
    return Transformer(
        vocab_size, attention=cfg.attention, window=cfg.attn_window or cfg.window, ttt_batch=cfg.ttt_batch, **kwargs
    )


class LengthGenTask(Task):
    """Train on W-token windows, evaluate per position out to ``eval_factor·W`` (the hooks of ``core.fit``)."""

    name = "lengthgen"
    score = "nll_1w"
    must_match_on_resume = (
        "task",
        "k",
        "vocab_size",
        "alpha",
        "data",
        "tokenizer",
        "bpe_vocab_size",
        "val_fraction",
        "window",
        "eval_factor",
        "buckets",
        "curriculum",
        "curriculum_steps",
        "attention",
        "attn_window",
        "ttt_batch",
        "n_layer",
        "n_head",
        "d_model",
        "mlp_ratio",
        "pos_enc",
        "eval_seqs",
        "eval_seed",
    )

    def __init__(self, cfg: LengthGenConfig):
        self.cfg = cfg
        self.eval_columns = _bucket_columns(cfg.buckets, cfg.task == "markov")
        self.corpus = None
        self.vocab = cfg.vocab_size if cfg.task == "markov" else None
        self._eval_set = None  # (tokens [N, 20W], bayes [N, 20W] or None)
        self._final = None
        self._fresh_tokenizer = False

    # -- data, checked before anything is written
    def prepare(self, run: Run) -> None:
        c = self.cfg
        if c.task != "text":
            return
        self.corpus, self._fresh_tokenizer = text_data.open_corpus(c, run)
        self.vocab = self.corpus.vocab_size
        n_train, n_val = len(self.corpus.train), len(self.corpus.val)
        if n_train < c.window + 1:
            raise ValueError(
                f"data={c.data!r}: the training split has {n_train} tokens, fewer than window={c.window} + 1"
            )
        if n_val < c.eval_len:
            raise ValueError(
                f"data={c.data!r}: the validation split has {n_val} tokens, fewer than eval_factor * window = "
                f"{c.eval_factor} * {c.window} = {c.eval_len} (one evaluation sequence); use more text, a larger "
                f"val_fraction (now {c.val_fraction}), or a smaller window / eval_factor"
            )
        starts = n_val - c.eval_len + 1  # eval_windows needs one distinct start per sequence
        if starts < max(c.eval_seqs, c.final_eval_seqs):
            raise ValueError(
                f"data={c.data!r}: the validation split ({n_val} tokens) has only {starts} distinct windows of "
                f"eval_factor * window = {c.eval_len} tokens, fewer than eval_seqs={c.eval_seqs} / final_eval_seqs="
                f"{c.final_eval_seqs}; use fewer sequences or more text"
            )

    def memory_need(self, run: Run) -> dict:
        """Lower bounds, in bytes, of what certainly gets allocated (attention scores not counted)."""
        c = self.cfg
        per = c.batch_size // run.dist.world_size
        act = 2 if c.bf16 else 4
        saved = c.n_layer if c.grad_checkpointing else c.n_layer * (7 + 2 * c.mlp_ratio)
        return {
            "activations": int(per * c.window * c.d_model * saved * act),
            "logits": per * c.window * self.vocab * 4 * 2,
            "eval set": c.eval_seqs * c.eval_len * (8 + 8 + (8 if c.task == "markov" else 0)),
            "eval logits": c.eval_batch_size * c.eval_len * self.vocab * 4,
        }

    def build_model(self, run: Run) -> Transformer:
        c = self.cfg
        if c.pos_enc == "learned":
            log.warning(
                "pos_enc='learned': positions past window=%d are never trained, so the loss there measures "
                "untrained embeddings (docs/lengthgen.md)",
                c.window,
            )
        if self._fresh_tokenizer:  # fit has prepared out_dir (moved an old run aside)
            text_data.save_tokenizer(c, self.corpus, run)
        return build_model(c, self.vocab)

    def train_batch(self, run: Run, step: int, micro: int) -> torch.Tensor:
        """This rank's rows of the global micro-batch of (step, micro), drawn from ``derive_seed`` (every rank
        draws the whole global batch and keeps its slice: DDP and resumed runs see the same tokens)."""
        c = self.cfg
        length = train_length_at(step, c)
        seed = derive_seed(c.seed, "train", step, micro)
        if c.task == "markov":
            x = markov.sample(
                c.batch_size, c.k, seq_len=length, vocab_size=self.vocab, alpha=c.alpha, seed=seed, device=run.device
            )
        else:
            gen = torch.Generator().manual_seed(seed)
            x = self.corpus.sample("train", c.batch_size, length, gen).to(run.device)
        per = c.batch_size // run.dist.world_size
        return x[run.dist.rank * per : (run.dist.rank + 1) * per]

    def loss(self, run: Run, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return next_token_nll(model(x), x)[:, self.cfg.first_position :].mean()

    def eval_set(self, run: Run, seed: Optional[int] = None, n: Optional[int] = None) -> tuple:
        """``(tokens [N, eval_factor·W], bayes [N, eval_factor·W] float64 or None)``; the fixed set by default."""
        c = self.cfg
        fixed = seed is None
        if fixed and self._eval_set is not None:
            return self._eval_set
        seed, n = (c.eval_seed, c.eval_seqs) if fixed else (seed, n)
        if c.task == "markov":
            x = markov.sample(
                n, c.k, seq_len=c.eval_len, vocab_size=self.vocab, alpha=c.alpha, seed=derive_seed(seed, "eval")
            ).to(run.device)
            bayes = markov.bayes_nll(x, c.k, vocab_size=self.vocab, alpha=c.alpha, dtype=torch.float64)
            out = (x, bayes)
        else:
            out = (self.corpus.eval_windows("val", c.eval_len, n, seed=seed).to(run.device), None)
        if fixed:
            self._eval_set = out
        return out

    def _evaluate(self, run: Run, model: torch.nn.Module, eval_set: tuple) -> dict:
        c = self.cfg
        x, bayes = eval_set
        nll = token_nll_of(model, x, batch_size=c.eval_batch_size, dist_info=run.dist, bf16=c.bf16)
        return evaluate_positions(nll, c.window, c.buckets, first=c.first_position, bayes=bayes)

    def evaluate(self, run: Run, model: torch.nn.Module) -> dict:
        ev = self._evaluate(run, model, self.eval_set(run))
        ev["step"] = run.step
        if run.dist.is_main:  # the per-position record of every evaluation, and the model it came from
            _write_json(ev, run.out_dir / "evals" / f"step_{run.step:07d}.json")
            if self.cfg.keep_eval_checkpoints:
                save_checkpoint(
                    {
                        "trainer": self.name,
                        "model": model.state_dict(),
                        "model_config": self.model_config(model),
                        "config": self.cfg.to_dict(),
                        "step": run.step,
                        "vocab_size": self.vocab,
                    },
                    run.out_dir / f"ckpt_step{run.step}.pt",
                )
        m = _metrics(ev)
        log.info("step %d: %s", run.step, _bucket_line(ev["buckets"]))
        return m

    def stop_reason(self, run: Run, m: dict) -> Optional[str]:
        past = [r[self.score] for r in run.history if r.get(self.score) is not None]
        return early_stop_reason(past + [m[self.score]], self.cfg.patience, self.cfg.min_delta)

    def final_evaluation(self, run: Run, model: torch.nn.Module) -> dict:
        c = self.cfg
        fixed = self._evaluate(run, model, self.eval_set(run))
        fresh = (
            self._evaluate(run, model, self.eval_set(run, seed=c.final_eval_seed, n=c.final_eval_seqs))
            if c.final_eval_seqs
            else None
        )
        self._final = {"fixed": fixed, "fresh": fresh}
        if run.dist.is_main:
            _write_json(self._final, run.out_dir / "final_eval.json")
            _write_per_position_csv(fixed, run.out_dir / "per_position.csv")
        return {
            "fixed": {"n_seqs": fixed["n_seqs"], "buckets": fixed["buckets"]},
            "fresh": None if fresh is None else {"n_seqs": fresh["n_seqs"], "buckets": fresh["buckets"]},
        }

    def summarize(self, run: Run, r: RunResult) -> "Summary":
        c = self.cfg
        return Summary.extend(
            r,
            task=c.task,
            attention=c.attention,
            window=c.window,
            eval_len=c.eval_len,
            pos_enc=c.pos_enc,
            vocab_size=self.vocab,
            data=self.corpus.description if self.corpus is not None else f"Markov k={c.k}, V={self.vocab}",
            best_nll_1w=r.best.get(self.score),
        )

    def figures(self, run: Run, r: RunResult) -> dict:
        c = self.cfg
        if not c.write_figures:
            return {}
        label = f"{c.attention}, W={c.window}"
        out = {"evolution": ("evolution.png", lambda p: evolution_plot(r.history, c.buckets, p, title=label))}
        if self._final is not None:
            fixed = self._final["fixed"]
            out["per_position"] = ("per_position.png", lambda p: per_position_plot(fixed, p, title=label))
            out["ratio_to_1w"] = ("ratio_to_1w.png", lambda p: ratio_plot(fixed, p, title=label))
        return out


def early_stop_reason(scores: list, patience: int, min_delta: float) -> Optional[str]:
    """The early-stop rule: an evaluation improves if its score is below the best so far by more than
    ``min_delta``; stop once the last ``patience`` evaluations did not. ``scores`` in evaluation order.

    Example: ``early_stop_reason([1.0, 0.9, 0.91, 0.9], patience=2, min_delta=0.0)  # a reason``
    """
    best, since, best_i = math.inf, 0, None
    for i, s in enumerate(scores):
        if s < best - min_delta:
            best, since, best_i = s, 0, i
        else:
            since += 1
    if since >= patience:
        return (
            f"no improvement of the log-PPL at 1xW (nll_1w) by more than {min_delta} nats in {since} evaluations "
            f"(best {best:.4f} at evaluation {best_i + 1}; patience {patience})"
        )
    return None


def _jsonable(obj):
    """Non-finite floats (a model that produced NaN) become None: strict JSON that every reader parses."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _jsonable(v) for key, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(_jsonable(obj), allow_nan=False) + "\n", path)


def _write_per_position_csv(ev: dict, path: Path) -> None:
    pos = ev["positions"]
    names = list(pos)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["position"] + names)
    for t in range(ev["seq_len"]):
        w.writerow([t] + ["" if pos[n][t] is None else pos[n][t] for n in names])
    write_text_atomic(buf.getvalue(), path)


def _bucket_line(buckets: list) -> str:
    parts = []
    for row in buckets:
        s = f"{row['b']}xW PPL {row['ppl']:.4g} (NLL {row['nll']:.4f} +- {row['nll_se']:.4f})"
        if "gap_pct" in row:
            s += f" gap {row['gap_pct']:+.2f}% +- {row['gap_se']:.2f}"
        parts.append(s)
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------
# the run


@dataclass
class Summary(RunResult):
    """What ``train`` returns (and writes, less ``history``, to ``summary.json``); ``print(summary)`` gives the
    bucket table of ``best.pt``.

    ``status``: ``reached_target`` (early stop: no improvement), ``max_steps``, ``interrupted`` (no final
    evaluation), ``diverged``. ``final``: ``{"fixed": {"n_seqs", "buckets"}, "fresh": ... or None}`` on
    ``best.pt`` (bucket dicts as ``bucket_stats``); the per-position curves are in ``final_eval.json``.
    """

    task: str = ""
    attention: str = ""
    window: int = 0
    eval_len: int = 0
    pos_enc: str = ""
    vocab_size: int = 0
    data: str = ""
    best_nll_1w: Optional[float] = None

    def __str__(self) -> str:
        lines = [
            f"{self.attention} attention, W={self.window}, eval length {self.eval_len} ({self.data}; "
            f"{self.n_params:,} params): {self.status} after {self.steps} steps, {self.wall_s:.0f} s"
        ]
        if self.message:
            lines.append(f"  {self.message}")
        if self.final:
            fixed = self.final["fixed"]
            lines.append(f"best.pt (step {self.best_step}) on {fixed['n_seqs']} held-out sequences:")
            for row in fixed["buckets"]:
                s = (
                    f"  {row['b']:>3}xW [{row['positions'][0]}, {row['positions'][1]}): PPL {row['ppl']:.4f}  "
                    f"NLL {row['nll']:.4f} +- {row['nll_se']:.4f}"
                )
                if "gap_pct" in row:
                    s += f"  gap to Bayes {row['gap_pct']:+.2f}% +- {row['gap_se']:.2f}"
                lines.append(s)
        lines.append(f"out_dir: {self.out_dir}")
        return "\n".join(lines)


def train(config, *, callback=None) -> Summary:
    """Train on W-token windows and evaluate per position out to ``eval_factor·W``; write the artifacts.

    Args:
        config: a ``LengthGenConfig`` or a dict for ``LengthGenConfig.from_dict``.
        callback: called after every optimizer step with the step's record and the (unwrapped) model.

    Returns:
        a ``Summary``. Under ``torchrun`` every rank returns it; only rank 0 writes files.

    Raises:
        FileNotFoundError / ValueError before anything is written: a missing ``data`` path, an empty corpus,
        a tokenizer that differs from the run's on resume, a validation split shorter than ``eval_factor·W``,
        ``out_dir`` holding a run without ``resume`` / ``overwrite``.

    Example: ``print(train(LengthGenConfig(window=32, max_steps=200, out_dir="runs/lg")))``
    """
    cfg = config if isinstance(config, LengthGenConfig) else LengthGenConfig.from_dict(dict(config))
    return fit(LengthGenTask(cfg), cfg, callback=callback)


def load_checkpoint(path, *, device="cpu") -> tuple:
    """``(model, config, checkpoint dict)`` from a checkpoint of this trainer (best.pt, last.pt, ckpt_stepN.pt).

    Example: ``model, cfg, ckpt = load_checkpoint("runs/lengthgen/ckpt_step100.pt")``
    """
    ckpt = load_checkpoint_file(path, map_location=device)
    if ckpt.get("trainer") != LengthGenTask.name:
        raise ValueError(
            f"{path} is a checkpoint of the {ckpt.get('trainer')!r} trainer, not of eqprop.train.lengthgen"
        )
    model = Transformer(**ckpt["model_config"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model, LengthGenConfig.from_dict(ckpt["config"]), ckpt


# ----------------------------------------------------------------------------------------------------
# figures (matplotlib's object API: a notebook's backend is left alone)


def _bucket_label(b: int) -> str:
    return f"{b}xW"


def evolution_plot(history: list, buckets, path, *, title: str = "") -> Path:
    """PPL of every bucket vs step (one line per bucket, band: exp(mean NLL +- SE)). Returns the path.

    Example: ``evolution_plot(summary.history, (1, 2, 10, 20), "evolution.png")``
    """
    from matplotlib.figure import Figure

    from eqprop.train.figures import _save

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    for i, b in enumerate(buckets):
        rows = [r for r in history if r.get(f"nll_{b}w") not in (None, "")]
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        nll = torch.tensor([float(r[f"nll_{b}w"]) for r in rows])
        se = torch.tensor([float(r[f"nll_se_{b}w"]) for r in rows])
        ax.plot(steps, nll.exp(), "o-", ms=3, color=f"C{i}", label=_bucket_label(b))
        ax.fill_between(steps, (nll - se).exp(), (nll + se).exp(), color=f"C{i}", alpha=0.15, lw=0)
    ax.set(xlabel="step", ylabel="PPL = exp(mean NLL) on the fixed eval set", title=f"{title}: PPL per bucket")
    ax.legend(fontsize=8, title="positions [(b-1)W, bW)", title_fontsize=7)
    return _save(fig, path)


def _bands(ax, bins: dict, color, label, scale=1.0, ratio_to=None):
    mids = [math.sqrt(a * (b - 1)) if b - 1 > a else a for a, b in zip(bins["lo"], bins["hi"])]  # log-axis mid
    mean = torch.tensor(bins["mean"], dtype=torch.float64)
    se = torch.tensor(bins["se"], dtype=torch.float64)
    if ratio_to is not None:
        mean, se = mean / ratio_to, se / ratio_to
    ax.plot(mids, mean * scale, color=color, lw=1.2, label=label)
    ax.fill_between(mids, (mean - se) * scale, (mean + se) * scale, color=color, alpha=0.25, lw=0)


def _bucket_lines(ax, ev: dict) -> None:
    w = ev["window"]
    for b in (1, 2, 10):
        if b * w < ev["seq_len"]:
            ax.axvline(b * w, color="0.6", lw=0.8, ls=":")


def per_position_plot(ev: dict, path, *, title: str = "") -> Path:
    """Per-position NLL (bins of W/8 positions, SE bands) of one evaluation (``evaluate_positions``), bucket
    edges dotted; Markov: with the Bayes curve (left) and the paired gap model - Bayes (right). Returns the path."""
    from matplotlib.figure import Figure

    from eqprop.train.figures import _save

    markov_ev = "bins_gap" in ev
    fig = Figure(figsize=(11 if markov_ev else 6.5, 4), layout="constrained")
    axes = fig.subplots(1, 2 if markov_ev else 1)
    ax = axes[0] if markov_ev else axes
    _bands(ax, ev["bins"], "C0", "model")
    if markov_ev:
        _bands(ax, ev["bins_bayes"], "k", "Bayes")
    _bucket_lines(ax, ev)
    ax.set_xscale("log")
    ax.set(xlabel="position t (dotted: W, 2W, 10W)", ylabel="NLL (nats/token)", title=f"{title}: NLL by position")
    ax.legend(fontsize=8)
    if markov_ev:
        ax2 = axes[1]
        _bands(ax2, ev["bins_gap"], "C3", "model - Bayes")
        ax2.axhline(0, color="k", lw=0.8)
        _bucket_lines(ax2, ev)
        ax2.set_xscale("log")
        ax2.set(xlabel="position t", ylabel="gap to Bayes (nats/token)", title="paired gap by position")
        ax2.legend(fontsize=8)
    return _save(fig, path)


def ratio_plot(ev: dict, path, *, title: str = "") -> Path:
    """Per-position NLL (bins) divided by the mean NLL of bucket 1xW (band: bin SE / that mean). Returns the path."""
    from matplotlib.figure import Figure

    from eqprop.train.figures import _save

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    ref = next(r["nll"] for r in ev["buckets"] if r["b"] == 1)
    _bands(ax, ev["bins"], "C0", "model", ratio_to=ref)
    if "bins_bayes" in ev:
        ref_b = next(r["bayes_nll"] for r in ev["buckets"] if r["b"] == 1)
        _bands(ax, ev["bins_bayes"], "k", "Bayes (its own 1xW value)", ratio_to=ref_b)
    ax.axhline(1.0, color="0.4", lw=0.8)
    _bucket_lines(ax, ev)
    ax.set_xscale("log")
    ax.set(xlabel="position t", ylabel="NLL / mean NLL of bucket 1xW", title=f"{title}: ratio to the 1xW value")
    ax.legend(fontsize=8)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------
# reading runs: status (also of a run another process is writing) and comparisons


def _read_history(path: Path) -> list:
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({key: (float(v) if v not in ("", None) else None) for key, v in r.items()})
    for r in rows:
        r["step"] = int(r["step"])
    return rows


def _read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    return _read_json(path)


def run_status(run_dir, *, now: Optional[float] = None, stall_factor: float = 5.0) -> dict:
    """Progress and health of a run, from the atomically written files only (``config.json``,
    ``training_history.csv``, ``summary.json``): safe on a run another process is writing.

    Health (docs/lengthgen.md): ``finished`` / ``diverged`` / ``interrupted`` from a ``summary.json`` written
    after the latest start (a resumed run that is running again is not "interrupted"); ``diverged`` also
    when the last logged loss is not finite; ``stalled`` when no history write came for ``stall_factor`` x
    the typical time between writes (the process may be dead: resume it), or when the last ``patience``
    evaluations did not improve ``nll_1w`` (with early stopping off); else ``running`` (``starting`` before
    the first history write).

    Returns:
        dict with ``step``, ``max_steps``, ``health``, ``reason``, ``eta_s``, ``sec_per_step``, ``latest``
        (the last evaluated row: step and bucket columns), ``best_step``, ``config``.

    Example: ``run_status("runs/sw64")["health"]``
    """
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    now = time.time() if now is None else now
    hist_path, summary_path = run_dir / "training_history.csv", run_dir / "summary.json"
    rows = _read_history(hist_path)
    step = rows[-1]["step"] if rows else 0
    max_steps = cfg["max_steps"]
    evals = [r for r in rows if r.get("nll_1w") is not None]
    latest = evals[-1] if evals else None
    best = min(evals, key=lambda r: r["nll_1w"]) if evals else None
    # seconds per step over the last rows (elapsed_s is cumulative across resumes)
    tail = rows[-20:]
    sec_per_step = None
    if len(tail) >= 2 and tail[-1]["step"] > tail[0]["step"]:
        sec_per_step = (tail[-1]["elapsed_s"] - tail[0]["elapsed_s"]) / (tail[-1]["step"] - tail[0]["step"])
    elif len(tail) == 1 and step > 0:
        sec_per_step = tail[0]["elapsed_s"] / step
    eta = sec_per_step * (max_steps - step) if sec_per_step is not None else None

    started = (run_dir / "config.json").stat().st_mtime
    newest = max([started] + [p.stat().st_mtime for p in (hist_path, run_dir / "last.pt") if p.exists()])
    summary = None
    if summary_path.exists() and summary_path.stat().st_mtime >= newest:
        summary = _read_json(summary_path)  # written after the latest start: the run ended
    health, reason = "running", ""
    if summary is not None:
        status = summary["status"]
        health = {"max_steps": "finished", "reached_target": "finished"}.get(status, status)
        reason = summary.get("message") or {"max_steps": "reached max_steps"}.get(status, status)
        eta = 0.0 if health == "finished" else None
    elif rows and not math.isfinite(rows[-1]["train_loss"]):
        health, reason = "diverged", f"non-finite train loss at step {step}"
    elif not rows:
        health, reason = "starting", "no history row yet"
    else:
        # the history file is rewritten at every evaluation: its typical interval is eval_every steps
        interval = (sec_per_step or 0.0) * min(cfg["eval_every"], max_steps)
        age = now - newest
        if sec_per_step is not None and age > stall_factor * max(interval, 1.0):
            health = "stalled"
            reason = (
                f"no history write for {age:.0f} s, {age / max(interval, 1e-9):.0f}x the typical {interval:.1f} s "
                f"between writes (the process may be gone: continue with --resume)"
            )
        elif evals and not cfg.get("early_stop", True):
            scores = [r["nll_1w"] for r in evals]
            why = early_stop_reason(scores, cfg["patience"], cfg["min_delta"])
            if why:
                health, reason = "stalled", why
    return {
        "run": str(run_dir),
        "step": step,
        "max_steps": max_steps,
        "health": health,
        "reason": reason,
        "eta_s": eta,
        "sec_per_step": sec_per_step,
        "latest": latest,
        "best_step": best["step"] if best else None,
        "config": cfg,
    }


def _run_result(run_dir: Path) -> dict:
    """The buckets and binned curves a comparison shows: ``final_eval.json`` (best.pt) when the run has
    finished, else the latest ``evals/step_N.json``."""
    if (run_dir / "final_eval.json").exists():
        return {"source": "best.pt", **_read_json(run_dir / "final_eval.json")["fixed"]}
    evals = sorted((run_dir / "evals").glob("step_*.json"))
    if not evals:
        raise ValueError(f"{run_dir} has no evaluation yet (no final_eval.json, no evals/step_*.json)")
    ev = _read_json(evals[-1])
    return {"source": f"step {ev['step']}", **ev}


def compare_runs(run_dirs) -> list:
    """One row per run: name, task, attention, W, pos_enc, steps, status, and the buckets (PPL, NLL +- SE,
    Markov gap) of best.pt (or of the latest evaluation of a run still going), plus its history. ``paired``:
    for a run scored on the same held-out sequences as the first run (same ``EVAL_SET_KEYS``), the NLL
    difference to it per bucket, paired over sequences, with its SE (``{"b", "d_nll", "d_nll_se"}``); else None.

    Example: ``rows = compare_runs(["runs/sw64", "runs/ttt64", "runs/full64"])``
    """
    rows = []
    for d in map(Path, run_dirs):
        cfg = _run_config(d)
        eval_key = {key: cfg.get(key) for key in EVAL_SET_KEYS[cfg["task"]]}
        st = run_status(d)
        res = _run_result(d)
        rows.append(
            {
                "run": d.name or str(d),
                "path": str(d),
                "task": cfg["task"],
                "attention": cfg["attention"],
                "window": cfg["window"],
                "pos_enc": cfg["pos_enc"],
                "steps": st["step"],
                "health": st["health"],
                "source": res["source"],
                "buckets": res["buckets"],
                "result": res,
                "history": _read_history(d / "training_history.csv"),
                "eval_key": eval_key,
            }
        )
    ref = rows[0] if rows else None
    for r in rows:
        r["paired"] = _paired_difference(r, ref) if r is not ref and r["eval_key"] == ref["eval_key"] else None
    return rows


#: Config fields that fix a run's held-out set: runs that agree on them scored the very same sequences.
EVAL_SET_KEYS = {
    "markov": ("task", "k", "vocab_size", "alpha", "window", "eval_factor", "eval_seqs", "eval_seed"),
    "text": (
        "task",
        "data",
        "tokenizer",
        "bpe_vocab_size",
        "val_fraction",
        "window",
        "eval_factor",
        "eval_seqs",
        "eval_seed",
    ),
}


def _paired_difference(run: dict, ref: dict) -> list:
    """Per bucket, the mean over sequences of (this run's NLL - the reference run's) with its standard error:
    both scored the same sequences, so the sequence-to-sequence variation they share cancels (pairing), and
    the SE of a difference is usually far below either run's own SE."""
    out = []
    ref_b = {b["b"]: b for b in ref["buckets"]}
    for b in run["buckets"]:
        if b["b"] not in ref_b or "seq_nll" not in b or "seq_nll" not in ref_b[b["b"]]:
            continue
        d = torch.tensor(b["seq_nll"], dtype=torch.float64) - torch.tensor(
            ref_b[b["b"]]["seq_nll"], dtype=torch.float64
        )
        out.append(
            {"b": b["b"], "d_nll": float(d.mean()), "d_nll_se": float(d.std(unbiased=True) / math.sqrt(d.numel()))}
        )
    return out


def compare_plot(rows: list, path) -> Path:
    """One figure across runs: PPL per bucket (+- SE) vs b (left), the binned per-position NLL -- Markov:
    the gap to Bayes -- (middle), and the PPL of the last bucket vs step (right). Returns the path."""
    from matplotlib.figure import Figure

    from eqprop.train.figures import _save

    fig = Figure(figsize=(15, 4.2), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    gap = all("bins_gap" in r["result"] for r in rows)
    for i, r in enumerate(rows):
        label = f"{r['run']} ({r['attention']}, W={r['window']})"
        bs = r["buckets"]
        nll = torch.tensor([b["nll"] for b in bs])
        se = torch.tensor([b["nll_se"] for b in bs])
        ppl = nll.exp()
        shift = 1.0 + 0.04 * (i - (len(rows) - 1) / 2)  # side by side on the log axis, bars readable
        ax1.errorbar(
            [b["b"] * shift for b in bs],
            ppl,
            yerr=[(ppl - (nll - se).exp()).tolist(), ((nll + se).exp() - ppl).tolist()],
            fmt="o-",
            ms=4,
            capsize=3,
            color=f"C{i}",
            label=label,
        )
        res = r["result"]
        _bands(ax2, res["bins_gap"] if gap else res["bins"], f"C{i}", label)
        last_b = bs[-1]["b"]
        ev = [h for h in r["history"] if h.get(f"nll_{last_b}w") is not None]
        if ev:
            n = torch.tensor([h[f"nll_{last_b}w"] for h in ev])
            s = torch.tensor([h[f"nll_se_{last_b}w"] for h in ev])
            steps = [h["step"] for h in ev]
            ax3.plot(steps, n.exp(), "o-", ms=3, color=f"C{i}", label=f"{label}: {last_b}xW")
            ax3.fill_between(steps, (n - s).exp(), (n + s).exp(), color=f"C{i}", alpha=0.2, lw=0)
    ax1.set_xscale("log")
    bucket_ticks = sorted({b["b"] for r in rows for b in r["buckets"]})
    ax1.set_xticks(bucket_ticks, [_bucket_label(b) for b in bucket_ticks])
    ax1.minorticks_off()
    ax1.set(xlabel="bucket: positions [(b-1)W, bW)", ylabel="PPL (+- SE)", title="PPL per bucket (best.pt)")
    ax1.legend(fontsize=7)
    if gap:
        ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xscale("log")
    ax2.set(
        xlabel="position t",
        ylabel="gap to Bayes (nats/token)" if gap else "NLL (nats/token)",
        title="by position (SE bands)",
    )
    ax3.set(xlabel="step", ylabel="PPL of the last bucket", title="evolution")
    ax3.legend(fontsize=7)
    return _save(fig, path)


__all__ += ["early_stop_reason", "token_nll_of"]
