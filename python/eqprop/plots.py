"""Figures of the diagnostics (docs/design.md §6, §7), with matplotlib (imported on first use).

Every function takes a result (or, where comparing makes sense, a dict label -> result), draws into
the given axes (the caller then lays out its figure) or a new, laid-out figure, and returns the
matplotlib Figure. The results' ``.plot()`` methods
call these.

============================  ======================================================  =================
function                      draws                                                   result of
============================  ======================================================  =================
plot_alignments               cos and k = ‖a‖/‖b‖ per group (grouped bars)            ``alignment``
plot_self_cosine              pairwise cosine matrix of the batches                   ``self_cosine``
plot_self_cosines             mean batch self-cosine ± SE per estimator (bars)        ``self_cosine``
plot_decomposition            cos(t, p), cos(t, t + p) and ‖p‖/‖t‖ per group          ``decompose``
plot_lr_sweep                 ΔCE against lr (log x)                                  ``lr_sweep``
plot_influence                influence and normalized influence against d, SE band   ``influence``
plot_per_position_ce          CE against position, SE band                            ``per_position_ce``
plot_branch_stats             branch ratios, entropy, qk RMS, weight norms            ``branch_stats``
plot_controller_history       jr, residual, penalty share against step                ``ContractionController``
============================  ======================================================  =================
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

__all__ = [
    "plot_alignments",
    "plot_self_cosine",
    "plot_self_cosines",
    "plot_decomposition",
    "plot_lr_sweep",
    "plot_influence",
    "plot_per_position_ce",
    "plot_branch_stats",
    "plot_controller_history",
]


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def _panels(axes: Any, n: int, figsize: tuple, what: str) -> tuple:
    """(figure, [n axes], own): a new figure (own = True) when axes is None, else the n axes given
    (one Axes for n = 1), whose figure the caller lays out."""
    if axes is None:
        fig, grid = _pyplot().subplots(1, n, figsize=figsize, squeeze=False)
        return fig, list(grid[0]), True
    if n == 1 and hasattr(axes, "plot"):
        return axes.figure, [axes], False
    try:
        axes = list(getattr(axes, "flat", axes))
    except TypeError:
        axes = [axes]
    if len(axes) != n or not all(hasattr(a, "plot") for a in axes):
        raise ValueError(
            f"{what} draws {n} panel(s): pass {'an Axes' if n == 1 else f'{n} Axes'} or None, got {axes!r}"
        )
    return axes[0].figure, axes, False


def _labelled(results: Any, kind: tuple, what: str) -> dict:
    """{label: result} from one result or a dict of them."""
    if isinstance(results, kind):
        return {"": results}
    if isinstance(results, dict) and results and all(isinstance(r, kind) for r in results.values()):
        return results
    names = " or ".join(k.__name__ for k in kind)
    raise TypeError(f"{what} takes a {names} or a non-empty dict label -> {names}, got {type(results).__name__}")


def _np(t: Any):
    return t.detach().cpu().to(torch.float64).numpy() if isinstance(t, torch.Tensor) else t


def _grouped_bars(ax, groups: list, series: dict, width: float = 0.8) -> None:
    """One bar per (group, series): series {label: [value per group]} side by side in each group."""
    m = max(1, len(series))
    for j, (label, vals) in enumerate(series.items()):
        xs = [i - width / 2 + (j + 0.5) * width / m for i in range(len(groups))]
        ax.bar(xs, vals, width / m, label=label or None, color=f"C{j}")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=45, ha="right")


# ---- gradients ------------------------------------------------------------------------------------


def plot_alignments(results: Any, axes: Any = None):
    """Alignment per parameter group: left cos(a, b), right k = ‖a‖/‖b‖, one bar per group and
    result, the last group ``overall``. results: an :class:`eqprop.gradients.Alignment` or a dict
    label -> Alignment (e.g. ``{"EP sym": alignment(ep, implicit), "BPTT": alignment(bptt, implicit)}``).

    Reading it: cos near 1 and k near 1 in every group is an unbiased, well-scaled estimate; a group
    with cos ≤ 0 gets updates that do not descend the loss (docs/design.md §7).
    Example: ``plot_alignments({"EP": alignment(ep, imp, "default")})``.
    """
    from .gradients import Alignment

    res = _labelled(results, (Alignment,), "plot_alignments")
    groups: list = []
    for a in res.values():
        groups += [str(g) for g in a.per_group if str(g) not in groups]
    groups.append("overall")

    def column(a, i):
        per = {str(g): v for g, v in a.per_group.items()}
        return [per[g][i] if g in per else math.nan for g in groups[:-1]] + [
            a.overall_cos if i == 0 else a.overall_ratio
        ]

    width = min(14.0, 4.0 + 0.35 * len(groups) * (1 + 0.5 * len(res)))
    fig, (ax_c, ax_k), own = _panels(axes, 2, (width, 3.4), "plot_alignments")
    _grouped_bars(ax_c, groups, {lab: column(a, 0) for lab, a in res.items()})
    _grouped_bars(ax_k, groups, {lab: column(a, 1) for lab, a in res.items()})
    ax_c.axhline(0.0, color="k", lw=0.5)
    ax_c.set_ylim(-1.05, 1.05)
    la, lb = next(iter(res.values())).labels
    ax_c.set_ylabel(f"cos({la}, {lb})")
    ax_k.axhline(1.0, color="k", lw=0.5)
    ax_k.set_ylim(bottom=0.0)
    ax_k.set_ylabel(f"k = |{la}| / |{lb}|")
    if len(res) > 1 or "" not in res:
        ax_c.legend(fontsize="small")
    if own:  # a figure of its own; the caller lays out axes it passed in
        fig.tight_layout()
    return fig


def plot_self_cosine(result: Any, ax: Any = None):
    """The N × N matrix of pairwise cosines of one estimator's gradients on N batches (color −1 .. 1),
    titled with the mean off-diagonal cosine ± SE. result: :class:`eqprop.gradients.SelfCosine`.

    Example: ``plot_self_cosine(self_cosine(BPTT(20), blk, batches, loss))``.
    """
    from .gradients import SelfCosine

    if not isinstance(result, SelfCosine):
        raise TypeError(f"plot_self_cosine takes a SelfCosine, got {type(result).__name__}")
    fig, (ax,), own = _panels(ax, 1, (3.6, 3.2), "plot_self_cosine")
    im = ax.imshow(_np(result.matrix), vmin=-1.0, vmax=1.0, cmap="RdBu_r")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xlabel("batch")
    ax.set_ylabel("batch")
    ax.set_title(f"self-cos {result.mean:.3f} ± {result.se:.3f}")
    return fig


def plot_self_cosines(results: Any, ax: Any = None):
    """Mean batch self-cosine ± SE per estimator (bars with error bars). results: a
    :class:`eqprop.gradients.SelfCosine` or a dict label -> SelfCosine.

    Reading it: near 1, the estimator points the same way on every batch (a consistent signal);
    near 0 or below, batch-to-batch noise (or bias that depends on the batch) dominates.
    Example: ``plot_self_cosines({"BPTT": sc_bptt, "EP": sc_ep})``.
    """
    from .gradients import SelfCosine

    res = _labelled(results, (SelfCosine,), "plot_self_cosines")
    fig, (ax,), own = _panels(ax, 1, (max(3.5, 1.0 * len(res) + 1.5), 3.2), "plot_self_cosines")
    labels = list(res)
    ax.bar(labels, [r.mean for r in res.values()], yerr=[0.0 if math.isnan(r.se) else r.se for r in res.values()])
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("batch self-cosine")
    ax.tick_params(axis="x", labelrotation=30)
    if own:  # a figure of its own; the caller lays out axes it passed in
        fig.tight_layout()
    return fig


def plot_decomposition(result: Any, axes: Any = None):
    """Task / penalty split per group (last group ``overall``): left cos(task, penalty) and
    cos(task, task + penalty), right ‖penalty‖/‖task‖ (log y). result:
    :class:`eqprop.gradients.Decomposition`.

    Reading it: a ratio above 1 with cos(task, total) well below 1 is a penalty that has taken over
    the update (docs/design.md §6). Example: ``plot_decomposition(decompose(g_task, g_pen, "default"))``.
    """
    from .gradients import Decomposition

    if not isinstance(result, Decomposition):
        raise TypeError(f"plot_decomposition takes a Decomposition, got {type(result).__name__}")
    groups = [str(g) for g in result.per_group] + ["overall"]
    rows = list(result.per_group.values()) + [(result.cos, result.ratio, result.cos_total, 0)]
    fig, (ax_c, ax_r), own = _panels(axes, 2, (max(8.0, 0.8 * len(groups) + 4), 3.4), "plot_decomposition")
    _grouped_bars(ax_c, groups, {"cos(task, penalty)": [r[0] for r in rows], "cos(task, total)": [r[2] for r in rows]})
    ax_c.axhline(0.0, color="k", lw=0.5)
    ax_c.set_ylim(-1.05, 1.05)
    ax_c.legend(fontsize="small")
    _grouped_bars(ax_r, groups, {"|penalty| / |task|": [r[1] for r in rows]})
    ax_r.axhline(1.0, color="k", lw=0.5)
    ax_r.set_yscale("log")
    ax_r.set_ylabel("|penalty| / |task|")
    if own:  # a figure of its own; the caller lays out axes it passed in
        fig.tight_layout()
    return fig


def plot_lr_sweep(results: Any, ax: Any = None):
    """ΔCE after one step against the learning rate (log x), one line per sweep. results: an
    :class:`eqprop.gradients.LrSweep` or a dict label -> LrSweep.

    Reading it: for a descent direction ΔCE ≈ −lr‖g‖² at small lr (negative, growing); the lr at the
    minimum is the largest useful step; a curve that is positive at every lr is not a descent
    direction. Example: ``plot_lr_sweep({"BPTT": lr_sweep(lm, g_bptt, lrs, tokens, loss)})``.
    """
    from .gradients import LrSweep

    res = _labelled(results, (LrSweep,), "plot_lr_sweep")
    fig, (ax,), own = _panels(ax, 1, (4.5, 3.2), "plot_lr_sweep")
    for label, sweep in res.items():
        ax.plot([lr for lr, _ in sweep], [d for _, d in sweep], "o-", label=label or None)
    ax.set_xscale("log")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("ΔCE after one step (nats)")
    if "" not in res:
        ax.legend(fontsize="small")
    if own:  # a figure of its own; the caller lays out axes it passed in
        fig.tight_layout()
    return fig


def plot_influence(results: Any, axes: Any = None):
    """Influence ‖∂z*_t/∂x_{t−d}‖ against distance d: left the mean with a ±1 SE band, right the
    curve normalized by d = 1 (both log y). results: an :class:`eqprop.gradients.Influence` or a
    dict label -> Influence.

    Reading it: how far back the fixed point still depends on the input; a curve that drops by
    orders of magnitude within a few tokens cannot carry in-context information that far.
    Example: ``plot_influence(influence(blk, x, z, range(1, 16)))``.
    """
    from .gradients import Influence

    res = _labelled(results, (Influence,), "plot_influence")
    fig, (ax_m, ax_n), own = _panels(axes, 2, (9.0, 3.2), "plot_influence")
    for j, (label, inf) in enumerate(res.items()):
        d, m, se = list(inf.distances), _np(inf.mean), _np(inf.se)
        ax_m.plot(d, m, "o-", color=f"C{j}", label=label or None)
        ax_m.fill_between(d, m - se, m + se, color=f"C{j}", alpha=0.25, lw=0)
        ax_n.plot(d, _np(inf.normalized), "o-", color=f"C{j}", label=label or None)
    for ax in (ax_m, ax_n):
        ax.set_yscale("log")
        ax.set_xlabel("distance d")
    ax_m.set_ylabel("‖∂z*_t / ∂x_{t−d}‖")
    ax_n.set_ylabel("normalized by d = 1")
    if "" not in res:
        ax_m.legend(fontsize="small")
    if own:  # a figure of its own; the caller lays out axes it passed in
        fig.tight_layout()
    return fig


# ---- model ----------------------------------------------------------------------------------------


def plot_per_position_ce(
    results: Any, ax: Any = None, *, reference: Optional[Any] = None, reference_label: str = "reference"
):
    """Mean next-token CE against position with a ±1 SE band, one line per result. results: a
    :class:`eqprop.model_stats.PerPositionCE` or a dict label -> PerPositionCE. reference: an
    optional [T] curve drawn dashed and labelled ``reference_label`` (e.g. the Bayes-optimal NLL
    per position, ``eqprop.markov.bayes_nll(tokens, k).mean(0)``).

    Reading it: where along the sequence the model loses (in-context learning shows as CE falling
    with position). Example: ``plot_per_position_ce(per_position_ce(lm, tokens))``.
    """
    from .model_stats import PerPositionCE

    res = _labelled(results, (PerPositionCE,), "plot_per_position_ce")
    fig, (ax,), own = _panels(ax, 1, (5.0, 3.2), "plot_per_position_ce")
    for j, (label, ce) in enumerate(res.items()):
        t, m, se = _np(ce.positions), _np(ce.mean), _np(ce.se)
        ax.plot(t, m, "-", color=f"C{j}", label=label or None)
        ax.fill_between(t, m - se, m + se, color=f"C{j}", alpha=0.25, lw=0)
    if reference is not None:
        r = _np(torch.as_tensor(reference))
        ax.plot(range(len(r)), r, "k--", lw=1, label=reference_label)
    ax.set_xlabel("position t")
    ax.set_ylabel("CE (nats)")
    if "" not in res or reference is not None:
        ax.legend(fontsize="small")
    if own:  # a figure of its own; the caller lays out axes it passed in
        fig.tight_layout()
    return fig


def plot_branch_stats(result: Any, axes: Any = None):
    """Four panels of an :class:`eqprop.model_stats.BranchStats`: (1) ‖Attn‖/‖x‖ and ‖FFN‖/‖x‖ over
    the batch (bars) with each sequence's value (dots); (2) attention entropy per head (bars) and the
    uniform-attention maximum mean_t ln(t + 1) (dashed); (3) qk-logit RMS per head; (4) ‖W_O‖ and
    ‖W_ffn_out‖, Frobenius and spectral.

    Reading it: a branch ratio ≫ 1 means the state is made by the branch, not by the input; entropy
    near the maximum is attention that does not select, near 0 one-hot attention (large qk RMS).
    Example: ``plot_branch_stats(branch_stats(blk, z, x))``.
    """
    from .model_stats import BranchStats

    if not isinstance(result, BranchStats):
        raise TypeError(f"plot_branch_stats takes a BranchStats, got {type(result).__name__}")
    fig, (a1, a2, a3, a4), own = _panels(axes, 4, (13.0, 3.2), "plot_branch_stats")
    a1.bar(["attn", "ffn"], [result.attn_ratio_overall, result.ffn_ratio_overall], color=["C0", "C1"])
    for i, r in enumerate((result.attn_ratio, result.ffn_ratio)):
        a1.plot([i] * r.numel(), _np(r), "k.", ms=4)
    a1.set_ylabel("‖branch‖ / ‖x‖")
    heads = [f"h{i}" for i in range(result.entropy.numel())]
    a2.bar(heads, _np(result.entropy), color="C2")
    a2.axhline(float(result.uniform_entropy.mean()), color="k", ls="--", lw=1, label="uniform")
    a2.set_ylabel("attention entropy (nats)")
    a2.legend(fontsize="small")
    a3.bar(heads, _np(result.qk_rms), color="C4")
    a3.set_ylabel("RMS of q·k/√d")
    a4.bar(
        ["W_O F", "W_O 2", "W_ffn F", "W_ffn 2"],
        [result.wo_fro, result.wo_spectral, result.ffn_out_fro, result.ffn_out_spectral],
        color=["C0", "C0", "C1", "C1"],
    )
    a4.set_ylabel("weight norm")
    a4.tick_params(axis="x", labelrotation=30)
    if own:  # a figure of its own; the caller lays out axes it passed in
        fig.tight_layout()
    return fig


# ---- controller -----------------------------------------------------------------------------------


def plot_controller_history(
    history: Sequence[Any],
    axes: Any = None,
    *,
    res_target: Optional[float] = None,
    fuse: Optional[float] = None,
):
    """A contraction controller's decisions against step: (1) jr, (2) the free-phase residual with
    ``res_target`` / ``fuse`` (dashed) when given, (3) the penalty share of the update (steps
    without one are left out), docs/design.md §6. history: a list of :class:`eqprop.control.Decision`
    or of the dicts in ``ContractionController.history`` (``ctl.plot()`` passes its thresholds).

    Reading it: jr climbing to jr_max while the residual stays above target, and the penalty share
    rising toward 1, is the controller taking over the run.
    Example: ``plot_controller_history(ctl.history, res_target=ctl.res_target)``.
    """
    rows = []
    for i, h in enumerate(history):
        d = h.as_dict() if hasattr(h, "as_dict") else h
        if not isinstance(d, dict) or not {"step", "jr", "residual"} <= set(d):
            raise TypeError(
                f"history[{i}] must be a Decision or a dict with step, jr, residual; got {type(h).__name__}"
            )
        rows.append(d)
    if not rows:
        raise ValueError("history is empty: nothing to plot")
    steps = [d["step"] for d in rows]
    fig, (a1, a2, a3), own = _panels(axes, 3, (12.0, 3.2), "plot_controller_history")
    a1.plot(steps, [d["jr"] for d in rows], "-", color="C0")
    if any(d["jr"] > 0 for d in rows):
        a1.set_yscale("log")
    a1.set_ylabel("jr")
    a2.plot(steps, [d["residual"] for d in rows], "-", color="C1")
    a2.set_yscale("log")
    a2.set_ylabel("free-phase residual (rel, max)")
    if res_target is not None:
        a2.axhline(res_target, color="k", ls="--", lw=1, label="res_target")
    if fuse is not None:
        a2.axhline(fuse, color="C3", ls="--", lw=1, label="fuse")
    if res_target is not None or fuse is not None:
        a2.legend(fontsize="small")
    shared = [(d["step"], d["penalty_share"]) for d in rows if d.get("penalty_share") is not None]
    a3.plot([s for s, _ in shared], [p for _, p in shared], "-", color="C2")
    if all(0.0 <= p <= 1.0 for _, p in shared):  # a share as a fraction: show the whole [0, 1]
        a3.set_ylim(-0.02, 1.02)
    a3.set_ylabel("penalty share of the update")
    for ax in (a1, a2, a3):
        ax.set_xlabel("step")
    if own:  # a figure of its own; the caller lays out axes it passed in
        fig.tight_layout()
    return fig
