"""Relaxation, the VectorField products, fixed_point and the fused damped step (docs/design.md §4, §5)."""

import cmath

import pytest
import torch

import eqprop
from eqprop import _C
from eqprop.reference import solvers as ref
from eqprop.testing import assert_converged
from equilibrium_fields import Linear, Scaled, TanhLayer
from testing import central_difference, check, condition_scale, devices, fd_tol, third_difference, tol


# --- the fused damped update and its CPU twin --------------------------------------------------------


def _check_damped_step(device, dtype):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 3, 7, generator=g, dtype=torch.float64)
    fz = torch.randn(5, 3, 7, generator=g, dtype=torch.float64)
    if dtype.is_complex:
        z = torch.complex(z, torch.randn(z.shape, generator=g, dtype=torch.float64))
        fz = torch.complex(fz, torch.randn(z.shape, generator=g, dtype=torch.float64))
    z, fz = z.to(device=device, dtype=dtype), fz.to(device=device, dtype=dtype)
    z_new, res_sq, f_sq = torch.ops.eqprop.relax_damped_step(z, fz, 0.3)
    zd, fd = (
        z.to(torch.complex128 if dtype.is_complex else torch.float64),
        fz.to(torch.complex128 if dtype.is_complex else torch.float64),
    )
    exp_z = zd + 0.3 * (fd - zd)
    exp_r = (fd - zd).abs().pow(2).reshape(5, -1).sum(1)
    exp_f = fd.abs().pow(2).reshape(5, -1).sum(1)
    assert z_new.dtype == dtype and z_new.shape == z.shape
    assert res_sq.dtype == (
        torch.float32
        if dtype == torch.bfloat16
        else exp_r.dtype
        if dtype == torch.float64
        else torch.float64
        if dtype == torch.complex128
        else torch.float32
    )
    # z + ε(F − z): three roundings; ‖·‖²: a sum of 21 squares, in the dtype of the result (float32 for
    # bfloat16, whose update is rounded once more to bfloat16)
    n = z[0].numel()
    check(z_new.to(exp_z.dtype), exp_z, tol(dtype, n=3, scale=zd.abs().max() + fd.abs().max()), "z + ε(F − z)")
    check(res_sq.double(), exp_r.double(), tol(res_sq.dtype, n=n + 3, scale=exp_r.abs().max()), "‖F − z‖²")
    check(f_sq.double(), exp_f.double(), tol(f_sq.dtype, n=n + 2, scale=exp_f.abs().max()), "‖F‖²")


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128, torch.bfloat16])
def test_damped_step_matches_plain_torch(device, dtype):
    _check_damped_step(device, dtype)


def test_damped_step_opcheck_and_errors():
    z = torch.randn(4, 6)
    torch.library.opcheck(torch.ops.eqprop.relax_damped_step.default, (z, torch.randn(4, 6), 0.5))
    with pytest.raises(ValueError, match=r"F\(z\) must have the shape of z"):
        torch.ops.eqprop.relax_damped_step(z, torch.randn(4, 5), 0.5)
    with pytest.raises(ValueError, match="dtype of z"):
        torch.ops.eqprop.relax_damped_step(z, torch.randn(4, 6, dtype=torch.float64), 0.5)


# --- relaxation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices)
def test_picard_trace_closed_form(device):
    # F(z) = s z + x: the residual of iterate t is r_t = r_0 (1 + ε(s − 1))^t, r_0 = ‖x‖ (z_0 = 0).
    s = torch.tensor([0.5, -0.3, 0.9], dtype=torch.float64, device=device)
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    eps = 0.7
    z, info = eqprop.relax(Scaled(s), x, eps=eps, tol=1e-9, stop="abs", max_steps=400)
    rate = (1 + eps * (s - 1)).abs()
    t = torch.arange(info.trace_abs.shape[0], dtype=torch.float64, device=device)[:, None]
    expected = x.norm(dim=1) * rate**t
    active = t < info.steps[None, :]  # stopped samples repeat their best iterate afterwards
    # each step rounds z (magnitude ≤ ‖x‖/|1 − s|) and the residual F(z) − z cancels down from it
    z_scale = float((x.norm(dim=1) / (1 - s).abs()).max())
    check(info.trace_abs[active], expected[active], tol(x.dtype, n=int(info.steps.max()) + x.shape[1], scale=z_scale))
    # First t with r_t ≤ tol, counted in F evaluations.
    steps = torch.ceil(torch.log(1e-9 / x.norm(dim=1)) / torch.log(rate)).long() + 1
    assert torch.equal(info.steps, steps)
    assert info.status_names == ["converged"] * 3
    # stopped at ‖F(z) − z‖ = |1 − s|·‖z − z*‖ <= 1e-9
    check(z, x / (1 - s[:, None]), 1e-9 / float((1 - s).abs().min()) + tol(x.dtype, n=4, scale=z_scale))
    torch.testing.assert_close(info.rel_lowest, info.abs_lowest / (s[:, None] * z + x).norm(dim=1))
    assert info.abs_max == float(info.abs_lowest.max()) <= 1e-9 and info.rel_max == float(info.rel_lowest.max())


