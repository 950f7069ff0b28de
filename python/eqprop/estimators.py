"""Gradient estimators for fixed points (docs/design.md §5): one interface, ``.grad(f, x, loss_fn)``.

An estimator relaxes to z* = F(z*; x), evaluates ``loss_fn(z*)`` and returns an :class:`Estimate`
with a gradient for every trainable parameter of the field (names as the field gives them) and,
when ``loss_fn`` is an ``nn.Module`` (a readout head), for its parameters under ``"readout.<name>"``
(readout parameters get their gradient directly). Gradients follow autograd's convention (what
``p.grad`` would hold), also for complex parameters.

:class:`Implicit` and :class:`BPTT` are here; the Equilibrium Propagation family (one-sided /
symmetric / holomorphic / asymmetric EP) is :class:`EP` (``eqprop.ep``, docs/ep.md), with the same
interface. Averaging an estimate over several batches is gradient accumulation in the training loop,
not an estimator option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import _C
from .solvers import (
    RelaxOptions,
    _adjoint_unconverged,
    _backward_options,
    _forward_unconverged,
    _initial_state,
    _int_option,
    _relax,
    _report,
    _warn_unreachable_tol,
    as_field,
)

__all__ = ["Estimate", "Implicit", "BPTT"]


@dataclass
class Estimate:
    """A gradient estimate: ``loss`` (scalar, detached), ``grads`` {name: Tensor}, ``z`` (the fixed
    point, detached) and ``stats`` (forward ``relax`` info and, where it applies, the backward solve).

    ``apply_to(module)`` writes the grads into ``p.grad`` of matching named parameters.
    ``stats["cotangent"]`` (:class:`Implicit` λ, EP v): the vector u with field gradient
    (∂F/∂θ)ᵀu at z*, so the gradient of the injection x is (∂F/∂x)ᵀu.
    ``stats["forward"].nonconverged`` and (Implicit) ``stats["backward"]["nonconverged"]`` [B]
    flag the samples whose relaxation / adjoint solve ended above its tolerance.
    """

    loss: torch.Tensor
    grads: dict
    z: torch.Tensor
    stats: dict

    def apply_to(self, *modules: torch.nn.Module, readout: Optional[torch.nn.Module] = None) -> None:
        """Accumulate ``grads`` into ``.grad`` (field parameters by name; readout under ``readout.``)."""
        targets = {}
        for m in modules:
            targets.update(dict(m.named_parameters()))
        if readout is not None:
            targets.update({f"readout.{n}": p for n, p in readout.named_parameters()})
        for name, g in self.grads.items():
            if name in targets and targets[name].requires_grad:  # frozen parameters get no .grad
                p = targets[name]
                p.grad = g.detach().clone() if p.grad is None else p.grad + g


def _field_params(fld) -> tuple[list[str], list[torch.Tensor]]:
    return list(fld.parameter_names()), list(fld.parameters())


def _loss_and_cotangent(loss_fn: Callable, z_star: torch.Tensor):
    """ℓ(z*), ∂ℓ/∂z* (autograd convention) and the readout gradients."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(z) -> scalar, got {type(loss_fn).__name__}")
    readout = (
        [(n, p) for n, p in loss_fn.named_parameters() if p.requires_grad]
        if isinstance(loss_fn, torch.nn.Module)
        else []
    )
    zr = z_star.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(zr)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_fn(z) must return a scalar tensor, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
            )
        grads = torch.autograd.grad(loss, [zr] + [p for _, p in readout], allow_unused=True)
    g = grads[0] if grads[0] is not None else torch.zeros_like(zr)
    ro = {f"readout.{n}": (gr if gr is not None else torch.zeros_like(p)) for (n, p), gr in zip(readout, grads[1:])}
    return loss.detach(), g, ro


