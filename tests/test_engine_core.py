"""The engine's plumbing: relaxation options defined once in C++, Ctrl-C inside the native loops,
picklable modules, the block's parameter table, clear errors for a missing injection."""

import copy
import io
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import traceback

import numpy as np
import pytest
import torch

import eqprop
from eqprop import _C
from eqprop.reference import block as ref


# ---- RelaxOptions: one class, defaults and checks in C++ ------------------------------------------


def test_relax_options_is_the_bound_class():
    assert eqprop.solvers.RelaxOptions is _C.RelaxOptions
    names = _C.RelaxOptions.fields()
    assert names[0] == "max_steps" and "on_nonconvergence" in names and len(set(names)) == len(names)
    o = eqprop.solvers.RelaxOptions()
    assert set(o.to_dict()) == set(names)
    assert o.on_nonconvergence == "warn" and o.cuda_graph is None


def test_relax_options_reach_the_engine():
    # tol = 0 is never met by a contraction started away from its fixed point within a few steps,
    # so the engine must run exactly max_steps steps, one host check per check_every group.
    f = lambda z, x: 0.5 * torch.tanh(z) + x  # noqa: E731
    x = torch.randn(3, 5, dtype=torch.float64)
    for max_steps, check_every in ((7, 1), (7, 3), (np.int64(4), 1)):
        _, info = eqprop.relax(f, x, max_steps=max_steps, tol=0.0, check_every=check_every)
        assert info.n_evals == int(max_steps)
        assert info.status_names == ["max_steps"] * 3
        assert info.trace_abs.shape == (int(max_steps), 3)
    # eps and stop reach the loop: one damped step from 0 is eps * F(0) = eps * x.
    z, info = eqprop.relax(f, x, max_steps=2, eps=0.25, stop="abs", tol=0.0, trace=False)
    assert info.trace_abs.shape == (0, 3)
    torch.testing.assert_close(
        info.abs_lowest,
        torch.linalg.vector_norm(0.5 * torch.tanh(0.25 * x) + 0.75 * x, dim=1).minimum(
            torch.linalg.vector_norm(x, dim=1)
        ),
        rtol=1e-12,
        atol=0,
    )


def test_relax_options_reject_bad_values_with_clear_errors():
    R = eqprop.solvers.RelaxOptions
    with pytest.raises(
        TypeError,
        match=r"fixed_point: unknown relaxation option\(s\) \['bogus', 'tolerance'\]; "
        r"valid options are \['max_steps', 'eps'",
    ):
        R.from_kwargs("fixed_point", {"tolerance": 1e-3, "bogus": 1})
    with pytest.raises(TypeError, match="unknown relaxation option"):
        R(tolerance=1.0)
    with pytest.raises(TypeError, match="max_steps must be an int, got float 2.5"):
        R(max_steps=2.5)
    with pytest.raises(TypeError, match="relax: max_steps must be an int, got float 2.5"):
        eqprop.relax(lambda z, x: z, torch.ones(1, 2), max_steps=2.5)
    with pytest.raises(TypeError, match="max_steps must be an int, got bool"):
        R(max_steps=True)
    with pytest.raises(TypeError, match="check_every must be an int, got float"):
        R(check_every=2.0)
    with pytest.raises(TypeError, match="tol must be a real number, got str"):
        R(tol="1e-3")
    with pytest.raises(TypeError, match="trace must be a bool"):
        R(trace=1)
    with pytest.raises(ValueError, match="max_steps must be >= 1, got 0"):
        R(max_steps=0)
    with pytest.raises(ValueError, match="eps .* must be finite and > 0, got nan"):
        R(eps=float("nan"))
    with pytest.raises(ValueError, match="solver must be one of 'picard', 'anderson', got 'newton'"):
        R(solver="newton")
    with pytest.raises(ValueError, match="on_nonconvergence must be one of 'warn', 'raise', 'ignore', got 'panic'"):
        R(on_nonconvergence="panic")
    o = R(tol=1e-6)
    with pytest.raises(ValueError, match="tol must be finite and >= 0, got -1"):
        o.tol = -1.0
    assert o.tol == 1e-6  # a rejected assignment leaves the options as they were
    o.max_steps = 9
    assert o.max_steps == 9