@pytest.mark.parametrize("device", devices)
def test_relax_matches_reference_loop(device):
    f = TanhLayer(8).to(device)
    x = torch.randn(4, 8, dtype=torch.float64, device=device)
    z, info = eqprop.relax(f, x, eps=0.8, tol=1e-8, max_steps=500)
    zr, ir = ref.picard(f, x, eps=0.8, tol=1e-8, max_steps=500)
    # the same iteration in another order of operations: a rounding per step, 8-term sums
    check(z, zr, tol(x.dtype, n=int(info.steps.max()) + 8, scale=zr.abs().max()))
    assert torch.equal(info.steps, ir["steps"])
    with torch.no_grad():
        assert (f(z, x) - z).norm(dim=1).max() <= 1e-8 * f(z, x).norm(dim=1).max()


@pytest.mark.parametrize("device", devices)
def test_anderson_needs_fewer_evaluations_than_picard(device):
    f = TanhLayer(32, scale=0.97, seed=3, symmetric=True).to(device)
    x = 0.1 * torch.randn(6, 32, dtype=torch.float64).to(device)
    zp, ip = eqprop.relax(f, x, tol=1e-8, max_steps=1000, solver="picard")
    za, ia = eqprop.relax(f, x, tol=1e-8, max_steps=1000, solver="anderson", anderson_m=5)
    assert_converged(ip)
    assert_converged(ia)
    assert ia.n_evals < 0.5 * ip.n_evals, (ia.n_evals, ip.n_evals)
    # both stopped at a relative residual 1e-8: ‖z − z*‖ <= 1e-8·‖F(z)‖ / (1 − L), L <= ‖W‖₂ = 0.97
    check(za, zp, 2 * 1e-8 * float(zp.norm(dim=1).max()) / (1 - 0.97))


@pytest.mark.parametrize("device", devices)
def test_divergence_reported_per_sample_and_best_iterate_kept(device):
    # Sample 0 contracts (s = 0.5); sample 1 expands (s = 3): its residual grows, so the best
    # iterate is z_0 = 0 and the status says diverged; sample 0 is unaffected.
    s = torch.tensor([0.5, 3.0], dtype=torch.float64, device=device)
    x = torch.ones(2, 3, dtype=torch.float64, device=device)
    z, info = eqprop.relax(Scaled(s), x, tol=1e-10, stop="abs", max_steps=200, on_nonconvergence="ignore")
    assert info.status_names == ["converged", "diverged"]
    torch.testing.assert_close(z[0], x[0] / 0.5)
    assert torch.equal(z[1], torch.zeros(3, dtype=torch.float64, device=device))
    torch.testing.assert_close(info.abs_lowest[1], x[1].norm())
    # Divergence: ‖r_t‖ = ‖x‖ 3^t exceeds 1e4 ‖x‖ first at t = 9 (10th evaluation).
    assert int(info.steps[1]) == 10
    # With stop="rel" the expanding sample's rel residual falls towards 2/3 but it still diverges.
    _, info = eqprop.relax(Scaled(s), x, tol=1e-10, stop="rel", max_steps=200, on_nonconvergence="ignore")
    assert info.status_names == ["converged", "diverged"]


def test_non_finite_field_is_diverged_not_raised():
    f = lambda z, x: torch.where(z.abs() > 0.5, torch.full_like(z, float("nan")), z * 0.5 + x)
    x = torch.tensor([[0.1], [0.4]], dtype=torch.float64)  # sample 1's fixed point 0.8 > 0.5
    z, info = eqprop.relax(f, x, tol=1e-12, max_steps=100, on_nonconvergence="ignore")
    assert info.status_names == ["converged", "diverged"]
    assert torch.isfinite(z).all()


