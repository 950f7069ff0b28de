"""Train the equilibrium LM with BP, BPTT, implicit differentiation or Equilibrium Propagation, on the
same data and loop, against a backprop transformer (docs/design.md §4–§7, §10).

``train(EqlmConfig(...))`` runs ``EqlmTask`` through the shared loop (``eqprop.train.core.fit``). This
module holds only what is specific to the equilibrium LM:

- tasks: ``markov`` (Markov-k sequences, scored by the gap to the exact Bayes NLL with the Markov
  trainer's evaluation, ``eqprop.train.markov``) and ``text`` (character-level or BPE text from
  ``eqprop.data``: the shipped tiny Shakespeare or the user's files; scored by validation CE in nats);
- models: ``EquilibriumLM`` (every block option is a config field) and ``model="transformer"``
  (``eqprop.models.Transformer`` at the same width) as the backprop baseline;
- estimators (docs/design.md §5): ``bp`` (the transformer, autograd), ``bptt`` (autograd through
  ``eqprop.fixed_point(backward="bptt")``, which is ``eqprop.estimators.BPTT``), ``implicit``
  (``eqprop.estimators.Implicit``) and ``ep`` (``eqprop.ep.EP``: β, n_points, correction, t2 list,
  gate), the last two applied with ``Estimate.apply_to``; the injection (token and position
  embeddings) gets (∂F/∂x)ᵀu from the estimate's cotangent u;
- an estimator schedule: one switch to other estimator options (``switch_to``) at a step or when the
  validation score stops improving (``plateau_patience`` evaluations without a ``plateau_min_delta``
  improvement); the warm-track recipe is ``estimator="ep", switch_on_plateau=True,
  switch_to="ep:correction=tracking"``;
- the contraction controller (``eqprop.control``, docs/design.md §6): its penalty is added to the
  gradient, ``step(info)`` decides jr every optimizer step from the free-phase residual, a fuse trip
  or a diverged relaxation stops the run cleanly (``status`` ``"fuse"`` / ``"relaxation_diverged"``;
  the last checkpoint is left as it was), cprewarm, parameter EMA for evaluation (``pema``);
- probes every ``probe_every`` steps (docs/design.md §7): cosine and norm ratio of the training
  gradient against BPTT(h) or implicit on the same batch, batch self-cosine, free and nudged
  residuals, jr, skipped nudges, non-normality of J, penalty share of the update.

The schedule's and the controller's state travel in every checkpoint, so resume is exact.

Artifacts in ``out_dir``: those of the core (``config.json``, ``training_history.csv``, ``summary.json``,
``best.pt``, ``last.pt``), ``tokenizer.json`` (text), ``figures/{val,relaxation,alignment}.png``.

Example::

    from eqprop.train.equilibrium import EqlmConfig, train
    s = train(EqlmConfig(task="markov", k=1, estimator="ep", max_steps=200, out_dir="runs/ep"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from eqprop import diagnostics
from eqprop.block import EquilibriumLM
from eqprop.control import ContractionController
from eqprop.ep import EP, CrossEntropyReadout
from eqprop.estimators import BPTT, Implicit
from eqprop.gradients import alignment, self_cosine
from eqprop.models import Transformer, next_token_nll
from eqprop.solvers import fixed_point
from eqprop.train import markov as tmarkov
from eqprop.train import text as text_data
from eqprop.train.checkpoint import load_checkpoint_file
from eqprop.train.config import RunConfig, option
from eqprop.train.core import DistInfo, Run, RunResult, Task, derive_seed, fit, resolve_device

log = logging.getLogger(__name__)

__all__ = [
    "EqlmConfig",
    "EqlmTask",
    "EqlmSummary",
    "train",
    "evaluate",
    "probe",
    "load_checkpoint",
    "generate",
    "parse_switch",
    "PROBE_COLUMNS",
]

ESTIMATOR_KEYS = ("estimator", "horizon", "beta", "n_points", "correction", "t2", "gate")
#: columns logged every logged step (controller decision) and at probe steps (the rest)
STEP_COLUMNS = ("phase", "estimator", "jr", "ctl_action", "free_res", "free_steps", "skipped_nudges")
PROBE_COLUMNS = ("cos_ref", "ratio_ref", "cos_block", "self_cos", "nudged_res", "nonnormality", "penalty_share")


@dataclass
class EqlmConfig(RunConfig):
    """Everything an equilibrium-LM run depends on. Defaults: Markov k = 1, a width-32 equilibrium LM
    trained with implicit differentiation (a CPU-sized demo: L = 200, 400 steps).

    The loop's knobs (optimizer, lr schedule, batch, grad accumulation, eval cadence, bf16, out_dir,
    resume / overwrite) come from ``RunConfig``.
    """

    options_title = "equilibrium-LM options"

    # the data
    task: Literal["markov", "text"] = option("markov", "markov: Markov-k sequences; text: tiny Shakespeare / DATA")
    k: int = option(1, "Markov order (task=markov)")
    vocab_size: int = option(2, "Markov vocabulary size V (task=markov)")
    alpha: float = option(1.0, "Dirichlet concentration (task=markov)")
    data: Optional[str] = option(
        None, "UTF-8 text file or folder (task=text; default: tiny Shakespeare)", metavar="PATH"
    )
    tokenizer: Literal["char", "bpe"] = option("char", "text tokenizer (saved in out_dir; reused on resume)")
    bpe_vocab_size: int = option(512, "BPE vocabulary size (tokenizer=bpe; > 256)")
    val_fraction: float = option(0.1, "last fraction of the text held out for validation")
    seq_len: Optional[int] = option(None, "training window (default: 100*2^k for markov, 64 for text)")
    eval_batches: int = option(4, "batches of the fixed evaluation set")
    eval_batch_size: int = option(32, "sequences per evaluation batch")
    eval_seed: int = option(1_000_003, "seed of the fixed evaluation set")
    final_eval_batches: int = option(8, "batches of the final evaluation of best.pt (fresh seed)")
    final_eval_seed: int = option(2_000_003, "seed of the final evaluation set")
    sample_tokens: int = option(200, "tokens generated from best.pt for the summary (task=text; 0 = none)")
    # the model
    model: Literal["equilibrium", "transformer"] = option("equilibrium", "equilibrium LM or the bp baseline")
    d_model: int = option(32, "width C (the same for both models)")
    n_head: int = option(2, "attention heads")
    n_layer: int = option(1, "transformer depth (model=transformer)")
    mlp_ratio: float = option(4.0, "FFN hidden width / d_model")
    pos_enc: Literal["learned", "sinusoidal", "rope"] = option("rope", "positional encoding")
    coupling: Literal["coupled", "sequential"] = option("coupled", "block coupling (docs/design.md §4)")
    qk_norm: bool = option(True, "RMS-normalize q and k")
    bias: bool = option(False, "biases in the block's linear maps and norms")
    resinit: float = option(0.1, "scale of the block's output projections at init")
    ffn: Literal["mlp", "monotone"] = option("mlp", "block FFN")
    spectral_rho: Optional[float] = option(1.0, "spectral cap rho of the block weights (None = off)")
    rope_base: float = option(10000.0, "rope base")
    monotone_m: float = option(0.1, "margin m of the monotone FFN")
    ln_eps: float = option(1e-5, "LayerNorm epsilon of the block")
    qk_eps: float = option(1e-6, "qk-norm epsilon")
    attn_kernel: Literal["auto", "math"] = option("auto", "block attention kernel")
    # the relaxation
    relax_max_steps: int = option(30, "free-phase F evaluations at most")
    relax_tol: float = option(1e-4, "free-phase relative residual tolerance")
    relax_eps: float = option(1.0, "damping of z <- z + eps (F(z) - z)")
    relax_solver: Literal["picard", "anderson"] = option("picard", "free-phase solver")
    relax_anderson_m: int = option(5, "Anderson history")
    backward_max_steps: Optional[int] = option(None, "implicit adjoint steps (default relax_max_steps)")
    backward_tol: Optional[float] = option(None, "implicit adjoint tolerance (default relax_tol)")
    # the estimator and its schedule
    estimator: Literal["bp", "bptt", "implicit", "ep"] = option("implicit", "gradient estimator (docs/design.md §5)")
    bptt_horizon: int = option(10, "BPTT steps from z*")
    ep_beta: float = option(0.1, "EP nudge beta (radius for n_points >= 3)")
    ep_n_points: int = option(2, "EP points: 1 one-sided, 2 symmetric, >= 3 holomorphic")
    ep_correction: Literal["none", "frozen", "tracking"] = option("none", "asymmetric-EP correction")
    ep_t2: Optional[tuple[int, ...]] = option(
        None, "EP nudged steps, one or several (the lowest-residual snapshot); None = 20", metavar="T2"
    )
    ep_gate: Optional[float] = option(None, "skip the nudge when the free residual exceeds this")
    switch_to: Optional[str] = option(
        None,
        "second phase, 'ESTIMATOR[:key=value,...]' (keys: horizon beta n_points correction t2 gate)",
        metavar="SPEC",
    )
    switch_at_step: Optional[int] = option(None, "switch to switch_to at this optimizer step")
    switch_on_plateau: bool = option(False, "switch when the eval score plateaus")
    plateau_patience: int = option(3, "evaluations without improvement that make a plateau")
    plateau_min_delta: float = option(0.0, "improvement of the score that counts (score units)")
    # the contraction controller (docs/design.md §6)
    jacreg: float = option(0.0, "initial Jacobian-penalty weight jr")
    jr_floor: Optional[float] = option(None, "lower bound of jr (default jacreg)")
    jr_max: Optional[float] = option(None, "upper bound of jr (default jacreg)")
    res_target: float = option(1e-3, "free-phase residual the controller aims below")
    jr_rate: float = option(2.0, "multiplicative step of jr")
    homeostasis: float = option(0.0, "weight of the Jacobian-symmetry penalty")
    fuse: Optional[float] = option(None, "stop cleanly when the free residual exceeds this")
    cprewarm: int = option(0, "initial penalty-only steps")
    pema: Optional[float] = option(None, "parameter EMA decay for evaluation (None = off)")
    jac_probes: int = option(1, "Hutchinson probes per penalty")
    # probes (docs/design.md §7)
    probe_every: int = option(50, "steps between gradient probes (0 = off)")
    probe_reference: Literal["bptt", "implicit"] = option("bptt", "reference gradient of the probes")
    probe_horizon: int = option(30, "BPTT horizon of the reference")
    probe_batches: int = option(2, "batches of the self-cosine probe (>= 2)")
    out_dir: str = option("runs/eqlm", "where artifacts go", metavar="DIR")

    def checks(self) -> list:
        tf = self.model == "transformer"
        return super().checks() + [
            ("k", self.k >= 1, ">= 1"),
            ("vocab_size", self.vocab_size >= 2, ">= 2"),
            ("alpha", self.alpha > 0, "> 0"),
            ("bpe_vocab_size", self.bpe_vocab_size >= 2, ">= 2"),
            ("val_fraction", 0 < self.val_fraction < 1, "in (0, 1)"),
            ("seq_len", self.seq_len is None or self.seq_len >= 2, "None or >= 2"),
            ("eval_batches", self.eval_batches >= 1, ">= 1"),
            ("eval_batch_size", self.eval_batch_size >= 2, ">= 2"),
            ("final_eval_batches", self.final_eval_batches >= 1, ">= 1"),
            ("sample_tokens", self.sample_tokens >= 0, ">= 0"),
            ("d_model", self.d_model >= 1 and self.d_model % self.n_head == 0, f"divisible by n_head={self.n_head}"),
            ("n_head", self.n_head >= 1, ">= 1"),
            ("n_layer", self.n_layer >= 1, ">= 1"),
            ("relax_max_steps", self.relax_max_steps >= 1, ">= 1"),
            ("relax_tol", self.relax_tol >= 0, ">= 0"),
            ("relax_eps", self.relax_eps > 0, "> 0"),
            ("bptt_horizon", self.bptt_horizon >= 1, ">= 1"),
            ("ep_beta", self.ep_beta > 0, "> 0"),
            ("ep_n_points", self.ep_n_points >= 1, ">= 1"),
            (
                "ep_t2",
                self.ep_t2 is None or (len(self.ep_t2) >= 1 and min(self.ep_t2) >= 1),
                "None or a non-empty list of step counts >= 1",
            ),
            (
                "estimator",
                (self.estimator == "bp") == tf,
                "'bp' exactly when model='transformer' (the equilibrium LM takes bptt, implicit or ep)",
            ),
            ("switch_to", self.switch_to is None or not tf, "None for model='transformer'"),
            ("switch_at_step", self.switch_at_step is None or self.switch_at_step >= 0, "None or >= 0"),
            (
                "switch_on_plateau",
                not (self.switch_on_plateau or self.switch_at_step is not None) or self.switch_to is not None,
                "used with switch_to (the estimator to switch to)",
            ),
            ("plateau_patience", self.plateau_patience >= 1, ">= 1"),
            ("plateau_min_delta", self.plateau_min_delta >= 0, ">= 0"),
            ("jacreg", not tf or (self.jacreg == 0 and self.homeostasis == 0), "0 for model='transformer'"),
            ("probe_every", self.probe_every >= 0, ">= 0"),
            ("probe_horizon", self.probe_horizon >= 1, ">= 1"),
            ("probe_batches", self.probe_batches >= 2, ">= 2"),
            ("jac_probes", self.jac_probes >= 1, ">= 1"),
            (
                "ep_correction",
                not (self.ep_correction == "tracking" and self.ep_n_points < 2),
                "'none' or 'frozen' when ep_n_points = 1 (tracking needs two points)",
            ),
        ]

    def __post_init__(self):
        super().__post_init__()
        if self.switch_to is not None:
            parse_switch(self.switch_to, self.phase0())  # a bad spec is a ValueError now, not mid-run

    @property
    def train_len(self) -> int:
        if self.seq_len is not None:
            return self.seq_len
        return 100 * 2**self.k if self.task == "markov" else 64

    def phase0(self) -> dict:
        """The first phase's estimator options (``ESTIMATOR_KEYS``)."""
        return dict(
            estimator=self.estimator,
            horizon=self.bptt_horizon,
            beta=self.ep_beta,
            n_points=self.ep_n_points,
            correction=self.ep_correction,
            t2=(20,) if self.ep_t2 is None else tuple(self.ep_t2),
            gate=self.ep_gate,
        )

    def phases(self) -> list:
        """[phase 0 options] or [phase 0, phase 1] with ``switch_to`` applied."""
        p0 = self.phase0()
        return [p0] if self.switch_to is None else [p0, parse_switch(self.switch_to, p0)]

    def relax_options(self) -> dict:
        return dict(
            max_steps=self.relax_max_steps,
            tol=self.relax_tol,
            eps=self.relax_eps,
            solver=self.relax_solver,
            anderson_m=self.relax_anderson_m,
            on_nonconvergence="ignore",  # residuals are logged, and the fuse acts on them
        )


