"""Contraction controller (docs/design.md §6): jr schedule, fuse, cprewarm, resume, penalty gradients, EMA."""

import logging

import pytest
import torch

import eqprop
from eqprop.control import ContractionController, FuseTrippedError

F64 = torch.float64


class TanhField(torch.nn.Module):
    """f(z, x) = tanh(z Wᵀ + x)."""

    def __init__(self, n=3, scale=0.5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(n, n, generator=g, dtype=F64) * scale)

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x)


def test_jr_trajectory_rise_cap_decay_floor():
    ctl = ContractionController(jacreg=0.01, jr_floor=0.005, jr_max=0.05, res_target=1e-3, rate=2.0)
    residuals = [0.1, 0.1, 0.1, 0.1, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4, 2e-3]
    # by hand: 0.01 -> .02 -> .04 -> .05 (cap) -> .05 hold -> .025 -> .0125 -> .00625 -> .005 (floor)
    #          -> .005 hold -> .01
    want_jr = [0.02, 0.04, 0.05, 0.05, 0.025, 0.0125, 0.00625, 0.005, 0.005, 0.01]
    want_act = ["rise", "rise", "rise", "hold", "decay", "decay", "decay", "decay", "hold", "rise"]
    ds = [ctl.step(r) for r in residuals]
    assert [d.jr for d in ds] == pytest.approx(want_jr, rel=1e-15, abs=0)
    assert [d.action for d in ds] == want_act
    assert [d.step for d in ds] == list(range(10))
    assert [h["jr"] for h in ctl.history] == [d.jr for d in ds]
    assert [h["residual"] for h in ctl.history] == residuals
    # residual exactly at target is not above it: decay
    assert ctl.step(1e-3).action == "decay"


def test_jr_frozen_when_floor_equals_max():
    ctl = ContractionController(jacreg=0.3, jr_floor=0.3, jr_max=0.3)
    assert ctl.frozen
    for r in (10.0, 1e-9, float("nan")):
        d = ctl.step(r)
        assert d.jr == 0.3 and d.action == "hold"
    # default: jr frozen at jacreg
    assert ContractionController(jacreg=0.2).frozen


def test_step_accepts_relax_info():
    info = eqprop.solvers.RelaxInfo(
        steps=torch.tensor([3, 4]),
        abs_lowest=torch.tensor([1.0, 1.0]),
        rel_lowest=torch.tensor([2e-3, 5e-2]),
        trace_abs=torch.zeros(1, 2),
        trace_rel=torch.zeros(1, 2),
        status=torch.zeros(2, dtype=torch.int8),
        n_evals=4,
    )
    ctl = ContractionController(jacreg=0.1, jr_floor=0.01, jr_max=1.0, rate=3.0)
    d = ctl.step(info, penalty_share=0.25)
    assert d.residual == pytest.approx(5e-2, rel=1e-7)  # batch max of rel_lowest (float32)
    assert d.jr == pytest.approx(0.3, rel=1e-15) and d.action == "rise"
    assert ctl.history[-1]["penalty_share"] == 0.25


def test_fuse_stops_and_refuses(caplog):
    ctl = ContractionController(jacreg=0.1, jr_floor=0.01, jr_max=1.0, fuse=0.5)
    with caplog.at_level(logging.DEBUG, logger="eqprop.control"):
        assert not ctl.step(0.4).stop
        d = ctl.step(0.6)
    assert d.stop and d.fuse_tripped and "fuse" in d.reason and d.action == "hold"
    assert d.jr == pytest.approx(0.2, rel=1e-15)  # unchanged by the tripping step
    assert any("STOP" in r.message for r in caplog.records)
    with pytest.raises(FuseTrippedError):
        ctl.step(1e-6)
    # non-finite residual trips too
    assert ContractionController(fuse=1.0).step(float("nan")).stop
    # the trip survives a resume
    ctl2 = ContractionController(jacreg=0.1, jr_floor=0.01, jr_max=1.0, fuse=0.5)
    ctl2.load_state_dict(ctl.state_dict())
    with pytest.raises(FuseTrippedError):
        ctl2.step(1e-6)


def test_cprewarm_task_enabled():
    ctl = ContractionController(cprewarm=3)
    assert [ctl.step(0.0).task_enabled for _ in range(5)] == [False, False, False, True, True]
    assert [ContractionController().step(0.0).task_enabled] == [True]