def test_max_steps_status():
    s = torch.tensor([0.99], dtype=torch.float64)
    z, info = eqprop.relax(
        Scaled(s), torch.ones(1, 2, dtype=torch.float64), tol=1e-12, max_steps=5, on_nonconvergence="ignore"
    )
    assert info.status_names == ["max_steps"] and int(info.steps[0]) == 5 and info.n_evals == 5
    assert info.trace_abs.shape == (5, 1)


def test_rel_and_abs_stop():
    s = torch.tensor([0.5], dtype=torch.float64)
    x = torch.full((1, 1), 1e3, dtype=torch.float64)
    _, ia = eqprop.relax(Scaled(s), x, tol=1e-3, stop="abs", max_steps=100)
    _, ir = eqprop.relax(Scaled(s), x, tol=1e-3, stop="rel", max_steps=100)
    # abs: 1e3·0.5^t ≤ 1e-3 → t = 20; rel: 0.5^t/(2 − 0.5^t) ≤ 1e-3 → t = 9 (0-based).
    assert int(ia.steps[0]) == 21 and int(ir.steps[0]) == 10


def test_warm_start_and_handle_and_vector_field_forms():
    f = TanhLayer(6)
    x = torch.randn(3, 6, dtype=torch.float64)
    z, info = eqprop.relax(f, x, tol=1e-10, max_steps=300)
    # Started at the fixed point: converged at the first evaluation.
    _, info2 = eqprop.relax(f, x, z0=z, tol=1e-9)
    assert info2.steps.tolist() == [1, 1, 1]
    handle = eqprop.solvers.as_field(f, x)
    z3, _ = eqprop.relax(handle, None, z0=torch.zeros_like(x), tol=1e-10, max_steps=300)
    torch.testing.assert_close(z3, z)

    class HasField:
        def vector_field(self, x):
            return _C.ModuleField(f, x, [], [])

    z4, _ = eqprop.relax(HasField(), x, tol=1e-10, max_steps=300)
    torch.testing.assert_close(z4, z)


def test_drive_shifts_the_fixed_point():
    # dz/dt = A z + x − β(z − y) − z: fixed point (I(1 + β) − A) z = x + β y (the nudged-phase slot).
    A = 0.3 * torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(3, 3, dtype=torch.float64)
    f = Linear(A)
    x = torch.randn(2, 3, dtype=torch.float64)
    y = torch.randn(2, 3, dtype=torch.float64)
    beta = 0.4
    expected = torch.linalg.solve((1 + beta) * torch.eye(3, dtype=torch.float64) - A, (x + beta * y).T).T
    # stopped at ‖G(z) − z‖ <= 1e-12 with G(z) − z = −M(z − z*), M = (1 + β)I − A: ‖z − z*‖ <= ‖M⁻¹‖·1e-12
    M = (1 + beta) * torch.eye(3, dtype=torch.float64) - A
    bound = 1e-12 * float(torch.linalg.matrix_norm(torch.linalg.inv(M), 2))
    bound += tol(x.dtype, n=6, scale=expected.abs().max())
    for solver in ("picard", "anderson"):
        z, info = eqprop.relax(
            f, x, eps=0.5, tol=1e-12, stop="abs", max_steps=500, solver=solver, drive=lambda z: -beta * (z - y)
        )
        assert_converged(info)
        check(z, expected, bound, solver)
    # Complex β (holomorphic EP): the same closed form in complex arithmetic.
    beta_c = 0.3 * cmath.exp(0.7j)
    Ac, xc, yc = A.to(torch.complex128), x.to(torch.complex128), y.to(torch.complex128)
    zc, info = eqprop.relax(
        lambda z, x: z @ Ac.T + x,
        xc,
        tol=1e-12,
        stop="abs",
        max_steps=500,
        solver="anderson",
        drive=lambda z: -beta_c * (z - yc),
    )
    Mc = (1 + beta_c) * torch.eye(3, dtype=torch.complex128) - Ac
    expected_c = torch.linalg.solve(Mc, (xc + beta_c * yc).T).T
    bound = 1e-12 * float(torch.linalg.matrix_norm(torch.linalg.inv(Mc), 2))
    bound += tol(xc.dtype, n=6, scale=expected_c.abs().max())
    check(zc, expected_c, bound, "complex β")


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_low_precision_relaxation(solver):
    # bfloat16 state: the damped step and Anderson's mixing run in float32 and the fixed point is
    # that of the float64 field to bfloat16 precision.
    fb = TanhLayer(16, scale=0.6, dtype=torch.bfloat16)
    x = torch.randn(3, 16).bfloat16()
    f = TanhLayer(16, scale=0.6)  # float64 on the same (bfloat16) weights
    with torch.no_grad():
        for p, q in zip(f.parameters(), fb.parameters()):
            p.copy_(q)
    z64, _ = eqprop.relax(f, x.double(), tol=1e-12, max_steps=300)
    zb, info = eqprop.relax(fb, x, tol=2e-2, max_steps=100, solver=solver)
    assert zb.dtype == torch.bfloat16 and info.abs_lowest.dtype == torch.float32
    assert_converged(info)
    # stopped at ‖F(z) − z‖ <= 2e-2·‖F(z)‖ (F is evaluated in bfloat16: 16-term sums, tanh), so
    # ‖z − z*‖ <= (2e-2 + 18ε)·‖F(z)‖ / (1 − L) with L <= ‖W‖₂ = 0.6
    Fz = float(zb.double().norm(dim=1).max()) * (1 + 2e-2)
    check(zb.double(), z64, (2e-2 * Fz + tol(zb.dtype, n=18, scale=Fz)) / (1 - 0.6))


