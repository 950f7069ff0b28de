"""Equilibrium Propagation (docs/design.md §5) against exact gradients in float64.

Linear fields with a quadratic loss have closed forms: z* = (I − W)⁻¹Ux, g = ∂ℓ/∂z*, the gradient
(∂F/∂θ)ᵀ(I − Wᵀ)⁻¹g and the limit of uncorrected EP (∂F/∂θ)ᵀ(I − W)⁻¹g. The nudged fixed point is
z_β = (I − W + βCᵀC)⁻¹(Ux + βCᵀy), analytic in β, so the estimators' errors have exact orders:
β (one-sided), β² (symmetric), r^N (holomorphic, N points).
"""

import math

import numpy as np
import pytest
import torch

import eqprop
from eqprop import _C
from eqprop.ep import EP, CrossEntropyReadout
from eqprop.estimators import Implicit
from equilibrium_fields import TanhLayer

F64 = torch.float64
# Free and nudged phases run to machine precision: tol = 0 runs every step (both contract by ≤ ~0.6 per step).
EXACT = dict(tol=0.0, stop="abs", max_steps=150)
T2 = 150


class LinearField(torch.nn.Module):
    """F(z; x) = W z + U x per sample (rows: z Wᵀ + x Uᵀ); holomorphic in z for complex z."""

    def __init__(self, W, U):
        super().__init__()
        self.W = torch.nn.Parameter(W.clone())
        self.U = torch.nn.Parameter(U.clone())

    def forward(self, z, x):
        return z @ self.W.T.to(z.dtype) + x @ self.U.T.to(x.dtype)


class Quadratic:
    """ℓ(z) = ½ Σ_b ‖C z_b − y_b‖², holomorphic (no conj): ∂ℓ/∂z = (zCᵀ − y)C."""

    def __init__(self, C, y):
        self.C, self.y = C, y

    def __call__(self, z):
        r = z @ self.C.T.to(z.dtype) - self.y.to(z.dtype)
        return 0.5 * (r * r).sum()