def _field_and_inputs():
    f = TanhField()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, generator=g, dtype=F64)
    z = torch.randn(2, 3, generator=g, dtype=F64)
    return f, x, z


def test_state_dict_round_trip_resumes_bit_exactly():
    f, x, z = _field_and_inputs()
    kw = dict(jacreg=0.05, jr_floor=0.01, jr_max=0.4, homeostasis=0.3, pema=0.9, probes=2, seed=7)
    residuals = [0.1, 0.1, 1e-5, 0.2, 1e-5, 1e-5, 0.3, 0.3, 1e-5, 0.1]
    ctl = ContractionController(**kw)
    jrs, pens, saved = [], [], None
    for i, r in enumerate(residuals):
        if i == 5:
            saved = ctl.state_dict()
        jrs.append(ctl.step(r).jr)
        pens.append(ctl.penalty(f, x, z).detach())
        ctl.update_ema(f)
    fresh = ContractionController(**kw)
    fresh.load_state_dict(saved)
    for i, r in enumerate(residuals[5:], start=5):
        assert fresh.step(r).jr == jrs[i]
        assert torch.equal(fresh.penalty(f, x, z).detach(), pens[i])
    assert fresh.history == ctl.history
    torch.testing.assert_close(fresh.ema_state_dict()["W"], ctl.ema_state_dict()["W"], rtol=0, atol=0)


def test_probes_change_per_step():
    f, x, z = _field_and_inputs()
    ctl = ContractionController(jacreg=0.1, seed=3)  # frozen jr
    ctl.step(0.0)
    p1 = ctl.penalty(f, x, z)
    ctl.step(0.0)
    p2 = ctl.penalty(f, x, z)
    assert ctl.jr == 0.1 and not torch.equal(p1, p2)
    # and equals the diagnostics call with the documented seed
    want = eqprop.diagnostics.jacobian_penalty(f, x, z, probes=1, seed=3 + 2, weight=0.1)
    assert torch.equal(p2, want)


def test_penalty_zero_when_weights_zero():
    f, x, z = _field_and_inputs()
    p = ContractionController().penalty(f, x, z)
    assert p.dim() == 0 and p.dtype == F64 and float(p) == 0.0
    (p + (f.W**2).sum()).backward()  # adding it to a loss is harmless
    assert torch.allclose(f.W.grad, 2 * f.W.detach())


def test_penalty_gradient_matches_finite_differences():
    f, x, z = _field_and_inputs()
    ctl = ContractionController(jacreg=0.7, homeostasis=0.4, probes=3, seed=11)
    ctl.step(0.0)
    p = ctl.penalty(f, x, z)
    assert p.dim() == 0
    (g,) = torch.autograd.grad(p, f.W)
    h = 1e-6
    fd = torch.zeros_like(g)
    with torch.no_grad():
        for i in range(3):
            for j in range(3):
                w0 = f.W[i, j].item()
                f.W[i, j] = w0 + h
                up = ctl.penalty(f, x, z).item()
                f.W[i, j] = w0 - h
                dn = ctl.penalty(f, x, z).item()
                f.W[i, j] = w0
                fd[i, j] = (up - dn) / (2 * h)
    # central differences: truncation O(h²·|p'''|) ~ 1e-12, rounding ~ eps·|p|/h ~ 1e-10
    assert g.abs().max() > 1e-3
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)


def test_ema_matches_hand_computation_and_swap_restores():
    f = TanhField()
    ctl = ContractionController(pema=0.75)
    w = []
    for k in range(4):
        with torch.no_grad():
            f.W.add_(0.1 * (k + 1))
        w.append(f.W.detach().clone())
        ctl.update_ema(f)
    want = w[0]
    for wk in w[1:]:
        want = 0.75 * want + 0.25 * wk
    ema = ctl.ema_state_dict()["W"]
    torch.testing.assert_close(ema, want, rtol=4e-15, atol=4e-15)
    before = f.W.detach().clone()
    with ctl.swap_in_ema(f) as m:
        assert m is f and torch.equal(f.W.detach(), ema)
    assert torch.equal(f.W.detach(), before)
    with pytest.raises(KeyError):
        with ctl.swap_in_ema(f):
            raise KeyError("boom")
    assert torch.equal(f.W.detach(), before)
    # resume carries the EMA
    ctl2 = ContractionController(pema=0.75)
    ctl2.load_state_dict(ctl.state_dict())
    assert torch.equal(ctl2.ema_state_dict()["W"], ema)
    with pytest.raises(ValueError, match="pema"):
        ContractionController().update_ema(f)