# --- VectorField products -------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices)
def test_products_against_dense_jacobian(device):
    f = TanhLayer(5).to(device)
    x = torch.randn(2, 5, dtype=torch.float64, device=device)
    z = torch.randn(2, 5, dtype=torch.float64, device=device)
    v = torch.randn(2, 5, dtype=torch.float64, device=device)
    fld = eqprop.solvers.as_field(f, x)
    J = ref.dense_jacobian(f, x, z).detach()  # [B, n, n]
    # a tanh layer forward and back (5-term sums, twice) and the 5-term product with J
    n = 2 * (5 + 2) + 5
    check(
        fld.jvp(z, v),
        torch.einsum("bij,bj->bi", J, v),
        2 * tol(z.dtype, n=n, scale=condition_scale(lambda z, v: fld.jvp(z, v), [z, v])),
        "jvp",
    )
    check(
        fld.vjp(z, v),
        torch.einsum("bji,bj->bi", J, v),
        2 * tol(z.dtype, n=n, scale=condition_scale(lambda z, v: fld.vjp(z, v), [z, v])),
        "vjp",
    )
    pv = fld.param_vjp(z, v)
    expected = torch.autograd.grad(f(z, x), list(f.parameters()), v)
    assert fld.parameter_names() == ["W", "U", "b"]
    for a, b in zip(pv, expected):
        check(a, b, 2 * tol(z.dtype, n=n, scale=b.abs().max()), "param_vjp")


def test_complex_plain_transpose():
    # d(z²)/dz at z = 0.2i is 0.4i; autograd's own VJP would give the conjugate −0.4i.
    fld = _C.ModuleField(lambda z, x: z * z + x, torch.zeros(1, 1, dtype=torch.complex128), [], [])
    z = torch.full((1, 1), 0.2j, dtype=torch.complex128)
    one = torch.ones_like(z)
    check(fld.vjp(z, one), torch.full_like(z, 0.4j), tol(z.dtype, n=2, scale=0.4))
    check(fld.jvp(z, one), torch.full_like(z, 0.4j), tol(z.dtype, n=2, scale=0.4))
    # Parameters: complex a in a·z² gives (∂F/∂a)ᵀv = z² v; a real w in w·z gives z·v (complex).
    a = torch.tensor(1.5 - 0.5j, dtype=torch.complex128, requires_grad=True)
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    fld = _C.ModuleField(lambda z, x: a * z * z + w * z, torch.zeros(1, 1, dtype=torch.complex128), ["a", "w"], [a, w])
    z = torch.tensor([[0.3 + 0.2j]], dtype=torch.complex128)
    v = torch.tensor([[1.0 - 2.0j]], dtype=torch.complex128)
    ga, gw = fld.param_vjp(z, v)
    # a few complex products of numbers of magnitude <= 3: a few roundings each
    check(ga, (z * z * v).sum(), tol(z.dtype, n=4, scale=3.0))
    check(gw, (z * v).sum(), tol(z.dtype, n=4, scale=3.0))
    check(fld.vjp(z, v), (2 * a * z + w) * v, tol(z.dtype, n=4, scale=3.0))


