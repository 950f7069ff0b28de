"""One training loop for every trainer (docs/design.md §10).

A trainer is a ``Task`` -- the model, the batches, the loss and the evaluation -- plus a config
deriving from ``RunConfig``; ``fit(task, config)`` runs the loop, which reads top to bottom::

    for step in range(start, max_steps):
        lr = lr_at(step, ...)                          # the schedule is a pure function of the step
        for micro in range(grad_accum_steps):          # forward, loss, backward
            batch = task.train_batch(run, step, micro)
            loss = task.loss(run, model, batch) / grad_accum_steps
            loss.backward()
        clip the gradient norm; stop on a non-finite loss or norm ("diverged")
        optimizer.step()
        log a history row
        every eval_every steps: metrics = task.evaluate(run, model); best.pt on a new best
                                task.score; task.stop_reason(run, metrics) may end the run early
        last.pt after each evaluation, on SIGINT/SIGTERM and at the end
    task.final_evaluation(run, model loaded from best.pt)
    summary.json (task.summarize), training_history.csv, then figures (task.figures; a failure warns)

What the loop guarantees for every trainer:

- exact resume (``resume=True`` / ``--resume``): the model, optimizer moments, RNG states, history
  and best score come back from ``last.pt``; the schedule depends only on the step, and batches only on
  ``(seed, step, micro)`` if the task derives them with ``derive_seed``, so the resumed run equals the
  uninterrupted one bit for bit;
- runs are never lost: a fresh run into a folder holding a run refuses (``resume`` continues it,
  ``overwrite`` moves it aside to ``<out_dir>.old-<time>``); results are written before figures;
- checkpoints are atomic, fsync'ed and checksummed (``eqprop.train.checkpoint``);
- SIGINT / SIGTERM checkpoint and stop at the end of the current step (``status="interrupted"``,
  ``stop_signal`` says which; the CLI exits 130 / 143);
- under ``torchrun`` every rank trains on its own device (``cuda:LOCAL_RANK``), the model is wrapped
  in DistributedDataParallel, only rank 0 writes files;
- the memory a config needs (``task.memory_need``) is checked against the device before anything is
  written.

Extension points -- a new trainer subclasses ``Task`` and overrides:

    name, score, eval_columns, must_match_on_resume     class attributes
    prepare(run)              -> None                   load and check data; called first, so a bad
                                                        data argument fails before anything is written
    memory_need(run)          -> {what: bytes}          lower bound, checked before anything is written
    build_model(run)          -> nn.Module              called after torch.manual_seed(config.seed)
    train_batch(run, step, micro) -> batch              this rank's share of the global micro-batch
    loss(run, model, batch)   -> scalar tensor          call model(...) (the DDP wrapper), not a method
    backward(run, model, batch, scale) -> loss tensor   fills .grad; default: autocast, loss / scale, backward
    halt(run)                 -> (status, msg) | None   asked after the gradients, before the step: stop cleanly
    after_step(run, model, step) -> {column: value}     after optimizer.step (EMA, probes); a row is logged if any
    state_dict() / load_state_dict(state)               the task's own state, saved in checkpoints (exact resume)
    evaluate(run, model)      -> {column: value}        must contain task.score (lower is better)
    stop_reason(run, metrics) -> str | None             early stop (asked only when config.early_stop)
    final_evaluation(run, model) -> JSON-able           on best.pt at the end
    summarize(run, result)    -> object with to_dict()  what fit returns and writes to summary.json
    figures(run, result)      -> {name: (file name, draw(path))}

Example::

    result = fit(MyTask(), MyConfig(max_steps=100, out_dir="runs/x"))
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from eqprop.train.checkpoint import (
    existing_run_files,
    load_checkpoint_file,
    move_aside,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_text_atomic,
)
from eqprop.train.config import SCHEDULES, RunConfig, knob

log = logging.getLogger(__name__)

__all__ = [
    "Task",
    "Run",
    "RunResult",
    "fit",
    "lr_at",
    "derive_seed",
    "DistInfo",
    "resolve_device",
    "adamw",
    "StopRequest",
    "BASE_COLUMNS",
]

#: History columns every trainer logs; a task's ``eval_columns`` go between the first four and the rest.
BASE_COLUMNS = ("step", "lr", "train_loss", "grad_norm", "tokens_per_s", "mem_mb", "elapsed_s")


# ----------------------------------------------------------------------------------------------------
# seeds and the schedule


def derive_seed(*parts) -> int:
    """A 62-bit seed that depends only on ``parts`` (ints / strings), stable across runs and platforms.

    Seeds for the training stream are ``derive_seed(config.seed, "train", step, micro_step)``, so a
    resumed run, or a data-parallel one, draws exactly the batches an uninterrupted single process would.

    Example: ``derive_seed(0, "train", 12, 0)``
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def lr_at(
    step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str, decay_frac: float = 0.2
) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup ``lr * (step + 1) / warmup_steps``
    over ``warmup_steps``, then

    - ``cosine``: half-cosine from ``lr`` to ``min_lr``;
    - ``wsd``: warmup-stable-decay, constant ``lr`` then a linear decay to ``min_lr`` over the last
      ``decay_frac`` of the steps;

    both reach ``min_lr`` exactly at the last optimizer step, ``max_steps - 1``;
    - ``constant``: ``lr``.

    A pure function of the step, so the schedule's whole state is the step counter (exact resume).

    Example: ``lr_at(0, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100, schedule="cosine")  # 1e-4``
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, max_steps - 1 - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    decay_start = max(warmup_steps, int(round(max_steps * (1.0 - decay_frac))))
    if step < decay_start:
        return lr
    span = max_steps - 1 - decay_start
    if span <= 0:  # a decay of one step: the last step is at min_lr
        return min_lr
    progress = min(1.0, (step - decay_start) / span)
    return lr + (min_lr - lr) * progress


