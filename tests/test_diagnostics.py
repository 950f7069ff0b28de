"""Jacobian diagnostics and penalties against the dense Jacobian (docs/design.md §6, §7)."""

import pytest
import torch

import eqprop
from eqprop import diagnostics as dg
from eqprop.reference import solvers as ref
from equilibrium_fields import Linear, TanhLayer
from testing import central_difference, check, devices, fd_tol, third_difference, tol


def _point(n=6, B=3, seed=0, device="cpu"):
    f = TanhLayer(n, scale=0.9, seed=seed).to(device)
    x = torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 10)).to(device)
    z, _ = eqprop.relax(f, x, tol=1e-12, max_steps=500)
    J = ref.dense_jacobian(f, x, z).detach()  # [B, n, n]
    return f, x, z, J


def _within(est, exact, k=3.0):
    assert abs(est.value - exact) <= k * est.stderr, (est, exact)
    assert est.stderr < 0.2 * abs(exact) + 1e-12  # the check above is not vacuous


def test_residual():
    f, x, z, _ = _point()
    z_off = z + 0.01
    a, r = dg.residual(f, x, z_off)
    with torch.no_grad():
        fz = f(z_off, x)
    torch.testing.assert_close(a, (fz - z_off).norm(dim=1))
    torch.testing.assert_close(r, (fz - z_off).norm(dim=1) / fz.norm(dim=1))


@pytest.mark.parametrize("device", devices)
def test_spectral_radius_and_norm_against_dense(device):
    f, x, z, J = _point(device=device)
    rho = dg.spectral_radius(f, x, z, iters=400)
    torch.testing.assert_close(rho, torch.linalg.eigvals(J).abs().max(-1).values, rtol=5e-3, atol=0)
    sigma, hist = dg.spectral_norm(f, x, z, iters=200, return_history=True)
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(J, 2), rtol=1e-8, atol=0)
    assert (hist[1:] >= hist[:-1] - 1e-12).all()  # ‖Jv‖ with v from JᵀJ power iteration never drops


def test_spectral_radius_complex_dominant_pair():
    # A non-normal matrix whose dominant eigenvalues are 0.8·e^{±i 1.1}: ‖Jv_t‖ oscillates.
    c, s = torch.cos(torch.tensor(1.1)), torch.sin(torch.tensor(1.1))
    D = torch.zeros(4, 4, dtype=torch.float64)
    D[:2, :2] = 0.8 * torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    D[2, 2], D[3, 3] = 0.3, -0.5
    P = torch.eye(4, dtype=torch.float64) + 0.4 * torch.randn(
        4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    A = P @ D @ torch.linalg.inv(P)
    x = torch.randn(2, 4, dtype=torch.float64)
    rho = dg.spectral_radius(Linear(A), x, torch.zeros_like(x), iters=2000)
    torch.testing.assert_close(rho, torch.full((2,), 0.8, dtype=torch.float64), rtol=5e-3, atol=0)


def test_spectral_norm_complex_field():
    g = torch.Generator().manual_seed(4)
    A = (
        torch.complex(
            torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
        )
        * 0.2
    )
    x = torch.zeros(1, 5, dtype=torch.complex128)
    sigma = dg.spectral_norm(lambda z, x: z @ A.T + x, x, x, iters=300)
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(A, 2).reshape(1), rtol=1e-8, atol=0)


@pytest.mark.parametrize("device", devices)
def test_monte_carlo_estimates_within_three_standard_errors(device):
    f, x, z, J = _point(device=device)
    numel = z.numel()
    Js, Ja = (J + J.mT) / 2, (J - J.mT) / 2
    for dist in ("rademacher", "gaussian"):
        _within(dg.frobenius_sq(f, x, z, probes=200, seed=1, dist=dist), float((J**2).sum() / numel))
        _within(dg.nonnormality(f, x, z, probes=200, seed=2, dist=dist), float((J - J.mT).norm() / J.norm()))
        _within(
            dg.symmetric_fraction(f, x, z, probes=200, seed=3, dist=dist), float(Js.norm() / (Js.norm() + Ja.norm()))
        )


def test_exact_limits_for_symmetric_and_antisymmetric_jacobians():
    g = torch.Generator().manual_seed(6)
    M = torch.randn(5, 5, generator=g, dtype=torch.float64) * 0.2
    x = torch.randn(2, 5, dtype=torch.float64, generator=g)
    z = torch.zeros_like(x)
    sym, anti = Linear(M + M.T), Linear(M - M.T)
    # ratios of 5-term products summed over the probes: a rounding per term, relative to the ratio
    bound = tol(torch.float64, n=4 * 10, scale=2.0)
    check(dg.nonnormality(sym, x, z, probes=4).value, 0.0, bound, "nonnormality, symmetric")
    check(dg.symmetric_fraction(sym, x, z, probes=4).value, 1.0, bound, "symmetric_fraction, symmetric")
    check(dg.nonnormality(anti, x, z, probes=4).value, 2.0, bound, "nonnormality, antisymmetric")
    check(dg.symmetric_fraction(anti, x, z, probes=4).value, 0.0, bound, "symmetric_fraction, antisymmetric")
    JS = float(((M + M.T) ** 2).sum())  # ‖Jε‖² is of order ‖J‖²_F per probe
    check(dg.homeostatic_loss(sym, x, z, probes=3).detach(), 0.0, tol(torch.float64, n=3 * 10, scale=JS), "homeostatic")
    # Antisymmetric: ½‖J − Jᵀ‖²_F = 2‖J‖²_F, and per probe ‖Jε‖² − (Jᵀε)·(Jε) = 2‖Jε‖².
    A = M - M.T
    hl = dg.homeostatic_loss(anti, x, z, probes=1, seed=0, dist="gaussian")
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = float(2 * (eps @ A.T).pow(2).sum() / x.numel())
    check(float(hl.detach()), expected, tol(torch.float64, n=2 * 10, scale=expected))