def test_holomorphic_jvp_finite_differences():
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.4).to(torch.complex128)
    f = lambda z, x: torch.tanh(z @ W.T + x)
    x = torch.randn(2, 4, generator=g, dtype=torch.float64).to(torch.complex128)
    z = torch.complex(torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)) * 0.3
    v = torch.complex(torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    fld = _C.ModuleField(f, x, [], [])
    jv = fld.jvp(z, v)
    h = 1e-6
    F = lambda t: f(z + t * v, x)  # noqa: E731
    noise = tol(z.dtype, n=6, scale=condition_scale(f, [z, x]))  # tanh of a 4-term sum
    for step in (h, 1j * h):  # (F(z + hv) − F(z − hv)) / 2h and the same along ihv: both Jv
        bound = fd_tol(h, noise=noise, curvature=third_difference(F, 1e3 * step))
        check(central_difference(F, step), jv, bound, f"step {step}")
    # Plain transpose: ⟨u, Jv⟩ = ⟨Jᵀu, v⟩ with the bilinear (not sesquilinear) pairing.
    u = torch.complex(torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    check((u * jv).sum(), (fld.vjp(z, u) * v).sum(), tol(z.dtype, n=2 * 6 + 8, scale=(u.abs() * jv.abs()).sum()))


# --- fixed_point ----------------------------------------------------------------------------------


def _loss(z):
    return (z**3).sum() + z.sum()


@pytest.mark.parametrize("device", devices)
def test_fixed_point_implicit_gradient_equals_finite_differences(device):
    torch.manual_seed(0)
    f = TanhLayer(6).to(device)
    x = torch.randn(3, 6, dtype=torch.float64, device=device, requires_grad=True)
    opts = dict(tol=1e-14, stop="abs", max_steps=2000)
    z = eqprop.fixed_point(f, x, backward_tol=1e-14, backward_max_steps=2000, **opts)
    params = list(f.parameters()) + [x]
    grads = torch.autograd.grad(_loss(z), params)
    fun = lambda: _loss(eqprop.relax(f, x.detach(), **opts)[0])
    # z* to ‖F(z) − z‖ <= 1e-14, so ‖z − z*‖ <= 1e-14 / (1 − L), L <= ‖W‖₂ = 0.8: the loss is off by
    # Σ|∂ℓ/∂z|·that, plus its own rounding; the adjoint, stopped at the same tolerance, by as much
    with torch.no_grad():
        noise = float((3 * z**2 + 1).abs().sum()) * (1e-14 / (1 - 0.8) + tol(z.dtype, n=8))
    h = 1e-6
    for p, g in zip(params, grads):
        d = torch.randn_like(p)
        fd = central_difference(fun, h, [p], [d])
        bound = fd_tol(h, noise=noise, curvature=third_difference(fun, 1e-3, [p], [d]))
        check((g * d).sum(), fd, bound + 1e-14 / (1 - 0.8) * float(g.norm() * d.norm()))


def test_fixed_point_bptt_converges_to_implicit():
    f = TanhLayer(6, scale=0.9)
    x = torch.randn(3, 6, dtype=torch.float64)
    opts = dict(tol=1e-13, stop="abs", max_steps=2000)
    g_imp = torch.autograd.grad(_loss(eqprop.fixed_point(f, x, backward_tol=1e-14, **opts)), [f.W])[0]
    errs = []
    for h in (1, 4, 16, 64):
        z = eqprop.fixed_point(f, x, backward="bptt", bptt_horizon=h, **opts)
        errs.append(float((torch.autograd.grad(_loss(z), [f.W])[0] - g_imp).norm() / g_imp.norm()))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-8
    # Full BPTT (no horizon) through 300 damped steps from z0 also agrees.
    z = eqprop.fixed_point(f, x, backward="bptt", max_steps=300, eps=0.9)
    g_full = torch.autograd.grad(_loss(z), [f.W])[0]
    assert float((g_full - g_imp).norm() / g_imp.norm()) < 1e-8


def test_fixed_point_complex_matches_unrolled_autograd():
    # Holomorphic field, real loss: the implicit hook must hand autograd the conjugate convention.
    g = torch.Generator().manual_seed(2)
    W = torch.nn.Parameter((torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.3).to(torch.complex128))
    f = lambda z, x: torch.tanh(z @ W.T + x)
    x = torch.complex(torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)) * 0.5
    loss = lambda z: (z * z.conj()).real.sum() + (z**2).real.sum()
    fld = _C.ModuleField(f, x, ["W"], [W])
    z = eqprop.fixed_point(fld, x, tol=1e-14, stop="abs", max_steps=500, backward_tol=1e-14)
    g_imp = torch.autograd.grad(loss(z), [W])[0]
    z_bptt = eqprop.fixed_point(fld, x, backward="bptt", max_steps=400)
    g_bptt = torch.autograd.grad(loss(z_bptt), [W])[0]
    torch.testing.assert_close(g_imp, g_bptt, rtol=1e-9, atol=1e-9)


def test_fixed_point_no_grad_returns_detached_fixed_point():
    f = TanhLayer(4)
    x = torch.randn(2, 4, dtype=torch.float64)
    with torch.no_grad():
        z, info = eqprop.fixed_point(f, x, tol=1e-10, return_info=True)
    assert not z.requires_grad and info.converged.all()


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=0.0), r"eps \(damping\) must be finite and > 0, got 0"),
        (dict(eps=-1.0), r"eps \(damping\) must be finite and > 0, got -1"),
        (dict(max_steps=0), "max_steps must be >= 1, got 0"),
        (dict(solver="broyden"), "solver must be one of 'picard', 'anderson', got 'broyden'"),
        (dict(stop="max"), "stop must be one of 'rel', 'abs', got 'max'"),
        (dict(anderson_m=0, solver="anderson"), "anderson_m must be >= 1, got 0"),
        (dict(tol=float("nan")), "tol must be finite and >= 0"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match):
    f = TanhLayer(3)
    with pytest.raises(ValueError, match=match):
        eqprop.relax(f, torch.randn(2, 3, dtype=torch.float64), **kwargs)


