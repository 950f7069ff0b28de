"""Figures of the diagnostics (eqprop.plots, docs/design.md §6, §7): each draws the result's own
numbers, checked artist by artist (bar heights, line data, SE bands, image data)."""

import math

import numpy as np
import pytest
import torch

import eqprop
from eqprop import EquilibriumBlock
from eqprop.control import ContractionController
from eqprop.diagnostics import alignment, branch_stats, decompose, influence, lr_sweep, per_position_ce, self_cosine
from eqprop.gradients import SelfCosine
from eqprop.models import Transformer
from eqprop.plots import plot_alignments, plot_lr_sweep, plot_self_cosines

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _grads(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {
        "block.q_weight": scale * torch.randn(4, 4, generator=g, dtype=F64),
        "block.ffn_in_weight": scale * torch.randn(8, 4, generator=g, dtype=F64),
        "block.ln1_weight": scale * torch.randn(4, generator=g, dtype=F64),
    }


def _heights(ax):
    return [p.get_height() for p in ax.patches]


def _band(ax, x, lo, hi):
    """The one fill_between band of ax covers exactly [lo, hi] at every x."""
    (poly,) = ax.collections
    v = poly.get_paths()[0].vertices
    for xi, a, b in zip(x, lo, hi):
        at = v[np.isclose(v[:, 0], xi)][:, 1]
        assert np.isclose(at.min(), a, rtol=1e-12, atol=1e-15) and np.isclose(at.max(), b, rtol=1e-12, atol=1e-15)


def test_alignment_bars_are_cos_and_k_per_group():
    a = alignment(_grads(0), _grads(1, 2.0), "default")
    fig = a.plot()
    ax_c, ax_k = fig.axes
    groups = list(a.per_group)
    assert [t.get_text() for t in ax_c.get_xticklabels()] == groups + ["overall"]
    assert _heights(ax_c) == pytest.approx([c for c, _, _ in a.per_group.values()] + [a.overall_cos], abs=1e-15)
    assert _heights(ax_k) == pytest.approx([r for _, r, _ in a.per_group.values()] + [a.overall_ratio], rel=1e-15)
    # several results: one bar series each, side by side
    b = alignment(_grads(2), _grads(1), "default")
    fig = plot_alignments({"x": a, "y": b})
    ax_c, _ = fig.axes
    assert len(ax_c.patches) == 2 * (len(groups) + 1)
    assert _heights(ax_c)[len(groups) + 1 :] == pytest.approx(
        [c for c, _, _ in b.per_group.values()] + [b.overall_cos], abs=1e-15
    )
    with pytest.raises(TypeError):
        plot_alignments([a])
    with pytest.raises(ValueError, match="2 Axes"):
        a.plot(axes=plt.subplots(1, 3)[1])


def test_self_cosine_matrix_and_bars():
    class Fixed:
        def __init__(self, gs):
            self.gs = iter(gs)

        def grad(self, f, x, loss_fn):
            return next(self.gs)

    sc = self_cosine(Fixed([_grads(i) for i in range(4)]), None, [None] * 4, lambda z: z)
    assert isinstance(sc, SelfCosine)
    fig = sc.plot()
    (img,) = fig.axes[0].images
    assert np.array_equal(np.asarray(img.get_array()), sc.matrix.numpy())
    other = SelfCosine(0.25, 0.05, torch.eye(2, dtype=F64))
    fig = plot_self_cosines({"a": sc, "b": other})
    ax = fig.axes[0]
    assert _heights(ax) == pytest.approx([sc.mean, 0.25], abs=1e-15)
    from matplotlib.container import ErrorbarContainer

    (ebar,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    (err,) = ebar.lines[2]  # the vertical error segments
    segs = err.get_segments()
    assert [s[1, 1] - s[0, 1] for s in segs] == pytest.approx([2 * sc.se, 0.1], rel=1e-12)


def test_decomposition_bars():
    d = decompose(_grads(0), _grads(1, 0.3), "default")
    ax_c, ax_r = d.plot().axes
    G = len(d.per_group) + 1
    rows = list(d.per_group.values())
    assert len(ax_c.patches) == 2 * G and len(ax_r.patches) == G
    assert _heights(ax_c)[:G] == pytest.approx([r[0] for r in rows] + [d.cos], abs=1e-15)
    assert _heights(ax_c)[G:] == pytest.approx([r[2] for r in rows] + [d.cos_total], abs=1e-15)
    assert _heights(ax_r) == pytest.approx([r[1] for r in rows] + [d.ratio], rel=1e-15)


def test_lr_sweep_lines():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(F64)
    batch = torch.randn(8, 3, dtype=F64)

    def loss(m, b):
        return m(b).square().mean()

    g = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss(model, batch), model.parameters())))
    s1 = lr_sweep(model, g, [1e-3, 1e-2, 1e-1], batch, loss)
    s2 = lr_sweep(model, {k: -v for k, v in g.items()}, [1e-3, 1e-1], batch, loss)
    ax = s1.plot().axes[0]
    data = [ln for ln in ax.lines if len(ln.get_xdata()) > 2 or ln.get_marker() == "o"]
    assert len(data) == 1 and ax.get_xscale() == "log"
    assert list(data[0].get_xdata()) == [1e-3, 1e-2, 1e-1]
    assert list(data[0].get_ydata()) == [d for _, d in s1]
    ax = plot_lr_sweep({"g": s1, "-g": s2}).axes[0]
    lines = [ln for ln in ax.lines if ln.get_marker() == "o"]
    assert [list(ln.get_ydata()) for ln in lines] == [[d for _, d in s1], [d for _, d in s2]]


