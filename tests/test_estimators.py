"""Gradient estimators (docs/design.md §5): Implicit against finite differences, BPTT(h) → Implicit."""

import pytest
import torch

import eqprop
from eqprop.estimators import BPTT, Estimate, Implicit
from eqprop.reference import solvers as ref
from eqprop.testing import assert_converged
from equilibrium_fields import TanhLayer
from testing import central_difference, check, fd_tol, third_difference, tol

OPTS = dict(tol=1e-14, stop="abs", max_steps=2000)


def _solve_tol(grad, L):
    """Bound on the error of a gradient whose forward and adjoint solves stopped at a residual 1e-14
    (OPTS, backward_tol=1e-14): each iterate is within 1e-14 / (1 − L) of its fixed point, L <= ‖W‖₂,
    relative to the gradient's size; plus float64 rounding of the 6-term products."""
    return 2 * (1e-14 / (1 - L) + tol(torch.float64, n=12)) * float(grad.abs().max())


class Head(torch.nn.Module):
    """A readout ℓ(z) = mean((z Vᵀ − y)²): its parameters get their gradient directly."""

    def __init__(self, n, m=3):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.V = torch.nn.Parameter(torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5)
        self.y = torch.randn(m, generator=g, dtype=torch.float64)

    def forward(self, z):
        return ((z @ self.V.T - self.y) ** 2).mean()


def _setup(n=6, B=3, scale=0.85):
    f = TanhLayer(n, scale=scale, seed=1)
    x = torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return f, x, Head(n)


def test_implicit_equals_finite_differences_per_coordinate():
    f, x, head = _setup()
    est = Implicit(backward_tol=1e-14, backward_max_steps=2000, **OPTS).grad(f, x, head)
    assert isinstance(est, Estimate) and set(est.grads) == {"W", "U", "b", "readout.V"}
    assert_converged(est.stats["forward"])
    assert (est.stats["backward"]["status"] == 0).all()

    def loss():
        z, _ = eqprop.relax(f, x, **OPTS)
        return head(z)

    check(est.loss, loss(), tol(x.dtype, n=12, scale=est.loss))
    # the loss at z* relaxed to 1e-14 (L <= 0.85) is off by about |∂ℓ/∂z|·1e-14 / (1 − L) plus its rounding
    noise = (1e-14 / (1 - 0.85) + tol(x.dtype, n=12)) * float(est.loss)
    h = 1e-6
    g = torch.Generator().manual_seed(9)
    for name, p in list(f.named_parameters()) + [("readout.V", head.V)]:
        for _ in range(3):
            idx = tuple(int(torch.randint(0, s, (1,), generator=g)) for s in p.shape)
            d = torch.zeros_like(p)
            d[idx] = 1.0
            fd = central_difference(loss, h, [p], [d])
            bound = fd_tol(h, noise=noise, curvature=third_difference(loss, 1e-3, [p], [d]))
            check(est.grads[name][idx], fd, bound + _solve_tol(est.grads[name], 0.85), f"{name}{list(idx)}")


def test_implicit_matches_reference_adjoint_and_fixed_point_autograd():
    f, x, head = _setup()
    est = Implicit(backward_tol=1e-14, **OPTS).grad(f, x, head)
    zr = est.z.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(head(zr), zr)
    expected = ref.implicit_grads(f, list(f.parameters()), x, est.z, g, tol=1e-15, max_steps=2000)
    for (name, _), e in zip(f.named_parameters(), expected):
        check(est.grads[name], e, _solve_tol(e, 0.85), name)
    z = eqprop.fixed_point(f, x, backward_tol=1e-14, **OPTS)
    grads = torch.autograd.grad(head(z), list(f.parameters()) + [head.V])
    for (name, _), a in zip(list(f.named_parameters()) + [("readout.V", None)], grads):
        check(est.grads[name], a, _solve_tol(a, 0.85), name)