def test_bad_inputs_raise_clear_errors():
    f = TanhLayer(3)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="x must be finite, got 1 non-finite entries"):
        eqprop.relax(f, torch.tensor([[1.0, float("inf"), 0.0], [0, 0, 0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="x must be a floating-point or complex tensor, got Long"):
        eqprop.relax(f, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"z0 must have the dtype of x \(torch.float64\), got torch.float32"):
        eqprop.relax(f, x, z0=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"F\(z\) must have the shape of z \[2, 3\], got \[2, 2\]"):
        eqprop.relax(lambda z, x: z[:, :2], x)
    with pytest.raises(ValueError, match=r"z0 must be \[B, \.\.\.\] with B >= 1"):
        eqprop.relax(f, x, z0=torch.zeros(0, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="f must be .* callable f\\(z, x\\); got int"):
        eqprop.relax(3, x)
    with pytest.raises(
        TypeError, match=r"fixed_point: unknown relaxation option\(s\) \['tolerance'\]; valid options are"
    ):
        eqprop.fixed_point(f, x, tolerance=1e-3)
    with pytest.raises(ValueError, match="backward must be one of 'implicit', 'bptt', got 'adjoint'"):
        eqprop.fixed_point(f, x, backward="adjoint")
    with pytest.raises(ValueError, match="bptt_horizon must be an int >= 1 or None, got 0"):
        eqprop.fixed_point(f, x, backward="bptt", bptt_horizon=0)
    with pytest.raises(TypeError, match="f\\(z, x\\) must return a torch.Tensor, got <class 'float'>"):
        eqprop.relax(lambda z, x: 1.0, x)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="z0 must be on the device of x"):
            eqprop.relax(f, x, z0=torch.zeros(2, 3, dtype=torch.float64, device="cuda"))


def test_backward_budget_defaults_to_the_forward_one_and_is_reported():
    f = TanhLayer(4)
    x = torch.randn(2, 4, dtype=torch.float64)
    z, info = eqprop.fixed_point(f, x, max_steps=3, tol=0.0, return_info=True)
    z.sum().backward()
    assert info.backward["n_vjps"] == 3 and info.backward["status"].tolist() == [1, 1]
    assert info.status_names == ["max_steps", "max_steps"]


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_python_errors_inside_f_propagate_unchanged(solver):
    # f runs inside the C++ loop (GIL released around it); its exception must come back as raised.
    def f(z, x):
        if z.abs().sum() > 0:
            raise ValueError("boom from f")
        return z + x

    with pytest.raises(ValueError, match="boom from f"):
        eqprop.relax(f, torch.ones(2, 3), solver=solver)
    with pytest.raises(ValueError, match="boom from f"):
        eqprop.diagnostics.spectral_radius(f, torch.ones(2, 3), torch.ones(2, 3))


# --- regressions found in review ----------------------------------------------------------------------


def test_implicit_backward_uses_the_forward_damping():
    """Eigenvalues of J down to -1.6: undamped Picard diverges, eps = 0.5 converges (|1 - eps(1 - λ)| < 1).
    The adjoint has J's spectrum, so it needs the same damping; the gradient must be exact."""
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.tensor([-1.6, -1.2, -0.5, 0.0, 0.3, 0.6], dtype=torch.float64)) @ Q.T
    layer = Linear(A)
    x = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, generator=g, dtype=torch.float64)
    z = eqprop.fixed_point(layer, x, eps=0.5, tol=1e-13, max_steps=2000)
    (z * w).sum().backward()
    exact = torch.linalg.solve(torch.eye(6, dtype=torch.float64) - A.T, w.T).T  # (I - Aᵀ)⁻¹ w per sample
    # the adjoint stops at ‖Jᵀλ + w − λ‖ <= 1e-13·‖Jᵀλ + w‖: ‖λ − λ*‖ <= ‖(I − Aᵀ)⁻¹‖·1e-13·‖λ‖·(1 + ‖A‖)
    cond = float(torch.linalg.matrix_norm(torch.linalg.inv(torch.eye(6, dtype=torch.float64) - A.T), 2))
    lam = float(exact.norm(dim=1).max())
    check(x.grad, exact, cond * (1e-13 * lam * (1 + 1.6) + tol(x.dtype, n=12, scale=lam)))


def test_half_precision_residuals_do_not_overflow():
    """‖F‖² = 2000·100² overflows float16 (max 65504) if summed in half precision."""
    x = torch.full((2, 2000), 100.0, dtype=torch.float16)
    z = torch.zeros_like(x)
    abs_res, rel_res = eqprop.diagnostics.residual(lambda z, x: x + 0 * z, x, z)
    # summed in float32 (2000 terms), the square root and the result rounded to the result's dtype
    exact = 100.0 * 2000**0.5
    bound = tol(torch.float32, n=2000, scale=exact) + tol(abs_res.dtype, n=2, scale=exact)
    check(abs_res.double(), torch.full((2,), exact, dtype=torch.float64), bound, "abs")
    check(rel_res.double(), torch.ones(2, dtype=torch.float64), 2 * bound / exact, "rel")


def test_drive_of_the_wrong_shape_is_rejected():
    layer = TanhLayer(4)
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"drive\(z\) must return a tensor of the shape of z"):
        eqprop.relax(layer, x, drive=lambda z: -0.1 * z[:1])
    with pytest.raises(TypeError, match=r"drive\(z\) must return a torch.Tensor"):
        eqprop.relax(layer, x, drive=lambda z: 0.0)


