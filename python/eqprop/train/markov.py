"""Train a transformer on in-context Markov-k sequences and measure it against the exact Bayes NLL.

``train(TrainConfig(...))`` runs one model through the shared loop (``eqprop.train.core``);
``evaluate`` scores a model or checkpoint on fresh sequences; ``eqprop.train.ladder`` grows models
until the gate passes (docs/design.md §8, §10). This module holds only what is Markov-specific: the
config, and the hooks of ``MarkovTask`` (model, batches, loss, evaluation, summary, figures).

What a run guarantees, so that a stalled model cannot hide:

- Training batches are sampled on the fly, ``seed = derive_seed(config.seed, "train", step, micro)``,
  and every data-parallel rank takes its rows of the same global batch: a resumed or a DDP run sees
  exactly the tokens an uninterrupted single process sees.
- Every evaluation uses one fixed held-out set (``eval_seed``), so successive gaps are paired;
  ``best.pt`` is the checkpoint with the lowest eval gap.
- At the end, ``best.pt`` is scored on two further independent sets (``final_eval_seeds``); the gate
  passes only if both gaps are <= ``target_gap_pct``. The summary also breaks the gap down by position
  and by how often the target's context was visited before (``eqprop.markov.gap_breakdowns``).
- The training loss is the mean NLL over positions ``t >= k``, the positions the gap is measured on.

History columns: ``mem_mb`` is the CUDA allocator's peak on a GPU and the process's peak RSS on CPU;
``tokens_per_s`` counts all ranks' tokens.

Artifacts (rank 0) in ``out_dir``: ``config.json``, ``training_history.csv``, ``summary.json``,
``best.pt``, ``last.pt``, ``figures/training_curve.png``, ``figures/gap_by_position.png``.

Example::

    from eqprop.train.markov import TrainConfig, train
    summary = train(TrainConfig(k=2, max_steps=400, out_dir="runs/k2"))
    print(summary)          # status, steps, best gap +- SE, final gaps, gate
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from eqprop import markov
from eqprop.models import POS_ENCODINGS, Transformer, next_token_nll
from eqprop.train.checkpoint import load_checkpoint_file
from eqprop.train.config import RunConfig, option
from eqprop.train.core import BASE_COLUMNS, DistInfo, Run, RunResult, Task, derive_seed, fit

log = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "MarkovTask",
    "Summary",
    "EvalResult",
    "train",
    "evaluate",
    "load_checkpoint",
    "gate_passed",
    "build_model",
    "train_batch",
    "make_eval_set",
    "evaluate_set",
    "HISTORY_COLUMNS",
]

PosEnc = Literal["learned", "sinusoidal", "rope", "alibi", "none"]
assert POS_ENCODINGS == PosEnc.__args__

EVAL_COLUMNS = ("eval_nll", "bayes_nll", "gap_pct", "gap_se")
HISTORY_COLUMNS = BASE_COLUMNS[:4] + EVAL_COLUMNS + BASE_COLUMNS[4:]


@dataclass
class TrainConfig(RunConfig):
    """Everything a Markov-k training run depends on. Defaults: the CPU demo (k = 2, a few minutes).

    The loop's knobs (optimizer, schedule, batch, eval cadence, out_dir, resume / overwrite) come from
    ``eqprop.train.config.RunConfig``; ``batch_size`` is the GLOBAL number of sequences per micro-step.
    """

    options_title = "Markov-k benchmark and model options"

    # the benchmark (docs/design.md §8)
    k: int = option(2, "Markov order")
    vocab_size: int = option(2, "vocabulary size V")
    alpha: float = option(1.0, "Dirichlet concentration of each table row")
    seq_len: Optional[int] = option(None, "training length (default 100*2^k)")
    eval_seq_len: Optional[int] = option(None, "evaluation length; default = seq_len (set only to override on purpose)")
    # the model
    n_layer: int = option(2, "transformer depth")
    n_head: int = option(4, "attention heads")
    d_model: int = option(64, "width")
    mlp_ratio: float = option(4.0, "MLP hidden width / d_model")
    pos_enc: PosEnc = option("rope", "positional encoding")
    grad_checkpointing: bool = option(False, "recompute blocks in backward")
    # evaluation and the gate
    eval_batches: int = option(4, "batches in the fixed held-out eval set")
    eval_batch_size: int = option(32, "sequences per eval batch")
    eval_seed: int = option(1_000_003, "seed of the held-out eval set")
    final_eval_batches: int = option(16, "batches in EACH of the two final eval sets")
    final_eval_seeds: tuple[int, ...] = option(
        (2_000_003, 3_000_017), "seeds of the two independent final eval sets", metavar="SEED"
    )
    target_gap_pct: float = option(3.0, "gate, and early stop once gap + 2 SE <= target")
    out_dir: str = option("runs/markov", "where artifacts go", metavar="DIR")

    def checks(self) -> list:
        return super().checks() + [
            ("k", self.k >= 1, ">= 1"),
            ("vocab_size", self.vocab_size >= 2, ">= 2"),
            ("alpha", self.alpha > 0, "> 0"),
            ("seq_len", self.seq_len is None or self.seq_len > self.k, f"None or > k={self.k}"),
            ("eval_seq_len", self.eval_seq_len is None or self.eval_seq_len > self.k, f"None or > k={self.k}"),
            ("eval_batches", self.eval_batches >= 1, ">= 1"),
            ("eval_batch_size", self.eval_batch_size >= 2, ">= 2 (a standard error needs 2 sequences)"),
            ("final_eval_batches", self.final_eval_batches >= 1, ">= 1"),
            (
                "final_eval_seeds",
                len(self.final_eval_seeds) == 2
                and len(set(self.final_eval_seeds)) == 2
                and self.eval_seed not in self.final_eval_seeds,
                "two distinct seeds, both different from eval_seed",
            ),
        ]

    @property
    def train_len(self) -> int:
        return self.seq_len or markov.default_seq_len(self.k)

    @property
    def eval_len(self) -> int:
        return self.eval_seq_len or self.train_len


@dataclass
class Summary(RunResult):
    """What ``train`` returns (and writes, less ``history``, to ``summary.json``); ``print(summary)`` gives
    the few lines that matter.

    ``status``: ``reached_target`` (early stop), ``max_steps``, ``interrupted`` (SIGINT/SIGTERM, named in
    ``stop_signal``; no final evaluation), ``diverged`` (non-finite loss; final evaluation of ``best.pt``
    if any). ``final``: the two independent final evaluations of ``best.pt`` (dicts with ``seed``,
    ``n_seqs``, ``gap_pct``, ``gap_se``, ``model_nll``, ``bayes_nll``, ``by_position``, ``by_visit_count``).
    """

    k: int = 0
    seq_len: int = 0
    target_gap_pct: float = 0.0
    gate_passed: bool = False
    best_gap_pct: Optional[float] = None
    best_gap_se: Optional[float] = None

    def __str__(self) -> str:
        lines = [
            f"Markov k={self.k} (L={self.seq_len}), {self.n_params:,} params: {self.status} after {self.steps} "
            f"steps, {self.wall_s:.0f} s"
        ]
        if self.message:
            lines.append(f"  {self.message}")
        if self.best_gap_pct is not None:
            lines.append(f"best eval gap {_fmt_gap(self.best_gap_pct, self.best_gap_se)} at step {self.best_step}")
        if self.final:
            lines.append(
                "final gaps of best.pt: "
                + ", ".join(
                    f"{_fmt_gap(f['gap_pct'], f['gap_se'])} ({f['n_seqs']} seqs, seed {f['seed']})" for f in self.final
                )
            )
            lines.append(f"gate (both final gaps <= {self.target_gap_pct}%): {'PASS' if self.gate_passed else 'FAIL'}")
        lines.append(f"out_dir: {self.out_dir}")
        return "\n".join(lines)


def _fmt_gap(gap, se) -> str:
    return "n/a" if gap is None else f"{gap:+.2f}% +- {se:.2f}"


@dataclass
class EvalResult:
    """One evaluation: ``gap_pct`` +- ``gap_se`` (paired, t >= k), mean NLLs, and the breakdowns.

    ``model_token_nll`` / ``bayes_token_nll`` are the ``[N, L]`` per-token NLLs (not written to JSON).
    """

    seed: int
    n_seqs: int
    seq_len: int
    gap_pct: float
    gap_se: float
    model_nll: float
    bayes_nll: float
    by_position: dict
    by_visit_count: list
    model_token_nll: Optional[torch.Tensor] = field(default=None, repr=False)
    bayes_token_nll: Optional[torch.Tensor] = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.endswith("token_nll")}


def gate_passed(final: list, target_gap_pct: float) -> bool:
    """The pass gate: two independent final evaluations, both with gap <= target (one lucky set is not
    enough). Example: ``gate_passed([{"gap_pct": 2.1}, {"gap_pct": 2.8}], 3.0)  # True``"""
    return len(final) == 2 and all(f["gap_pct"] <= target_gap_pct for f in final)