def parse_switch(spec: str, base: dict) -> dict:
    """``"ep:correction=tracking,beta=0.05"`` -> the phase options ``base`` updated by it.

    The part before ``:`` is the estimator (``bptt``, ``implicit``, ``ep``); keys: horizon, beta,
    n_points, correction (none / frozen / tracking), t2 (``20/40`` for a list), gate (a number or
    ``none``). Example: ``parse_switch("ep:correction=tracking", cfg.phase0())``
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"switch_to must be 'ESTIMATOR[:key=value,...]', got {spec!r}")
    head, _, rest = spec.strip().partition(":")
    if head not in ("bptt", "implicit", "ep"):
        raise ValueError(f"switch_to must start with bptt, implicit or ep, got {head!r} in {spec!r}")
    out = dict(base, estimator=head)
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in ESTIMATOR_KEYS[1:]:
            raise ValueError(
                f"switch_to item {item!r} must be key=value with key one of {', '.join(ESTIMATOR_KEYS[1:])}"
            )
        try:
            if key in ("horizon", "n_points"):
                v = int(value)
            elif key == "beta":
                v = float(value)
            elif key == "t2":
                v = tuple(int(t) for t in value.split("/"))
            elif key == "gate":
                v = None if value.lower() == "none" else float(value)
            else:
                if value not in ("none", "frozen", "tracking"):
                    raise ValueError(value)
                v = value
        except ValueError:
            raise ValueError(f"switch_to: bad value {value!r} for {key} in {spec!r}") from None
        out[key] = v
    if out["correction"] == "tracking" and out["n_points"] < 2 and out["estimator"] == "ep":
        raise ValueError(f"switch_to {spec!r}: correction=tracking needs n_points >= 2")
    return out


def _describe_phase(p: dict) -> str:
    e = p["estimator"]
    if e == "bptt":
        return f"bptt(h={p['horizon']})"
    if e == "ep":
        corr = "" if p["correction"] == "none" else f",{p['correction']}"
        return f"ep(b={p['beta']:g},n={p['n_points']}{corr})"
    return e


def _make_estimator(p: dict, cfg: EqlmConfig):
    """The library estimator of a phase (docs/design.md §5)."""
    relax = cfg.relax_options()
    if p["estimator"] == "implicit":
        return Implicit(backward_max_steps=cfg.backward_max_steps, backward_tol=cfg.backward_tol, **relax)
    if p["estimator"] == "bptt":
        return BPTT(p["horizon"], **relax)
    if p["estimator"] == "ep":
        corr = None if p["correction"] == "none" else p["correction"]
        return EP(p["beta"], n_points=p["n_points"], correction=corr, t2=list(p["t2"]), gate=p["gate"], **relax)
    return None


@dataclass
class EqlmSummary(RunResult):
    """What ``train`` returns (``RunResult`` plus the task, the phases and the best score)."""

    task: str = ""
    model: str = ""
    score_name: str = ""
    best_score: Optional[float] = None
    phases: list = dataclasses.field(default_factory=list)
    switched_at: Optional[int] = None

    def __str__(self) -> str:
        lines = [
            f"{self.model} on {self.task}, {self.n_params:,} params, "
            f"{' -> '.join(self.phases)}: {self.status} after {self.steps} steps, {self.wall_s:.0f} s"
        ]
        if self.switched_at is not None:
            lines.append(f"switched estimator at step {self.switched_at}")
        if self.message:
            lines.append(f"  {self.message}")
        if self.best_score is not None:
            lines.append(f"best {self.score_name} {self.best_score:.4f} at step {self.best_step}")
        if isinstance(self.final, dict) and self.final:
            lines.append("final (best.pt, fresh data): " + _final_line(self.final))
        lines.append(f"out_dir: {self.out_dir}")
        return "\n".join(lines)


def _final_line(f: dict) -> str:
    if "val_ce" in f:
        return f"val CE {f['val_ce']:.4f} nats ({f['n_windows']} windows)"
    return f"gap {f['gap_pct']:+.2f}% +- {f['gap_se']:.2f} (model {f['model_nll']:.4f} vs Bayes {f['bayes_nll']:.4f})"


# ----------------------------------------------------------------------------------------------------
# model, data


def _markov_config(cfg: EqlmConfig) -> tmarkov.TrainConfig:
    """The Markov trainer's config with this run's data settings (its sampling and evaluation are reused)."""
    return tmarkov.TrainConfig(
        k=cfg.k,
        vocab_size=cfg.vocab_size,
        alpha=cfg.alpha,
        seq_len=cfg.train_len,
        eval_batch_size=cfg.eval_batch_size,
        bf16=cfg.bf16,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        progress=False,
        device="cpu",
    )


def build_model(cfg: EqlmConfig, vocab_size: int) -> torch.nn.Module:
    """The model a config describes: ``EquilibriumLM`` or, for ``model="transformer"``, a ``Transformer`` of
    the same width. Example: ``build_model(EqlmConfig(), 2)``"""
    if cfg.model == "transformer":
        return Transformer(
            vocab_size,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            d_model=cfg.d_model,
            mlp_ratio=cfg.mlp_ratio,
            max_len=cfg.train_len,
            pos_enc=cfg.pos_enc,
            rope_base=cfg.rope_base,
        )
    fp = dict(cfg.relax_options(), backward_max_steps=cfg.backward_max_steps, backward_tol=cfg.backward_tol)
    return EquilibriumLM(
        vocab_size,
        cfg.d_model,
        cfg.n_head,
        max_len=cfg.train_len,
        pos_enc=cfg.pos_enc,
        fixed_point=fp,
        mlp_ratio=cfg.mlp_ratio,
        coupling=cfg.coupling,
        qk_norm=cfg.qk_norm,
        bias=cfg.bias,
        resinit=cfg.resinit,
        ffn=cfg.ffn,
        spectral_rho=cfg.spectral_rho,
        rope_base=cfg.rope_base,
        monotone_m=cfg.monotone_m,
        ln_eps=cfg.ln_eps,
        qk_eps=cfg.qk_eps,
        attn_kernel=cfg.attn_kernel,
    )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Sample ``max_new_tokens`` tokens after ``prompt`` [B, L0] (int64) -> [B, L0 + max_new_tokens].

    Works for any model mapping tokens [B, L] to logits [B, L, V] (``EquilibriumLM``, ``Transformer``);
    the context is cut to the model's ``max_len`` most recent tokens. ``temperature`` > 0 scales the
    logits; ``top_k`` keeps the k most likely tokens; ``generator`` makes the draw reproducible.

    Example: ``generate(lm, torch.zeros(1, 1, dtype=torch.long), 100, top_k=10)``
    """
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype != torch.long:
        raise ValueError(f"prompt must be an int64 tensor [B, L0], got {getattr(prompt, 'shape', type(prompt))}")
    if prompt.shape[1] < 1:
        raise ValueError("prompt must hold at least one token")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    was = model.training
    model.eval()
    max_len = getattr(model, "max_len", None) or prompt.shape[1] + max_new_tokens
    out = prompt
    for _ in range(max_new_tokens):
        logits = model(out[:, -max_len:])[:, -1].float() / temperature  # [B, V]
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = torch.softmax(logits, dim=-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(out.device)
        out = torch.cat([out, nxt], dim=1)
    model.train(was)
    return out


# ----------------------------------------------------------------------------------------------------
# the hooks


class EqlmTask(Task):
    """The equilibrium LM (or its bp baseline) on Markov-k or text, as hooks of ``core.fit``."""

    name = "eqlm"
    must_match_on_resume = (
        "task",
        "k",
        "vocab_size",
        "alpha",
        "data",
        "tokenizer",
        "bpe_vocab_size",
        "val_fraction",
        "seq_len",
        "eval_batches",
        "eval_batch_size",
        "eval_seed",
        "model",
        "d_model",
        "n_head",
        "n_layer",
        "mlp_ratio",
        "pos_enc",
        "coupling",
        "qk_norm",
        "bias",
        "ffn",
        "spectral_rho",
        "estimator",
        "switch_to",
    )

    def __init__(self, cfg: EqlmConfig):
        self.cfg = cfg
        if cfg.task == "markov":
            self.score = "gap_pct"
            eval_cols = ("eval_nll", "bayes_nll", "gap_pct", "gap_se")
            self.mcfg = _markov_config(cfg)
        else:
            self.score = "val_ce"
            eval_cols = ("val_ce",)
        self.eval_columns = eval_cols + STEP_COLUMNS + PROBE_COLUMNS
        self.phases = cfg.phases()
        self.estimators = [_make_estimator(p, cfg) for p in self.phases]
        self.corpus, self._fresh_tokenizer = None, False
        self._eval_set = None
        self.ctl = None
        if cfg.model == "equilibrium":
            self.ctl = ContractionController(
                jacreg=cfg.jacreg,
                jr_floor=cfg.jr_floor,
                jr_max=cfg.jr_max,
                res_target=cfg.res_target,
                rate=cfg.jr_rate,
                homeostasis=cfg.homeostasis,
                spectral_rho=cfg.spectral_rho,
                fuse=cfg.fuse,
                cprewarm=cfg.cprewarm,
                pema=cfg.pema,
                probes=cfg.jac_probes,
                seed=derive_seed(cfg.seed, "controller") % 2**31,
            )
        # the schedule's state (saved in checkpoints)
        self.sched = dict(phase=0, switched_at=None, best=None, since=0, skipped=0, done=0)
        self._step = 0
        self._micro = 0
        self._halt = None
        self._info = {}
        self._probe = {}
        self._task_on = True

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"sched": dict(self.sched), "ctl": None if self.ctl is None else self.ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sched"):
            self.sched = dict(state["sched"])
        if self.ctl is not None and state.get("ctl") is not None:
            self.ctl.load_state_dict(state["ctl"])

    # ---- model and batches ----------------------------------------------------------------------
    def prepare(self, run: Run) -> None:
        # text: read and tokenize (on resume: check the run's saved tokenizer) before anything is written
        c = self.cfg
        if c.task == "text":
            self.corpus, self._fresh_tokenizer = text_data.open_corpus(c, run)
            n = max(c.eval_batches, c.final_eval_batches) * c.eval_batch_size
            self.corpus.eval_windows("val", c.train_len, n)  # a val split too short for them: ValueError now

    def memory_need(self, run: Run) -> dict:
        """Lower bounds, in bytes, of what certainly gets allocated (attention scores not counted)."""
        c = self.cfg
        per, L = c.batch_size // run.dist.world_size, c.train_len
        vocab = c.vocab_size if c.task == "markov" else self.corpus.vocab_size
        state = per * L * c.d_model * (2 if c.bf16 else 4)  # one [B, T, C] tensor
        saved = 7 + 2 * c.mlp_ratio  # what one block application keeps for backward, in [B, T, C] tensors
        need = {"logits": per * L * vocab * 4 * 2}
        if c.model == "transformer":
            need["activations"] = int(state * c.n_layer * saved)
            return need
        # the relaxation holds z and F(z), plus Anderson's past iterates and residuals; every EP point
        # relaxes in the same batch; BPTT keeps its horizon of block applications on the graph
        copies = 2 + (2 * c.relax_anderson_m if c.relax_solver == "anderson" else 0)
        if c.estimator == "ep":
            copies *= 1 + c.ep_n_points
        need["relaxation states"] = state * copies
        need["backward graph"] = int(state * saved * (c.bptt_horizon if c.estimator == "bptt" else 1))
        return need

    def build_model(self, run: Run) -> torch.nn.Module:
        if self.cfg.task == "text" and self._fresh_tokenizer:  # fit has prepared out_dir
            text_data.save_tokenizer(self.cfg, self.corpus, run)
        vocab = self.cfg.vocab_size if self.cfg.task == "markov" else self.corpus.vocab_size
        model = build_model(self.cfg, vocab)
        if self.ctl is not None:
            self.ctl.apply_spectral_cap(model)
        return model

    def model_config(self, model) -> dict:
        return {"vocab_size": int(model.vocab_size)}

    def train_batch(self, run: Run, step: int, micro: int) -> torch.Tensor:
        self._step, self._micro = step, micro
        c = self.cfg
        if c.task == "markov":
            return tmarkov.train_batch(self.mcfg, step, micro, run.dist, run.device)
        g = torch.Generator().manual_seed(derive_seed(c.seed, "train", step, micro))
        x = self.corpus.sample("train", c.batch_size, c.train_len, g)
        per = c.batch_size // run.dist.world_size
        return x[run.dist.rank * per : (run.dist.rank + 1) * per].to(run.device)

    def probe_batch(self, run: Run, step: int, i: int) -> torch.Tensor:
        c = self.cfg
        if c.task == "markov":
            x = tmarkov.markov.sample(
                c.batch_size,
                c.k,
                seq_len=c.train_len,
                vocab_size=c.vocab_size,
                alpha=c.alpha,
                seed=derive_seed(c.seed, "probe", step, i),
                device=run.device,
            )
            return x
        g = torch.Generator().manual_seed(derive_seed(c.seed, "probe", step, i))
        return self.corpus.sample("train", c.batch_size, c.train_len, g).to(run.device)

    def loss(self, run: Run, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Mean next-token CE over positions 1..L-1 (Markov: over the targets t >= k)."""
        first = self.cfg.k if self.cfg.task == "markov" else 1
        return next_token_nll(model(x), x)[:, first:].mean()

    # ---- gradients --------------------------------------------------------------------------------
    def phase_at(self, step: int) -> int:
        if self.sched["phase"] == 0 and self.cfg.switch_at_step is not None and step >= self.cfg.switch_at_step:
            self._switch(step, "step")
        return self.sched["phase"]

    def _switch(self, step: int, why: str) -> None:
        if self.sched["phase"] == 1 or len(self.phases) < 2:
            return
        self.sched["phase"], self.sched["switched_at"] = 1, step
        log.info(
            "estimator switch at step %d (%s): %s -> %s",
            step,
            why,
            _describe_phase(self.phases[0]),
            _describe_phase(self.phases[1]),
        )

    def _readout(self, lm, x_tokens: torch.Tensor) -> CrossEntropyReadout:
        ro = CrossEntropyReadout.for_lm(lm, x_tokens)
        if self.cfg.task == "markov" and self.cfg.k > 1:  # the loss is over targets t >= k (positions >= k-1)
            ro.targets[:, : self.cfg.k - 1] = -100
        return ro

    def estimate(self, lm: EquilibriumLM, tokens: torch.Tensor, phase: int):
        """The phase's estimate on ``tokens`` -> (Estimate, x) with x the injection (on the graph)."""
        x = lm.inject(tokens)
        ro = self._readout(lm, tokens)
        est = self.estimators[phase].grad(lm.block, x.detach(), ro)
        return est, x

    def backward(self, run: Run, model: torch.nn.Module, tokens, scale: int) -> torch.Tensor:
        if self.cfg.model == "transformer":
            return super().backward(run, model, tokens, scale)
        lm = _unwrap(model)
        step, first = self._step, self._micro == 0
        phase = self.phase_at(step)
        p = self.phases[phase]
        if p["estimator"] == "bptt":
            # autograd through the last h steps from z*: BPTT(h) of eqprop.estimators, with the embeddings
            x = lm.inject(tokens)
            z, info = fixed_point(
                lm.block,
                x,
                backward="bptt",
                bptt_horizon=p["horizon"],
                return_info=True,
                **self.cfg.relax_options(),
            )
            with run.autocast():
                task_loss = self._readout(lm, tokens)(z)
            z_star, est = z.detach(), None
        else:
            est, x = self.estimate(lm, tokens, phase)
            info, task_loss, z_star = est.stats["forward"], est.loss, est.z
        if first:  # one controller decision per optimizer step, from its first micro-batch
            decision = self._control(run, info, step)
            self._task_on = decision is None or decision.task_enabled
        if self._task_on:
            if est is None:
                (task_loss / scale).backward()
            else:
                self._apply(lm, est, x, scale)
        penalty = self._penalty(lm, x, z_star)
        if penalty is not None:
            (penalty / scale).backward()
        if first and self.cfg.probe_every and (step + 1) % self.cfg.probe_every == 0:
            self._probe = self.run_probes(run, lm, tokens, phase, est)
        if self._micro == self.cfg.grad_accum_steps - 1 and run.dist.world_size > 1:
            for q in lm.parameters():  # estimates bypass DDP's hooks: average the gradients here
                if q.grad is not None:
                    run.all_reduce_sum(q.grad).div_(run.dist.world_size)
        total = task_loss.detach() + (penalty.detach() if penalty is not None else 0.0)
        return total.reshape(()) / scale

    def _apply(self, lm, est, x, scale: int) -> None:
        """Write an estimate into .grad: block and readout via ``Estimate.apply_to``; the injection gets
        (∂F/∂x)ᵀu with the estimate's cotangent u (docs/design.md §5), then autograd to the embeddings."""
        if est.stats.get("skipped"):
            self.sched["skipped"] += 1
        scaled = dataclasses.replace(est, grads={n: g / scale for n, g in est.grads.items()})
        ro = CrossEntropyReadout(lm.ln_f, lm.head, torch.zeros(1, 1, dtype=torch.long))  # names readout.ln / .head
        scaled.apply_to(lm.block, readout=ro)
        u = est.stats.get("cotangent")
        if u is None:  # a skipped nudge: no signal for the injection either
            return
        was = lm.block.training
        lm.block.eval()  # no power-iteration step: F stays the F the estimate used
        try:
            with torch.enable_grad():
                xr = x.detach().requires_grad_(True)
                (gx,) = torch.autograd.grad(lm.block(est.z, xr), xr, u.to(xr.dtype))
        finally:
            lm.block.train(was)
        x.backward(gx / scale)

    def _control(self, run: Run, info, step: int):
        """One controller decision per optimizer step; a tripped fuse or a diverged relaxation halts.
        Under DDP the decision uses the largest residual over ranks, so every rank's controller (and jr)
        stays the same."""
        res = float(info.rel_max)
        stats = torch.tensor([res if math.isfinite(res) else math.inf, float(info.diverged.sum())], device=run.device)
        run.all_reduce_max(stats)
        res, diverged = float(stats[0]), int(stats[1])  # diverged: the most on any rank (> 0: halt on every rank)
        self._info = dict(free_res=res, free_steps=float(info.steps.float().mean()))
        d = None
        if self.ctl is not None:
            d = self.ctl.step(res)
            self._info.update(jr=d.jr, ctl_action=d.action)
            if d.stop:
                self._halt = ("fuse", f"contraction fuse tripped: {d.reason} (optimizer step {step + 1})")
        if diverged and self._halt is None:
            self._halt = (
                "relaxation_diverged",
                f"free-phase relaxation diverged in {diverged} of {info.status.numel()} samples at optimizer "
                f"step {step + 1}",
            )
        return d

    def _penalty(self, lm, x, z_star):
        if self.ctl is None or (self.ctl.jr == 0 and self.ctl.homeostasis == 0):
            return None
        return self.ctl.penalty(lm.block, x.detach(), z_star.detach())

    def halt(self, run: Run):
        h, self._halt = self._halt, None
        return h

    def after_step(self, run: Run, model: torch.nn.Module, step: int) -> dict:
        c = self.cfg
        if self.ctl is not None and c.pema is not None:
            self.ctl.update_ema(_unwrap(model))
        self.sched["done"] = step
        probe, self._probe = self._probe, {}
        if not (probe or step % c.log_every == 0 or step % c.eval_every == 0 or step == c.max_steps):
            return {}
        if c.model == "transformer":
            return {"phase": 0, "estimator": "bp"}
        row = {
            "phase": self.sched["phase"],
            "estimator": _describe_phase(self.phases[self.sched["phase"]]),
            "skipped_nudges": self.sched["skipped"],
            **self._info,
        }
        row.update(probe)
        return row

    # ---- probes (docs/design.md §7) -------------------------------------------------------------
    def run_probes(self, run: Run, lm, tokens, phase: int, est) -> dict:
        """Alignment with the reference, batch self-cosine, nudged residual, non-normality, penalty share,
        on this step's first micro-batch at the current parameters (eval mode: no spectral update)."""
        c = self.cfg
        was = lm.training
        lm.eval()
        try:
            p = self.phases[phase]
            train_est = self.estimators[phase]
            ro = self._readout(lm, tokens)
            x = lm.inject(tokens).detach()
            if est is None:  # bptt trained through autograd: the same gradient from the estimator
                est = train_est.grad(lm.block, x, ro)
            ref = (
                BPTT(c.probe_horizon, **c.relax_options())
                if c.probe_reference == "bptt"
                else Implicit(backward_max_steps=c.backward_max_steps, backward_tol=c.backward_tol, **c.relax_options())
            ).grad(lm.block, x, ro)
            a = alignment(est.grads, ref.grads)
            # the readout's gradient is exact for every estimator: the block's alone shows the estimator
            block = lm.block.param_names()
            a_block = alignment({n: est.grads[n] for n in block}, {n: ref.grads[n] for n in block})
            batches = []
            for i in range(c.probe_batches):
                t = tokens if i == 0 else self.probe_batch(run, self._step, i)
                batches.append((lm.inject(t).detach(), self._readout(lm, t)))
            sc, _, _ = self_cosine(train_est, lm.block, batches)
            nonnorm = diagnostics.nonnormality(lm.block, x, est.z, probes=4, seed=self._step).value
            nudged = float("nan")
            if p["estimator"] == "ep" and est.stats.get("nudged"):
                nudged = max(float(n.rel_lowest.max()) for n in est.stats["nudged"])
            share = 0.0
            pen = self._penalty(lm, x, est.z)
            if pen is not None:
                params = [q for q in lm.block.parameters() if q.requires_grad]
                gp = torch.autograd.grad(pen, params, allow_unused=True)
                gp = torch.cat([(g if g is not None else torch.zeros_like(q)).flatten() for g, q in zip(gp, params)])
                gt = torch.cat([est.grads[n].flatten() for n in lm.block.param_names()])
                share = float(gp.norm() / (gt + gp).norm().clamp_min(1e-30))
            return dict(
                cos_ref=a.overall_cos,
                ratio_ref=a.overall_ratio,
                cos_block=a_block.overall_cos,
                self_cos=sc,
                nudged_res=nudged,
                nonnormality=nonnorm,
                penalty_share=share,
            )
        finally:
            lm.train(was)

    # ---- evaluation -----------------------------------------------------------------------------
    def _with_ema(self, model):
        """Evaluate with the parameter EMA (``pema``) once one exists (it is updated after every step)."""
        if self.ctl is not None and self.cfg.pema is not None and self.sched["done"] > 0:
            return self.ctl.swap_in_ema(model)
        return contextlib.nullcontext(model)

    def eval_set(self, run: Run):
        if self._eval_set is None:
            self._eval_set = self._make_eval_set(run, self.cfg.eval_seed, self.cfg.eval_batches)
        return self._eval_set

    def _make_eval_set(self, run: Run, seed: int, n_batches: int):
        c = self.cfg
        if c.task == "markov":
            return tmarkov.make_eval_set(self.mcfg, seed, n_batches, run.device)
        w = self.corpus.eval_windows("val", c.train_len, n_batches * c.eval_batch_size, seed=seed)
        return list(w.to(run.device).split(c.eval_batch_size))

    def _score_set(self, run: Run, model, eval_set, breakdowns: bool = False) -> dict:
        c = self.cfg
        with self._with_ema(model):
            if c.task == "markov":
                ev = tmarkov.evaluate_set(model, eval_set, self.mcfg, run.dist, breakdowns=breakdowns)
                return (
                    ev.to_dict()
                    if breakdowns
                    else {
                        "eval_nll": ev.model_nll,
                        "bayes_nll": ev.bayes_nll,
                        "gap_pct": ev.gap_pct,
                        "gap_se": ev.gap_se,
                    }
                )
            return {"val_ce": text_ce(model, eval_set, bf16=c.bf16)}

    def evaluate(self, run: Run, model: torch.nn.Module) -> dict:
        m = self._score_set(run, model, self.eval_set(run))
        score, s = m[self.score], self.sched
        if s["best"] is None or score < s["best"] - self.cfg.plateau_min_delta:
            s["best"], s["since"] = score, 0
        else:
            s["since"] += 1
        if self.cfg.switch_on_plateau and s["phase"] == 0 and s["since"] >= self.cfg.plateau_patience:
            self._switch(s["done"], f"plateau: no {self.score} improvement in {s['since']} evaluations")
            s["since"] = 0
        return m

    def final_evaluation(self, run: Run, model: torch.nn.Module) -> dict:
        c = self.cfg
        eval_set = self._make_eval_set(run, c.final_eval_seed, c.final_eval_batches)
        out = self._score_set(run, model, eval_set, breakdowns=True)
        if c.task == "text":
            out["n_windows"] = sum(int(b.shape[0]) for b in eval_set)
            if c.sample_tokens:
                g = torch.Generator().manual_seed(c.seed)
                prompt = eval_set[0][:1, :8]
                with self._with_ema(model):
                    ids = generate(model, prompt, c.sample_tokens, top_k=10, generator=g)
                out["sample"] = self.corpus.tokenizer.decode(ids[0].tolist())
        return out

    def summarize(self, run: Run, r: RunResult) -> EqlmSummary:
        return EqlmSummary.extend(
            r,
            task=self.cfg.task,
            model=self.cfg.model,
            score_name=self.score,
            best_score=r.best.get(self.score),
            phases=[_describe_phase(p) for p in self.phases] if self.cfg.model == "equilibrium" else ["bp"],
            switched_at=self.sched["switched_at"],
        )

    def figures(self, run: Run, r: RunResult) -> dict:
        h = r.history
        out = {"val": ("val.png", lambda p: plot_curves({self.cfg.model: h}, self.score, p))}
        if self.cfg.model == "equilibrium":
            out["relaxation"] = ("relaxation.png", lambda p: plot_relaxation(h, p))
            if any(row.get("cos_ref") is not None for row in h):
                out["alignment"] = ("alignment.png", lambda p: plot_alignment({self.cfg.model: h}, p))
        return out


@torch.no_grad()
def text_ce(model: torch.nn.Module, batches, *, bf16: bool = False) -> float:
    """Mean next-token CE (nats) over positions 1..L-1 of every window in ``batches`` ([b, L] int64 each).

    Example: ``text_ce(lm, corpus.eval_windows("val", 64, 32).split(8))``"""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for x in batches:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            nll = model.token_nll(x)[:, 1:].double()
        total += float(nll.sum())
        n += nll.numel()
    model.train(was)
    return total / n


# ----------------------------------------------------------------------------------------------------
# figures


def _series(history, col):
    pts = [(r["step"], r[col]) for r in history if r.get(col) is not None and r.get(col) != ""]
    return [s for s, _ in pts], [float(v) for _, v in pts]


def plot_curves(histories: dict, score: str, path) -> str:
    """Evaluation score (``score``: a history column) against the step, one line per run ({label: history
    rows}), saved to ``path``. Example: ``plot_curves({"ep": summary.history}, "val_ce", "val.png")``"""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) is left alone

    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    for label, h in histories.items():
        xs, ys = _series(h, score)
        ax.plot(xs, ys, "o-", ms=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel({"val_ce": "validation CE (nats/token)", "gap_pct": "gap to Bayes (%)"}.get(score, score))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def plot_relaxation(history: list, path) -> str:
    """Free-phase and nudged residuals (log) and jr over training, saved to ``path``.

    Example: ``plot_relaxation(summary.history, "relaxation.png")``"""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) is left alone

    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    xs, ys = _series(history, "free_res")
    ax.semilogy(xs, [max(y, 1e-12) for y in ys], label="free residual (batch max, rel)")
    xs, ys = _series(history, "nudged_res")
    if xs:
        ax.semilogy(xs, [max(y, 1e-12) for y in ys], "s", ms=3, label="nudged residual")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("residual")
    ax2 = ax.twinx()
    xs, ys = _series(history, "jr")
    ax2.plot(xs, ys, color="C3", lw=1, label="jr")
    ax2.set_ylabel("jr", color="C3")
    ax.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def plot_alignment(histories: dict, path) -> str:
    """cos(training gradient, reference) and batch self-cosine over training, one line pair per run
    ({label: history rows}), saved to ``path``. Example: ``plot_alignment({"ep": summary.history}, "a.png")``"""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) is left alone

    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    for i, (label, h) in enumerate(histories.items()):
        xs, ys = _series(h, "cos_ref")
        if xs:
            ax.plot(xs, ys, "o-", ms=3, color=f"C{i}", label=f"{label}: cos vs reference")
        xs, ys = _series(h, "self_cos")
        if xs:
            ax.plot(xs, ys, "x--", ms=3, color=f"C{i}", alpha=0.6, label=f"{label}: batch self-cos")
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cosine")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