def test_bptt_converges_to_implicit_as_horizon_grows():
    f, x, head = _setup(scale=0.9)
    imp = Implicit(backward_tol=1e-14, **OPTS).grad(f, x, head)
    flat = lambda e: torch.cat([e.grads[n].flatten() for n in ("W", "U", "b")])
    ref_flat = flat(imp)
    errs = [
        float((flat(BPTT(h, **OPTS).grad(f, x, head)) - ref_flat).norm() / ref_flat.norm()) for h in (1, 3, 10, 30, 100)
    ]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-9 and errs[0] > 1e-2
    # The readout gradient does not depend on the horizon (it is taken at z*).
    check(
        BPTT(2, **OPTS).grad(f, x, head).grads["readout.V"],
        imp.grads["readout.V"],
        _solve_tol(imp.grads["readout.V"], 0.9),
    )


def test_apply_to_accumulates_into_grad():
    f, x, head = _setup()
    est = Implicit(**OPTS).grad(f, x, head)
    est.apply_to(f, readout=head)
    assert torch.equal(f.W.grad, est.grads["W"]) and torch.equal(head.V.grad, est.grads["readout.V"])
    est.apply_to(f)
    assert torch.equal(f.W.grad, 2 * est.grads["W"])  # g + g is exact


def test_estimators_reject_bad_configuration():
    with pytest.raises(
        TypeError,
        match=r"Implicit: unknown relaxation option\(s\) \['tolerance'\]; "
        r"valid options are \['max_steps'",
    ):
        Implicit(tolerance=1e-3)
    with pytest.raises(ValueError, match="horizon must be an int >= 1, got 0"):
        BPTT(0)
    with pytest.raises(ValueError, match="backward_max_steps must be an int >= 1, got 0"):
        Implicit(backward_max_steps=0)
    f, x, _ = _setup()
    with pytest.raises(ValueError, match=r"loss_fn\(z\) must return a scalar tensor"):
        Implicit().grad(f, x, lambda z: z)


def test_implicit_gradient_of_the_block_equals_finite_differences():
    # The native block field (no Python in the loop) through the same estimator.
    torch.manual_seed(0)
    blk = eqprop.EquilibriumBlock(8, 2, resinit=0.3).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    loss_fn = lambda z: (z**3).sum()
    est = Implicit(backward_tol=1e-14, backward_max_steps=500, tol=1e-14, stop="abs", max_steps=500).grad(
        blk, x, loss_fn
    )
    assert set(est.grads) == {n for n, p in blk.named_parameters() if p.requires_grad}
    fun = lambda: loss_fn(eqprop.relax(blk, x, tol=1e-14, stop="abs", max_steps=500)[0])
    # the loss at z* relaxed to 1e-14 is off by Σ|3z²|·1e-14 / (1 − L), (1 − L)⁻¹ <= 10 here, plus rounding
    noise = float((3 * est.z**2).abs().sum()) * (10 * 1e-14 + tol(x.dtype, n=10 * 8))
    g = torch.Generator().manual_seed(1)
    h = 1e-6
    for name in ("q_weight", "ffn_in_weight" if "ffn_in_weight" in est.grads else sorted(est.grads)[-1]):
        p = dict(blk.named_parameters())[name]
        d = torch.randn(p.shape, generator=g, dtype=p.dtype)
        fd = central_difference(fun, h, [p], [d])
        bound = fd_tol(h, noise=noise, curvature=third_difference(fun, 1e-3, [p], [d]))
        bound += 10 * 1e-14 * float(est.grads[name].norm() * d.norm())  # the adjoint's own stop
        check((est.grads[name] * d).sum(), fd, bound, name)


