"""Gradient and influence diagnostics (docs/design.md §7) against closed forms and finite differences."""

import math

import pytest
import torch

import eqprop
from eqprop import EquilibriumBlock, EquilibriumLM
from eqprop.diagnostics import alignment, decompose, influence, lr_sweep, self_cosine
from eqprop.estimators import Implicit
from eqprop.gradients import default_group

F64 = torch.float64
OPTS = dict(tol=1e-14, stop="abs", max_steps=2000)
# float64 cosines of a vector with itself: a few ulps of accumulated dot-product rounding.
EPS = 1e-12


def _block_estimate(seed=0):
    torch.manual_seed(seed)
    blk = EquilibriumBlock(8, 2, dtype=F64, spectral_rho=0.5).eval()
    x = torch.randn(2, 5, 8, dtype=F64)
    est = Implicit(backward_tol=1e-14, backward_max_steps=2000, **OPTS).grad(blk, x, lambda z: (z**2).sum())
    return blk, x, est


def test_alignment_with_itself_negative_and_scaled():
    _, _, est = _block_estimate()
    a = alignment(est, est, "default")
    assert abs(a.overall_cos - 1) < EPS and abs(a.overall_ratio - 1) < EPS
    assert set(a.per_group) == {"attn.q", "attn.k", "attn.v", "attn.o", "norm", "ffn.in", "ffn.out"}
    for c, r, _ in a.per_group.values():
        assert abs(c - 1) < EPS and abs(r - 1) < EPS
    neg = {k: -v for k, v in est.grads.items()}
    a = alignment(est, neg)
    assert abs(a.overall_cos + 1) < EPS
    for c, r, _ in a.per_group.values():
        assert abs(c + 1) < EPS and abs(r - 1) < EPS
    # k = ‖a‖/‖b‖: a = 3b gives 3 in every group.
    a = alignment({k: 3 * v for k, v in est.grads.items()}, est.grads, "default")
    for c, r, _ in a.per_group.values():
        assert abs(c - 1) < EPS and abs(r - 3) < 3 * EPS
    assert "overall" in a.table() and "attn.q" in a.table()


def test_alignment_cosine_by_hand():
    torch.manual_seed(1)
    a = {"w": torch.randn(3, 4, dtype=F64), "b": torch.randn(4, dtype=F64)}
    b = {"w": torch.randn(3, 4, dtype=F64), "b": torch.randn(4, dtype=F64)}
    res = alignment(a, b, {"w": "g1", "b": "g2"})
    fa, fb = torch.cat([a["b"], a["w"].flatten()]), torch.cat([b["b"], b["w"].flatten()])
    assert res.overall_cos == pytest.approx(float(fa @ fb / fa.norm() / fb.norm()), abs=EPS)
    w_cos = float((a["w"] * b["w"]).sum() / a["w"].norm() / b["w"].norm())
    assert res.per_group["g1"][0] == pytest.approx(w_cos, abs=EPS)
    assert res.per_group["g1"][1] == pytest.approx(float(a["w"].norm() / b["w"].norm()), rel=EPS)
    assert res.per_group["g1"][2] == 12 and res.per_group["g2"][2] == 4


def test_groups_cover_each_parameter_once_and_errors_name_it():
    _, _, est = _block_estimate()
    names = list(est.grads)
    total = sum(g.numel() for g in est.grads.values())
    for groups in (None, "default", lambda n: "all", {n: n[:2] for n in names}):
        res = alignment(est, est, groups)
        assert sum(n for _, _, n in res.per_group.values()) == total
    partial = {n: "x" for n in names[1:]}
    with pytest.raises(ValueError, match=names[0]):
        alignment(est, est, partial)
    with pytest.raises(ValueError, match="not_a_param"):
        alignment(est, est, {**{n: "x" for n in names}, "not_a_param": "x"})
    with pytest.raises(ValueError, match="mystery.weight"):
        default_group("mystery.weight")
    with pytest.raises(ValueError, match="extra"):
        alignment({**est.grads, "extra": torch.zeros(1, dtype=F64)}, est)
    with pytest.raises((ValueError, TypeError)):
        alignment(est, est, 3)