def test_relax_options_copy_replace_pickle():
    o = eqprop.solvers.RelaxOptions(
        max_steps=12, tol=1e-7, solver="anderson", cuda_graph=False, on_nonconvergence="raise"
    )
    for c in (copy.copy(o), copy.deepcopy(o), pickle.loads(pickle.dumps(o))):
        assert c == o and c.to_dict() == o.to_dict() and c is not o
    r = o.replace(max_steps=3)
    assert r.max_steps == 3 and o.max_steps == 12 and r != o
    assert r.to_dict() == {**o.to_dict(), "max_steps": 3}
    assert repr(o).startswith("RelaxOptions(max_steps=12, eps=1.0, tol=1e-07")


# ---- clear errors -----------------------------------------------------------------------------------

# ---- Ctrl-C inside the native loops ---------------------------------------------------------------


def _interrupt_after(seconds: float) -> tuple[threading.Timer, list]:
    sent = []
    main = threading.main_thread().ident

    def fire():
        sent.append(time.monotonic())
        signal.pthread_kill(main, signal.SIGINT)

    timer = threading.Timer(seconds, fire)
    timer.start()
    return timer, sent


def _slow_block_problem():
    torch.manual_seed(0)
    blk = eqprop.EquilibriumBlock(16, 2, dtype=torch.float64)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    # eps = 1e-4 damping: the residual shrinks by ~(1 - 1e-4) per step, so tol = 0 is not met for
    # millions of steps; without the interrupt hook the call would run for hours.
    return blk, x, dict(max_steps=10**9, tol=0.0, eps=1e-4)


def _check_interrupted(run, frame_file: str) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread")
    timer, sent = _interrupt_after(0.5)
    try:
        with pytest.raises(KeyboardInterrupt) as exc:
            run()
        caught = time.monotonic()
    finally:
        timer.cancel()
    assert sent, "the call ended before the interrupt was sent"
    assert caught - sent[0] < 1.0
    # Raised from inside the native loop, not from Python code around it.
    frames = traceback.extract_tb(exc.value.__traceback__)
    assert any(os.path.basename(f.filename) == frame_file for f in frames)


def test_ctrl_c_interrupts_relax_on_the_block():
    blk, x, opts = _slow_block_problem()
    _check_interrupted(lambda: eqprop.relax(blk, x, **opts), "solvers.py")
    _check_interrupted(lambda: eqprop.relax(blk, x, check_every=50, **opts), "solvers.py")
    # The block and the engine still work afterwards.
    z, info = eqprop.relax(blk, x, max_steps=40, tol=1e-10)
    assert info.status_names == ["converged"] * 2 and torch.isfinite(z).all()


def test_ctrl_c_interrupts_the_adjoint_solve():
    blk, x, opts = _slow_block_problem()
    x.requires_grad_(True)
    z = eqprop.fixed_point(
        blk, x, max_steps=3, eps=1e-4, backward_max_steps=10**9, backward_tol=0.0, on_nonconvergence="ignore"
    )
    loss = z.square().sum()
    _check_interrupted(lambda: loss.backward(), "solvers.py")


def test_ctrl_c_interrupts_the_diagnostics_loops():
    blk, x, _ = _slow_block_problem()
    z = torch.randn(2, 6, 16, dtype=torch.float64)
    long = 10**9  # iterations / probes: hours without the interrupt hook
    _check_interrupted(lambda: eqprop.diagnostics.spectral_radius(blk, x, z, iters=long), "diagnostics.py")
    _check_interrupted(lambda: eqprop.diagnostics.frobenius_sq(blk, x, z, probes=long), "diagnostics.py")
    _check_interrupted(lambda: eqprop.diagnostics.nonnormality(blk, x, z, probes=long), "diagnostics.py")


# ---- pickling: copy, save, AveragedModel, spawn ---------------------------------------------------


def _modules():
    torch.manual_seed(0)
    blk = eqprop.EquilibriumBlock(16, 2, spectral_rho=0.9, bias=True, ffn="monotone", dtype=torch.float64)
    lm = eqprop.EquilibriumLM(5, 16, 2, max_len=12, spectral_rho=1.0, dtype=torch.float64)
    z = torch.randn(2, 6, 16, dtype=torch.float64)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    tokens = torch.randint(0, 5, (2, 12))
    return blk, lm, (z, x), tokens


def _outputs(blk, lm, zx, tokens):
    blk.eval()
    lm.eval()
    with torch.no_grad():
        return blk(*zx), lm(tokens)