def _autograd_convention(plain: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    # The engine returns (∂F/∂θ)ᵀλ in the plain-transpose convention; p.grad holds its conjugate
    # for complex θ and its real part for real θ fed into a complex field.
    if param.is_complex():
        return plain.conj().resolve_conj()
    return plain.real if plain.is_complex() else plain


class Implicit:
    """Implicit differentiation (recurrent backprop): ∇θL = (∂F/∂θ)ᵀλ, (I - Jᵀ)λ = ∂ℓ/∂z*,
    with λ <- Jᵀλ + ∂ℓ/∂z* in C++ (docs/design.md §5).

    ``Implicit(backward_max_steps=None, backward_tol=None, backward_solver="picard",
    backward_anderson_m=5, **relax_options)`` (None: the forward ``max_steps`` / ``tol``;
    ``backward_solver="anderson"`` accelerates the adjoint solve); unknown options raise.
    ``on_nonconvergence`` (a relax option, default ``"warn"``): when the forward relaxation or the
    adjoint solve ends above its tolerance for some sample, ``grad`` issues one
    ``eqprop.NonConvergenceWarning`` naming the phase(s), the count and the worst residual
    (``"raise"``: ``eqprop.NonConvergenceError``, before the adjoint if the forward failed;
    ``"ignore"``: nothing).
    Example: ``est = Implicit(tol=1e-8).grad(layer, x, lambda z: z.square().mean())``.
    """

    def __init__(
        self,
        *,
        backward_max_steps: Optional[int] = None,
        backward_tol: Optional[float] = None,
        backward_solver: str = "picard",
        backward_anderson_m: int = 5,
        **relax_options,
    ):
        self.relax_options = RelaxOptions.from_kwargs("Implicit", relax_options)
        self.backward = _backward_options(
            backward_max_steps, backward_tol, backward_solver, backward_anderson_m, self.relax_options
        )

    def grad(
        self, f: Any, x: Optional[torch.Tensor], loss_fn: Callable, *, z0: Optional[torch.Tensor] = None
    ) -> Estimate:
        fld = as_field(f, x)
        opts, bo = self.relax_options, self.backward
        start = _initial_state(x, z0)
        _warn_unreachable_tol("Implicit.grad", start.dtype, opts, bo.tol)
        z_star, info = _relax(fld, start, opts)
        forward_msg = _forward_unconverged(info, opts)
        if opts.on_nonconvergence == "raise":  # no adjoint solve for a gradient that will be refused
            _report("Implicit.grad", [forward_msg], "raise", info)
        loss, g, grads = _loss_and_cotangent(loss_fn, z_star)
        gp = g.conj().resolve_conj() if g.is_complex() else g
        res = _C.implicit_grads(fld, z_star, gp, bo.max_steps, bo.tol, bo.solver, bo.anderson_m, bo.eps)
        names, params = _field_params(fld)
        field_grads = {n: _autograd_convention(pg, p) for n, p, pg in zip(names, params, res["param_grads"])}
        backward = {k: v for k, v in res.items() if k not in ("param_grads", "lambda")}
        backward["nonconverged"] = res["status"] != 0
        info.backward = backward
        # One report for both phases (docs/design.md §5: an adjoint stopped above tol gives a
        # gradient off by about its residual).
        _report(
            "Implicit.grad",
            [forward_msg, _adjoint_unconverged(res, bo, opts.on_nonconvergence)],
            opts.on_nonconvergence,
            info,
        )
        return Estimate(
            loss=loss,
            grads={**field_grads, **grads},
            z=z_star.detach(),
            # λ: the field gradient is (∂F/∂θ)ᵀλ, and that of the injection (∂F/∂x)ᵀλ (docs/design.md §5)
            stats={"forward": info, "backward": backward, "cotangent": _autograd_convention(res["lambda"], z_star)},
        )


class BPTT:
    """Truncated backprop through time: relax to z*, then backprop through ``horizon`` damped Picard
    steps from z* (docs/design.md §5); converges to :class:`Implicit` as the horizon grows.

    ``BPTT(horizon, **relax_options)``; ``on_nonconvergence`` as in :class:`Implicit` (forward
    relaxation only: BPTT has no adjoint solve). Example: ``BPTT(20).grad(layer, x, loss_fn).grads``.
    """

    def __init__(self, horizon: int, **relax_options):
        if _int_option("horizon", horizon) < 1:
            raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
        self.horizon = int(horizon)
        self.relax_options = RelaxOptions.from_kwargs("BPTT", relax_options)

    def grad(
        self, f: Any, x: Optional[torch.Tensor], loss_fn: Callable, *, z0: Optional[torch.Tensor] = None
    ) -> Estimate:
        fld = as_field(f, x)
        opts = self.relax_options
        start = _initial_state(x, z0)
        _warn_unreachable_tol("BPTT.grad", start.dtype, opts)
        z_star, info = _relax(fld, start, opts)
        _report("BPTT.grad", [_forward_unconverged(info, opts)], opts.on_nonconvergence, info)
        names, params = _field_params(fld)
        readout = (
            [(n, p) for n, p in loss_fn.named_parameters() if p.requires_grad]
            if isinstance(loss_fn, torch.nn.Module)
            else []
        )
        with torch.enable_grad():
            z = _C.unroll(fld, z_star.detach(), self.horizon, float(self.relax_options.eps))
            loss = loss_fn(z)
            wrt = params + [p for _, p in readout]
            live = [p for p in wrt if p.requires_grad]  # frozen parameters: zero, as in Implicit
            live_grads = iter(torch.autograd.grad(loss, live, allow_unused=True) if live else [])
            gs = [next(live_grads) if p.requires_grad else None for p in wrt]
        gs = [g if g is not None else torch.zeros_like(p) for g, p in zip(gs, wrt)]
        grads = dict(zip(names, gs[: len(names)]))
        grads.update({f"readout.{n}": g for (n, _), g in zip(readout, gs[len(names) :])})
        return Estimate(
            loss=loss.detach(), grads=grads, z=z_star.detach(), stats={"forward": info, "horizon": self.horizon}
        )


from .ep import EP  # noqa: E402  (Equilibrium Propagation, python/eqprop/ep.py)

__all__ += ["EP"]
