"""Figures the trainers write (matplotlib's object API, no pyplot: a notebook's backend is left alone)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter


def _symlog_if_needed(ax, values):
    vals = [v for v in values if v is not None]
    if vals and min(vals) > 0:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 2, 5, 10 rather than 2x10^0
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    else:  # gaps within noise of zero can be negative
        ax.set_yscale("symlog", linthresh=1.0)


def training_curve(history: list, bayes_nll: float, target: float, path, *, k: int) -> Path:
    """Train loss and eval NLL vs step with the Bayes line (left), eval gap% +- SE vs step (right).

    Returns the written path. Example: ``training_curve(summary.history, 0.4874, 3.0, "curve.png", k=2)``
    """
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    steps = [r["step"] for r in history]
    ax1.plot(steps, [r["train_loss"] for r in history], lw=1, alpha=0.7, label="train loss")
    ev = [r for r in history if r.get("gap_pct") is not None]
    if ev:
        ax1.plot([r["step"] for r in ev], [r["eval_nll"] for r in ev], "o-", ms=3, label="eval NLL")
        ax2.errorbar(
            [r["step"] for r in ev],
            [r["gap_pct"] for r in ev],
            yerr=[r["gap_se"] for r in ev],
            fmt="o-",
            ms=3,
            capsize=2,
            label="eval gap",
        )
        _symlog_if_needed(ax2, [r["gap_pct"] for r in ev])
    ax1.axhline(bayes_nll, color="k", ls="--", lw=1, label=f"Bayes {bayes_nll:.4f}")
    ax1.set(xlabel="step", ylabel="NLL per token (nats), t >= k", title=f"Markov k={k}: loss")
    ax1.legend(fontsize=8)
    ax2.axhline(target, color="r", ls="--", lw=1, label=f"target {target}%")
    ax2.set(xlabel="step", ylabel="gap to Bayes (%)", title="gap on the fixed eval set")
    ax2.legend(fontsize=8)
    return _save(fig, path)


def gap_by_position(result: dict, path, *, k: int, target: float) -> Path:
    """Gap% by position (20 bins and the three thirds) and by context visit count, from one evaluation
    (an ``EvalResult.to_dict()``). Returns the written path."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    bins = [b for b in result["by_position"]["bins"] if b["gap_pct"] is not None]
    mids = [(b["positions"][0] + b["positions"][1]) / 2 for b in bins]
    ax1.errorbar(
        mids,
        [b["gap_pct"] for b in bins],
        yerr=[b["gap_se"] for b in bins],
        fmt="o-",
        ms=3,
        capsize=2,
        label="20 position bins",
    )
    for name in ("early", "middle", "late"):
        third = result["by_position"][name]
        if third["gap_pct"] is not None:
            lo, hi = third["positions"]
            ax1.hlines(third["gap_pct"], lo, hi, color="C1", lw=3, label="thirds" if name == "early" else None)
    ax1.axhline(target, color="r", ls="--", lw=1, label=f"target {target}%")
    ax1.set(
        xlabel="position t",
        ylabel="gap to Bayes (%)",
        title=f"k={k}: gap by position ({result['n_seqs']} seqs, seed {result['seed']})",
    )
    ax1.legend(fontsize=8)
    buckets = [b for b in result["by_visit_count"] if b["gap_pct"] is not None]
    labels = [_bucket_label(*b["visits"]) for b in buckets]
    ax2.bar(range(len(buckets)), [b["gap_pct"] for b in buckets], yerr=[b["gap_se"] for b in buckets], capsize=3)
    for i, b in enumerate(buckets):
        ax2.annotate(f"{100 * b['frac_tokens']:.0f}%", (i, 0), ha="center", va="bottom", fontsize=7)
    ax2.set_xticks(range(len(buckets)), labels)
    ax2.axhline(target, color="r", ls="--", lw=1)
    ax2.set(
        xlabel="earlier visits of the target's context (% of tokens)",
        ylabel="gap to Bayes (%)",
        title="gap by context visit count",
    )
    return _save(fig, path)


def ladder_plot(results: dict, path, *, target: float) -> Path:
    """Best eval gap per rung, one line per k, with the gate line. Returns the written path."""
    fig = Figure(figsize=(6, 3.8), layout="constrained")
    ax = fig.subplots()
    all_gaps = []
    for k, res in results.items():
        rungs = [r for r in res["rungs"] if r["best_gap_pct"] is not None]
        gaps = [r["best_gap_pct"] for r in rungs]
        all_gaps += gaps
        ax.plot([r["rung"] for r in rungs], gaps, "o-", label=f"k={k}")
        for r in rungs:
            ax.annotate(
                f"{r['n_layer']}x{r['d_model']}\n{r['max_steps']}",
                (r["rung"], r["best_gap_pct"]),
                fontsize=6,
                textcoords="offset points",
                xytext=(3, 3),
            )
    _symlog_if_needed(ax, all_gaps)
    ax.axhline(target, color="r", ls="--", lw=1, label=f"gate {target}%")
    ax.set(xlabel="rung", ylabel="best eval gap to Bayes (%)", title="ladder (layers x width, steps)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _bucket_label(lo, hi) -> str:
    return f"{lo}+" if hi is None else (f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}")


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