def test_influence_curve_band_and_normalized():
    torch.manual_seed(1)
    blk = EquilibriumBlock(8, 2, dtype=F64, spectral_rho=0.5).eval()
    x = torch.randn(2, 6, 8, dtype=F64)
    z, _ = eqprop.relax(blk, x, tol=1e-12, max_steps=500)
    inf = influence(blk, x, z, [1, 2, 3, 4], probes=2)
    ax_m, ax_n = inf.plot().axes
    (line,) = ax_m.lines
    assert list(line.get_xdata()) == [1, 2, 3, 4]
    assert np.allclose(line.get_ydata(), inf.mean.numpy(), rtol=1e-15, atol=0)
    _band(ax_m, [1, 2, 3, 4], (inf.mean - inf.se).numpy(), (inf.mean + inf.se).numpy())
    (line,) = ax_n.lines
    assert np.allclose(line.get_ydata(), inf.normalized.numpy(), rtol=1e-15, atol=0)
    assert line.get_ydata()[0] == pytest.approx(1.0, rel=1e-14)


def test_per_position_ce_line_and_band():
    torch.manual_seed(2)
    model = Transformer(3, n_layer=1, n_head=2, d_model=8, max_len=7).to(F64)
    ce = per_position_ce(model, torch.randint(0, 3, (5, 7)))
    ax = ce.plot().axes[0]
    (line,) = ax.lines
    assert list(line.get_xdata()) == list(range(7))
    assert np.allclose(line.get_ydata(), ce.mean.numpy(), rtol=1e-15, atol=0)
    _band(ax, range(7), (ce.mean - ce.se).numpy(), (ce.mean + ce.se).numpy())


def test_branch_stats_panels():
    torch.manual_seed(3)
    blk = EquilibriumBlock(8, 2, dtype=F64, resinit=1.0).eval()
    x, z = torch.randn(3, 5, 8, dtype=F64), torch.randn(3, 5, 8, dtype=F64)
    s = branch_stats(blk, z, x)
    a1, a2, a3, a4 = s.plot().axes
    assert _heights(a1) == pytest.approx([s.attn_ratio_overall, s.ffn_ratio_overall], rel=1e-15)
    dots = [ln for ln in a1.lines if ln.get_marker() == "."]
    assert [list(d.get_ydata()) for d in dots] == [s.attn_ratio.tolist(), s.ffn_ratio.tolist()]
    assert _heights(a2) == pytest.approx(s.entropy.tolist(), rel=1e-15)
    (uniform,) = a2.lines
    assert uniform.get_ydata()[0] == pytest.approx(sum(math.log(t + 1) for t in range(5)) / 5, rel=1e-14)
    assert _heights(a3) == pytest.approx(s.qk_rms.tolist(), rel=1e-15)
    assert _heights(a4) == pytest.approx([s.wo_fro, s.wo_spectral, s.ffn_out_fro, s.ffn_out_spectral], rel=1e-15)


def test_controller_history_lines():
    ctl = ContractionController(jacreg=0.01, jr_floor=0.005, jr_max=0.05, res_target=1e-3, fuse=1.0)
    residuals = [0.1, 0.1, 1e-4, 1e-4, 0.5]
    decisions = []
    for i, r in enumerate(residuals):
        decisions.append(ctl.step(r))
        if i != 2:  # one step without a share: left out of the share panel
            ctl.record_penalty_share(0.1 * i)
    a1, a2, a3 = ctl.plot().axes
    assert list(a1.lines[0].get_ydata()) == [d.jr for d in decisions]
    assert list(a2.lines[0].get_ydata()) == residuals
    assert [ln.get_ydata()[0] for ln in a2.lines[1:]] == [1e-3, 1.0]  # res_target, fuse
    assert list(a3.lines[0].get_xdata()) == [0, 1, 3, 4]
    assert list(a3.lines[0].get_ydata()) == pytest.approx([0.0, 0.1, 0.3, 0.4], abs=1e-15)
    # a list of Decision objects draws the same jr / residual curves (no shares: they are in history)
    from eqprop.plots import plot_controller_history

    b1, b2, b3 = plot_controller_history(decisions).axes
    assert list(b1.lines[0].get_ydata()) == [d.jr for d in decisions] and len(b3.lines[0].get_xdata()) == 0
    with pytest.raises(ValueError, match="empty"):
        plot_controller_history([])
    with pytest.raises(TypeError, match="history"):
        plot_controller_history([1.0])