def test_anderson_adjoint_gives_the_same_gradient_with_fewer_vjps():
    f = TanhLayer(24, scale=0.97, seed=3, symmetric=True)
    x = 0.1 * torch.randn(4, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss_fn = lambda z: (z**3).sum() + z.sum()
    picard = Implicit(backward_tol=1e-12, backward_max_steps=3000, **OPTS).grad(f, x, loss_fn)
    anderson = Implicit(backward_tol=1e-12, backward_max_steps=3000, backward_solver="anderson", **OPTS).grad(
        f, x, loss_fn
    )
    assert (picard.stats["backward"]["status"] == 0).all() and (anderson.stats["backward"]["status"] == 0).all()
    assert anderson.stats["backward"]["n_vjps"] < 0.5 * picard.stats["backward"]["n_vjps"]
    # both adjoints stopped at a relative residual 1e-12, L <= ‖W‖₂ = 0.97
    bound = lambda g: 2 * 1e-12 / (1 - 0.97) * float(g.abs().max())  # noqa: E731
    for name in picard.grads:
        check(anderson.grads[name], picard.grads[name], bound(picard.grads[name]), name)
    # fixed_point's hook takes the same option.
    z = eqprop.fixed_point(f, x, backward_solver="anderson", backward_tol=1e-12, backward_max_steps=3000, **OPTS)
    (gW,) = torch.autograd.grad(loss_fn(z), [f.W])
    check(gW, picard.grads["W"], bound(picard.grads["W"]), "fixed_point")
    with pytest.raises(ValueError, match="backward_solver must be one of 'picard', 'anderson', got 'broyden'"):
        Implicit(backward_solver="broyden")


def test_implicit_estimate_on_a_complex_field_follows_autograd_convention():
    # Holomorphic field with a complex parameter W and a real parameter s: the estimator's grads
    # must equal what autograd puts in .grad (conjugate Wirtinger for W, real part for s).
    g = torch.Generator().manual_seed(3)
    W = torch.nn.Parameter((torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.3).to(torch.complex128))
    s = torch.nn.Parameter(torch.tensor(0.8, dtype=torch.float64))

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W, self.s = W, s

        def forward(self, z, x):
            return torch.tanh(self.s * (z @ self.W.T) + x)

    f = Field()
    x = (
        torch.complex(
            torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
        )
        * 0.5
    )
    loss_fn = lambda z: (z * z.conj()).real.sum() + (z**2).real.sum()
    est = Implicit(backward_tol=1e-14, **OPTS).grad(f, x, loss_fn)
    z = eqprop.fixed_point(f, x, backward="bptt", max_steps=400)
    gW, gs = torch.autograd.grad(loss_fn(z), [W, s])
    assert est.grads["s"].dtype == torch.float64 and est.grads["W"].dtype == torch.complex128
    # implicit (solves stopped at 1e-14) against BPTT through 400 steps (truncation L^400, negligible)
    # (the field contracts with L < 0.9 at these points)
    check(est.grads["W"], gW, _solve_tol(gW, 0.9) + tol(gW.dtype, n=400, scale=gW.abs().max()), "W")
    check(est.grads["s"], gs, _solve_tol(gs, 0.9) + tol(gs.dtype, n=400, scale=gs.abs().max()), "s")


def test_frozen_block_parameters_get_zero_gradients_and_no_grad():
    """The native block field lists every parameter, trainable or not; both estimators must cope."""
    torch.manual_seed(0)
    blk = eqprop.EquilibriumBlock(8, 2, dtype=torch.float64)
    blk.ln1_weight.requires_grad_(False)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    loss_fn = lambda z: z.square().mean()  # noqa: E731
    for est in (Implicit(tol=1e-12, max_steps=500), BPTT(40, tol=1e-12, max_steps=500)):
        out = est.grad(blk, x, loss_fn)
        assert torch.equal(out.grads["ln1_weight"], torch.zeros_like(blk.ln1_weight))
        assert out.grads["q_weight"].abs().sum() > 0
        out.apply_to(blk)
        assert blk.ln1_weight.grad is None and blk.q_weight.grad is not None
        blk.zero_grad(set_to_none=True)