def adamw(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW that decays matrices only; biases, norm gains and embeddings stay undecayed (nanoGPT)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


# ----------------------------------------------------------------------------------------------------
# signals, devices, data parallelism


class StopRequest:
    """SIGINT / SIGTERM set a flag instead of killing the process; the loop checkpoints and exits at the
    end of the current step. The previous handlers come back on leaving the ``with``."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False


@dataclass
class DistInfo:
    """Where this process sits in a ``torchrun`` job (a plain run is rank 0 of a world of one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _dist_env() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


def resolve_device(device: str, local_rank: int = 0, world_size: int = 1) -> str:
    """The torch device string this process trains on.

    ``auto``: ``cuda:<local_rank>`` when CUDA is available, else ``cpu``. ``cuda`` / ``cuda:N``: on one
    process ``cuda`` is ``cuda:0`` and ``cuda:N`` is kept; under ``torchrun`` (``world_size > 1``) every
    rank takes its own GPU, ``cuda:<LOCAL_RANK>``. Raises ``ValueError`` when CUDA is asked of a torch
    without CUDA support or a GPU that is not there.

    Example: ``resolve_device("auto")  # 'cpu' on a machine without a GPU``
    """
    if device == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if torch.version.cuda is None:
            raise ValueError(
                f"device={device!r}: this torch ({torch.__version__}) has no CUDA (it was built for the "
                f"CPU only); use {knob('device', 'cpu')}, or install a CUDA build of torch"
            )
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r}: this torch has CUDA {torch.version.cuda} but sees no GPU "
                f"(check CUDA_VISIBLE_DEVICES and the driver); use {knob('device', 'cpu')}"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if world_size > 1:
            if ":" in device and index != local_rank:
                log.warning(
                    "device=%r under torchrun: each rank uses its own GPU, this one cuda:%d", device, local_rank
                )
            index = local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: needs GPU {index}, but only {torch.cuda.device_count()} are visible")
        return f"cuda:{index}"
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _init_distributed(info: DistInfo, device: str) -> DistInfo:
    """Join the process group ``torchrun`` describes (NCCL on CUDA, gloo on CPU)."""
    if info.world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return info
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # NCCL binds each rank to the current device
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank, True)


def device_memory_bytes(device: str) -> int:
    """Total memory of the device: the GPU's, or the machine's physical memory for ``cpu``."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 2**63


def peak_memory_mb(device: str) -> float:
    """Peak memory in MiB: CUDA allocator peak on a GPU, the process's peak RSS on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:  # pragma: no cover - not on Linux
        return float("nan")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# ----------------------------------------------------------------------------------------------------
# what a trainer supplies, and what the loop hands it


