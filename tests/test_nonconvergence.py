"""No silent non-convergence: relax / fixed_point / the estimators report samples that end above
their tolerance (forward relaxation and adjoint solve) through eqprop.NonConvergenceWarning, or
raise eqprop.NonConvergenceError, or stay silent when told to; plus the checks of options that
would otherwise be truncated or ignored (docs/design.md §4, §5)."""

import re
import warnings

import numpy as np
import pytest
import torch

import eqprop
from eqprop import estimators
from eqprop.solvers import min_rel_tol

from equilibrium_fields import Linear, Scaled, TanhLayer


def _scaled_rel_residual(s: float, k: int) -> float:
    """F(z) = s z + x from z_0 = 0 (undamped Picard): z_k = x (1 - s^k)/(1 - s), F(z_k) - z_k = s^k x,
    so the relative residual of z_k is s^k (1 - s) / (1 - s^(k+1)), for any x."""
    return s**k * (1 - s) / (1 - s ** (k + 1))


def _silently(fn):
    """Run fn with every warning turned into an error: a converged run must say nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def _one_warning(record, *patterns):
    ours = [w for w in record if issubclass(w.category, eqprop.NonConvergenceWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    msg = str(ours[0].message)
    for p in patterns:
        assert re.search(p, msg), (p, msg)
    return msg


# ---- forward relaxation ----------------------------------------------------------------------------


def test_relax_warns_once_with_the_count_and_the_worst_residual():
    # sample 0 (s = 0.2) converges within 5 steps; samples 1, 2 (s = 0.9, 0.8) cannot: residual s^k
    f = Scaled(torch.tensor([0.2, 0.9, 0.8], dtype=torch.float64))
    x = torch.randn(3, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        z, info = eqprop.relax(f, x, max_steps=5, tol=1e-2)
    assert info.status_names == ["converged", "max_steps", "max_steps"]
    assert info.nonconverged.tolist() == [False, True, True]
    # the lowest-residual iterate among z_0 .. z_4 is z_4; the worst sample is s = 0.9
    worst = _scaled_rel_residual(0.9, 4)
    torch.testing.assert_close(info.rel_lowest[1].item(), worst, rtol=1e-12, atol=0)
    _one_warning(
        rec,
        r"^relax: the forward relaxation did not converge for 2 of 3 samples \(2 at max_steps\)",
        re.escape(f"worst rel residual {worst:.2e} > tol 0.01"),
    )


def test_relax_reports_divergence_and_tol_zero_reports_only_divergence():
    x = torch.ones(2, 3, dtype=torch.float64)
    f = Scaled(torch.tensor([0.5, 1.5], dtype=torch.float64))  # |s| > 1: the second sample blows up
    with pytest.warns(eqprop.NonConvergenceWarning, match=r"for 1 of 2 samples \(1 diverged\)"):
        _, info = eqprop.relax(f, x, max_steps=200, tol=1e-10)
    assert info.status_names == ["converged", "diverged"]
    with pytest.warns(eqprop.NonConvergenceWarning, match=r"for 1 of 2 samples \(1 diverged\)"):
        eqprop.relax(f, x, max_steps=200, tol=0.0)
    # tol = 0 asks for exactly max_steps steps: ending there is what was asked, not a failure
    _, info = _silently(
        lambda: eqprop.relax(Scaled(torch.tensor([0.5, 0.9], dtype=torch.float64)), x, max_steps=7, tol=0.0)
    )
    assert info.status_names == ["max_steps", "max_steps"] and info.n_evals == 7


def test_raise_and_ignore():
    f = Scaled(torch.tensor([0.2, 0.9], dtype=torch.float64))
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(eqprop.NonConvergenceError, match="for 1 of 2 samples") as err:
        eqprop.relax(f, x, max_steps=5, tol=1e-2, on_nonconvergence="raise")
    assert not isinstance(err.value, (ValueError, TypeError)) and isinstance(err.value, ArithmeticError)
    assert err.value.info.status_names == ["converged", "max_steps"]
    _, info = _silently(lambda: eqprop.relax(f, x, max_steps=5, tol=1e-2, on_nonconvergence="ignore"))
    assert info.status_names == ["converged", "max_steps"]
    with warnings.catch_warnings():  # NonConvergenceWarning alone can be made an error
        warnings.simplefilter("error", eqprop.NonConvergenceWarning)
        with pytest.raises(eqprop.NonConvergenceWarning):
            eqprop.relax(f, x, max_steps=5, tol=1e-2)


def test_converged_runs_are_silent():
    layer = TanhLayer(6)
    x = torch.randn(3, 6, dtype=torch.float64)
    loss_fn = lambda z: z.square().sum()  # noqa: E731

    def run():
        eqprop.relax(layer, x, tol=1e-10, max_steps=200)
        z = eqprop.fixed_point(layer, x, tol=1e-10, max_steps=200)
        z.square().sum().backward()
        eqprop.fixed_point(layer, x, backward="bptt", bptt_horizon=5, tol=1e-10, max_steps=200).sum().backward()
        eqprop.fixed_point(layer, x, backward="bptt", tol=1e-10, max_steps=200).sum().backward()
        est = estimators.Implicit(tol=1e-10, max_steps=200).grad(layer, x, loss_fn)
        estimators.BPTT(5, tol=1e-10, max_steps=200).grad(layer, x, loss_fn)
        return est

    est = _silently(run)
    assert not bool(est.stats["backward"]["nonconverged"].any())
    assert not bool(est.stats["forward"].nonconverged.any())


# ---- fixed_point: forward and adjoint --------------------------------------------------------------


def test_fixed_point_forward_nonconvergence_warns_and_raises():
    f = Scaled(torch.tensor([0.2, 0.9], dtype=torch.float64))
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.warns(
        eqprop.NonConvergenceWarning,
        match=r"^fixed_point: the forward relaxation did not converge "
        r"for 1 of 2 samples",
    ):
        eqprop.fixed_point(f, x, max_steps=5, tol=1e-2)
    with pytest.raises(eqprop.NonConvergenceError, match="forward relaxation"):
        eqprop.fixed_point(f, x, max_steps=5, tol=1e-2, on_nonconvergence="raise")
    _silently(lambda: eqprop.fixed_point(f, x, max_steps=5, tol=1e-2, on_nonconvergence="ignore"))
    # plain BPTT keeps no stats: the residual of its last iterate is judged (s^4 (1-s)/(1-s^5) for z_5 ...)
    with pytest.warns(eqprop.NonConvergenceWarning, match="unrolled relaxation did not converge for 1 of 2"):
        eqprop.fixed_point(f, x, backward="bptt", max_steps=5, tol=1e-2)


def _adjoint_case():
    """J = A with ρ(A) = 0.9: the forward converges in 300 steps, the adjoint cannot in 3."""
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.tensor([0.9, 0.5, 0.1, -0.3, -0.6], dtype=torch.float64)) @ Q.T
    x = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, generator=g, dtype=torch.float64)
    return Linear(A), x, w


def test_fixed_point_adjoint_nonconvergence_warns_once_in_backward():
    layer, x, w = _adjoint_case()
    z, info = _silently(
        lambda: eqprop.fixed_point(layer, x, tol=1e-12, max_steps=400, backward_max_steps=3, return_info=True)
    )
    assert info.status_names == ["converged", "converged"]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        (z * w).sum().backward()
    worst = float(info.backward["residual"].max())
    assert worst > 1e-12 and info.backward["status"].tolist() == [1, 1]
    assert info.backward["nonconverged"].tolist() == [True, True]
    _one_warning(
        rec,
        r"^fixed_point \(implicit backward\): the adjoint solve did not converge for 2 of 2 samples",
        re.escape(f"worst rel residual {worst:.2e} > tol 1e-12"),
    )
    # the repro from the report: a 3-step forward and a 3-step adjoint on the block
    torch.manual_seed(0)
    blk = eqprop.EquilibriumBlock(8, 2, dtype=torch.float64).eval()
    xb = torch.randn(2, 5, 8, dtype=torch.float64)
    with pytest.warns(eqprop.NonConvergenceWarning, match="forward relaxation"):
        zb = eqprop.fixed_point(blk, xb, max_steps=3)
    with pytest.warns(eqprop.NonConvergenceWarning, match="adjoint solve"):
        zb.square().sum().backward()


def test_fixed_point_adjoint_raise_leaves_through_backward():
    layer, x, w = _adjoint_case()
    z = eqprop.fixed_point(layer, x, tol=1e-12, max_steps=400, backward_max_steps=3, on_nonconvergence="raise")
    with pytest.raises(eqprop.NonConvergenceError, match="adjoint solve did not converge for 2 of 2"):
        (z * w).sum().backward()
    z, info = eqprop.fixed_point(
        layer, x, tol=1e-12, max_steps=400, backward_max_steps=3, on_nonconvergence="ignore", return_info=True
    )
    _silently(lambda: (z * w).sum().backward())
    assert info.backward["nonconverged"].tolist() == [True, True]  # still recorded


# ---- estimators ----------------------------------------------------------------------------------


def test_implicit_reports_both_phases_in_one_warning():
    layer, x, w = _adjoint_case()
    x = x.detach()
    loss_fn = lambda z: (z * w).sum()  # noqa: E731
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        est = estimators.Implicit(tol=1e-12, max_steps=400, backward_max_steps=3).grad(layer, x, loss_fn)
    worst = float(est.stats["backward"]["residual"].max())
    _one_warning(
        rec, r"^Implicit.grad: the adjoint solve did not converge for 2 of 2 samples", re.escape(f"{worst:.2e}")
    )
    assert "forward" not in str(rec[0].message).split(";")[0]
    assert est.stats["backward"]["nonconverged"].tolist() == [True, True]
    assert est.stats["forward"].backward["nonconverged"].tolist() == [True, True]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        estimators.Implicit(tol=1e-12, max_steps=3).grad(layer, x, loss_fn)  # both phases: 3 steps each
    _one_warning(rec, "forward relaxation did not converge for 2 of 2", "adjoint solve did not converge for 2 of 2")
    with pytest.raises(eqprop.NonConvergenceError, match="Implicit.grad: the adjoint solve"):
        estimators.Implicit(tol=1e-12, max_steps=400, backward_max_steps=3, on_nonconvergence="raise").grad(
            layer, x, loss_fn
        )
    est = _silently(
        lambda: estimators.Implicit(tol=1e-12, max_steps=3, on_nonconvergence="ignore").grad(layer, x, loss_fn)
    )
    assert est.stats["forward"].nonconverged.tolist() == [True, True]


def test_bptt_estimator_reports_the_forward_relaxation():
    f_layer, x, w = _adjoint_case()
    x = x.detach()
    loss_fn = lambda z: (z * w).sum()  # noqa: E731
    with pytest.warns(
        eqprop.NonConvergenceWarning,
        match=r"^BPTT.grad: the forward relaxation did not converge "
        r"for 2 of 2 samples",
    ):
        est = estimators.BPTT(4, tol=1e-12, max_steps=3).grad(f_layer, x, loss_fn)
    assert est.stats["forward"].nonconverged.tolist() == [True, True]
    with pytest.raises(eqprop.NonConvergenceError):
        estimators.BPTT(4, tol=1e-12, max_steps=3, on_nonconvergence="raise").grad(f_layer, x, loss_fn)
    _silently(lambda: estimators.BPTT(4, tol=1e-12, max_steps=3, on_nonconvergence="ignore").grad(f_layer, x, loss_fn))


def test_lm_forwards_the_option():
    lm = eqprop.EquilibriumLM(2, 8, 2, max_len=10, dtype=torch.float64, fixed_point=dict(max_steps=2, tol=1e-12))
    tokens = torch.randint(0, 2, (2, 10))
    with pytest.warns(eqprop.NonConvergenceWarning, match="forward relaxation"):
        lm(tokens)
    lm.fixed_point_options["on_nonconvergence"] = "ignore"
    _silently(lambda: lm(tokens))
    assert bool(lm.last_info.nonconverged.all())


# ---- tolerances the dtype cannot resolve ---------------------------------------------------------


def test_min_rel_tol_is_the_dtype_eps():
    assert min_rel_tol(torch.bfloat16) == 2.0**-7 and min_rel_tol(torch.float16) == 2.0**-10
    assert min_rel_tol(torch.float32) == 2.0**-23 and min_rel_tol(torch.complex64) == 2.0**-23
    assert min_rel_tol(torch.float64) == 2.0**-52
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        min_rel_tol(torch.int64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_default_tol_warns_up_front(dtype):
    torch.manual_seed(0)
    blk = eqprop.EquilibriumBlock(32, 2, resinit=0.5, dtype=dtype).eval()
    x = torch.randn(4, 16, 32).to(dtype)
    eps = min_rel_tol(dtype)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _, info = eqprop.relax(blk, x, max_steps=40)  # the default tol = 1e-4
    msgs = [str(w.message) for w in rec if issubclass(w.category, eqprop.NonConvergenceWarning)]
    assert len(msgs) == 2, msgs  # up front, then the outcome
    assert re.search(rf"^relax: tol=0.0001 is below what {dtype} resolves .* use tol >= {2 * eps:.1e}", msgs[0])
    assert msgs[1].startswith("relax: the forward relaxation did not converge for 4 of 4 samples")
    # ... and it is right: F(z) - z is rounding noise of ~eps/10 .. eps/2 relative to F, far above 1e-4
    assert info.status_names == ["max_steps"] * 4
    assert float(info.rel_lowest.min()) > 1e-4
    # the tolerance it recommends is met, silently, in a few steps
    _, info = _silently(lambda: eqprop.relax(blk, x, max_steps=40, tol=2 * eps))
    assert info.status_names == ["converged"] * 4 and int(info.steps.max()) < 30
    # the adjoint tolerance (the forward's by default) is checked by fixed_point and Implicit too
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        eqprop.fixed_point(blk, x, tol=2 * eps, backward_tol=1e-6)
    assert re.search(r"^fixed_point: backward_tol=1e-06 is below", str(rec[0].message))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        estimators.Implicit(max_steps=3).grad(blk, x, lambda z: z.float().square().sum())
    assert re.search(r"^Implicit.grad: tol=0.0001 and backward_tol=0.0001 is below", str(rec[0].message))
    _silently(lambda: eqprop.relax(blk, x, max_steps=3, on_nonconvergence="ignore"))


def _messages(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in rec if issubclass(w.category, eqprop.NonConvergenceWarning)]


def test_float64_and_float32_tolerances_are_checked_too():
    layer = TanhLayer(6)
    x = torch.randn(2, 6, dtype=torch.float64)
    _silently(lambda: eqprop.relax(layer, x, tol=1e-13, max_steps=400))
    msgs = _messages(lambda: eqprop.relax(layer, x, tol=1e-17, max_steps=5))
    assert msgs[0].startswith("relax: tol=1e-17 is below what torch.float64 resolves") and len(msgs) == 2
    msgs = _messages(lambda: eqprop.relax(TanhLayer(6, dtype=torch.float32), x.float(), tol=1e-8, max_steps=5))
    assert msgs[0].startswith("relax: tol=1e-08 is below what torch.float32 resolves")
    # stop="abs": the floor depends on |z*|, unknown before relaxing; no up-front warning
    msgs = _messages(lambda: eqprop.relax(layer, x, tol=1e-17, stop="abs", max_steps=5))
    assert len(msgs) == 1 and "resolves" not in msgs[0]


# ---- option checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["max_steps", "anderson_m", "check_every"])
def test_non_integer_int_options_are_rejected(name):
    layer = TanhLayer(4)
    x = torch.randn(2, 4, dtype=torch.float64)
    pat = rf"{name} must be an int, got float 2.5"
    with pytest.raises(TypeError, match=pat):
        eqprop.relax(layer, x, **{name: 2.5})
    with pytest.raises(TypeError, match=pat):
        eqprop.fixed_point(layer, x, **{name: 2.5})
    with pytest.raises(TypeError, match=pat):
        estimators.Implicit(**{name: 2.5})
    with pytest.raises(TypeError, match=pat):
        estimators.BPTT(3, **{name: 2.5})
    with pytest.raises(TypeError, match=rf"{name} must be an int, got bool True"):
        eqprop.relax(layer, x, **{name: True})


def test_other_int_options_are_rejected_and_integer_scalars_accepted():
    layer = TanhLayer(4)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="backward_max_steps must be an int, got float 2.5"):
        eqprop.fixed_point(layer, x, backward_max_steps=2.5)
    with pytest.raises(TypeError, match="backward_anderson_m must be an int, got float 2.0"):
        estimators.Implicit(backward_anderson_m=2.0)
    with pytest.raises(TypeError, match="bptt_horizon must be an int, got float 2.5"):
        eqprop.fixed_point(layer, x, backward="bptt", bptt_horizon=2.5)
    with pytest.raises(TypeError, match="horizon must be an int, got float 2.5"):
        estimators.BPTT(2.5)
    # a numpy / torch integer is an int: same result as the Python int
    kw = dict(tol=0.0, on_nonconvergence="ignore")
    z_np, i_np = eqprop.relax(layer, x, max_steps=np.int64(7), **kw)
    z_py, i_py = eqprop.relax(layer, x, max_steps=7, **kw)
    assert torch.equal(z_np, z_py) and i_np.n_evals == i_py.n_evals == 7
    assert eqprop.relax(layer, x, max_steps=torch.tensor(7), **kw)[1].n_evals == 7


def test_on_nonconvergence_values_are_checked():
    layer = TanhLayer(4)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"on_nonconvergence must be one of 'warn', 'raise', 'ignore', got 'loud'"):
        eqprop.relax(layer, x, on_nonconvergence="loud")
    with pytest.raises(TypeError, match=r"on_nonconvergence must be a str, got NoneType None"):
        eqprop.fixed_point(layer, x, on_nonconvergence=None)
    with pytest.raises(ValueError, match="on_nonconvergence must be one of"):
        estimators.Implicit(on_nonconvergence="error")


def test_x_none_with_a_block_is_a_clear_error():
    blk = eqprop.EquilibriumBlock(8, 2, dtype=torch.float64)
    for call in (
        lambda: eqprop.relax(blk, None),
        lambda: eqprop.fixed_point(blk, None),
        lambda: estimators.Implicit().grad(blk, None, lambda z: z.sum()),
        lambda: eqprop.relax(TanhLayer(4), None),
    ):
        with pytest.raises(
            ValueError,
            match=r"x must be a tensor \(the injection, \[B, \.\.\.\]\) when f is a "
            r"(EquilibriumBlock|TanhLayer), got None",
        ):
            call()


# ---- hooks -------------------------------------------------------------------------------------------


def test_forward_hooks_fire_on_the_block_call_not_inside_relax():
    """What the block's docstring says: the native loop bypasses forward; the trace and a call on z*
    are the ways in."""
    torch.manual_seed(0)
    blk = eqprop.EquilibriumBlock(8, 2, dtype=torch.float64, spectral_rho=0.9).eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    seen = []
    handle = blk.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    z, info = eqprop.relax(blk, x, tol=1e-10, max_steps=200)
    assert seen == [] and info.trace_rel.shape == (info.n_evals, 2)
    Fz = blk(z, x)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], blk.vector_field(x).eval(z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Fz, z, rtol=0, atol=1e-8)  # z* = F(z*) to the relaxation's tolerance
    handle.remove()
