"""Jacobian diagnostics and contraction penalties of a fixed point (docs/design.md §6, §7).

Each function takes ``(f, x, z)`` with ``f`` in any form :func:`eqprop.solvers.as_field` accepts
and J = ∂F/∂z at z ([B, ...]). Spectral quantities are per sample ([B]; J is block diagonal over
the batch); Frobenius-type quantities are over the whole state and normalized by ``z.numel()``.
Monte-Carlo estimates return a :class:`MonteCarlo` (value, standard error, probes); probes are
Rademacher (default) or Gaussian, drawn from a CPU generator seeded with ``seed``. All run in C++
(``csrc/diagnostics``).

The gradient diagnostics (:mod:`eqprop.gradients`: alignment, self-cosine, task/penalty split,
one-step lr sweep, influence) and the model diagnostics (:mod:`eqprop.model_stats`: per-position CE,
branch statistics) are re-exported here; their figures are in :mod:`eqprop.plots`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import _C
from .solvers import as_field

__all__ = [
    "MonteCarlo",
    "residual",
    "spectral_radius",
    "spectral_norm",
    "frobenius_sq",
    "nonnormality",
    "symmetric_fraction",
    "jacobian_penalty",
    "homeostatic_loss",
]


@dataclass
class MonteCarlo:
    """A Monte-Carlo estimate: ``value`` ± ``stderr`` from ``probes`` probes (stderr NaN for 1)."""

    value: float
    stderr: float
    probes: int


def _count(name: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    return n


def _seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return seed


def residual(f: Any, x: Optional[torch.Tensor], z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample residuals at z: abs ``||F(z) - z||`` [B] and rel ``||F(z) - z|| / ||F(z)||`` [B].

    Example: ``abs_res, rel_res = diagnostics.residual(layer, x, z)``.
    """
    return tuple(_C.residual(as_field(f, x), z))


def spectral_radius(
    f: Any, x: Optional[torch.Tensor], z: torch.Tensor, *, iters: int = 100, seed: int = 0, return_history: bool = False
):
    """Spectral radius ρ(J) per sample [B] by power iteration on JVPs.

    ρ is the geometric mean of the growth ``||J v_t||`` (v_t normalized) over the second half of the
    iterations, which also converges for a complex-conjugate dominant pair. ``return_history``
    adds the growth [iters, B]. Example: ``rho = diagnostics.spectral_radius(layer, x, z)``.
    """
    rho, hist = _C.spectral_radius(as_field(f, x), z, _count("iters", iters), _seed(seed))
    return (rho, hist) if return_history else rho


def spectral_norm(
    f: Any, x: Optional[torch.Tensor], z: torch.Tensor, *, iters: int = 100, seed: int = 0, return_history: bool = False
):
    """‖J‖₂ per sample [B] by power iteration on JᴴJ (one JVP and one VJP per iteration).

    Example: ``sigma = diagnostics.spectral_norm(layer, x, z)``.
    """
    s, hist = _C.spectral_norm(as_field(f, x), z, _count("iters", iters), _seed(seed))
    return (s, hist) if return_history else s


def _mc(fn, f, x, z, probes, seed, dist) -> MonteCarlo:
    d = fn(as_field(f, x), z, _count("probes", probes), _seed(seed), dist)
    return MonteCarlo(value=float(d["value"]), stderr=float(d["stderr"]), probes=int(d["probes"]))


def frobenius_sq(
    f: Any, x: Optional[torch.Tensor], z: torch.Tensor, *, probes: int = 8, seed: int = 0, dist: str = "rademacher"
) -> MonteCarlo:
    """Hutchinson estimate of ``||J||_F^2 / numel(z)`` as the mean of ``||vᵀJ||² / numel`` (docs/design.md §6).

    Example: ``diagnostics.frobenius_sq(layer, x, z, probes=16).value``.
    """
    return _mc(_C.frobenius_sq, f, x, z, probes, seed, dist)


def nonnormality(
    f: Any, x: Optional[torch.Tensor], z: torch.Tensor, *, probes: int = 8, seed: int = 0, dist: str = "rademacher"
) -> MonteCarlo:
    """``sqrt(Σ||Jv - Jᵀv||² / Σ||Jv||²)`` over probes, an estimate of ``||J - Jᵀ||_F / ||J||_F``
    (0 for symmetric J); stderr by the delta method. Example: ``diagnostics.nonnormality(f, x, z)``.
    """
    return _mc(_C.nonnormality, f, x, z, probes, seed, dist)


def symmetric_fraction(
    f: Any, x: Optional[torch.Tensor], z: torch.Tensor, *, probes: int = 8, seed: int = 0, dist: str = "rademacher"
) -> MonteCarlo:
    """``||J_s||_F / (||J_s||_F + ||J_a||_F)`` with J_s, J_a the symmetric / antisymmetric parts
    (1 for symmetric J, 1/2 for ``||J_s|| = ||J_a||``). Example: ``diagnostics.symmetric_fraction(f, x, z)``.
    """
    return _mc(_C.symmetric_fraction, f, x, z, probes, seed, dist)


def jacobian_penalty(
    f: Any,
    x: Optional[torch.Tensor],
    z: torch.Tensor,
    *,
    probes: int = 1,
    seed: int = 0,
    weight: float = 1.0,
    dist: str = "gaussian",
) -> torch.Tensor:
    """``weight · mean_v ||vᵀJ||² / numel(z)`` (jr·‖J‖²_F, docs/design.md §6), a scalar on the autograd
    graph: differentiable in f's parameters (and in z if z requires grad).

    Example: ``(loss + diagnostics.jacobian_penalty(layer, x, z, weight=jr)).backward()``.
    """
    return _C.jacobian_penalty(as_field(f, x), z, _count("probes", probes), _seed(seed), float(weight), dist)


def homeostatic_loss(
    f: Any,
    x: Optional[torch.Tensor],
    z: torch.Tensor,
    *,
    probes: int = 1,
    seed: int = 0,
    weight: float = 1.0,
    dist: str = "gaussian",
) -> torch.Tensor:
    """``weight · mean_ε (||Jε||² - (Jᵀε)·(Jε)) / numel(z)``: an unbiased estimate of
    ``weight · ½||J - Jᵀ||²_F / numel(z)`` (Laborieux & Zenke 2024, docs/design.md §6), differentiable in
    f's parameters. Example: ``diagnostics.homeostatic_loss(layer, x, z, weight=lam).backward()``.
    """
    return _C.homeostatic_loss(as_field(f, x), z, _count("probes", probes), _seed(seed), float(weight), dist)


from . import gradients as _gradients  # noqa: E402
from . import model_stats as _model_stats  # noqa: E402
from .gradients import *  # noqa: E402,F403  (alignment, self_cosine, decompose, lr_sweep, influence, ...)
from .model_stats import *  # noqa: E402,F403  (per_position_ce, branch_stats)

__all__ += _gradients.__all__ + _model_stats.__all__