@dataclass
class Run:
    """What the hooks see: the config, this process's device and rank, the output folder, and (kept up
    to date by ``fit``) the optimizer steps done and the history rows logged so far (read-only for hooks:
    e.g. an early-stop rule over past evaluations, which then survives a resume)."""

    config: RunConfig
    device: str
    dist: DistInfo
    out_dir: Path
    step: int = 0
    history: list = field(default_factory=list)

    def autocast(self):
        """bf16 autocast when ``config.bf16``, else a no-op context."""
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` in place over ranks (a no-op on one process)."""
        if self.dist.world_size > 1:
            dist.all_reduce(t)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Maximum of ``t`` in place over ranks (a no-op on one process)."""
        if self.dist.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t


class Task:
    """The hooks a trainer supplies to ``fit`` (see the module docstring for the loop that calls them)."""

    #: label of the progress bar; stored in checkpoints
    name: str = "task"
    #: key of ``evaluate``'s dict that selects ``best.pt`` (lower is better)
    score: str = "eval_loss"
    #: history columns ``evaluate`` fills (in CSV order)
    eval_columns: tuple = ("eval_loss",)
    #: config fields that a resume must not change (beyond the loop's batch_size, grad_accum_steps, seed)
    must_match_on_resume: tuple = ()

    def prepare(self, run: Run) -> None:
        """Load and check what the task needs (a corpus, a tokenizer); raise ``ValueError`` /
        ``FileNotFoundError`` naming the bad argument. Called first, before anything is written."""

    def memory_need(self, run: Run) -> dict:
        """A LOWER bound of the bytes training needs on ``run.device``, by part; over the device's memory
        the run is refused before anything is written."""
        return {}

    def build_model(self, run: Run) -> torch.nn.Module:
        raise NotImplementedError(f"{type(self).__name__}.build_model")

    def model_config(self, model: torch.nn.Module) -> dict:
        """JSON-able constructor arguments stored in checkpoints (default: ``model.config`` if a dict)."""
        cfg = getattr(model, "config", None)
        return dict(cfg) if isinstance(cfg, dict) else {}

    def optimizer(self, run: Run, model: torch.nn.Module) -> torch.optim.Optimizer:
        return adamw(model, run.config)

    def train_batch(self, run: Run, step: int, micro: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.train_batch")

    def tokens(self, batch) -> int:
        """Tokens in this rank's batch (for tokens/s)."""
        return batch.numel() if isinstance(batch, torch.Tensor) else 0

    def loss(self, run: Run, model: torch.nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def backward(self, run: Run, model: torch.nn.Module, batch, scale: int) -> torch.Tensor:
        """Fill ``.grad`` for one micro-batch and return its detached loss divided by ``scale`` (the number of
        micro-steps). The default is ``loss(...) / scale`` under ``run.autocast()`` and ``.backward()``; a task
        whose gradient is not autograd's (an estimator writing ``.grad`` itself) overrides it."""
        with run.autocast():
            loss = self.loss(run, model, batch) / scale
        loss.backward()
        return loss.detach()

    def halt(self, run: Run) -> Optional[tuple]:
        """``(status, message)`` to stop cleanly before this step's update (nothing is written: the last
        checkpoint stays the last good state), or None. Asked once per optimizer step, after the gradients."""
        return None

    def after_step(self, run: Run, model: torch.nn.Module, step: int) -> dict:
        """Called after each optimizer step (``step`` = steps done); extra history columns (non-empty: the row
        is logged)."""
        return {}

    def state_dict(self) -> dict:
        """The task's own training state (schedules, controllers), saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` on resume."""

    def evaluate(self, run: Run, model: torch.nn.Module) -> dict:
        raise NotImplementedError(f"{type(self).__name__}.evaluate")

    def stop_reason(self, run: Run, metrics: dict) -> Optional[str]:
        return None

    def final_evaluation(self, run: Run, model: torch.nn.Module) -> Any:
        return []

    def summarize(self, run: Run, result: "RunResult"):
        return result

    def figures(self, run: Run, result: "RunResult") -> dict:
        return {}


@dataclass
class RunResult:
    """What the loop did. ``status``: ``reached_target`` (early stop), ``max_steps``, ``interrupted``
    (SIGINT/SIGTERM: ``stop_signal``; no final evaluation), ``diverged`` (non-finite loss; final
    evaluation of ``best.pt`` if there is one), or a status of the task's ``halt`` (e.g. a tripped
    fuse; final evaluation of ``best.pt`` if there is one)."""

    status: str
    steps: int
    best_step: Optional[int]
    best: dict
    final: Any
    n_params: int
    wall_s: float
    tokens_seen: int
    world_size: int
    out_dir: str
    figures: dict
    message: str = ""
    stop_signal: Optional[str] = None
    history: list = field(default_factory=list, repr=False)

    def to_dict(self, with_history: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not with_history:
            d.pop("history")
        return d

    @classmethod
    def extend(cls, result: "RunResult", **extra):
        """A subclass's result (a trainer's summary, adding defaulted fields) from the loop's ``result``.
        Example: ``MySummary.extend(result, k=2)``"""
        return cls(**{f.name: getattr(result, f.name) for f in dataclasses.fields(RunResult)}, **extra)


# ----------------------------------------------------------------------------------------------------
# the loop


def fit(task: Task, cfg: RunConfig, *, callback: Optional[Callable[[dict, torch.nn.Module], None]] = None):
    """Train ``task`` under ``cfg``; returns ``task.summarize(run, result)``. See the module docstring.

    Under ``torchrun`` every rank returns it; only rank 0 writes files.
    """
    t_start = time.perf_counter()
    dist_info = _dist_env()
    device = resolve_device(cfg.device, dist_info.local_rank, dist_info.world_size)
    if cfg.batch_size % dist_info.world_size:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by the number of data-parallel "
            f"processes ({dist_info.world_size})"
        )
    out_dir = Path(cfg.out_dir)
    run = Run(cfg, device, dist_info, out_dir)
    task.prepare(run)
    _check_memory(task.memory_need(run), device)
    dist_info = run.dist = _init_distributed(dist_info, device)
    _prepare_out_dir(out_dir, cfg, dist_info)
    log.info("config: %s", json.dumps(cfg.to_dict()))

    torch.manual_seed(cfg.seed)
    model = task.build_model(run).to(device)
    optimizer = task.optimizer(run, model)
    state = {
        "step": 0,
        "best": {},
        "best_step": None,
        "history": [],
        "tokens_seen": 0,
        "elapsed_s": 0.0,
        "status": "max_steps",
    }
    if cfg.resume and (out_dir / "last.pt").exists():
        state = _restore(out_dir / "last.pt", task, cfg, model, optimizer)
        log.info("resumed from %s at step %d", out_dir / "last.pt", state["step"])
    if dist_info.is_main:  # only now: a config that cannot build or resume must not overwrite the run's record
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(cfg.to_dict(), indent=2) + "\n", out_dir / "config.json")
    raw_model = model
    if dist_info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None
        )

    history, step = state["history"], state["step"]
    run.history, run.step = history, step
    status, message, stop_signal = "max_steps", "", None
    if state["status"] == "reached_target" and cfg.early_stop:
        status = "reached_target"
        message = f"resumed a run that had reached its target at step {step}: final evaluation only"
        log.info(message)
    elapsed_before = state["elapsed_s"]
    columns = BASE_COLUMNS[:4] + tuple(task.eval_columns) + BASE_COLUMNS[4:]

    def checkpoint(path: Path, rows: list) -> None:
        save_checkpoint(
            {
                "trainer": task.name,
                "model": raw_model.state_dict(),
                "model_config": task.model_config(raw_model),
                "optimizer": optimizer.state_dict(),
                "config": cfg.to_dict(),
                "step": step,
                "best": state["best"],
                "best_step": state["best_step"],
                "tokens_seen": state["tokens_seen"],
                "status": state["status"],
                "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                "history": list(rows),
                "rng": rng_state(),
                "task_state": task.state_dict(),
            },
            path,
        )

    from tqdm import tqdm  # not tqdm.auto: it warns in kernels without ipywidgets

    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        desc=task.name,
        dynamic_ncols=True,
        disable=not (cfg.progress and dist_info.is_main),
    )
    with StopRequest() as stop:
        while step < cfg.max_steps and status == "max_steps":
            t0 = time.perf_counter()
            lr = lr_at(
                step,
                lr=cfg.lr,
                min_lr=cfg.min_lr,
                warmup_steps=cfg.warmup_steps,
                max_steps=cfg.max_steps,
                schedule=cfg.schedule,
                decay_frac=cfg.wsd_decay_frac,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr

            # forward, loss, backward (gradient accumulation; DDP all-reduces on the last micro-step only)
            model.train()
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            tokens = 0
            for micro in range(cfg.grad_accum_steps):
                batch = task.train_batch(run, step, micro)
                tokens += task.tokens(batch) * dist_info.world_size
                sync = micro == cfg.grad_accum_steps - 1 or dist_info.world_size == 1
                with contextlib.nullcontext() if sync else model.no_sync():
                    loss = task.backward(run, model, batch, cfg.grad_accum_steps)
                loss_sum += loss.detach().double()
            if dist_info.world_size > 1:  # the global mean, so every rank logs (and judges) the same loss
                dist.all_reduce(loss_sum)
                loss_sum /= dist_info.world_size
            train_loss = float(loss_sum)
            halt = task.halt(run)
            if _agree(halt is not None, dist_info, device):  # every rank stops at the same step
                halt = halt or ("halted", "another rank halted")
                status, message = halt[0], f"{halt[1]}; " + _saved_checkpoints_note(out_dir)
                optimizer.zero_grad(set_to_none=True)
                log.warning(message)
                break

            # clip, divergence check, step
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            )
            if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
                status = "diverged"
                what = "loss" if not math.isfinite(train_loss) else "gradient norm"
                message = (
                    f"non-finite {what} at step {step + 1} (loss={train_loss}, grad_norm={grad_norm}); "
                    + _saved_checkpoints_note(out_dir)
                )
                log.warning(message)
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            run.step = step
            extra = task.after_step(run, raw_model, step)

            # log
            record = {
                "step": step,
                "lr": lr,
                "train_loss": train_loss,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / (time.perf_counter() - t0),
                "mem_mb": peak_memory_mb(device),
                "elapsed_s": elapsed_before + time.perf_counter() - t_start,
            }
            record.update(extra)
            state["tokens_seen"] += tokens

            # eval, best.pt, early stop
            evaluated = step % cfg.eval_every == 0 or step == cfg.max_steps
            if evaluated:
                metrics = task.evaluate(run, raw_model)
                record.update(metrics)
                score = metrics[task.score]
                if not state["best"] or score < state["best"][task.score]:
                    state["best"], state["best_step"] = dict(metrics), step
                    if dist_info.is_main:
                        checkpoint(out_dir / "best.pt", history + [record])
                reason = task.stop_reason(run, metrics) if cfg.early_stop else None
                if reason:
                    status, message = "reached_target", reason
            if evaluated or extra or step % cfg.log_every == 0 or step == cfg.max_steps:
                history.append(record)
            if callback is not None:
                callback(record, raw_model)
            last = next((r[task.score] for r in reversed(history) if r.get(task.score) is not None), None)
            bar.set_postfix({"loss": f"{train_loss:.4f}", task.score: "-" if last is None else f"{last:.4g}"})
            bar.update(1)

            # checkpoint
            stop_now = _agree(stop.requested is not None, dist_info, device)
            if evaluated or stop_now or status != "max_steps" or step == cfg.max_steps:
                state["status"] = status
                if dist_info.is_main:
                    checkpoint(out_dir / "last.pt", history)
                    _write_history(history, columns, out_dir / "training_history.csv")
            if stop_now:
                status, stop_signal = "interrupted", stop.requested or "stop request"
                message = f"{stop_signal} at step {step}; last.pt written, continue with {knob('resume')}"
                log.warning(message)
                break
    bar.close()
    if dist_info.is_main:
        _write_history(history, columns, out_dir / "training_history.csv")

    # final evaluation of best.pt
    final = []
    if status != "interrupted" and state["best_step"] is not None:
        _barrier(dist_info)  # rank 0 has written best.pt; ranks share out_dir (one node or a shared file system)
        raw_model.load_state_dict(load_checkpoint_file(out_dir / "best.pt", map_location=device)["model"])
        final = task.final_evaluation(run, raw_model)
    result = RunResult(
        status=status,
        steps=step,
        best_step=state["best_step"],
        best=state["best"],
        final=final,
        n_params=sum(p.numel() for p in raw_model.parameters() if p.requires_grad),
        wall_s=elapsed_before + time.perf_counter() - t_start,
        tokens_seen=state["tokens_seen"],
        world_size=dist_info.world_size,
        out_dir=str(out_dir),
        figures={},
        message=message,
        stop_signal=stop_signal,
        history=history,
    )

    # results first, figures after: a figure that cannot be drawn must not cost the numbers
    summary = task.summarize(run, result)
    if dist_info.is_main:
        write_text_atomic(json.dumps(summary.to_dict(), indent=2) + "\n", out_dir / "summary.json")
        for name, (filename, draw) in task.figures(run, result).items():
            path = out_dir / "figures" / filename
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                result.figures[name] = str(draw(path))
            except Exception as err:  # noqa: BLE001 - any plotting failure is reported, never fatal
                warnings.warn(
                    f"figure {name!r} could not be written to {path} ({type(err).__name__}: {err}); "
                    f"the results are in {out_dir / 'summary.json'}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if result.figures:
            summary = task.summarize(run, result)
            write_text_atomic(json.dumps(summary.to_dict(), indent=2) + "\n", out_dir / "summary.json")
    if dist_info.initialized_here:
        dist.destroy_process_group()
    return summary


# ----------------------------------------------------------------------------------------------------
# the loop's helpers


def _check_memory(need: dict, device: str) -> None:
    total = sum(need.values())
    have = device_memory_bytes(device)
    if total > have:
        parts = ", ".join(f"{what} {_gib(n)}" for what, n in sorted(need.items(), key=lambda kv: -kv[1]) if n)
        raise ValueError(
            f"this config needs at least {_gib(total)} on {device} ({parts}), more than the "
            f"{_gib(have)} it has; use a smaller batch_size / seq_len / k / model"
        )


def _prepare_out_dir(out_dir: Path, cfg: RunConfig, dist_info: DistInfo) -> None:
    """Refuse to start a fresh run over a folder that holds a run; ``overwrite`` moves it aside first."""
    found = existing_run_files(out_dir)
    resumable = cfg.resume and (out_dir / "last.pt").exists()
    _barrier(dist_info)  # every rank has looked before rank 0 moves anything
    if not found or resumable:
        return
    if cfg.resume or cfg.overwrite:
        # resume without last.pt (the run stopped before its first checkpoint): start afresh, but keep the record
        if dist_info.is_main:
            moved = move_aside(out_dir)
            log.warning(
                "%s held a run (%s)%s; moved it to %s",
                out_dir,
                ", ".join(found),
                " but no last.pt to resume from" if cfg.resume else "",
                moved,
            )
        _barrier(dist_info)
        return
    raise ValueError(
        f"{out_dir} already holds a run ({', '.join(found)}); nothing was changed. Continue it with "
        f"{knob('resume')}, or start afresh with {knob('overwrite')} (the old run is moved to "
        f"{out_dir.name}.old-<time>, not deleted), or choose another out_dir"
    )


def _restore(path: Path, task: Task, cfg: RunConfig, model, optimizer) -> dict:
    # The RNG states must stay CPU tensors; load_state_dict moves the rest to the parameters' device.
    ckpt = load_checkpoint_file(path, map_location="cpu")
    saved = ckpt["config"]
    must_match = ("batch_size", "grad_accum_steps", "seed") + tuple(task.must_match_on_resume)
    mismatched = [
        f"{n}: checkpoint {saved.get(n)!r} vs config {v!r}"
        for n in must_match
        for v in [cfg.to_dict()[n]]
        if saved.get(n) != v
    ]
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
    task.load_state_dict(ckpt.get("task_state", {}))
    # rows logged after the checkpoint (a crash between checkpoints) are dropped: they will be redone
    history = [r for r in ckpt["history"] if r["step"] <= ckpt["step"]]
    return {
        "step": ckpt["step"],
        "best": ckpt["best"],
        "best_step": ckpt["best_step"],
        "history": history,
        "tokens_seen": ckpt["tokens_seen"],
        "elapsed_s": ckpt["elapsed_s"],
        "status": ckpt["status"],
    }


def _saved_checkpoints_note(out_dir: Path) -> str:
    saved = [name for name in ("last.pt", "best.pt") if (out_dir / name).exists()]
    if not saved:
        return "no checkpoint had been written yet"
    return f"{' / '.join(saved)} in {out_dir} hold the last evaluated state"


def _write_history(history: list, columns: tuple, path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in history:
        writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
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
