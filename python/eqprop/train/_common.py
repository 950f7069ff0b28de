"""Pieces every trainer shares: seeds, learning-rate schedules, atomic checkpoints, signals, DDP setup."""

from __future__ import annotations

import hashlib
import math
import os
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

SCHEDULES = ("cosine", "wsd", "constant")


def derive_seed(*parts) -> int:
    """A 62-bit seed that depends only on ``parts`` (ints / strings), stable across runs and platforms.

    Seeds for the training stream are ``derive_seed(config.seed, "train", step, micro_step)``, so a
    resumed run, or a data-parallel one, draws exactly the batches an uninterrupted single process would.

    Example: ``derive_seed(0, "train", 12, 0)``
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str,
          decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup over ``warmup_steps``, then

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
    progress = min(1.0, (step - decay_start) / max(1, max_steps - 1 - decay_start))
    return lr + (min_lr - lr) * progress


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a reader (or a crash)
    never sees a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


class StopRequest:
    """SIGINT / SIGTERM set a flag instead of killing the process; the loop checkpoints and exits at the
    end of the current step. The previous handlers come back on ``restore()`` (or leaving the ``with``)."""

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
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1), with
    NCCL on CUDA and gloo on CPU; a plain ``python`` run is a world of one."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # NCCL binds each rank to the current device
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True)


def resolve_device(device: str, local_rank: int = 0) -> str:
    if device == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"cuda:{local_rank}"
    return device


def peak_memory_mb(device: str) -> float:
    """Peak memory in MiB: CUDA allocator peak on a GPU, the process's peak RSS on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:  # pragma: no cover - not on Linux
        return float("nan")
