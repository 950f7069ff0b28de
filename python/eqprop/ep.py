"""Equilibrium Propagation estimators (docs/design.md §5): one-sided, symmetric, holomorphic and
asymmetric (frozen / tracking corrected) EP on the C++ engine.

After the free phase z* = F(z*; x), every nudging point β_k relaxes

    dz/dt = F(z) − z − β_k ∂ℓ/∂z(z) + c(z)          from z*, T2 damped Euler steps

as one batched relaxation in C++ (the points stacked on the batch axis), and the field gradient is

    ĝ = (∂F/∂θ)ᵀ v,   v = −Re[(1/N) Σ_k (z_{β_k} − z*) / β_k]        (one parameter VJP at z*)

n_points N = 1: one-sided (β), bias O(β); N = 2: symmetric (±β), bias O(β²); N ≥ 3: holomorphic,
β_k = β e^{2πik/N}, error O(β^N), run in complex arithmetic (only the points with Im β_k ≥ 0 relax:
for a real field and loss z_{β̄} = conj z_β). Uncorrected, these converge as β → 0 to
(∂F/∂θ)ᵀ(I − J)⁻¹∂ℓ/∂z*, which is the gradient only when J is symmetric; the corrections
c(z) = −2A(z̄)(z − z̄), A = ½(J − Jᵀ) give the nudged dynamics the Jacobian Jᵀ, so the estimate
converges to the true gradient (∂F/∂θ)ᵀ(I − Jᵀ)⁻¹∂ℓ/∂z*.

``loss_fn`` is any callable ``loss_fn(z) -> scalar`` (through a Python callback at every nudged step)
or a :class:`CrossEntropyReadout` (final LayerNorm → linear head → cross-entropy), whose ∂ℓ/∂z runs
natively in C++. For n_points ≥ 3 a Python ``loss_fn`` and a Python field ``f(z, x)`` are evaluated
at complex z and must be holomorphic extensions (no ``abs``, ``conj``, ``.real``; cast real weights
to ``z.dtype``); EP checks this once per estimate and names the callable that fails.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import _C
from .estimators import Estimate, _field_params, _loss_and_cotangent
from .solvers import RelaxInfo, RelaxOptions, _initial_state, _relax, as_field

__all__ = ["EP", "CrossEntropyReadout"]

log = logging.getLogger(__name__)


# ---- the standard readout ---------------------------------------------------------------------------


class CrossEntropyReadout(nn.Module):
    """ℓ(z) = mean cross-entropy of ``head(ln(z))`` against ``targets`` (positions equal to
    ``ignore_index`` have no target), the readout of ``EquilibriumLM``; EP computes its ∂ℓ/∂z in C++.

    Args:
        ln: the final ``nn.LayerNorm(C)``; head: ``nn.Linear(C, V)``; both used as they are (shared
            parameters: their gradients come back under ``"readout.ln.*"`` / ``"readout.head.*"``).
        targets: [B, T] int64 class indices in [0, V) or ``ignore_index``.

    ``readout(z)``: z [B, T, C] -> scalar (nats). For complex z it evaluates the holomorphic
    extension (LayerNorm as x·(mean(x²) − mean(x)² + ε)^(−1/2), softmax without conj / abs), the map
    holomorphic EP differentiates.

    Example: ``ro = CrossEntropyReadout.for_lm(lm, tokens); EP(0.1).grad(lm.block, lm.inject(tokens), ro)``
    """

    def __init__(self, ln: nn.LayerNorm, head: nn.Linear, targets: Tensor, *, ignore_index: int = -100):
        super().__init__()
        if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1:
            raise TypeError(f"ln must be an nn.LayerNorm over the last dimension, got {ln!r}")
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
        if head.in_features != ln.normalized_shape[0]:
            raise ValueError(
                f"head.in_features ({head.in_features}) must equal the LayerNorm width ({ln.normalized_shape[0]})"
            )
        if not isinstance(targets, Tensor) or targets.dim() != 2 or targets.dtype != torch.long:
            got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(f"targets must be an int64 tensor [B, T], got {got}")
        self.ln, self.head = ln, head
        self.register_buffer("targets", targets, persistent=False)
        self.ignore_index = int(ignore_index)

    @classmethod
    def for_lm(cls, lm: nn.Module, tokens: Tensor) -> "CrossEntropyReadout":
        """The readout of ``lm.loss(tokens)``: position t predicts token t + 1; the last position has none.

        Example: ``ro = CrossEntropyReadout.for_lm(lm, tokens)``; then ``ro(z*)`` equals ``lm.loss(tokens)``.
        """
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError("tokens must be an int64 tensor [B, L] with L >= 2")
        targets = torch.full_like(tokens, -100)
        targets[:, :-1] = tokens[:, 1:]
        return cls(lm.ln_f, lm.head, targets, ignore_index=-100)

    def forward(self, z: Tensor) -> Tensor:
        """ℓ(z): z [B, T, C] (real or complex) -> scalar mean cross-entropy (nats)."""
        if not z.is_complex():
            logits = self.head(self.ln(z))  # [B, T, V]
            return nn.functional.cross_entropy(
                logits.flatten(0, 1), self.targets.flatten(), ignore_index=self.ignore_index
            )
        cast = lambda t: None if t is None else t.to(z.dtype)  # noqa: E731
        zc = z - z.mean(-1, keepdim=True)
        h = zc * torch.rsqrt((zc * zc).mean(-1, keepdim=True) + self.ln.eps)
        if self.ln.weight is not None:
            h = h * cast(self.ln.weight)
        if self.ln.bias is not None:
            h = h + cast(self.ln.bias)
        logits = nn.functional.linear(h, cast(self.head.weight), cast(self.head.bias))
        m = logits.real.amax(-1, keepdim=True).detach()
        lse = torch.log(torch.exp(logits - m).sum(-1)) + m.squeeze(-1)  # [B, T]
        valid = self.targets != self.ignore_index
        picked = logits.gather(-1, torch.where(valid, self.targets, 0)[..., None]).squeeze(-1)
        return torch.where(valid, lse - picked, 0).sum() / valid.sum()

    def native(self) -> "_C.CrossEntropyReadout":
        """The C++ readout with the current (detached) parameters: ``.grad(z)`` is ∂ℓ/∂z, ``.loss(z)``."""
        C = self.ln.normalized_shape[0]
        w = (
            self.ln.weight.detach()
            if self.ln.weight is not None
            else torch.ones(C, dtype=self.head.weight.dtype, device=self.head.weight.device)
        )
        b = self.ln.bias.detach() if self.ln.bias is not None else None
        hb = self.head.bias.detach() if self.head.bias is not None else None
        return _C.CrossEntropyReadout(
            w, b, self.head.weight.detach(), hb, self.targets, self.ignore_index, float(self.ln.eps)
        )


# ---- helpers -------------------------------------------------------------------------------------------


def _loss_grad_callback(loss_fn: Callable, points: int, complex_: bool) -> Callable[[Tensor], Tensor]:
    """∂ℓ/∂z of a Python loss at stacked states [P·B, ...]: ℓ of each block of B rows, one backward;
    plain transpose (the conjugate of autograd's cotangent for holomorphic ℓ)."""

    def grad(z: Tensor) -> Tensor:
        try:
            with torch.enable_grad():
                zr = z.detach().requires_grad_(True)
                total = None
                for block in zr.chunk(points):
                    loss = loss_fn(block)
                    if not isinstance(loss, Tensor) or loss.numel() != 1:
                        raise ValueError("loss_fn(z) must return a scalar tensor")
                    if complex_ and not loss.is_complex():
                        raise TypeError(
                            f"loss_fn returned a real {loss.dtype} loss for complex z; holomorphic EP "
                            "needs its holomorphic extension (complex in, complex out)"
                        )
                    total = loss if total is None else total + loss
                (g,) = torch.autograd.grad(
                    total.reshape(()),
                    zr,
                    grad_outputs=torch.ones((), dtype=total.dtype, device=total.device),
                    allow_unused=True,
                )
        except (RuntimeError, TypeError) as err:
            if not complex_:
                raise
            raise TypeError(
                f"loss_fn failed on complex input: holomorphic EP (n_points >= 3) evaluates it at "
                f"complex z and needs its holomorphic extension ({type(err).__name__}: {err})"
            ) from err
        if g is None:
            g = torch.zeros_like(zr)
        return g.conj().resolve_conj() if g.is_complex() else g

    return grad


def _check_holomorphic(fn: Callable[[Tensor], Tensor], z: Tensor, what: str) -> None:
    """Cauchy–Riemann at z along a fixed real direction v: for holomorphic fn,
    fn(z + ihv) − fn(z − ihv) = i (fn(z + hv) − fn(z − hv)) + O(h³). abs, conj, .real break it at O(h)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(z.shape, generator=g, dtype=z.real.dtype).to(z.device)
    double = z.dtype == torch.complex128
    h = (1e-4 if double else 1e-2) * (1.0 + float(z.abs().max()))
    try:
        with torch.no_grad():
            outs = [fn(z + s * h * v) for s in (1, -1, 1j, -1j)]
    except Exception as err:  # noqa: BLE001 - reported with the callable's name, original chained
        raise TypeError(
            f"{what} failed on complex input: holomorphic EP (n_points >= 3) evaluates it at complex "
            f"states and needs its holomorphic extension (cast real weights to z.dtype; no abs, conj, "
            f".real) ({type(err).__name__}: {err})"
        ) from err
    for o in outs:
        if not isinstance(o, Tensor) or not o.is_complex():
            got = o.dtype if isinstance(o, Tensor) else type(o).__name__
            raise TypeError(
                f"{what} returned {got} for complex input: holomorphic EP needs its holomorphic "
                "extension (complex in, complex out; no abs, .real or .imag)"
            )
    a, b = outs[0] - outs[1], outs[2] - outs[3]
    scale = float(a.abs().max())
    mismatch = float((b - 1j * a).abs().max())
    if scale > 0 and mismatch > (1e-5 if double else 1e-2) * scale:
        raise TypeError(
            f"{what} is not holomorphic (the Cauchy–Riemann check fails: relative mismatch "
            f"{mismatch / scale:.2g}); holomorphic EP needs its holomorphic extension: no abs, conj, "
            ".real/.imag, or functions of |z|"
        )


def _t2_list(t2: Union[int, Sequence[int]]) -> list[int]:
    if isinstance(t2, bool):
        raise TypeError(f"t2 must be an int >= 1 or a non-empty list of them, got {t2!r}")
    if isinstance(t2, numbers.Integral):
        t2 = [int(t2)]
    elif isinstance(t2, (list, tuple)):
        if not t2:
            raise ValueError("t2 must be an int >= 1 or a non-empty list of them, got an empty list")
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in t2):
            raise TypeError(f"t2 must hold ints, got {t2!r}")
    else:
        raise TypeError(f"t2 must be an int >= 1 or a non-empty list of them, got {type(t2).__name__}")
    if min(t2) < 1:
        raise ValueError(f"t2 must hold step counts >= 1, got {list(t2)}")
    return sorted(set(int(t) for t in t2))


def _stacked_field(f: Any, fld, points: int, batch: int, complex_: bool):
    """The field for P = points copies of the batch on the batch axis (x repeated, complex if asked):
    a Python f(z, x) is rebuilt on the stacked x, the native block is rebuilt in C++, any other
    VectorField is evaluated block by block."""
    if isinstance(fld, _C.ModuleField) and not isinstance(f, _C.VectorField) and not hasattr(f, "vector_field"):
        xs = fld.x.detach().repeat(points, *([1] * (fld.x.dim() - 1)))
        if complex_ and not xs.is_complex():
            xs = xs.to(torch.complex128 if xs.dtype == torch.float64 else torch.complex64)
        return as_field(f, xs)
    return _C.ep_stack_points(fld, points, batch, complex_)


# ---- the estimator -------------------------------------------------------------------------------------

_CORRECTIONS = (None, "frozen", "tracking")


class EP:
    """Equilibrium Propagation: ``EP(beta, *, n_points=2, correction=None, t2=40, gate=None,
    **relax_options).grad(f, x, loss_fn) -> Estimate`` (docs/design.md §5).

    Args:
        beta: nudging strength β > 0 (the radius r of the points for n_points >= 3).
        n_points: 1 one-sided, 2 symmetric (real arithmetic), N >= 3 holomorphic (complex arithmetic).
        correction: None (plain EP: converges to (∂F/∂θ)ᵀ(I − J)⁻¹∂ℓ/∂z, biased when J is not
            symmetric), ``"frozen"`` (asymmetric EP linearized at z*) or ``"tracking"`` (re-linearized
            at the common mode of the nudged states; n_points >= 2): both converge to the gradient.
        t2: nudged steps, or a list of step counts: the estimate is formed at the snapshot (among
            them) with the lowest residual drop ‖r_T2‖/‖r_0‖ (max over points and samples).
        gate: skip the nudge (zero field gradients, ``stats["skipped"] = True``) when the free
            phase's residual (by ``stop``, batch max) exceeds ``gate``.
        conjugate_shortcut: for n_points >= 3 relax only the points with Im β >= 0 (exact for real
            fields and losses); False relaxes all N (a check, or an ablation).
        relax_options: ``eqprop.relax`` options of the free phase. The nudged phase takes ``eps``,
            ``tol`` (a nudged row is converged once its residual is ``tol`` × its first one; when every
            row is, the phase stops), ``divergence``, ``trace`` and ``check_every``; it always runs
            damped Picard steps.

    Averaging over several batches (``navg``) is gradient accumulation in the trainer, not an option
    here. Stats: ``forward`` (free-phase :class:`RelaxInfo`), ``nudged`` (one RelaxInfo per relaxed
    point, at the chosen T2), ``t2`` (chosen), ``t2_residual`` {T2: drop}, ``skipped``, ``beta_points``
    (the relaxed β_k), ``n_points``, ``correction``, ``n_evals`` (batched nudged steps), ``cotangent``
    (v with ĝ = (∂F/∂θ)ᵀ v; absent when the nudge was skipped).

    Example: ``est = EP(0.05, n_points=4, correction="tracking").grad(block, x, readout); est.apply_to(block)``
    """

    def __init__(
        self,
        beta: float,
        *,
        n_points: int = 2,
        correction: Optional[str] = None,
        t2: Union[int, Sequence[int]] = 40,
        gate: Optional[float] = None,
        conjugate_shortcut: bool = True,
        **relax_options,
    ):
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
            kind = (
                "complex (the complex points come from n_points >= 3)"
                if isinstance(beta, complex)
                else type(beta).__name__
            )
            raise TypeError(f"beta must be a real number > 0 (the radius r for n_points >= 3), got {kind}")
        if not (math.isfinite(float(beta)) and float(beta) > 0):
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
        if isinstance(n_points, bool) or not isinstance(n_points, numbers.Integral) or n_points < 1:
            raise ValueError(f"n_points must be an int >= 1, got {n_points!r}")
        if correction not in _CORRECTIONS:
            raise ValueError(f"correction must be one of None, 'frozen', 'tracking', got {correction!r}")
        if correction == "tracking" and n_points < 2:
            raise ValueError(
                "correction='tracking' needs n_points >= 2 (the common mode of one nudged state is "
                "the state itself); use correction='frozen' for one-sided EP"
            )
        if gate is not None and (isinstance(gate, bool) or not isinstance(gate, numbers.Real) or not gate > 0):
            raise ValueError(f"gate must be None or a number > 0, got {gate!r}")
        if not isinstance(conjugate_shortcut, bool):
            raise TypeError(f"conjugate_shortcut must be a bool, got {type(conjugate_shortcut).__name__}")
        self.beta = float(beta)
        self.n_points = int(n_points)
        self.correction = correction
        self.t2 = _t2_list(t2)
        self.gate = None if gate is None else float(gate)
        self.conjugate_shortcut = conjugate_shortcut
        self.relax_options = RelaxOptions.from_kwargs("EP", relax_options)
        self.points = _C.ep_points(self.n_points, self.beta, conjugate_shortcut)

    def __repr__(self) -> str:
        return (
            f"EP(beta={self.beta}, n_points={self.n_points}, correction={self.correction!r}, "
            f"t2={self.t2 if len(self.t2) > 1 else self.t2[0]}, gate={self.gate})"
        )

    def grad(self, f: Any, x: Optional[Tensor], loss_fn: Callable, *, z0: Optional[Tensor] = None) -> Estimate:
        """The EP estimate of the gradient of ``loss_fn(z*)`` for every parameter of the field f (and,
        for an ``nn.Module`` loss_fn, its own parameters directly, under ``"readout.<name>"``).

        f: a VectorField, an object with ``.vector_field(x)`` (``EquilibriumBlock``), or a callable
        f(z, x) (its parameters are the module's); x: [B, ...] real; loss_fn(z) -> scalar, or a
        :class:`CrossEntropyReadout`. Returns an :class:`Estimate` (grads in autograd's convention).

        Example: ``EP(1e-2).grad(layer, x, lambda z: z.square().mean()).grads["W"]``
        """
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(z) -> scalar, got {type(loss_fn).__name__}")
        if x is not None and isinstance(x, Tensor):
            if x.is_complex():
                raise ValueError(
                    "EP needs a real field: x must be real (holomorphic EP makes the complex "
                    f"extension itself), got {x.dtype}"
                )
            x = x.detach()
        opts = self.relax_options
        fld = as_field(f, x)
        z_star, info = _relax(fld, _initial_state(x, z0), opts)
        if z_star.is_complex():
            raise ValueError(f"EP needs a real field: the free phase returned a {z_star.dtype} state")
        loss, _, readout_grads = _loss_and_cotangent(loss_fn, z_star)
        names, params = _field_params(fld)
        stats = {
            "forward": info,
            "nudged": [],
            "t2": None,
            "t2_residual": {},
            "skipped": False,
            "beta_points": list(self.points["beta"]),
            "n_points": self.n_points,
            "correction": self.correction,
            "n_evals": 0,
        }

        free_residual = info.rel_max if opts.stop == "rel" else info.abs_max
        if self.gate is not None and not free_residual <= self.gate:
            log.info("EP: free-phase residual %.3g exceeds gate %.3g; nudge skipped", free_residual, self.gate)
            stats["skipped"] = True
            field_grads = {n: torch.zeros_like(p) for n, p in zip(names, params)}
            return Estimate(loss=loss, grads={**field_grads, **readout_grads}, z=z_star.detach(), stats=stats)

        P, B = len(self.points["beta"]), z_star.shape[0]
        complex_ = bool(self.points["complex"])
        stacked = _stacked_field(f, fld, P, B, complex_)
        native = isinstance(loss_fn, CrossEntropyReadout)
        loss_grad = loss_fn.native() if native else _loss_grad_callback(loss_fn, P, complex_)
        if complex_:
            z_probe = (
                z_star.detach()
                .repeat(P, *([1] * (z_star.dim() - 1)))
                .to(torch.complex128 if z_star.dtype == torch.float64 else torch.complex64)
            )
            if not isinstance(stacked, _C.BlockField):
                _check_holomorphic(stacked.eval, z_probe, f"the field f ({type(f).__name__})")
            if not native:
                _check_holomorphic(
                    lambda z: torch.stack([loss_fn(b) for b in z.chunk(P)]),
                    z_probe,
                    f"loss_fn ({type(loss_fn).__name__})",
                )

        res = _C.ep_grads(
            fld,
            stacked,
            z_star,
            self.n_points,
            self.beta,
            self.conjugate_shortcut,
            loss_grad,
            float(opts.eps),
            float(opts.tol),
            float(opts.divergence),
            bool(opts.trace),
            int(opts.check_every),
            self.t2,
            self.correction or "none",
        )
        field_grads = {n: (pg.real if pg.is_complex() else pg) for n, pg in zip(names, res["param_grads"])}
        for n, p in zip(names, params):  # frozen parameters get zero, as in Implicit
            if not p.requires_grad:
                field_grads[n] = torch.zeros_like(p)

        status = res["status"].view(P, B)
        for k in range(P):
            rows = slice(k * B, (k + 1) * B)
            stats["nudged"].append(
                RelaxInfo(
                    steps=res["steps"][rows],
                    abs_lowest=res["abs_residual"][rows],
                    rel_lowest=res["rel_residual"][rows],
                    trace_abs=res["trace_abs"][:, rows],
                    trace_rel=res["trace_rel"][:, rows],
                    status=status[k],
                    n_evals=int(res["n_evals"]),
                )
            )
        stats["t2"] = int(res["t2"][res["chosen"]])
        stats["t2_residual"] = dict(zip((int(t) for t in res["t2"]), (float(r) for r in res["snapshot_residual"])))
        stats["n_evals"] = int(res["n_evals"])
        # ĝ = (∂F/∂θ)ᵀ v at z* (docs/design.md §5): v also gives the gradient of anything else F depends
        # on, e.g. the injection, (∂F/∂x)ᵀ v
        stats["cotangent"] = res["v"].real if res["v"].is_complex() else res["v"]
        n_div = int((status == 2).sum())
        if n_div:
            log.warning("EP: %d of %d nudged states diverged", n_div, status.numel())
        return Estimate(loss=loss, grads={**field_grads, **readout_grads}, z=z_star.detach(), stats=stats)