def _assert_same_module(a, b):
    assert type(a) is type(b) and a is not b
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_block_config_pickles():
    cfg = _C.BlockConfig(
        d_model=12,
        n_heads=3,
        d_ff=7,
        coupling="sequential",
        attention="energy",
        ffn="monotone",
        qk_norm=False,
        bias=True,
        rope=True,
        rope_base=500.0,
        spectral_rho=0.7,
        monotone_m=0.2,
        ln_eps=1e-6,
        qk_eps=1e-7,
        attn_kernel="math",
    )
    for c in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert c == cfg and repr(c) == repr(cfg) and c is not cfg
        assert (c.rope_base, c.spectral_rho, c.ln_eps, c.qk_eps, c.attn_kernel) == (500.0, 0.7, 1e-6, 1e-7, "math")
    assert cfg != _C.BlockConfig(d_model=12, n_heads=3, d_ff=7)


def test_modules_deepcopy_pickle_save_averaged_model():
    blk, lm, zx, tokens = _modules()
    want = _outputs(blk, lm, zx, tokens)

    buf = io.BytesIO()
    torch.save((blk, lm), buf)
    buf.seek(0)
    copies = {
        "deepcopy": (copy.deepcopy(blk), copy.deepcopy(lm)),
        "pickle": pickle.loads(pickle.dumps((blk, lm))),
        "torch.save": torch.load(buf, weights_only=False),
        "AveragedModel": (
            torch.optim.swa_utils.AveragedModel(blk).module,
            torch.optim.swa_utils.AveragedModel(lm).module,
        ),
    }
    for how, (b, m) in copies.items():
        _assert_same_module(b, blk)
        _assert_same_module(m, lm)
        assert b.config == blk.config, how
        got = _outputs(b, m, zx, tokens)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), how
    # A copy is independent: training the copy leaves the original alone.
    b = copies["deepcopy"][0]
    with torch.no_grad():
        b.q_weight.add_(1.0)
    assert torch.equal(_outputs(blk, lm, zx, tokens)[0], want[0])


def _forward_in_child(payload: bytes, n_threads: int):
    torch.set_num_threads(n_threads)
    blk, lm, zx, tokens = pickle.loads(payload)
    return _outputs(blk, lm, zx, tokens)


@pytest.mark.slow
def test_modules_cross_a_spawned_process():
    blk, lm, zx, tokens = _modules()
    want = _outputs(blk, lm, zx, tokens)
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        got = pool.apply(_forward_in_child, (pickle.dumps((blk, lm, zx, tokens)), torch.get_num_threads()))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---- the block's parameter table ------------------------------------------------------------------


def test_parameter_table_drives_names_and_init():
    table = {row["name"]: row for row in _C.block_param_table()}
    C, resinit = 64, 0.3
    torch.manual_seed(0)
    for kw in (dict(bias=True), dict(attention="energy", qk_norm=True), dict(ffn="monotone", bias=True)):
        blk = eqprop.EquilibriumBlock(C, 4, resinit=resinit, dtype=torch.float64, **kw)
        names = [n for n, _ in blk.named_parameters()]
        assert set(names) <= set(table) and names == [n for n in table if n in names]  # table order
        for n, p in blk.named_parameters():
            rule = table[n]["init"]
            if rule == "one":
                assert torch.equal(p, torch.ones_like(p)), n
            elif rule == "zero":
                assert torch.equal(p, torch.zeros_like(p)), n
            elif rule == "resinit":
                assert torch.equal(p, torch.full_like(p, resinit)), n
            else:
                # N(0, s²) over >= 4096 entries: the sample std is within 10% of s (> 9 standard errors).
                s = {"fan_in": 1 / p.shape[1] ** 0.5, "fan_in_resinit": resinit / p.shape[1] ** 0.5, "monotone": 1 / C}[
                    rule
                ]
                assert abs(float(p.detach().std()) / s - 1) < 0.1, (n, rule)
    # The output projections start small (resinit), the others at the fan-in scale.
    assert table["o_weight"]["init"] == table["ffn_out_weight"]["init"] == "fan_in_resinit"
    # Spectral normalization applies to exactly the reference's spectral weights.
    blk = eqprop.EquilibriumBlock(8, 2, spectral_rho=0.5, dtype=torch.float64)
    assert set(blk.sn_u_dict()) == {n for n, _ in blk.named_parameters() if n in ref._SPECTRAL}
