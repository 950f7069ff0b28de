"""The ladder: per Markov order, grow a transformer until it passes the gap gate (docs/design.md §8).

``ladder([4, 5], base=TrainConfig(...))`` trains rung after rung with ``eqprop.train.markov.train``:
more steps while the best gap still falls, else deeper, then wider. ``eqprop markov ladder`` is its
command line.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

from eqprop.train.checkpoint import move_aside, write_text_atomic
from eqprop.train.config import knob
from eqprop.train.markov import Summary, TrainConfig, train

log = logging.getLogger(__name__)

__all__ = ["ladder", "LADDER_START"]

#: The ladder's first rung unless told otherwise: a medium model with a large effective batch (128 sequences).
LADDER_START = dict(
    n_layer=4,
    n_head=8,
    d_model=128,
    batch_size=64,
    grad_accum_steps=2,
    lr=1e-3,
    min_lr=1e-4,
    warmup_steps=100,
    max_steps=2000,
    eval_every=100,
    eval_batches=8,
    final_eval_batches=32,
    progress=False,
)


def ladder(
    ks: Sequence[int],
    *,
    base: Optional[TrainConfig] = None,
    out_dir: str = "runs/ladder",
    max_rungs: int = 8,
    max_layers: int = 8,
    max_width: int = 512,
    max_steps_cap: int = 100_000,
    overwrite: bool = False,
    train_fn: Callable[[TrainConfig], Summary] = None,
) -> dict:
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
        overwrite: if ``out_dir`` already holds a ladder, move it aside to ``<out_dir>.old-<time>``
            (without it, such a folder is refused: runs are never lost).
        train_fn: the training function (default ``train``; tests pass a stand-in).

    Returns:
        ``{"k": {"passed": bool, "reason": str, "rungs": [...]}}`` as written to the JSON.

    Example: ``ladder([4], base=TrainConfig(n_layer=4, d_model=256, batch_size=64, max_steps=4000))``
    """
    train_fn = train_fn or train
    base = base or TrainConfig(**LADDER_START)
    root = Path(out_dir)
    held = (
        sorted(p.name for p in root.glob("*") if p.name == "ladder_summary.json" or p.name.startswith("k"))
        if root.is_dir()
        else []
    )
    if held and not overwrite:
        raise ValueError(
            f"{root} already holds a ladder ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}); "
            f"nothing was changed. Start afresh with {knob('overwrite')} (the old ladder is moved to "
            f"{root.name}.old-<time>, not deleted), or choose another out_dir"
        )
    if held:
        log.warning("moved the ladder in %s to %s", root, move_aside(root))
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    for k in ks:
        cfg = base.replace(k=int(k))
        rungs, reason, passed = [], "max_rungs", False
        depth_helped = True
        for i in range(max_rungs):
            cfg = cfg.replace(out_dir=str(root / f"k{k}" / f"rung{i}"), resume=False, overwrite=False)
            s = train_fn(cfg)
            gaps = [f["gap_pct"] for f in s.final]
            worst = max(gaps) if gaps else None
            rung = {
                "rung": i,
                "n_layer": cfg.n_layer,
                "d_model": cfg.d_model,
                "max_steps": cfg.max_steps,
                "status": s.status,
                "best_gap_pct": s.best_gap_pct,
                "final_gaps": gaps,
                "gate_passed": s.gate_passed,
                "n_params": s.n_params,
                "wall_s": s.wall_s,
            }
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

    try:  # results first: a plot that cannot be drawn only warns
        figs.ladder_plot(results, root / "ladder.png", target=base.target_gap_pct)
    except Exception as err:  # noqa: BLE001
        warnings.warn(
            f"the ladder plot could not be written to {root / 'ladder.png'} ({type(err).__name__}: {err}); "
            f"the results are in {root / 'ladder_summary.json'}",
            RuntimeWarning,
            stacklevel=2,
        )
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
