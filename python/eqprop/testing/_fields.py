"""Field assertions: JVP / VJP consistency, sample separability, holomorphy, convergence, contraction
(docs/testing.md; the engine's conventions are docs/design.md §4, §5, §7)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ._tolerance import central_difference, eps, fd_tol, third_difference, tol

__all__ = ["assert_field_consistent", "assert_converged", "assert_contractive"]


def _ops(f: Any, x: Optional[torch.Tensor]):
    """The field's (eval, jvp, vjp): an object that has all three (an ``eqprop._C.VectorField`` or a
    duck-typed one) is used as is; anything else goes through ``eqprop.solvers.as_field``."""
    if all(callable(getattr(f, m, None)) for m in ("eval", "jvp", "vjp")):
        return f
    from ..solvers import as_field

    return as_field(f, x)


def _randn_like(z: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if z.is_complex():
        r = torch.randn(z.shape + (2,), generator=g, dtype=z.real.dtype)
        return torch.view_as_complex(r).to(z.device) / math.sqrt(2.0)
    return torch.randn(z.shape, generator=g, dtype=z.dtype).to(z.device)


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _check_adjoint(fld, z, u, v, n):
    """⟨u, Jv⟩ − ⟨Jᵀu, v⟩ over the batch (plain bilinear pairing, no conjugation: docs/design.md §5;
    over the whole batch so a field that mixes samples fails the separability check, not this one)
    and its rounding bound: each side is an n-term contraction of products bounded by ‖u‖‖Jv‖ (resp.
    ‖Jᵀu‖‖v‖) summed over the N = z.numel() entries, each entry of Jv and Jᵀu itself a contraction
    over the n entries of a sample: N + n terms; factor 4 for the few roundings per term."""
    jv, jtu = fld.jvp(z, v).detach(), fld.vjp(z, u).detach()
    lhs, rhs = complex((u * jv).sum()), complex((jtu * v).sum())
    scale = float(u.norm() * jv.norm() + jtu.norm() * v.norm())
    return abs(lhs - rhs), tol(z.dtype, n=4 * (z.numel() + n), scale=scale), lhs, rhs


def _fd_check(fld, z, v, jv, n, step):
    """max |Jv − (F(z + h·step·v) − F(z − h·step·v)) / 2h·step| against `fd_tol`: h = (3ε_F/c)^(1/3)
    minimizes h²c + ε_F/h, with ε_F the rounding of one F evaluation (n-term sums of size max|F|)
    and c the curvature |g'''| measured by `third_difference` at a coarser step. ``step`` is 1 for a
    real direction and 1j for the holomorphy check (F(z + ihv) − F(z − ihv) ≈ 2ih·Jv)."""
    g = lambda t: fld.eval(z + (t * step) * v).detach()
    fz = g(0.0)
    noise = tol(z.dtype, n=n, scale=float(fz.abs().max()) + float(z.abs().max()))
    curv = third_difference(g, 0.05) + 1e-300
    h = min(max((3 * noise / curv) ** (1 / 3), 1e3 * eps(z.dtype)), 0.05)
    fd = central_difference(g, h) / step
    # factor 6: the third difference is measured at a coarser step and g''' varies (fd_tol's note);
    # the same noise enters both evaluations (2) and the subtraction rounds again.
    bound = fd_tol(h, noise=2 * noise, curvature=curv, factor=6.0)
    err = float((fd - jv).abs().max())
    return err, bound, h


def assert_field_consistent(
    f: Any,
    x: Optional[torch.Tensor],
    z: Optional[torch.Tensor] = None,
    *,
    holomorphic: Optional[bool] = None,
    probes: int = 2,
    seed: int = 0,
) -> None:
    """Assert that a vector field's products are the ones the engine assumes (docs/design.md §5).

    Checked at ``z`` ([B, ...], the field's state; default: a seeded standard-normal state shaped
    like ``x`` — the properties hold everywhere, and a random point avoids special ones like z = 0):

    * adjoint: ⟨u, Jv⟩ = ⟨Jᵀu, v⟩ per sample on ``probes`` random u, v — the VJP is the *plain*
      transpose (no conjugation, also for complex fields), within the rounding of both sides;
    * finite differences: Jv agrees with the central difference of F along v, within `fd_tol`
      (bound from the dtype and the measured curvature; the VJP is tied to it by the adjoint check);
    * separable: perturbing sample b of z changes only sample b of F (stats and stopping are per
      sample, docs/design.md §4), up to rounding;
    * holomorphic (complex state; ``holomorphic=None`` checks exactly then, False skips, True demands
      a complex state): F(z + ihv) − F(z − ihv) ≈ 2ih·Jv, the complex-step form of ∂F/∂z̄ = 0.

    Args:
        f: an ``nn.Module`` / callable f(z, x), an object with ``.vector_field(x)`` (the block), an
            ``eqprop._C.VectorField``, or any object with ``eval(z)``, ``jvp(z, v)``, ``vjp(z, u)``.
        x: the injection [B, ...] (None for a VectorField with x bound; then give z).
    Raises:
        AssertionError naming every property that broke, by how much and against which bound.
    Example: ``assert_field_consistent(MyLayer(), torch.randn(4, 16, dtype=torch.float64))``
    """
    if z is None:
        if x is None:
            raise ValueError("assert_field_consistent: give z (the state) when x is None")
        g0 = torch.Generator().manual_seed(seed + 7919)
        z = _randn_like(x, g0)
    if not isinstance(z, torch.Tensor) or z.dim() < 1 or not (z.is_floating_point() or z.is_complex()):
        raise TypeError(
            f"z must be a float or complex [B, ...] tensor, got {type(z).__name__} {getattr(z, 'dtype', '')}"
        )
    if holomorphic is True and not z.is_complex():
        raise ValueError(f"holomorphic=True needs a complex state z, got {z.dtype}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an int >= 1, got {probes!r}")
    fld = _ops(f, x)
    z = z.detach()
    B, n = z.shape[0], max(1, z[0].numel())
    g = torch.Generator().manual_seed(seed)
    failures = []

    for p in range(probes):
        u, v = _randn_like(z, g), _randn_like(z, g)
        err, bound, lhs, rhs = _check_adjoint(fld, z, u, v, n)
        if not err <= bound:
            failures.append(
                f"adjoint (the VJP is not the plain transpose of the JVP): probe {p}: <u, Jv> = {lhs:.6g}, "
                f"<J^T u, v> = {rhs:.6g}, |difference| {err:.3g} > bound {bound:.3g}"
                + (
                    " (a complex field's VJP must be J^T u, not the conjugate transpose J^H u, and a "
                    "non-holomorphic F has no complex J)"
                    if z.is_complex()
                    else ""
                )
            )
            break

    v = _randn_like(z, g)
    jv = fld.jvp(z, v).detach()
    err, bound, h = _fd_check(fld, z, v, jv, n, 1.0)
    if not err <= bound:
        failures.append(
            f"finite differences: max |Jv - (F(z+hv) - F(z-hv))/2h| = {err:.3g} > bound {bound:.3g} (h = {h:.2g})"
        )

    if holomorphic is not False and z.is_complex():
        err, bound, h = _fd_check(fld, z, v, jv, n, 1j)
        if not err <= bound:
            failures.append(
                f"holomorphic: max |Jv - (F(z+ihv) - F(z-ihv))/2ih| = {err:.3g} > bound "
                f"{bound:.3g} (h = {h:.2g}); F depends on conj(z) (abs, real/imag parts, "
                f"|z|^2 ...), so complex-step and holomorphic-EP estimates are wrong"
            )

    if B > 1:
        fz = fld.eval(z).detach()
        bound = tol(z.dtype, n=n, scale=float(fz.abs().max()))
        worst = (0.0, -1, -1)
        for b in range(min(B, 4)):
            dz = torch.zeros_like(z)
            d = _randn_like(z[b : b + 1], g)[0]
            dz[b] = d * (1.0 + float(z[b].abs().max())) / float(d.abs().max())
            change = _per_sample(fld.eval(z + dz).detach() - fz).abs().amax(1).cpu()
            change[b] = 0.0
            c, other = float(change.max()), int(change.argmax())
            if c > worst[0]:
                worst = (c, b, other)
        if worst[0] > bound:
            failures.append(
                f"separable: perturbing sample {worst[1]} of z changed sample {worst[2]} of F "
                f"by {worst[0]:.3g} > bound {bound:.3g} (the field mixes samples, e.g. a "
                f"batch mean or batch norm)"
            )

    if failures:
        raise AssertionError(
            f"field {type(f).__name__} at z {tuple(z.shape)} {z.dtype}: "
            f"{len(failures)} propert{'y' if len(failures) == 1 else 'ies'} broke:\n  - " + "\n  - ".join(failures)
        )


def _table(header, rows, mark):
    lines = ["  ".join(f"{h:>12}" for h in header)]
    for r, m in zip(rows, mark):
        lines.append("  ".join(f"{c:>12}" for c in r) + ("  <-- FAIL" if m else ""))
    return "\n".join(lines)


def assert_converged(info, *, tol: Optional[float] = None, stop: str = "rel", max_rows: int = 20) -> None:
    """Assert that every sample of a relaxation converged (``eqprop.RelaxInfo``, docs/design.md §4).

    A sample fails when its status is not "converged" or, with ``tol``, when its returned residual
    (``stop="rel"``: ‖F(z) − z‖ / ‖F(z)‖, ``"abs"``: ‖F(z) − z‖) exceeds ``tol``.
    Raises AssertionError with a per-sample table (status, steps, abs and rel residual) of the
    failing samples (at most ``max_rows``).
    Example: ``z, info = eqprop.relax(layer, x, tol=1e-6); assert_converged(info, tol=1e-6)``
    """
    if stop not in ("rel", "abs"):
        raise ValueError(f"stop must be 'rel' or 'abs', got {stop!r}")
    res = (info.rel_lowest if stop == "rel" else info.abs_lowest).detach().double().cpu()
    bad = ~info.converged.cpu()
    if tol is not None:
        bad = bad | ~(res <= float(tol))
    if not bool(bad.any()):
        return
    idx = bad.nonzero().flatten().tolist()
    names = info.status_names
    rows = [
        (
            str(b),
            names[b],
            str(int(info.steps[b])),
            f"{float(info.abs_lowest[b]):.3g}",
            f"{float(info.rel_lowest[b]):.3g}",
        )
        for b in idx[:max_rows]
    ]
    more = f"\n  ... and {len(idx) - max_rows} more" if len(idx) > max_rows else ""
    raise AssertionError(
        f"{len(idx)} of {bad.numel()} samples did not converge"
        + (f" to {stop} residual <= {tol:.3g}" if tol is not None else "")
        + ":\n"
        + _table(["sample", "status", "steps", "abs_res", "rel_res"], rows, [False] * len(rows))
        + more
    )


def assert_contractive(
    f: Any, x: Optional[torch.Tensor], z: torch.Tensor, *, rho_max: float = 1.0, iters: int = 100, seed: int = 0
) -> None:
    """Assert that the spectral radius ρ(J) at z is at most ``rho_max`` in every sample.

    ρ per sample by power iteration on JVPs (``eqprop.diagnostics.spectral_radius``, docs/design.md
    §7); ρ < 1 makes the Picard iteration a local contraction. Raises AssertionError with ρ of every
    sample (failing ones marked). Example: ``assert_contractive(block, x, z_star, rho_max=0.95)``
    """
    from ..diagnostics import spectral_radius

    rho = spectral_radius(f, x, z.detach(), iters=iters, seed=seed).detach().double().cpu()
    bad = ~(rho <= float(rho_max))
    if not bool(bad.any()):
        return
    rows = [(str(b), f"{float(r):.4f}") for b, r in enumerate(rho.tolist())]
    raise AssertionError(
        f"spectral radius above rho_max = {rho_max:g} in {int(bad.sum())} of {rho.numel()} "
        f"samples (max {float(rho.max()):.4f}, power iteration, {iters} JVPs):\n"
        + _table(["sample", "rho"], rows, bad.tolist())
    )