def test_default_groups_cover_equilibrium_lm_and_transformer():
    from eqprop.models import Transformer

    for model in (
        EquilibriumLM(5, 8, 2, max_len=6, dtype=F64),
        Transformer(5, n_layer=2, n_head=2, d_model=8, max_len=6),
    ):
        grads = {n: torch.ones_like(p) for n, p in model.named_parameters()}
        res = alignment(grads, grads, "default")
        assert sum(n for _, _, n in res.per_group.values()) == sum(p.numel() for p in model.parameters())
        assert {"embed", "norm", "head", "ffn.in", "ffn.out", "attn.o"} <= set(res.per_group)
    lm = EquilibriumLM(5, 8, 2, max_len=6, dtype=F64)
    assert default_group("block.q_weight") == "attn.q" and default_group("tok_emb.weight") == "embed"
    assert {default_group(n) for n, _ in lm.named_parameters()} == {
        "embed",
        "norm",
        "head",
        "attn.q",
        "attn.k",
        "attn.v",
        "attn.o",
        "ffn.in",
        "ffn.out",
    }


def test_decompose_orthogonal_and_parallel():
    torch.manual_seed(2)
    task = {"a": torch.randn(10, dtype=F64), "b": torch.randn(2, 3, dtype=F64)}
    pen = {}
    for k, t in task.items():  # Gram-Schmidt per parameter: orthogonal in every group and overall
        r = torch.randn_like(t)
        pen[k] = 0.5 * (r - (r * t).sum() / (t * t).sum() * t)
    d = decompose(task, pen)
    nt = math.sqrt(sum(float((t * t).sum()) for t in task.values()))
    npen = math.sqrt(sum(float((p * p).sum()) for p in pen.values()))
    assert abs(d.cos) < EPS
    assert d.ratio == pytest.approx(npen / nt, rel=EPS)
    # cos(t, t + p) = ‖t‖² / (‖t‖ ‖t + p‖) = ‖t‖ / sqrt(‖t‖² + ‖p‖²) for p ⟂ t.
    assert d.cos_total == pytest.approx(nt / math.hypot(nt, npen), abs=EPS)
    for g, (c, r, ct, _) in d.per_group.items():
        t, p = task[g], pen[g]
        assert abs(c) < EPS and r == pytest.approx(float(p.norm() / t.norm()), rel=EPS)
        assert ct == pytest.approx(float(t.norm() / torch.hypot(t.norm(), p.norm())), abs=EPS)
    d = decompose(task, {k: 3 * t for k, t in task.items()}, {"a": "g", "b": "g"})
    assert abs(d.cos - 1) < EPS and d.ratio == pytest.approx(3, rel=EPS) and abs(d.cos_total - 1) < EPS
    assert abs(d.per_group["g"][0] - 1) < EPS and "overall" in d.table()


def test_lr_sweep_restores_parameters_and_matches_first_order():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(F64)
    batch = (torch.randn(16, 4, dtype=F64), torch.randint(0, 3, (16,)))

    def loss(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss(model, batch), list(params.values()))))
    g2 = sum(float((g * g).sum()) for g in grads.values())
    res = lr_sweep(model, grads, [1e-6, 1e-3, 1e-1], batch, loss)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert [lr for lr, _ in res] == [1e-6, 1e-3, 1e-1]
    # ΔCE = -lr‖g‖² + O(lr²): at lr 1e-6 the relative second-order term is ~1e-6 (float64 roundoff
    # of the loss difference ~1e-16 / 1e-6 is smaller still); 1e-4 leaves > 3x headroom either way.
    assert res[0][1] == pytest.approx(-1e-6 * g2, rel=1e-4)
    assert res[1][1] < 0
    with pytest.raises(ValueError, match="nope"):
        lr_sweep(model, {"nope": torch.zeros(1, dtype=F64)}, [1e-3], batch, loss)