def _linear_problem(n=6, m=3, B=3, *, normal=True, seed=0, x_scale=1e-3):
    """W symmetric (or non-normal) with ‖W‖₂ = 0.5. A small x keeps z* small next to the nudge
    z_β − z* = O(β), so the one-sided difference quotient keeps its digits at β ~ 1e-9."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=F64)
    if normal:
        W = A + A.T
    else:  # strongly non-normal: an upper-triangular part much larger than the diagonal
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
        W = Q @ (torch.diag(torch.linspace(-0.3, 0.3, n, dtype=F64)) + 3 * torch.triu(A, 1)) @ Q.T
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
    U = torch.randn(n, n, generator=g, dtype=F64) / math.sqrt(n)
    C = torch.randn(m, n, generator=g, dtype=F64) / math.sqrt(n)
    y = torch.randn(B, m, generator=g, dtype=F64)
    x = x_scale * torch.randn(B, n, generator=g, dtype=F64)
    return LinearField(W, U), x, Quadratic(C, y)


def _closed_forms(f, x, loss):
    """(true gradient, uncorrected-EP limit) as flat vectors over (W, U)."""
    W, U, C, y = f.W.detach(), f.U.detach(), loss.C, loss.y
    eye = torch.eye(W.shape[0], dtype=F64)
    z = torch.linalg.solve(eye - W, (x @ U.T).T).T  # [B, n]
    g = (z @ C.T - y) @ C  # ∂ℓ/∂z*, [B, n]
    out = []
    for M in (eye - W.T, eye - W):
        lam = torch.linalg.solve(M, g.T).T  # [B, n]
        out.append(torch.cat([(lam.T @ z).flatten(), (lam.T @ x).flatten()]))  # dF/dW: λ zᵀ, dF/dU: λ xᵀ
    return out


def _flat(est, names=("W", "U")):
    return torch.cat([est.grads[n].flatten() for n in names])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _slope(betas, errs):
    return float(np.polyfit(np.log(betas), np.log(errs), 1)[0])


# ---- linear fields: orders and exactness ----------------------------------------------------------------


@pytest.mark.parametrize(
    "n_points,order,betas",
    [
        (1, 1, np.geomspace(0.02, 0.2, 5)),
        (2, 2, np.geomspace(0.02, 0.2, 5)),
        (3, 3, np.geomspace(0.01, 0.1, 5)),
        (4, 4, np.geomspace(0.01, 0.1, 5)),
        (6, 6, np.geomspace(0.01, 0.1, 5)),
    ],
    ids=["one-sided", "symmetric", "holo3", "holo4", "holo6"],
)
def test_error_order_in_beta_on_a_symmetric_linear_field(n_points, order, betas):
    f, x, loss = _linear_problem()
    true, _ = _closed_forms(f, x, loss)
    errs = [_rel(_flat(EP(float(b), n_points=n_points, t2=T2, **EXACT).grad(f, x, loss)), true) for b in betas]
    assert min(errs) > 1e-13, errs  # above roundoff, so the fit measures the bias
    assert abs(_slope(betas, errs) - order) < 0.25, (errs, _slope(betas, errs))


@pytest.mark.parametrize("n_points,beta", [(1, 1e-9), (2, 1e-5), (3, 1e-4), (4, 1e-3), (6, 5e-3)])
def test_small_beta_matches_the_closed_form(n_points, beta):
    f, x, loss = _linear_problem()
    true, _ = _closed_forms(f, x, loss)
    est = EP(beta, n_points=n_points, t2=T2, **EXACT).grad(f, x, loss)
    assert _rel(_flat(est), true) <= 1e-8
    assert est.stats["n_points"] == n_points and len(est.stats["nudged"]) == len(est.stats["beta_points"])


def test_uncorrected_ep_is_biased_on_a_non_normal_field_and_corrections_remove_it():
    f, x, loss = _linear_problem(normal=False, seed=3)
    W = f.W.detach()
    assert float(torch.linalg.matrix_norm(W - W.T) / torch.linalg.matrix_norm(W)) > 0.5
    true, biased = _closed_forms(f, x, loss)
    assert _rel(biased, true) > 0.05  # the two limits differ measurably
    plain = _flat(EP(1e-5, t2=T2, **EXACT).grad(f, x, loss))
    assert _rel(plain, biased) <= 1e-8 and _rel(plain, true) > 0.05
    for correction in ("frozen", "tracking"):
        for n_points, beta in ((2, 1e-5), (4, 1e-3)):
            est = EP(beta, n_points=n_points, correction=correction, t2=T2, **EXACT).grad(f, x, loss)
            assert _rel(_flat(est), true) <= 1e-8, (correction, n_points)
    # one-sided frozen: the nudged dynamics have Jacobian Wᵀ, exactly, for a linear field
    est = EP(1e-9, n_points=1, correction="frozen", t2=T2, **EXACT).grad(f, x, loss)
    assert _rel(_flat(est), true) <= 1e-8


# ---- nonlinear field --------------------------------------------------------------------------------------


def _tanh_problem(seed=4):
    f = TanhLayer(8, scale=0.7, seed=seed)  # W random: asymmetric
    x = torch.randn(3, 8, dtype=F64, generator=torch.Generator().manual_seed(5))
    C = torch.randn(2, 8, dtype=F64, generator=torch.Generator().manual_seed(6)) / math.sqrt(8)
    y = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(7))
    return f, x, Quadratic(C, y)


def test_frozen_and_tracking_converge_to_implicit_on_a_tanh_field():
    f, x, loss = _tanh_problem()
    names = ("W", "U", "b")
    imp = _flat(Implicit(backward_tol=1e-15, backward_max_steps=400, **EXACT).grad(f, x, loss), names)
    plain = _flat(EP(1e-4, t2=T2, **EXACT).grad(f, x, loss), names)
    assert _rel(plain, imp) > 0.1  # asymmetric W: uncorrected EP is biased
    betas = (0.1, 0.03, 0.01, 1e-3)
    for correction in ("frozen", "tracking"):
        errs = [_rel(_flat(EP(b, correction=correction, t2=T2, **EXACT).grad(f, x, loss), names), imp) for b in betas]
        assert abs(_slope(betas, errs) - 2) < 0.2, (correction, errs)  # symmetric: O(β²)
        assert errs[-1] < 1e-5, (correction, errs)


@pytest.mark.parametrize("seed", [4, 11])
def test_tracking_beats_frozen_when_the_free_phase_is_not_converged(seed):
    # Tracking's correction −2A(z̄)(z± − z̄) cancels in the common mode, so the pair's mean relaxes on
    # to the fixed point; frozen's −2A(z*)(z − z*) pins it near the inexact z* (three free steps here).
    f, x, loss = _tanh_problem(seed)
    names = ("W", "U", "b")
    imp = _flat(Implicit(backward_tol=1e-15, backward_max_steps=400, **EXACT).grad(f, x, loss), names)
    rough = dict(tol=0.0, stop="abs", max_steps=3)
    for beta in (0.1, 0.01):
        err = {
            c: _rel(_flat(EP(beta, correction=c, t2=T2, **rough).grad(f, x, loss), names), imp)
            for c in ("frozen", "tracking")
        }
        assert err["tracking"] < 0.95 * err["frozen"], (beta, err)


# ---- the block ------------------------------------------------------------------------------------------


def _block_problem(B=2, T=5, C=8, V=3, seed=0):
    torch.manual_seed(seed)
    blk = eqprop.EquilibriumBlock(C, 2, resinit=0.5, spectral_rho=1.0, dtype=F64).eval()
    x = torch.randn(B, T, C, dtype=F64)
    ln, head = torch.nn.LayerNorm(C, dtype=F64), torch.nn.Linear(C, V, dtype=F64)
    with torch.no_grad():
        ln.weight.add_(0.3 * torch.randn(C, dtype=F64))
        ln.bias.add_(0.1 * torch.randn(C, dtype=F64))
    targets = torch.randint(0, V, (B, T))
    targets[0, -1] = -100
    return blk, x, CrossEntropyReadout(ln, head, targets)


def _cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_block_estimators_against_implicit():
    blk, x, ro = _block_problem()
    opts = dict(tol=1e-13, stop="abs", max_steps=150)
    imp = Implicit(backward_tol=1e-13, **opts).grad(blk, x, ro)
    names = [n for n, _ in blk.named_parameters()]
    flat = lambda e: torch.cat([e.grads[n].flatten() for n in names])  # noqa: E731
    cos, rel = {}, {}
    for key, est in {
        "symmetric": EP(1e-3, t2=100, **opts),
        "holo4": EP(2e-2, n_points=4, t2=100, **opts),
        "tracking4": EP(2e-2, n_points=4, correction="tracking", t2=100, **opts),
    }.items():
        e = est.grad(blk, x, ro)
        cos[key], rel[key] = _cosine(flat(e), flat(imp)), _rel(flat(e), flat(imp))
        per = {n: _cosine(e.grads[n].flatten(), imp.grads[n].flatten()) for n in names if imp.grads[n].norm() > 1e-12}
        # readout gradients are direct, identical to Implicit's
        for n in ("readout.ln.weight", "readout.ln.bias", "readout.head.weight", "readout.head.bias"):
            torch.testing.assert_close(e.grads[n], imp.grads[n], rtol=1e-12, atol=1e-14)
        if key == "tracking4":
            assert min(per.values()) >= 0.999, per
    # measured: symmetric / holo4 cosine 0.932 (rel. error 0.38); tracking4 cosine 1 - 1e-20, rel. error 6e-11
    assert cos["tracking4"] >= 0.999 and rel["tracking4"] < 1e-8, (cos, rel)
    # the block's Jacobian is not symmetric: uncorrected EP is measurably off, tracking removes it
    assert rel["tracking4"] < 0.1 * rel["symmetric"], rel
    # symmetric and holomorphic estimate the same (biased) limit
    assert abs(cos["symmetric"] - cos["holo4"]) < 1e-3, cos


def test_native_readout_gradient_equals_autograd_real_and_complex():
    blk, x, ro = _block_problem()
    nat = ro.native()
    z = torch.randn(2 * 2, 5, 8, dtype=F64)  # two blocks of the B = 2 target rows
    zr = z.clone().requires_grad_(True)
    total = ro(zr[:2]) + ro(zr[2:])
    (g,) = torch.autograd.grad(total, zr)
    torch.testing.assert_close(nat.grad(z), g, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(nat.loss(z), torch.stack([ro(z[:2]), ro(z[2:])]).detach(), rtol=1e-12, atol=0)
    # complex: the holomorphic derivative, = conj of autograd's cotangent of the holomorphic forward
    zc = torch.complex(z, 0.3 * torch.randn_like(z)).requires_grad_(True)
    lc = ro(zc[:2]) + ro(zc[2:])
    (gc,) = torch.autograd.grad(lc, zc, grad_outputs=torch.ones((), dtype=lc.dtype))
    torch.testing.assert_close(nat.grad(zc.detach()), gc.conj(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        nat.loss(zc.detach()), torch.stack([ro(zc[:2]), ro(zc[2:])]).detach(), rtol=1e-12, atol=0
    )
    # and it is the readout of EquilibriumLM
    lm = eqprop.EquilibriumLM(5, 8, 2, max_len=6, dtype=F64)
    tokens = torch.randint(0, 5, (2, 6))
    lro = CrossEntropyReadout.for_lm(lm, tokens)
    with torch.no_grad():
        z_lm = lm.equilibrium(lm.inject(tokens))
        torch.testing.assert_close(lro(z_lm), lm.loss(tokens), rtol=1e-12, atol=0)
        torch.testing.assert_close(lro.native().loss(z_lm), lm.loss(tokens)[None], rtol=1e-12, atol=0)  # no head bias


def test_complex_nudged_state_of_block_and_native_readout_equals_dense_reference():
    blk, x, ro = _block_problem(B=1, T=3)
    fld = blk.vector_field(x)
    z_star, _ = eqprop.relax(fld, x, tol=1e-14, stop="abs", max_steps=100)
    beta = 0.05
    pts = _C.ep_points(4, beta, True)  # β, iβ, −β
    stacked = _C.ep_stack_points(fld, 3, 1, True)
    res = _C.ep_grads(fld, stacked, z_star, 4, beta, True, ro.native(), 1.0, 0.0, 1e4, False, 1, [100], "none")
    xc = x.to(torch.complex128)
    for k, b in enumerate(pts["beta"]):
        # dense reference: the complex block in Python, ∂ℓ/∂z by autograd of the holomorphic readout
        z = z_star.to(torch.complex128)
        for _ in range(100):
            zr = z.detach().requires_grad_(True)
            lc = ro(zr)
            (g,) = torch.autograd.grad(lc, zr, grad_outputs=torch.ones((), dtype=lc.dtype))
            z = (blk(z, xc) - b * g.conj()).detach()
        torch.testing.assert_close(res["z_points"][k : k + 1], z, rtol=0, atol=1e-12)
    assert abs(pts["beta"][1] - 1j * beta) < 1e-15 and pts["weight"] == [1.0, 2.0, 1.0]


def test_conjugate_shortcut_equals_relaxing_all_points():
    blk, x, ro = _block_problem(B=1, T=3)
    opts = dict(tol=1e-13, stop="abs", max_steps=100)
    for n_points in (3, 4):
        short = EP(0.05, n_points=n_points, correction="tracking", t2=60, **opts).grad(blk, x, ro)
        full = EP(0.05, n_points=n_points, correction="tracking", t2=60, conjugate_shortcut=False, **opts).grad(
            blk, x, ro
        )
        assert len(full.stats["beta_points"]) == n_points
        assert len(short.stats["beta_points"]) == n_points // 2 + 1
        for n in short.grads:
            torch.testing.assert_close(short.grads[n], full.grads[n], rtol=1e-9, atol=1e-13)


def test_python_field_and_loss_run_holomorphic_ep():
    # The callback path: a Python f(z, x) and loss rebuilt for complex z, same answer as N = 2 at small β.
    f, x, loss = _tanh_problem()

    class HoloTanh(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.W, self.U, self.b = base.W, base.U, base.b

        def forward(self, z, x):
            return torch.tanh(z @ self.W.T.to(z.dtype) + x @ self.U.T.to(x.dtype) + self.b.to(z.dtype))

    h = HoloTanh(f)
    a = EP(0.05, n_points=4, correction="tracking", t2=T2, **EXACT).grad(h, x, loss)
    b = EP(1e-5, n_points=2, correction="frozen", t2=T2, **EXACT).grad(f, x, loss)
    assert _rel(_flat(a, ("W", "U", "b")), _flat(b, ("W", "U", "b"))) < 1e-4


# ---- t2, gate ---------------------------------------------------------------------------------------------


def test_t2_selects_the_snapshot_with_the_lowest_residual():
    # F(z) = Wz + x with a non-normal W, ℓ = Σ c·z: the nudged residual is r_t = Wᵗ r_0, r_0 = −βc,
    # which vanishes in its first coordinate at t = 2 and grows back (transient growth) at t = 3, 4.
    W = torch.tensor([[0.5, 4.0], [0.0, 0.5]], dtype=F64)
    c = torch.tensor([-16.0, 1.0], dtype=F64)
    f = LinearField(W, torch.eye(2, dtype=F64))
    x = torch.zeros(1, 2, dtype=F64)
    loss = lambda z: (z @ c.to(z.dtype)).sum()  # noqa: E731
    est = EP(0.1, n_points=1, t2=[1, 2, 4], **EXACT).grad(f, x, loss)
    r = lambda t: float(torch.linalg.vector_norm(torch.linalg.matrix_power(W, t) @ c) / c.norm())  # noqa: E731
    expected = {t: r(t) for t in (1, 2, 4)}
    assert min(expected, key=expected.get) == 2 and expected[4] > 3 * expected[2]
    assert est.stats["t2"] == 2
    for t, v in est.stats["t2_residual"].items():
        assert abs(v - expected[t]) <= 1e-12 * max(1.0, expected[t]), (t, v, expected[t])
    single = EP(0.1, n_points=1, t2=2, **EXACT).grad(f, x, loss)
    for n in ("W", "U"):
        torch.testing.assert_close(est.grads[n], single.grads[n], rtol=0, atol=0)


def test_gate_skips_the_nudge_and_says_so():
    f, x, loss = _tanh_problem()
    rough = dict(max_steps=2, tol=1e-12)  # two steps: the free residual is far above 1e-6
    est = EP(0.01, gate=1e-6, **rough).grad(f, x, loss)
    assert est.stats["skipped"] and est.stats["nudged"] == []
    assert all(float(est.grads[n].abs().max()) == 0.0 for n in ("W", "U", "b"))
    ok = EP(0.01, gate=1.0, t2=50, **EXACT).grad(f, x, loss)
    assert not ok.stats["skipped"] and float(ok.grads["W"].abs().max()) > 0


def test_stats_and_apply_to():
    f, x, loss = _tanh_problem()
    est = EP(0.01, n_points=2, correction="frozen", t2=[5, 40], **EXACT).grad(f, x, loss)
    assert est.stats["t2"] == 40 and set(est.stats["t2_residual"]) == {5, 40}
    assert est.stats["beta_points"] == [0.01, -0.01]
    info = est.stats["nudged"][1]
    assert info.steps.shape == (3,) and info.trace_abs.shape == (41, 3) and info.status.dtype == torch.int8
    est.apply_to(f)
    torch.testing.assert_close(f.W.grad, est.grads["W"])
    assert est.grads["W"].dtype == F64


# ---- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_is_rejected_with_a_clear_error():
    for beta in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            EP(beta)
    with pytest.raises(TypeError, match="beta must be a real number > 0.*complex"):
        EP(0.1j)
    with pytest.raises(ValueError, match="n_points must be an int >= 1, got 0"):
        EP(0.1, n_points=0)
    with pytest.raises(ValueError, match="correction must be one of None, 'frozen', 'tracking', got 'aep'"):
        EP(0.1, correction="aep")
    with pytest.raises(ValueError, match="t2 must be an int >= 1 or a non-empty list of them, got an empty list"):
        EP(0.1, t2=[])
    with pytest.raises(ValueError, match=r"t2 must hold step counts >= 1, got \[5, 0\]"):
        EP(0.1, t2=[5, 0])
    with pytest.raises(ValueError, match="t2 must hold step counts >= 1"):
        EP(0.1, t2=0)
    with pytest.raises(ValueError, match="tracking' needs n_points >= 2"):
        EP(0.1, n_points=1, correction="tracking")
    with pytest.raises(ValueError, match="gate must be None or a number > 0"):
        EP(0.1, gate=0)
    with pytest.raises(TypeError, match=r"EP: unknown relaxation option\(s\) \['tolerance'\]"):
        EP(0.1, tolerance=1e-3)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        _C.ep_points(2, -1.0, True)


def test_complex_points_need_holomorphic_callables():
    f, x, loss = _tanh_problem()  # TanhLayer multiplies complex z by real W: no holomorphic extension
    with pytest.raises(TypeError, match=r"the field f \(TanhLayer\) failed on complex input"):
        EP(0.05, n_points=3, t2=5).grad(f, x, loss)

    class Holo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W = torch.nn.Parameter(f.W.detach().clone())

        def forward(self, z, x):
            return torch.tanh(z @ self.W.T.to(z.dtype) + x.to(z.dtype))

    with pytest.raises(TypeError, match=r"loss_fn \(function\) .*not holomorphic"):
        EP(0.05, n_points=4, t2=5).grad(Holo(), x, lambda z: (z.abs() ** 2).sum().to(z.dtype))
    with pytest.raises(TypeError, match=r"loss_fn \(function\) returned torch.float64 for complex input"):
        EP(0.05, n_points=4, t2=5).grad(Holo(), x, lambda z: (z.real**2).sum())
    with pytest.raises(ValueError, match="EP needs a real field: x must be real"):
        EP(0.05).grad(Holo(), x.to(torch.complex128), loss)
    # real arithmetic (n_points <= 2) never evaluates at complex z: the same field works
    assert not EP(0.05, t2=5).grad(f, x, loss).stats["skipped"]


def test_a_vector_field_handle_is_stacked_point_by_point():
    # An opaque VectorField (here a ModuleField handle) cannot be rebuilt on a stacked x: EP wraps it
    # and evaluates F, Jv, Jᵀv one point at a time. Same estimate as the rebuilt (batched) field.
    f, x, loss = _linear_problem(normal=False, seed=3)
    handle = eqprop.solvers.as_field(f, x)
    for kw in (dict(correction="frozen"), dict(n_points=4, correction="tracking")):
        a = EP(1e-3, t2=T2, **kw, **EXACT).grad(handle, x, loss)
        b = EP(1e-3, t2=T2, **kw, **EXACT).grad(f, x, loss)
        torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-10, atol=1e-14)