# --- check_every and the CUDA-graph switch (the graph itself: test_engine_cuda.py) -----------------


def _blend_block():
    torch.manual_seed(3)
    blk = eqprop.EquilibriumBlock(8, 2, resinit=0.5, dtype=torch.float64, spectral_rho=0.9).eval()
    return blk, torch.randn(3, 5, 8, dtype=torch.float64)


@pytest.mark.parametrize("solver", ["picard", "anderson"])
@pytest.mark.parametrize("check_every", [2, 3, 7, 50])
def test_check_every_changes_nothing_but_the_wasted_evaluations(solver, check_every):
    """Checking for running samples every k steps evaluates up to k - 1 more batched steps, but
    stopped samples are frozen: per-sample results and the trace are those of k = 1."""
    blk, x = _blend_block()
    # per-sample scales: sample 0 converges fast, 1 slowly, 2 does not converge in 40 steps
    cases = [
        (blk, x, dict(tol=1e-9, max_steps=40, on_nonconvergence="ignore")),
        (
            Scaled(torch.tensor([0.1, 0.7, 0.999], dtype=torch.float64)),
            torch.randn(3, 4, dtype=torch.float64),
            dict(tol=1e-8, max_steps=40, on_nonconvergence="ignore"),
        ),
    ]
    for f, xx, kw in cases:
        z1, i1 = eqprop.relax(f, xx, solver=solver, **kw)
        zk, ik = eqprop.relax(f, xx, solver=solver, check_every=check_every, **kw)
        assert torch.equal(zk, z1)
        for name in ("steps", "status", "abs_lowest", "rel_lowest", "trace_abs", "trace_rel"):
            assert torch.equal(getattr(ik, name), getattr(i1, name)), name
        last = int(i1.steps.max())
        assert i1.n_evals == last and i1.trace_abs.shape[0] == last
        assert last <= ik.n_evals < last + check_every and ik.n_evals <= kw["max_steps"]
        assert not ik.cuda_graph and not i1.cuda_graph