def _per_seed(fn, n):
    vals = torch.tensor([float(fn(seed).detach()) for seed in range(n)], dtype=torch.float64)
    return vals.mean(), vals.std() / n**0.5


def test_penalties_are_unbiased_and_consistent():
    f, x, z, J = _point(n=5, B=2)
    numel = z.numel()
    # The penalty with Rademacher probes is the same Hutchinson sum as frobenius_sq (same seed).
    jp = dg.jacobian_penalty(f, x, z, probes=5, seed=7, dist="rademacher", weight=2.0)
    expected = 2.0 * dg.frobenius_sq(f, x, z, probes=5, seed=7).value
    check(float(jp.detach()), expected, tol(torch.float64, n=5 * 10, scale=expected))  # 5 probes, 5-term JVPs
    mean, se = _per_seed(lambda s: dg.jacobian_penalty(f, x, z, probes=1, seed=s), 300)
    assert abs(mean - (J**2).sum() / numel) <= 3 * se
    mean, se = _per_seed(lambda s: dg.homeostatic_loss(f, x, z, probes=1, seed=s), 300)
    assert abs(mean - 0.5 * ((J - J.mT) ** 2).sum() / numel) <= 3 * se


@pytest.mark.parametrize("penalty", [dg.jacobian_penalty, dg.homeostatic_loss])
def test_penalties_are_differentiable_in_the_parameters(penalty):
    f, x, z, _ = _point(n=4, B=2)
    value = penalty(f, x, z, probes=2, seed=3, weight=0.5)
    (gW,) = torch.autograd.grad(value, [f.W])
    d = torch.randn_like(f.W)
    h = 1e-6
    fun = lambda: penalty(f, x, z, probes=2, seed=3, weight=0.5)  # noqa: E731
    fd = central_difference(fun, h, [f.W], [d])
    # the penalty's rounding: 2 probes of forward-and-back products of 4-term sums
    noise = tol(torch.float64, n=2 * 16, scale=value)
    bound = fd_tol(h, noise=noise, curvature=third_difference(fun, 1e-3, [f.W], [d]))
    check((gW * d).sum(), fd, bound)


def test_bad_arguments():
    f, x, z, _ = _point(n=3, B=1)
    with pytest.raises(ValueError, match="probes must be an int >= 1, got 0"):
        dg.frobenius_sq(f, x, z, probes=0)
    with pytest.raises(ValueError, match="iters must be an int >= 1, got 0"):
        dg.spectral_radius(f, x, z, iters=0)
    with pytest.raises(ValueError, match="probe distribution must be 'rademacher' or 'gaussian', got 'uniform'"):
        dg.nonnormality(f, x, z, dist="uniform")
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
        dg.symmetric_fraction(f, x, z, seed=-1)
    wrong = lambda z, x: z[:, :2]  # noqa: E731
    for fn in (dg.spectral_radius, dg.frobenius_sq):
        with pytest.raises(ValueError, match=r"must return F\(z\) with the shape of z \[1, 3\], got \[1, 2\]"):
            fn(wrong, x, z)
    with pytest.raises(ValueError, match=r"must return F\(z\) with the shape of z"):
        eqprop.solvers.as_field(wrong, x).jvp(z, z)


def test_block_diagnostics_against_dense_jacobian():
    torch.manual_seed(0)
    blk = eqprop.EquilibriumBlock(8, 2, resinit=0.5).double()
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    z, _ = eqprop.relax(blk, x, tol=1e-12, max_steps=300)
    J = ref.dense_jacobian(blk, x, z).detach()  # [1, 24, 24]
    torch.testing.assert_close(
        dg.spectral_norm(blk, x, z, iters=300), torch.linalg.matrix_norm(J, 2), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        dg.spectral_radius(blk, x, z, iters=600), torch.linalg.eigvals(J).abs().max(-1).values, rtol=1e-2, atol=0
    )
    _within(dg.frobenius_sq(blk, x, z, probes=200, seed=1), float((J**2).sum() / z.numel()))
    _within(dg.nonnormality(blk, x, z, probes=200, seed=2), float((J - J.mT).norm() / J.norm()))
