"""Train a transformer on in-context Markov-k sequences and measure it against the exact Bayes NLL.

``train(TrainConfig(...))`` runs one model; ``evaluate`` scores a model or checkpoint on fresh
sequences; ``ladder`` grows models until the gate passes (DESIGN.md §8, issue 3).

What a run guarantees, so that a stalled model cannot hide:

- Training batches are sampled on the fly, ``seed = derive_seed(config.seed, "train", step, micro)``,
  and every data-parallel rank takes its rows of the same global batch: a resumed or a DDP run sees
  exactly the tokens an uninterrupted single process sees.
- Every evaluation uses one fixed held-out set (``eval_seed``), so successive gaps are paired;
  ``best.pt`` is the checkpoint with the lowest eval gap.
- At the end, ``best.pt`` is scored on two further independent sets (``final_eval_seeds``); the gate
  passes only if both gaps are <= ``target_gap_pct``. The summary also breaks the gap down by position
  (early / middle / late thirds of ``t >= k``) and by how often the target's context was visited before.
- The training loss is the mean NLL over positions ``t >= k``, the positions the gap is measured on.

Context visit count of a target ``x_t`` (t >= k): ``N_<t(c_t)``, the number of earlier targets in
``[k, t)`` with the same context ``c_t = x_{t-k..t-1}`` -- exactly the count the Bayes predictive
conditions on, so rare contexts are those where the posterior is still broad.

History columns: ``mem_mb`` is the CUDA allocator's peak on a GPU and the process's peak RSS on CPU;
``tokens_per_s`` counts all ranks' tokens.

Artifacts (rank 0) in ``out_dir``: ``config.json``, ``training_history.csv``, ``summary.json``,
``best.pt``, ``last.pt``, ``figures/training_curve.png``, ``figures/gap_by_position.png``.

Example::

    from eqprop.train.markov import TrainConfig, train
    summary = train(TrainConfig(k=2, max_steps=400, out_dir="runs/k2"))
    print(summary.final[0]["gap_pct"], summary.gate_passed)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from eqprop import markov
from eqprop.models.transformer import POS_ENCODINGS, Transformer
from eqprop.train._common import (
    SCHEDULES,
    DistInfo,
    StopRequest,
    derive_seed,
    lr_at,
    peak_memory_mb,
    resolve_device,
    rng_state,
    save_atomic,
    set_rng_state,
    setup_distributed,
    write_text_atomic,
)

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "Summary", "EvalResult", "train", "evaluate", "ladder", "load_checkpoint",
           "context_visits", "gate_passed", "VISIT_BUCKETS"]

#: Buckets of the context visit count N_<t(c_t) for the "gap by visit count" report: [lo, hi).
VISIT_BUCKETS = ((0, 1), (1, 3), (3, 10), (10, 30), (30, 100), (100, None))

HISTORY_COLUMNS = ("step", "lr", "train_loss", "grad_norm", "eval_nll", "bayes_nll", "gap_pct", "gap_se",
                   "tokens_per_s", "mem_mb", "elapsed_s")


@dataclass
class TrainConfig:
    """Everything a Markov-k training run depends on. Defaults: the CPU demo (k = 2, a few minutes).

    ``batch_size`` is the GLOBAL number of sequences per micro-step (split evenly over data-parallel
    ranks); one optimizer step sees ``batch_size * grad_accum_steps`` sequences.
    """

    # the benchmark (DESIGN.md §8)
    k: int = field(default=2, metadata={"help": "Markov order"})
    vocab_size: int = field(default=2, metadata={"help": "vocabulary size V"})
    alpha: float = field(default=1.0, metadata={"help": "Dirichlet concentration of each table row"})
    seq_len: Optional[int] = field(default=None, metadata={"help": "training length (default 100*2^k)"})
    eval_seq_len: Optional[int] = field(
        default=None, metadata={"help": "evaluation length; default = seq_len (set only to override on purpose)"})
    # the model
    n_layer: int = field(default=2, metadata={"help": "transformer depth"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    d_model: int = field(default=64, metadata={"help": "width"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden width / d_model"})
    pos_enc: str = field(default="rope", metadata={"help": f"positional encoding: {' | '.join(POS_ENCODINGS)}"})
    # optimization
    batch_size: int = field(default=32, metadata={"help": "global sequences per micro-step"})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW)"})
    min_lr: float = field(default=3e-4, metadata={"help": "final learning rate of cosine / wsd"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup steps"})
    schedule: str = field(default="cosine", metadata={"help": f"lr schedule: {' | '.join(SCHEDULES)}"})
    wsd_decay_frac: float = field(default=0.2, metadata={"help": "fraction of steps the wsd schedule decays over"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm (0 = off)"})
    max_steps: int = field(default=400, metadata={"help": "optimizer steps"})
    # memory / speed
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for the forward pass"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    # evaluation and the gate
    eval_every: int = field(default=50, metadata={"help": "steps between evaluations"})
    eval_batches: int = field(default=4, metadata={"help": "batches in the fixed held-out eval set"})
    eval_batch_size: int = field(default=32, metadata={"help": "sequences per eval batch"})
    eval_seed: int = field(default=1_000_003, metadata={"help": "seed of the held-out eval set"})
    final_eval_batches: int = field(default=16, metadata={"help": "batches in EACH of the two final eval sets"})
    final_eval_seeds: tuple = field(default=(2_000_003, 3_000_017),
                                    metadata={"help": "seeds of the two independent final eval sets"})
    target_gap_pct: float = field(default=3.0, metadata={"help": "gate, and early stop once gap + 2 SE <= target"})
    early_stop: bool = field(default=True, metadata={"help": "stop when the eval gap + 2 SE <= target"})
    # bookkeeping
    seed: int = field(default=0, metadata={"help": "seed of the model init and the training stream"})
    out_dir: str = field(default="runs/markov", metadata={"help": "where artifacts go"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/last.pt if present"})
    log_every: int = field(default=10, metadata={"help": "steps between history rows"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm bar"})

    def __post_init__(self):
        self.final_eval_seeds = tuple(int(s) for s in self.final_eval_seeds)
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type.replace("Optional[", "").rstrip("]")
            if value is None and f.type.startswith("Optional"):
                continue
            if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
                continue
            expected = {"int": int, "float": float, "bool": bool, "str": str}.get(kind)
            if expected and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
                raise TypeError(f"TrainConfig.{f.name} must be {f.type}, got {type(value).__name__} {value!r}")
        checks = [
            ("k", self.k >= 1, ">= 1"),
            ("vocab_size", self.vocab_size >= 2, ">= 2"),
            ("alpha", self.alpha > 0, "> 0"),
            ("seq_len", self.seq_len is None or self.seq_len > self.k, f"None or > k={self.k}"),
            ("eval_seq_len", self.eval_seq_len is None or self.eval_seq_len > self.k, f"None or > k={self.k}"),
            ("pos_enc", self.pos_enc in POS_ENCODINGS, f"one of {POS_ENCODINGS}"),
            ("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum_steps", self.grad_accum_steps >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"in [0, lr={self.lr}]"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("wsd_decay_frac", 0 < self.wsd_decay_frac <= 1, "in (0, 1]"),
            ("max_steps", self.max_steps >= 1, ">= 1"),
            ("eval_every", self.eval_every >= 1, ">= 1"),
            ("eval_batches", self.eval_batches >= 1, ">= 1"),
            ("eval_batch_size", self.eval_batch_size >= 2, ">= 2 (a standard error needs 2 sequences)"),
            ("final_eval_batches", self.final_eval_batches >= 1, ">= 1"),
            ("final_eval_seeds", len(self.final_eval_seeds) == 2 and len(set(self.final_eval_seeds)) == 2
             and self.eval_seed not in self.final_eval_seeds, "two distinct seeds, both different from eval_seed"),
            ("grad_clip", self.grad_clip >= 0, ">= 0"),
            ("log_every", self.log_every >= 1, ">= 1"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {need}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a plain dict (e.g. a ``config.json``); unknown keys are an error that lists the valid
        ones, so a misspelled knob is never silently ignored.

        Example: ``TrainConfig.from_dict({"k": 3, "max_steps": 2000})``
        """
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise KeyError(f"unknown TrainConfig key(s) {unknown}; valid keys are: {', '.join(valid)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (unknown keys are an error, as in ``from_dict``)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["final_eval_seeds"] = list(self.final_eval_seeds)
        return d

    @property
    def train_len(self) -> int:
        return self.seq_len or markov.default_seq_len(self.k)

    @property
    def eval_len(self) -> int:
        return self.eval_seq_len or self.train_len


@dataclass
class Summary:
    """What ``train`` returns (and writes, less ``history``, to ``summary.json``).

    ``status``: ``reached_target`` (early stop), ``max_steps``, ``interrupted`` (SIGINT/SIGTERM; no final
    evaluation), ``diverged`` (non-finite loss; final evaluation of the last ``best.pt`` if any).
    ``final``: the two independent final evaluations of ``best.pt`` (dicts with ``seed``, ``n_seqs``,
    ``gap_pct``, ``gap_se``, ``model_nll``, ``bayes_nll``, ``by_position``, ``by_visit_count``).
    """

    status: str
    steps: int
    k: int
    seq_len: int
    n_params: int
    target_gap_pct: float
    gate_passed: bool
    best_step: Optional[int]
    best_gap_pct: Optional[float]
    best_gap_se: Optional[float]
    final: list
    wall_s: float
    tokens_seen: int
    world_size: int
    out_dir: str
    figures: dict
    message: str = ""
    history: list = field(default_factory=list, repr=False)

    def to_dict(self, with_history: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not with_history:
            d.pop("history")
        return d


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


# ----------------------------------------------------------------------------------------------------
# the loop


def train(config, *, callback: Optional[Callable[[dict, torch.nn.Module], None]] = None) -> Summary:
    """Train a ``Transformer`` on Markov-k sequences, evaluate against Bayes, write the artifacts.

    Args:
        config: a ``TrainConfig`` or a dict for ``TrainConfig.from_dict``.
        callback: called after every optimizer step with the step's record (``step``, ``lr``,
            ``train_loss``, ``grad_norm`` and, on evaluation steps, ``gap_pct`` / ``gap_se`` ...) and
            the model (unwrapped); for live plots in notebooks.

    Returns:
        a ``Summary``. Under ``torchrun`` every rank returns it; only rank 0 writes files.

    Example: ``train(TrainConfig(k=1, max_steps=200, out_dir="runs/k1", progress=False)).final[0]["gap_pct"]``
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    t_start = time.perf_counter()
    dist_info = setup_distributed(cfg.device if cfg.device != "auto" else resolve_device("auto"))
    device = resolve_device(cfg.device, dist_info.local_rank)
    if cfg.batch_size % dist_info.world_size:
        raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} must be divisible by the number of "
                         f"data-parallel processes ({dist_info.world_size})")
    out_dir = Path(cfg.out_dir)
    log.info("config: %s", json.dumps(cfg.to_dict()))

    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    state = {"step": 0, "best_gap": math.inf, "best_se": None, "best_step": None, "history": [],
             "tokens_seen": 0, "elapsed_s": 0.0}
    if cfg.resume and (out_dir / "last.pt").exists():
        state = _restore(out_dir / "last.pt", cfg, model, optimizer, device)
        log.info("resumed from %s at step %d", out_dir / "last.pt", state["step"])
    elif cfg.resume:
        log.info("resume requested but %s does not exist: starting from scratch", out_dir / "last.pt")
    if state["step"] == 0 and dist_info.is_main:
        # a fresh run must not inherit another run's checkpoints (a divergence before the first evaluation
        # would otherwise leave them looking like this run's)
        for stale in ("best.pt", "last.pt", "summary.json"):
            if (out_dir / stale).exists():
                log.warning("fresh run in %s: removing the earlier %s", out_dir, stale)
                (out_dir / stale).unlink()
    if dist_info.is_main:  # only now: a config that cannot build or resume must not overwrite the run's record
        (out_dir / "figures").mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(cfg.to_dict(), indent=2) + "\n", out_dir / "config.json")
    raw_model = model
    if dist_info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)

    k, L = cfg.k, cfg.train_len
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * L
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.bf16)
    eval_set = make_eval_set(cfg, cfg.eval_seed, cfg.eval_batches, device)
    bayes_eval_nll = float(torch.cat([b[:, k:] for _, b in eval_set]).double().mean())
    history = state["history"]
    step, status, message = state["step"], "max_steps", ""
    if state.get("status") == "reached_target" and cfg.early_stop:
        status = "reached_target"
        message = f"resumed a run that had reached its target at step {step}: final evaluation only"
        log.info(message)
    elapsed_before = state["elapsed_s"]

    from tqdm import tqdm  # not tqdm.auto: it warns in kernels without ipywidgets

    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"markov k={k}", dynamic_ncols=True,
               disable=not (cfg.progress and dist_info.is_main))
    with StopRequest() as stop:
        while step < cfg.max_steps and status == "max_steps":
            t0 = time.perf_counter()
            lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                       schedule=cfg.schedule, decay_frac=cfg.wsd_decay_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # forward, loss, backward (gradient accumulation; DDP all-reduces on the last micro-step only)
            model.train()
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            for micro in range(cfg.grad_accum_steps):
                x = train_batch(cfg, step, micro, dist_info, device)  # [B / world, L]
                sync = micro == cfg.grad_accum_steps - 1 or dist_info.world_size == 1
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with autocast:
                        out = model(x)
                    loss = out.nll[:, k:].mean() / cfg.grad_accum_steps  # mean NLL over t >= k
                    loss.backward()
                loss_sum += loss.detach().double()
            if dist_info.world_size > 1:  # the global mean, so every rank logs (and judges) the same loss
                dist.all_reduce(loss_sum)
                loss_sum /= dist_info.world_size
            train_loss = float(loss_sum)

            # clip, divergence check, step
            grad_norm = float(torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                             cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
            if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
                status = "diverged"
                message = (f"non-finite {'loss' if not math.isfinite(train_loss) else 'gradient norm'} at step "
                           f"{step + 1} (loss={train_loss}, grad_norm={grad_norm}); last.pt / best.pt hold the "
                           "last evaluated checkpoint")
                log.warning(message)
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # log
            dt = time.perf_counter() - t0
            record = {"step": step, "lr": lr, "train_loss": train_loss, "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_step / dt, "mem_mb": peak_memory_mb(device),
                      "elapsed_s": elapsed_before + time.perf_counter() - t_start}
            state["tokens_seen"] += tokens_per_step

            # eval (the fixed held-out set, paired with every earlier evaluation), checkpoint
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                ev = _evaluate_set(raw_model, eval_set, cfg, dist_info, breakdowns=False)
                record.update(eval_nll=ev.model_nll, bayes_nll=ev.bayes_nll, gap_pct=ev.gap_pct, gap_se=ev.gap_se)
                log.info("step %d: train loss %.4f, eval NLL %.4f (Bayes %.4f), gap %.2f%% +- %.2f",
                         step, train_loss, ev.model_nll, ev.bayes_nll, ev.gap_pct, ev.gap_se)
                if ev.gap_pct < state["best_gap"]:
                    state.update(best_gap=ev.gap_pct, best_se=ev.gap_se, best_step=step)
                    if dist_info.is_main:
                        save_atomic(_checkpoint(raw_model, optimizer, cfg, state, step, history + [record],
                                                t_start, elapsed_before), out_dir / "best.pt")
                if cfg.early_stop and ev.gap_pct + 2 * ev.gap_se <= cfg.target_gap_pct:
                    status = "reached_target"
                    message = (f"eval gap {ev.gap_pct:.2f}% + 2 SE ({ev.gap_se:.2f}) <= target "
                               f"{cfg.target_gap_pct}% at step {step}")
            if record.get("gap_pct") is not None or step % cfg.log_every == 0 or step == cfg.max_steps:
                history.append(record)
            if callback is not None:
                callback(record, raw_model)
            last_gap = next((r["gap_pct"] for r in reversed(history) if r.get("gap_pct") is not None), None)
            bar.set_postfix(loss=f"{train_loss:.4f}", gap=f"{last_gap:.2f}%" if last_gap is not None else "-")
            bar.update(1)

            stop_now = _agree(stop.requested is not None, dist_info, device)
            if "gap_pct" in record or stop_now or status != "max_steps" or step == cfg.max_steps:
                state["status"] = status
                if dist_info.is_main:
                    save_atomic(_checkpoint(raw_model, optimizer, cfg, state, step, history, t_start,
                                            elapsed_before), out_dir / "last.pt")
                    _write_history(history, out_dir / "training_history.csv")
            if stop_now:
                status = "interrupted"
                message = f"{stop.requested or 'stop request'} at step {step}; last.pt written, resume with resume=True"
                log.warning(message)
                break
            if status != "max_steps":
                break
    bar.close()
    if dist_info.is_main:
        _write_history(history, out_dir / "training_history.csv")

    # final evaluation of best.pt on two independent large sets, the gate
    final = []
    if status != "interrupted" and state["best_step"] is not None:
        _barrier(dist_info)  # rank 0 has written best.pt; ranks share out_dir (one node or a shared file system)
        best = torch.load(out_dir / "best.pt", map_location=device, weights_only=False)
        raw_model.load_state_dict(best["model"])
        for seed in cfg.final_eval_seeds:
            eval_large = make_eval_set(cfg, seed, cfg.final_eval_batches, device)
            final.append(_evaluate_set(raw_model, eval_large, cfg, dist_info, breakdowns=True, seed=seed).to_dict())
    gate = gate_passed(final, cfg.target_gap_pct)
    figures = {}
    if dist_info.is_main:
        from eqprop.train import figures as figs

        figures["training_curve"] = str(figs.training_curve(history, bayes_eval_nll, cfg.target_gap_pct,
                                                            out_dir / "figures" / "training_curve.png", k=k))
        if final:
            figures["gap_by_position"] = str(figs.gap_by_position(final[0], out_dir / "figures" / "gap_by_position.png",
                                                                  k=k, target=cfg.target_gap_pct))
    summary = Summary(
        status=status, steps=step, k=k, seq_len=L, n_params=raw_model.num_params(),
        target_gap_pct=cfg.target_gap_pct, gate_passed=gate, best_step=state["best_step"],
        best_gap_pct=state["best_gap"] if math.isfinite(state["best_gap"]) else None,
        best_gap_se=state["best_se"], final=final,
        wall_s=elapsed_before + time.perf_counter() - t_start, tokens_seen=state["tokens_seen"],
        world_size=dist_info.world_size, out_dir=str(out_dir), figures=figures, message=message, history=history)
    if dist_info.is_main:
        write_text_atomic(json.dumps(summary.to_dict(), indent=2) + "\n", out_dir / "summary.json")
    if dist_info.initialized_here:
        dist.destroy_process_group()
    return summary


def gate_passed(final: list, target_gap_pct: float) -> bool:
    """The pass gate: two independent final evaluations, both with gap <= target (one lucky set is not
    enough). Example: ``gate_passed([{"gap_pct": 2.1}, {"gap_pct": 2.8}], 3.0)  # True``"""
    return len(final) == 2 and all(f["gap_pct"] <= target_gap_pct for f in final)


# ----------------------------------------------------------------------------------------------------
# model, optimizer, data


def build_model(cfg: TrainConfig) -> Transformer:
    """The ``Transformer`` a config describes (sized for ``max(train_len, eval_len)`` positions)."""
    return Transformer(cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model,
                       mlp_ratio=cfg.mlp_ratio, max_seq_len=max(cfg.train_len, cfg.eval_len), pos_enc=cfg.pos_enc,
                       grad_checkpointing=cfg.grad_checkpointing)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # decay matrices only; biases, LayerNorm gains and embeddings stay undecayed (nanoGPT)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def train_batch(cfg: TrainConfig, step: int, micro: int, dist_info: DistInfo, device) -> torch.Tensor:
    """This rank's rows ``[B / world, L]`` of the global micro-batch of (step, micro). Every rank samples the
    whole global batch from the same seed and keeps its slice (sampling is cheap next to the model), which
    makes a DDP run see exactly the tokens of a single-process run."""
    seed = derive_seed(cfg.seed, "train", step, micro)
    x = markov.sample(cfg.batch_size, cfg.k, seq_len=cfg.train_len, vocab_size=cfg.vocab_size, alpha=cfg.alpha,
                      seed=seed, device=device)
    per = cfg.batch_size // dist_info.world_size
    return x[dist_info.rank * per:(dist_info.rank + 1) * per]


def make_eval_set(cfg: TrainConfig, seed: int, n_batches: int, device) -> list:
    """``n_batches`` pairs ``(tokens [b, L_eval], bayes_nll [b, L_eval] float64)`` from ``seed``."""
    out = []
    for i in range(n_batches):
        x = markov.sample(cfg.eval_batch_size, cfg.k, seq_len=cfg.eval_len, vocab_size=cfg.vocab_size,
                          alpha=cfg.alpha, seed=derive_seed(seed, "eval", i), device=device)
        out.append((x, markov.bayes_nll(x, cfg.k, vocab_size=cfg.vocab_size, alpha=cfg.alpha, dtype=torch.float64)))
    return out


# ----------------------------------------------------------------------------------------------------
# evaluation


def context_visits(tokens: torch.Tensor, k: int, *, vocab_size: int = 2) -> torch.Tensor:
    """How often the context of each target was seen before it: ``N_<t(c_t)``.

    ``visits[b, t]`` counts targets ``s`` in ``[k, t)`` with ``c_s == c_t`` (the count in the Bayes
    predictive, DESIGN.md §8); ``-1`` for ``t < k``. Context index: oldest symbol most significant.

    Args:
        tokens: ``[B, L]`` int64.

    Returns:
        ``[B, L]`` int64.

    Example: ``context_visits(torch.tensor([[0, 1, 0, 1, 0]]), 1)  # [[-1, 0, 0, 1, 1]]``
    """
    B, L = tokens.shape
    ctx = torch.zeros(B, L - k, dtype=torch.long, device=tokens.device)  # c_t for t = k..L-1
    for i in range(k):
        ctx = ctx * vocab_size + tokens[:, i:L - k + i]
    n_ctx = vocab_size**k
    flat = (ctx + torch.arange(B, device=tokens.device)[:, None] * n_ctx).reshape(-1)  # [B * (L-k)]
    order = torch.sort(flat, stable=True).indices  # groups by (sequence, context), in time order
    sorted_keys = flat[order]
    counts = torch.bincount(flat, minlength=B * n_ctx)
    group_start = torch.cumsum(counts, 0) - counts  # first index of each (sequence, context) group
    occurrence = torch.empty_like(flat)
    occurrence[order] = torch.arange(flat.numel(), device=tokens.device) - group_start[sorted_keys]
    visits = torch.full((B, L), -1, dtype=torch.long, device=tokens.device)
    visits[:, k:] = occurrence.view(B, L - k)
    return visits


def _gap_on(model_nll: torch.Tensor, bayes: torch.Tensor, mask: torch.Tensor) -> tuple:
    """Gap% and SE over the masked tokens: zeroing both NLLs outside the mask turns ``gap_pct``'s per-sequence
    means into sums, whose common 1/L cancels in the ratio, so this is the pooled gap over the mask with
    the same paired delta-method SE."""
    if not bool(mask.any()):
        return None, None
    m = torch.where(mask, model_nll.double(), 0.0)
    b = torch.where(mask, bayes.double(), 0.0)
    return markov.gap_pct(m, b, 0)


def _breakdowns(model_nll: torch.Tensor, bayes: torch.Tensor, tokens: torch.Tensor, cfg: TrainConfig):
    N, L = tokens.shape
    k = cfg.k
    pos = torch.arange(L, device=tokens.device).expand(N, L)
    edges = [k + round(i * (L - k) / 3) for i in range(4)]
    by_position = {}
    for name, lo, hi in zip(("early", "middle", "late"), edges[:-1], edges[1:]):
        gap, se = _gap_on(model_nll, bayes, (pos >= lo) & (pos < hi))
        by_position[name] = {"positions": [lo, hi], "gap_pct": gap, "gap_se": se}
    # a finer curve for the figure: 20 position bins
    bins = []
    n_bins = min(20, L - k)
    bin_edges = [k + round(i * (L - k) / n_bins) for i in range(n_bins + 1)]
    for lo, hi in zip(bin_edges[:-1], bin_edges[1:]):
        gap, se = _gap_on(model_nll, bayes, (pos >= lo) & (pos < hi))
        bins.append({"positions": [lo, hi], "gap_pct": gap, "gap_se": se})
    by_position["bins"] = bins
    visits = context_visits(tokens, k, vocab_size=cfg.vocab_size)
    by_visits = []
    for lo, hi in VISIT_BUCKETS:
        mask = (visits >= lo) & ((visits < hi) if hi is not None else True)
        gap, se = _gap_on(model_nll, bayes, mask)
        by_visits.append({"visits": [lo, hi], "frac_tokens": float(mask.double().sum() / (N * (L - k))),
                          "gap_pct": gap, "gap_se": se})
    return by_position, by_visits


@torch.no_grad()
def _evaluate_set(model: Transformer, eval_set: list, cfg: TrainConfig, dist_info: DistInfo, *,
                  breakdowns: bool, seed: Optional[int] = None) -> EvalResult:
    """Per-token NLL of every sequence in ``eval_set``; batches are shared out over ranks and summed back."""
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
                model_nll[row:row + x.shape[0]] = model(x).nll.double()
            row += x.shape[0]
    if dist_info.world_size > 1:
        dist.all_reduce(model_nll)  # rows of other ranks are zero here
    model.train(was_training)
    k = cfg.k
    gap, se = markov.gap_pct(model_nll, bayes, k)
    by_position, by_visits = _breakdowns(model_nll, bayes, tokens, cfg) if breakdowns else ({}, [])
    return EvalResult(seed=seed if seed is not None else -1, n_seqs=tokens.shape[0], seq_len=tokens.shape[1],
                      gap_pct=gap, gap_se=se, model_nll=float(model_nll[:, k:].mean()),
                      bayes_nll=float(bayes[:, k:].mean()), by_position=by_position, by_visit_count=by_visits,
                      model_token_nll=model_nll, bayes_token_nll=bayes)


def load_checkpoint(path, *, device="cpu") -> tuple:
    """``(model, config, checkpoint dict)`` from a ``best.pt`` / ``last.pt`` written by ``train``.

    Example: ``model, cfg, ckpt = load_checkpoint("runs/markov/best.pt")``
    """
    ckpt = torch.load(path, map_location=device, weights_only=False)
    for key in ("model", "model_config", "config"):
        if key not in ckpt:
            raise ValueError(f"{path} is not a checkpoint written by eqprop.train.markov (no {key!r} entry)")
    model = Transformer(**ckpt["model_config"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model, TrainConfig.from_dict(ckpt["config"]), ckpt


def evaluate(model_or_checkpoint, *, config: Optional[TrainConfig] = None, n_batches: int = 16,
             batch_size: Optional[int] = None, seed: int = 2_000_003, seq_len: Optional[int] = None,
             device: Optional[str] = None) -> EvalResult:
    """Gap to Bayes of a model (or a checkpoint path) on ``n_batches`` fresh batches from ``seed``.

    Args:
        model_or_checkpoint: a ``Transformer`` (then ``config`` gives k, V, alpha, lengths) or a path to a
            checkpoint written by ``train``.
        n_batches, batch_size: size of the evaluation set (``batch_size`` default: the config's
            ``eval_batch_size``).
        seed: seed of the evaluation set; use a seed the run never evaluated on for an unbiased number.
        seq_len: evaluation length (default: the config's evaluation length).

    Returns:
        an ``EvalResult`` (gap, SE, mean NLLs, gap by position thirds and by context visit count, and the
        ``[N, L]`` per-token NLLs).

    Example: ``evaluate("runs/markov/best.pt", n_batches=32, seed=7).gap_pct``
    """
    if isinstance(model_or_checkpoint, (str, Path)):
        model, ckpt_cfg, _ = load_checkpoint(model_or_checkpoint, device=device or "cpu")
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
    return _evaluate_set(model, eval_set, cfg, DistInfo(), breakdowns=True, seed=seed)


# ----------------------------------------------------------------------------------------------------
# checkpoints


_MUST_MATCH_ON_RESUME = ("k", "vocab_size", "alpha", "seq_len", "n_layer", "n_head", "d_model", "mlp_ratio",
                         "pos_enc", "batch_size", "grad_accum_steps", "seed", "eval_seed", "eval_batches",
                         "eval_batch_size", "eval_seq_len")


def _checkpoint(model, optimizer, cfg, state, step, history, t_start, elapsed_before) -> dict:
    return {
        "model": model.state_dict(),
        "model_config": model.config,
        "optimizer": optimizer.state_dict(),
        "config": cfg.to_dict(),
        "step": step,
        "best_gap": state["best_gap"], "best_se": state["best_se"], "best_step": state["best_step"],
        "tokens_seen": state["tokens_seen"],
        "status": state.get("status", "max_steps"),  # "reached_target" survives a resume
        "elapsed_s": elapsed_before + time.perf_counter() - t_start,
        "history": list(history),
        "rng": rng_state(),
    }


def _restore(path: Path, cfg: TrainConfig, model, optimizer, device) -> dict:
    # On the CPU: the RNG states must stay CPU byte tensors; load_state_dict moves the rest to the
    # parameters' device.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    saved = ckpt["config"]
    mismatched = [f"{n}: checkpoint {saved.get(n)!r} vs config {getattr(cfg, n)!r}"
                  for n in _MUST_MATCH_ON_RESUME if saved.get(n) != getattr(cfg, n)]
    if mismatched:
        raise ValueError(f"cannot resume from {path}: the config differs in " + "; ".join(mismatched))
    if saved.get("max_steps") != cfg.max_steps or saved.get("schedule") != cfg.schedule:
        log.warning("resuming with a different max_steps/schedule: the lr schedule changes from here on")
    model.load_state_dict(ckpt["model"])
    # The checkpoint supplies the optimizer's moments; this run's config supplies its hyper-parameters
    # (weight decay, betas; lr is set every step), so what config.json records is what is used.
    hyper = [{key: v for key, v in g.items() if key != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, h in zip(optimizer.param_groups, hyper):
        group.update(h)
    set_rng_state(ckpt["rng"])
    # rows logged after the checkpoint (a crash between checkpoints) are dropped: they will be redone
    history = [r for r in ckpt["history"] if r["step"] <= ckpt["step"]]
    return {"step": ckpt["step"], "best_gap": ckpt["best_gap"], "best_se": ckpt["best_se"],
            "best_step": ckpt["best_step"], "history": history, "tokens_seen": ckpt["tokens_seen"],
            "elapsed_s": ckpt["elapsed_s"], "status": ckpt.get("status", "max_steps")}


def _write_history(history: list, path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in history:
        writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in HISTORY_COLUMNS})
    write_text_atomic(buf.getvalue(), path)


def _agree(flag: bool, dist_info: DistInfo, device) -> bool:
    """True on every rank if it is true on any (a signal may reach only some ranks)."""
    if dist_info.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# the ladder


#: The ladder's first rung unless told otherwise: a medium model with a large effective batch (128 sequences).
LADDER_START = dict(n_layer=4, n_head=8, d_model=128, batch_size=64, grad_accum_steps=2, lr=1e-3, min_lr=1e-4,
                    warmup_steps=100, max_steps=2000, eval_every=100, eval_batches=8, final_eval_batches=32,
                    progress=False)


def ladder(ks: Sequence[int], *, base: Optional[TrainConfig] = None, out_dir: str = "runs/ladder",
           max_rungs: int = 8, max_layers: int = 8, max_width: int = 512, max_steps_cap: int = 100_000,
           train_fn: Callable[[TrainConfig], Summary] = None) -> dict:
    """Adaptive search, per k, for a model that passes the gate (gap <= target on both final sets).

    Each rung trains ``base`` (a medium model with a large effective batch is a good start) and reads its
    summary. After a rung that fails the gate:

    1. if the best gap was still improving late in the run (see ``_still_improving``), the next rung
       doubles ``max_steps`` (up to ``max_steps_cap``);
    2. otherwise it has plateaued: grow depth (``n_layer`` x2, up to ``max_layers``) while growing depth
       still lowers the best gap, then width (``d_model`` x2, up to ``max_width``);
    3. stop when the gate passes, after ``max_rungs`` rungs, or when nothing can grow.

    Writes ``out_dir/ladder_summary.json`` and ``out_dir/ladder.png`` (best gap per rung, per k); each rung's
    artifacts are in ``out_dir/k{k}/rung{i}``.

    Args:
        ks: Markov orders.
        base: the first rung's config (its ``k`` and ``out_dir`` are replaced per rung).
        train_fn: the training function (default ``train``; tests pass a stand-in).

    Returns:
        ``{"k": {"passed": bool, "reason": str, "rungs": [...]}}`` as written to the JSON.

    Example: ``ladder([4], base=TrainConfig(n_layer=4, d_model=256, batch_size=64, max_steps=4000))``
    """
    train_fn = train_fn or train
    base = base or TrainConfig(**LADDER_START)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    for k in ks:
        cfg = base.replace(k=int(k))
        rungs, reason, passed = [], "max_rungs", False
        depth_helped = True
        for i in range(max_rungs):
            cfg = cfg.replace(out_dir=str(root / f"k{k}" / f"rung{i}"), resume=False)
            s = train_fn(cfg)
            gaps = [f["gap_pct"] for f in s.final]
            worst = max(gaps) if gaps else None
            rung = {"rung": i, "n_layer": cfg.n_layer, "d_model": cfg.d_model, "max_steps": cfg.max_steps,
                    "status": s.status, "best_gap_pct": s.best_gap_pct, "final_gaps": gaps,
                    "gate_passed": s.gate_passed, "n_params": s.n_params, "wall_s": s.wall_s}
            prev_best = min((r["best_gap_pct"] for r in rungs if r["best_gap_pct"] is not None), default=None)
            improved = prev_best is None or (s.best_gap_pct is not None and s.best_gap_pct < prev_best)
            if rungs and rungs[-1]["action"] == "deeper" and not improved:
                depth_helped = False
            rungs.append(rung)
            log.info("ladder k=%d rung %d: %s, best gap %s, final %s", k, i, s.status, s.best_gap_pct, worst)
            if s.gate_passed:
                rung["action"], reason, passed = "stop", "gate passed", True
                break
            if s.status == "diverged":
                rung["action"] = "halve lr"
                cfg = cfg.replace(lr=cfg.lr / 2, min_lr=min(cfg.min_lr, cfg.lr / 2))
            elif _still_improving(s.history) and cfg.max_steps * 2 <= max_steps_cap:
                rung["action"] = "longer"
                cfg = cfg.replace(max_steps=cfg.max_steps * 2)
            elif depth_helped and cfg.n_layer * 2 <= max_layers:
                rung["action"] = "deeper"
                cfg = cfg.replace(n_layer=cfg.n_layer * 2)
            elif cfg.d_model * 2 <= max_width:
                rung["action"] = "wider"
                cfg = cfg.replace(d_model=cfg.d_model * 2)
            else:
                rung["action"], reason = "stop", "nothing left to grow"
                break
        results[str(k)] = {"passed": passed, "reason": reason, "rungs": rungs}
    write_text_atomic(json.dumps(results, indent=2) + "\n", root / "ladder_summary.json")
    from eqprop.train import figures as figs

    figs.ladder_plot(results, root / "ladder.png", target=base.target_gap_pct)
    return results


def _still_improving(history: list, *, tail: float = 0.25) -> bool:
    """Whether the best eval gap fell during the last ``tail`` of the run by more than two standard errors
    (then more steps are worth more than a bigger model)."""
    evals = [r for r in history if r.get("gap_pct") is not None]
    if len(evals) < 2:
        return False
    last_step = evals[-1]["step"]
    cut = last_step * (1.0 - tail)
    before = [r for r in evals if r["step"] <= cut]
    after = [r for r in evals if r["step"] > cut]
    if not before or not after:
        return False
    best_before = min(before, key=lambda r: r["gap_pct"])
    best_after = min(after, key=lambda r: r["gap_pct"])
    return best_after["gap_pct"] < best_before["gap_pct"] - 2 * (best_after.get("gap_se") or 0.0)