@pytest.mark.parametrize("check_every", [1, 5])
def test_trace_grows_with_the_steps_run_not_with_max_steps(check_every):
    """max_steps = 1e12 ("until converged"): nothing of that size is allocated."""
    f = Scaled(torch.tensor([0.5, 0.25], dtype=torch.float64))
    z, info = eqprop.relax(
        f, torch.ones(2, 3, dtype=torch.float64), max_steps=10**12, tol=1e-10, stop="abs", check_every=check_every
    )
    # stopped at ‖F(z) − z‖ = (1 − s)‖z − z*‖ <= 1e-10, 1 − s >= 0.5
    check(z, torch.tensor([[2.0] * 3, [4 / 3] * 3], dtype=torch.float64), 1e-10 / 0.5 + tol(z.dtype, n=4, scale=2.0))
    assert info.trace_abs.shape == (int(info.steps.max()), 2) and info.n_evals < int(info.steps.max()) + check_every


def test_check_every_reaches_the_solvers_and_estimators():
    blk, x = _blend_block()
    loss = lambda z: z.square().sum()  # noqa: E731
    for k in (1, 4):
        z = eqprop.fixed_point(blk, x, check_every=k, tol=1e-10, max_steps=60)
        est = eqprop.estimators.Implicit(check_every=k, tol=1e-10, max_steps=60).grad(blk, x, loss)
        if k == 1:
            z1, est1 = z, est
    assert torch.equal(z, z1) and torch.equal(est.z, est1.z)
    assert all(torch.equal(est.grads[n], est1.grads[n]) for n in est1.grads)
    with pytest.raises(ValueError, match="check_every must be >= 1, got 0"):
        eqprop.fixed_point(blk, x, check_every=0)
    with pytest.raises(ValueError, match="check_every must be >= 1, got 0"):
        eqprop.estimators.BPTT(3, check_every=0).grad(blk, x, loss)


def test_cuda_graph_switch_errors():
    blk, x = _blend_block()
    with pytest.raises(ValueError, match="cuda_graph=True cannot be honoured: the state is not on a CUDA device"):
        eqprop.relax(blk, x, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True cannot be honoured: it needs solver='picard'"):
        eqprop.relax(blk, x, cuda_graph=True, solver="anderson")
    with pytest.raises(ValueError, match="cuda_graph=True cannot be honoured: a drive"):
        eqprop.relax(blk, x, cuda_graph=True, drive=lambda z: 0.1 * z)
    with pytest.raises(ValueError, match="does not declare itself capturable"):
        eqprop.relax(TanhLayer(4), torch.randn(2, 4, dtype=torch.float64), cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be None \\(auto\\), True or False, got 'yes'"):
        eqprop.relax(blk, x, cuda_graph="yes")
    with pytest.raises(ValueError, match="check_every must be >= 1, got 0"):
        eqprop.relax(blk, x, check_every=0)
    with pytest.raises(TypeError, match="check_every must be an int, got float"):
        eqprop.relax(blk, x, check_every=2.0)
    # off, and auto on the CPU, relax eagerly
    for mode in (None, False):
        assert not eqprop.relax(blk, x, cuda_graph=mode)[1].cuda_graph