# ----------------------------------------------------------------------------------------------------
# the hooks


class MarkovTask(Task):
    """Markov-k next-token prediction scored against the exact Bayes NLL (the hooks of ``core.fit``)."""

    name = "markov"
    score = "gap_pct"
    eval_columns = EVAL_COLUMNS
    must_match_on_resume = (
        "k",
        "vocab_size",
        "alpha",
        "seq_len",
        "n_layer",
        "n_head",
        "d_model",
        "mlp_ratio",
        "pos_enc",
        "eval_seed",
        "eval_batches",
        "eval_batch_size",
        "eval_seq_len",
    )

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._eval_set = None

    def memory_need(self, run: Run) -> dict:
        """Lower bounds, in bytes, of what certainly gets allocated (attention scores not counted)."""
        c, V = self.cfg, self.cfg.vocab_size
        L, per = c.train_len, c.batch_size // run.dist.world_size
        act_bytes = 2 if c.bf16 else 4
        # saved per layer and token: residual in, LN1, q, k, v, attention out, LN2, MLP hidden in and out
        saved = c.n_layer if c.grad_checkpointing else c.n_layer * (7 + 2 * c.mlp_ratio)
        need = {
            "training tokens": c.batch_size * L * 8,  # every rank samples the global batch, int64
            "transition tables": c.batch_size * V**c.k * V * 4,
            "activations": int(per * L * c.d_model * saved * act_bytes),
            "logits": per * L * V * 4 * 2,
            "eval set": c.eval_batches * c.eval_batch_size * c.eval_len * (8 + 8),
        }
        if c.pos_enc == "learned":  # parameter, gradient, two AdamW moments
            need["position table"] = max(c.train_len, c.eval_len) * c.d_model * 4 * 4
        return need

    def build_model(self, run: Run) -> Transformer:
        return build_model(self.cfg)

    def train_batch(self, run: Run, step: int, micro: int) -> torch.Tensor:
        return train_batch(self.cfg, step, micro, run.dist, run.device)

    def loss(self, run: Run, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return next_token_nll(model(x), x)[:, self.cfg.k :].mean()  # mean NLL over t >= k

    def eval_set(self, run: Run) -> list:
        if self._eval_set is None:
            self._eval_set = make_eval_set(self.cfg, self.cfg.eval_seed, self.cfg.eval_batches, run.device)
        return self._eval_set

    def evaluate(self, run: Run, model: torch.nn.Module) -> dict:
        ev = evaluate_set(model, self.eval_set(run), self.cfg, run.dist, breakdowns=False)
        log.info("eval NLL %.4f (Bayes %.4f), gap %.2f%% +- %.2f", ev.model_nll, ev.bayes_nll, ev.gap_pct, ev.gap_se)
        return {"eval_nll": ev.model_nll, "bayes_nll": ev.bayes_nll, "gap_pct": ev.gap_pct, "gap_se": ev.gap_se}

    def stop_reason(self, run: Run, m: dict) -> Optional[str]:
        if m["gap_pct"] + 2 * m["gap_se"] <= self.cfg.target_gap_pct:
            return f"eval gap {m['gap_pct']:.2f}% + 2 SE ({m['gap_se']:.2f}) <= target {self.cfg.target_gap_pct}%"
        return None

    def final_evaluation(self, run: Run, model: torch.nn.Module) -> list:
        return [
            evaluate_set(
                model,
                make_eval_set(self.cfg, seed, self.cfg.final_eval_batches, run.device),
                self.cfg,
                run.dist,
                breakdowns=True,
                seed=seed,
            ).to_dict()
            for seed in self.cfg.final_eval_seeds
        ]

    def summarize(self, run: Run, r: RunResult) -> Summary:
        return Summary.extend(
            r,
            k=self.cfg.k,
            seq_len=self.cfg.train_len,
            target_gap_pct=self.cfg.target_gap_pct,
            gate_passed=gate_passed(r.final, self.cfg.target_gap_pct),
            best_gap_pct=r.best.get("gap_pct"),
            best_gap_se=r.best.get("gap_se"),
        )

    def figures(self, run: Run, r: RunResult) -> dict:
        from eqprop.train import figures as figs

        c = self.cfg
        bayes = float(torch.cat([b[:, c.k :] for _, b in self.eval_set(run)]).double().mean())
        out = {
            "training_curve": (
                "training_curve.png",
                lambda p: figs.training_curve(r.history, bayes, c.target_gap_pct, p, k=c.k),
            )
        }
        if r.final:
            out["gap_by_position"] = (
                "gap_by_position.png",
                lambda p: figs.gap_by_position(r.final[0], p, k=c.k, target=c.target_gap_pct),
            )
        return out


def train(config, *, callback: Optional[Callable[[dict, torch.nn.Module], None]] = None) -> Summary:
    """Train a ``Transformer`` on Markov-k sequences, evaluate against Bayes, write the artifacts.

    Args:
        config: a ``TrainConfig`` or a dict for ``TrainConfig.from_dict``.
        callback: called after every optimizer step with the step's record (``step``, ``lr``,
            ``train_loss``, ``grad_norm`` and, on evaluation steps, ``gap_pct`` / ``gap_se`` ...) and
            the model (unwrapped); for live plots in notebooks.

    Returns:
        a ``Summary``. Under ``torchrun`` every rank returns it; only rank 0 writes files.

    Raises:
        ValueError: ``out_dir`` already holds a run and neither ``resume`` nor ``overwrite`` is set; the
            config needs more memory than the device has; a resume whose config differs.

    Example: ``print(train(TrainConfig(k=1, max_steps=200, out_dir="runs/k1", progress=False)))``
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    return fit(MarkovTask(cfg), cfg, callback=callback)


# ----------------------------------------------------------------------------------------------------
# model, data, evaluation


def build_model(cfg: TrainConfig) -> Transformer:
    """The ``Transformer`` a config describes (sized for ``max(train_len, eval_len)`` positions)."""
    return Transformer(
        cfg.vocab_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        d_model=cfg.d_model,
        mlp_ratio=cfg.mlp_ratio,
        max_len=max(cfg.train_len, cfg.eval_len),
        pos_enc=cfg.pos_enc,
        grad_checkpointing=cfg.grad_checkpointing,
    )


def train_batch(cfg: TrainConfig, step: int, micro: int, dist_info: DistInfo, device) -> torch.Tensor:
    """This rank's rows ``[B / world, L]`` of the global micro-batch of (step, micro). Every rank samples the
    whole global batch from the same seed and keeps its slice (sampling is cheap next to the model), which
    makes a DDP run see exactly the tokens of a single-process run."""
    seed = derive_seed(cfg.seed, "train", step, micro)
    x = markov.sample(
        cfg.batch_size,
        cfg.k,
        seq_len=cfg.train_len,
        vocab_size=cfg.vocab_size,
        alpha=cfg.alpha,
        seed=seed,
        device=device,
    )
    per = cfg.batch_size // dist_info.world_size
    return x[dist_info.rank * per : (dist_info.rank + 1) * per]


def make_eval_set(cfg: TrainConfig, seed: int, n_batches: int, device) -> list:
    """``n_batches`` pairs ``(tokens [b, L_eval], bayes_nll [b, L_eval] float64)`` from ``seed``."""
    out = []
    for i in range(n_batches):
        x = markov.sample(
            cfg.eval_batch_size,
            cfg.k,
            seq_len=cfg.eval_len,
            vocab_size=cfg.vocab_size,
            alpha=cfg.alpha,
            seed=derive_seed(seed, "eval", i),
            device=device,
        )
        out.append((x, markov.bayes_nll(x, cfg.k, vocab_size=cfg.vocab_size, alpha=cfg.alpha, dtype=torch.float64)))
    return out


@torch.no_grad()
def evaluate_set(
    model: torch.nn.Module,
    eval_set: list,
    cfg: TrainConfig,
    dist_info: DistInfo,
    *,
    breakdowns: bool,
    seed: Optional[int] = None,
) -> EvalResult:
    """Per-token NLL (``model.token_nll``) of every sequence in ``eval_set`` against Bayes: the paired gap
    with its SE, and with ``breakdowns`` the gap by position and by context visits. Batches are shared
    out over ranks and summed back. Used by every trainer with a Markov task.

    Example: ``evaluate_set(model, make_eval_set(cfg, 0, 4, "cpu"), cfg, DistInfo(), breakdowns=False)``"""
    was_training = model.training
    model.eval()
    device = eval_set[0][0].device
    tokens = torch.cat([x for x, _ in eval_set])  # [N, L]
    bayes = torch.cat([b for _, b in eval_set])  # [N, L]
    model_nll = torch.zeros(bayes.shape, dtype=torch.float64, device=device)
    row = 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        for i, (x, _) in enumerate(eval_set):
            if i % dist_info.world_size == dist_info.rank:
                model_nll[row : row + x.shape[0]] = model.token_nll(x).double()
            row += x.shape[0]
    if dist_info.world_size > 1:
        torch.distributed.all_reduce(model_nll)  # rows of other ranks are zero here
    model.train(was_training)
    k = cfg.k
    gap, se = markov.gap_pct(model_nll, bayes, k)
    by_position, by_visits = (
        markov.gap_breakdowns(model_nll, bayes, tokens, k, vocab_size=cfg.vocab_size) if breakdowns else ({}, [])
    )
    return EvalResult(
        seed=seed if seed is not None else -1,
        n_seqs=tokens.shape[0],
        seq_len=tokens.shape[1],
        gap_pct=gap,
        gap_se=se,
        model_nll=float(model_nll[:, k:].mean()),
        bayes_nll=float(bayes[:, k:].mean()),
        by_position=by_position,
        by_visit_count=by_visits,
        model_token_nll=model_nll,
        bayes_token_nll=bayes,
    )


def load_checkpoint(path, *, device="cpu") -> tuple:
    """``(model, config, checkpoint dict)`` from a ``best.pt`` / ``last.pt`` written by ``train``.

    The file is read with ``torch.load(weights_only=True)`` and its checksum verified
    (``eqprop.train.checkpoint.load_checkpoint_file``): a broken file is a ``ValueError`` naming it.

    Example: ``model, cfg, ckpt = load_checkpoint("runs/markov/best.pt")``
    """
    ckpt = load_checkpoint_file(path, map_location=device)
    if ckpt.get("trainer") != MarkovTask.name:
        raise ValueError(f"{path} is a checkpoint of the {ckpt.get('trainer')!r} trainer, not of eqprop.train.markov")
    model = Transformer(**ckpt["model_config"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model, TrainConfig.from_dict(ckpt["config"]), ckpt


def evaluate(
    model_or_checkpoint,
    *,
    config: Optional[TrainConfig] = None,
    n_batches: int = 16,
    batch_size: Optional[int] = None,
    seed: int = 2_000_003,
    seq_len: Optional[int] = None,
    device: Optional[str] = None,
) -> EvalResult:
    """Gap to Bayes of a model (or a checkpoint path) on ``n_batches`` fresh batches from ``seed``.

    Args:
        model_or_checkpoint: a model with ``token_nll(tokens)`` (``Transformer``, ``EquilibriumLM``; then
            ``config`` gives k, V, alpha, lengths) or a path to a checkpoint written by ``train``.
        n_batches, batch_size: size of the evaluation set (>= 1 batches; ``batch_size`` default: the
            config's ``eval_batch_size``).
        seed: seed of the evaluation set; use a seed the run never evaluated on for an unbiased number.
        seq_len: evaluation length (default: the config's evaluation length).

    Returns:
        an ``EvalResult`` (gap, SE, mean NLLs, gap by position thirds and by context visit count, and the
        ``[N, L]`` per-token NLLs).

    Example: ``evaluate("runs/markov/best.pt", n_batches=32, seed=7).gap_pct``
    """
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches (--batches) must be an int >= 1, got {n_batches!r}")
    if isinstance(model_or_checkpoint, (str, Path)):
        from eqprop.train.core import resolve_device

        dev = resolve_device(device or "cpu")
        model, ckpt_cfg, _ = load_checkpoint(model_or_checkpoint, device=dev)
        config = config or ckpt_cfg
    else:
        model = model_or_checkpoint
        if config is None:
            raise ValueError("evaluate(model, ...) needs config= (a TrainConfig giving k, vocab_size, alpha)")
        dev = device or str(next(model.parameters()).device)
    overrides = {"eval_seq_len": seq_len} if seq_len is not None else {}
    if batch_size is not None:
        overrides["eval_batch_size"] = batch_size
    cfg = config.replace(**overrides) if overrides else config
    model = model.to(dev)
    eval_set = make_eval_set(cfg, seed, n_batches, dev)
    return evaluate_set(model, eval_set, cfg, DistInfo(), breakdowns=True, seed=seed)