def test_influence_matches_finite_difference_jacobian():
    torch.manual_seed(4)
    blk = EquilibriumBlock(8, 2, dtype=F64, spectral_rho=0.5).eval()
    T, C = 6, 8
    x = torch.randn(1, T, C, dtype=F64)
    z, _ = eqprop.relax(blk, x, **OPTS)
    # Dense ∂z*/∂x [T, C, T, C] by central differences through tight relaxations.
    h = 1e-5
    D = torch.empty(T, C, T, C, dtype=F64)
    for s in range(T):
        for c in range(C):
            e = torch.zeros_like(x)
            e[0, s, c] = h
            zp, _ = eqprop.relax(blk, x + e, z0=z, **OPTS)
            zm, _ = eqprop.relax(blk, x - e, z0=z, **OPTS)
            D[:, :, s, c] = ((zp - zm) / (2 * h))[0]
    probes = torch.randn(2, C, dtype=F64)
    v = probes / probes.norm(dim=1, keepdim=True)
    dists = [0, 1, 2, 5]
    inf = influence(blk, x, z, dists, probes=probes, tol=1e-14)
    for i, d in enumerate(dists):
        vals = [float((D[t, :, t - d, :] @ v[p]).norm()) for p in range(2) for t in range(d, T)]
        expect = sum(vals) / len(vals)
        # FD truncation ~h² and relaxation error 1e-14 / h ~1e-9, far below 1e-6.
        assert float(inf.mean[i]) == pytest.approx(expect, rel=1e-6, abs=1e-9)
        assert inf.n[i] == len(vals)
    assert float(inf.normalized[1]) == pytest.approx(1.0, rel=EPS)
    # one (source, probe) pair per relaxation instead of all 12 stacked: the same numbers (each
    # stacked sample converges on its own to the 1e-14 residual)
    one = influence(blk, x, z, dists, probes=probes, tol=1e-14, max_elements=x.numel())
    assert torch.allclose(one.mean, inf.mean, rtol=1e-10, atol=0) and one.n == inf.n
    with pytest.raises(ValueError, match="max_elements"):
        influence(blk, x, z, dists, max_elements=0)
    # a subset of source positions s averages only the pairs (t, s = t − d) with s in it
    sub = influence(blk, x, z, dists, probes=probes, tol=1e-14, sources=[0, 3])
    for i, d in enumerate(dists):
        vals = [float((D[s + d, :, s, :] @ v[p]).norm()) for p in range(2) for s in (0, 3) if s + d < T]
        assert float(sub.mean[i]) == pytest.approx(sum(vals) / len(vals), rel=1e-6, abs=1e-9)
        assert sub.n[i] == len(vals)
    with pytest.raises(ValueError, match="5"):
        influence(blk, x, z, [5], sources=[1, 2])  # no target s + 5 < 6
    with pytest.raises(ValueError, match="sources"):
        influence(blk, x, z, [1], sources=[T])
    with pytest.raises(ValueError, match="distances"):
        influence(blk, x, z, [T])


class _Fixed:
    """A deterministic stand-in estimator: returns preset grads in turn."""

    def __init__(self, grads):
        self.grads, self.i = grads, 0

    def grad(self, f, x, loss_fn):
        g = self.grads[self.i]
        self.i += 1
        return {"w": g}


def test_self_cosine_identical_batches_and_by_hand():
    blk, x, _ = _block_estimate()
    est = Implicit(backward_tol=1e-14, backward_max_steps=2000, **OPTS)
    mean, se, m = self_cosine(est, blk, [x, x, x], lambda z: (z**2).sum())
    assert abs(mean - 1) < EPS and se < EPS and m.shape == (3, 3)
    g = [torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([1.0, 1.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)]
    mean, se, m = self_cosine(_Fixed(g), None, [x, x, x], lambda z: z.sum())
    r = 1 / math.sqrt(2)
    assert mean == pytest.approx((r + 0 + r) / 3, abs=EPS)
    # Jackknife: leave-one-out means (0, r, r) -> se = sqrt(2/3 · Σ(loo - mean(loo))²).
    loo = [0.0, r, r]
    mu = sum(loo) / 3
    assert se == pytest.approx(math.sqrt(2 / 3 * sum((q - mu) ** 2 for q in loo)), abs=EPS)
    with pytest.raises(ValueError, match="at least 2"):
        self_cosine(_Fixed(g), None, [x], lambda z: z.sum())