def test_apply_spectral_cap():
    blk = eqprop.EquilibriumBlock(8, 2, spectral_rho=1.0)
    ContractionController(spectral_rho=1.0).apply_spectral_cap(blk)
    ContractionController().apply_spectral_cap(blk)
    with pytest.raises(ValueError, match="spectral_rho"):
        ContractionController(spectral_rho=0.5).apply_spectral_cap(blk)
    with pytest.raises(ValueError, match="spectral_rho"):
        ContractionController(spectral_rho=1.0).apply_spectral_cap(eqprop.EquilibriumBlock(8, 2))
    with pytest.raises(TypeError, match="module"):
        ContractionController(spectral_rho=1.0).apply_spectral_cap(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(jacreg=-1.0), ValueError, "jacreg"),
        (dict(jacreg="a"), TypeError, "jacreg"),
        (dict(jacreg=0.1, jr_floor=0.2, jr_max=0.5), ValueError, "jacreg"),
        (dict(jr_floor=0.5, jr_max=0.1, jacreg=0.2), ValueError, "jr_floor"),
        (dict(jr_floor=0.0, jr_max=1.0), ValueError, "jr_floor"),
        (dict(jr_max=float("inf")), ValueError, "jr_max"),
        (dict(res_target=0.0), ValueError, "res_target"),
        (dict(rate=1.0), ValueError, "rate"),
        (dict(rate=True), TypeError, "rate"),
        (dict(homeostasis=-0.1), ValueError, "homeostasis"),
        (dict(spectral_rho=0.0), ValueError, "spectral_rho"),
        (dict(fuse=-1.0), ValueError, "fuse"),
        (dict(cprewarm=1.5), TypeError, "cprewarm"),
        (dict(cprewarm=-1), ValueError, "cprewarm"),
        (dict(pema=1.0), ValueError, "pema"),
        (dict(pema="x"), TypeError, "pema"),
        (dict(probes=0), ValueError, "probes"),
        (dict(seed=-2), ValueError, "seed"),
        (dict(seed=None), TypeError, "seed"),
    ],
)
def test_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        ContractionController(**kwargs)


def test_bad_step_arguments():
    ctl = ContractionController()
    with pytest.raises(TypeError, match="info"):
        ctl.step("big")
    with pytest.raises(TypeError, match="penalty_share"):
        ctl.step(0.1, penalty_share="x")
    with pytest.raises(TypeError, match="state"):
        ctl.load_state_dict([1])


def test_penalty_on_equilibrium_block_matches_diagnostics():
    torch.manual_seed(0)
    blk = eqprop.EquilibriumBlock(8, 2, dtype=F64).eval()
    x = torch.randn(2, 5, 8, dtype=F64)
    z = torch.randn(2, 5, 8, dtype=F64)
    ctl = ContractionController(jacreg=0.2, homeostasis=0.1, seed=5, probes=2)
    ctl.step(0.0)
    p = ctl.penalty(blk, x, z)
    want = eqprop.diagnostics.jacobian_penalty(
        blk, x, z, probes=2, seed=5, weight=0.2
    ) + eqprop.diagnostics.homeostatic_loss(blk, x, z, probes=2, seed=6, weight=0.1)
    torch.testing.assert_close(p, want, rtol=0, atol=0)
    p.backward()
    assert all(q.grad is not None for q in blk.param_list() if q.requires_grad)
    assert any(q.grad.abs().max() > 0 for q in blk.param_list())


def test_record_penalty_share_attaches_to_the_last_decision():
    ctl = ContractionController(jacreg=0.1)
    with pytest.raises(ValueError, match="step"):
        ctl.record_penalty_share(0.5)
    ctl.step(0.1)
    ctl.step(0.2, penalty_share=0.9)
    ctl.record_penalty_share(0.25)  # overrides what step() was given, for the last step only
    assert [h["penalty_share"] for h in ctl.history] == [None, 0.25]
    with pytest.raises(TypeError, match="share"):
        ctl.record_penalty_share("high")
    # the share survives a state_dict round trip
    other = ContractionController(jacreg=0.1)
    other.load_state_dict(ctl.state_dict())
    assert other.history == ctl.history