# ----------------------------------------------------------------------------------------------------
# entry points


def train(config, *, callback: Optional[Callable[[dict, torch.nn.Module], None]] = None) -> EqlmSummary:
    """Train an equilibrium LM (or the bp transformer) under ``config`` (an ``EqlmConfig`` or a dict).

    Returns an ``EqlmSummary`` (``status``: ``max_steps``, ``interrupted``, ``diverged``, ``fuse``,
    ``relaxation_diverged``); writes the artifacts listed in the module docstring.

    Example: ``print(train(EqlmConfig(max_steps=100, out_dir="runs/eqlm", progress=False)))``
    """
    cfg = config if isinstance(config, EqlmConfig) else EqlmConfig.from_dict(dict(config))
    return fit(EqlmTask(cfg), cfg, callback=callback)


def load_checkpoint(path, *, device: str = "cpu") -> tuple:
    """``(model, config, checkpoint, corpus)`` from a ``best.pt`` / ``last.pt`` of ``train``; ``corpus`` is
    the text corpus with the run's saved tokenizer (None for markov).

    Example: ``model, cfg, ckpt, corpus = load_checkpoint("runs/eqlm/best.pt")``
    """
    ckpt = load_checkpoint_file(path, map_location=device)
    if ckpt.get("trainer") != EqlmTask.name:
        raise ValueError(
            f"{path} is a checkpoint of the {ckpt.get('trainer')!r} trainer, not of eqprop.train.equilibrium"
        )
    cfg = EqlmConfig.from_dict(ckpt["config"])
    corpus = text_data.load_corpus(cfg, Path(path).parent) if cfg.task == "text" else None
    model = build_model(cfg, ckpt["model_config"]["vocab_size"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model, cfg, ckpt, corpus


def _loaded_task(path, device):
    model, cfg, ckpt, corpus = load_checkpoint(path, device=device)
    task = EqlmTask(cfg)
    task.corpus = corpus
    task.load_state_dict(ckpt.get("task_state", {}))
    run = Run(cfg, device, DistInfo(), Path(path).parent)
    return model, cfg, task, run


def evaluate(checkpoint, *, batches: int = 8, seed: int = 2_000_003, device: Optional[str] = None) -> dict:
    """Score a checkpoint on ``batches`` fresh evaluation batches from ``seed``: the gap to Bayes (markov)
    or validation CE (text). Example: ``evaluate("runs/eqlm/best.pt")["val_ce"]``"""
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be an int >= 1, got {batches!r}")
    dev = resolve_device(device or "cpu")
    model, cfg, task, run = _loaded_task(checkpoint, dev)
    eval_set = task._make_eval_set(run, seed, batches)
    out = task._score_set(run, model, eval_set, breakdowns=cfg.task == "markov")
    if cfg.task == "text":
        out["n_windows"] = sum(int(b.shape[0]) for b in eval_set)
    return out


def probe(
    checkpoint,
    out_dir,
    *,
    horizon: int = 30,
    batches: int = 3,
    distances=(1, 2, 4, 8),
    lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    jr: float = 1e-2,
    device: Optional[str] = None,
) -> dict:
    """Gradient diagnostics of an equilibrium-LM checkpoint (docs/design.md §7), into ``out_dir``:

    - alignment of the run's estimator(s) with BPTT(``horizon``) and with implicit, per parameter group;
    - batch self-cosine of each estimator over ``batches`` batches;
    - decomposition of the implicit gradient and the Jacobian penalty (weight ``jr``);
    - influence ‖∂z*_t/∂x_{t−d}‖ at ``distances``;
    - a one-step lr sweep of the implicit gradient.

    Writes ``probe.json``, ``probe.txt`` and figures ``alignment.png``, ``influence.png``, ``lr_sweep.png``;
    returns the dict of ``probe.json``. Example: ``probe("runs/eqlm/best.pt", "runs/eqlm/probe")``
    """
    from eqprop.gradients import decompose, influence, lr_sweep

    dev = resolve_device(device or "cpu")
    model, cfg, task, run = _loaded_task(checkpoint, dev)
    if cfg.model != "equilibrium":
        raise ValueError(f"probe needs an equilibrium-LM checkpoint, {checkpoint} holds model={cfg.model!r}")
    if not (isinstance(batches, int) and batches >= 2):
        raise ValueError(f"batches must be an int >= 2 (a self-cosine needs two batches), got {batches!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    toks = [task.probe_batch(run, 0, i) for i in range(batches)]
    data = [(model.inject(t).detach(), task._readout(model, t)) for t in toks]
    x, ro = data[0]
    relax = cfg.relax_options()
    ests = {_describe_phase(p): e for p, e in zip(task.phases, task.estimators)}
    ests.setdefault("implicit", Implicit(**relax))
    ests.setdefault(f"bptt(h={horizon})", BPTT(horizon, **relax))
    grads = {name: e.grad(model.block, x, ro) for name, e in ests.items()}
    ref_bptt, ref_imp = grads[f"bptt(h={horizon})"], grads["implicit"]
    result = {"checkpoint": str(checkpoint), "alignment": {}, "self_cosine": {}}
    text = []
    align_objs = {}
    for name, est in grads.items():
        for rname, ref in (("bptt", ref_bptt), ("implicit", ref_imp)):
            if est is ref:
                continue
            a = alignment(est, ref, "default")
            a.labels = (name, rname)
            align_objs[f"{name} vs {rname}"] = a
            result["alignment"][f"{name} vs {rname}"] = {
                "cos": a.overall_cos,
                "ratio": a.overall_ratio,
                "per_group": {g: list(v) for g, v in a.per_group.items()},
            }
            text += [f"== {name} vs {rname}", a.table(), ""]
        mean, se, _ = self_cosine(ests[name], model.block, data)
        result["self_cosine"][name] = {"mean": mean, "se": se, "batches": batches}
        text.append(f"self-cosine {name}: {mean:.4f} +- {se:.4f} over {batches} batches")
    z = ref_imp.z
    ctl = ContractionController(jacreg=jr)
    ctl.step(0.0)
    pen = ctl.penalty(model.block, x, z)
    params = [q for q in model.block.parameters()]
    gp = torch.autograd.grad(pen, params, allow_unused=True)
    pen_grads = {
        n: (g if g is not None else torch.zeros_like(q)) for n, g, q in zip(model.block.param_names(), gp, params)
    }
    task_grads = {n: ref_imp.grads[n] for n in model.block.param_names()}
    dec = decompose(task_grads, pen_grads, "default")
    result["decomposition"] = {"jr": jr, "cos": dec.cos, "ratio": dec.ratio, "cos_total": dec.cos_total}
    text += ["", f"== implicit task gradient vs Jacobian penalty (jr={jr})", dec.table()]
    T = x.shape[1]
    ds = [d for d in distances if 0 <= d < T]
    inf = influence(model.block, x[:2], z[:2], ds, probes=1, tol=max(cfg.relax_tol, 1e-6), max_steps=500)
    result["influence"] = {"distances": ds, "mean": inf.mean.tolist(), "normalized": inf.normalized.tolist()}
    text += ["", "== influence |dz*_t/dx_(t-d)| (normalized to d=1)"]
    text += [f"d={d}: {m:.4g} ({nm:.3g})" for d, m, nm in zip(ds, inf.mean.tolist(), inf.normalized.tolist())]
    sweep = lr_sweep(
        model, {f"block.{n}": g for n, g in task_grads.items()}, lrs, toks[0], lambda m, b: task.loss(run, m, b)
    )
    result["lr_sweep"] = [list(r) for r in sweep]
    text += ["", "== one-step lr sweep (implicit gradient of the block)"]
    text += [f"lr={lr:g}: dCE={d:+.5f}" for lr, d in sweep]
    import json

    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    from eqprop.plots import plot_alignments

    figs = {}
    panels = (
        ("alignment", lambda axes: plot_alignments(align_objs, axes=axes), 2),
        ("influence", inf.plot, 2),
        ("lr_sweep", lambda axes: sweep.plot(axes[0]), 1),
    )
    for name, draw, n_panels in panels:
        fig = Figure(figsize=(5.0 * n_panels, 3.4))
        draw(list(fig.subplots(1, n_panels, squeeze=False)[0]))
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        figs[name] = str(out / f"{name}.png")
    result["figures"] = figs
    (out / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "probe.txt").write_text("\n".join(text) + "\n")
    result["text"] = "\n".join(text)
    return result
