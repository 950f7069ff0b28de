"""Plain PyTorch relaxation, adjoint iteration and dense Jacobians (test oracle / benchmark baseline).

The same math as ``csrc/solvers/relax.cpp`` written as an eager loop over ``f(z, x)``: nothing in
the library imports this module (docs/design.md §2).
"""

from __future__ import annotations

import torch

__all__ = ["picard", "adjoint", "implicit_grads", "dense_jacobian"]


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).abs().pow(2).sum(1).sqrt()


@torch.no_grad()
def picard(f, x, z0=None, *, max_steps=100, eps=1.0, tol=1e-4, stop="rel"):
    """Damped Picard z <- z + eps (F(z) - z) (docs/design.md §4), lowest-residual iterate per sample.

    Returns ``(z, info)`` with ``info = {"steps", "abs", "rel", "trace_abs", "trace_rel", "n_evals"}``.
    A sample that has met ``tol`` stays at that iterate while the rest of the batch goes on (as in
    the engine). Example: ``z, info = picard(f, x, tol=1e-6)``.
    """
    z = torch.zeros_like(x) if z0 is None else z0.clone()
    B = z.shape[0]
    best = z.clone()
    real = z.real.dtype if z.is_complex() else z.dtype
    best_m = torch.full((B,), float("inf"), device=z.device, dtype=real)
    best_abs = torch.full((B,), float("nan"), device=z.device, dtype=real)
    best_rel = best_abs.clone()
    steps = torch.full((B,), max_steps, dtype=torch.long, device=z.device)
    tr_a, tr_r = [], []
    t = 0
    for t in range(max_steps):
        fz = f(z, x)
        a = _per_sample_norm(fz - z)
        r = a / _per_sample_norm(fz).clamp_min(1e-30)
        tr_a.append(a)
        tr_r.append(r)
        m = r if stop == "rel" else a
        imp = m < best_m
        best[imp] = z[imp]
        best_m = torch.where(imp, m.to(best_m.dtype), best_m)
        best_abs = torch.where(imp, a.to(best_abs.dtype), best_abs)
        best_rel = torch.where(imp, r.to(best_rel.dtype), best_rel)
        steps = torch.where((m <= tol) & (steps == max_steps), t + 1, steps)
        done = best_m <= tol
        if bool(done.all()):
            break
        z = torch.where(done.reshape(-1, *([1] * (z.dim() - 1))), z, z + eps * (fz - z))
    info = {
        "steps": steps,
        "abs": best_abs,
        "rel": best_rel,
        "trace_abs": torch.stack(tr_a),
        "trace_rel": torch.stack(tr_r),
        "n_evals": t + 1,
    }
    return best, info


def adjoint(f, x, z, g, *, max_steps=200, tol=1e-10):
    """λ solving (I - Jᵀ)λ = g at z by λ <- Jᵀλ + g with eager autograd VJPs (real fields)."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        fz = f(z, x)
    lam = g.clone()
    for _ in range(max_steps):
        (jt,) = torch.autograd.grad(fz, z, lam, retain_graph=True)
        new = jt + g
        done = (new - lam).norm() <= tol * new.norm()
        lam = new
        if done:
            break
    return lam


def implicit_grads(f, params, x, z, g, **kw):
    """(∂F/∂θ)ᵀλ for ``params`` at the fixed point z (eager autograd; real fields)."""
    lam = adjoint(f, x, z, g, **kw)
    with torch.enable_grad():
        fz = f(z.detach(), x)
        return torch.autograd.grad(fz, params, lam, allow_unused=True)


def dense_jacobian(f, x, z):
    """The per-sample Jacobians ∂F_b/∂z_b, [B, n, n] with n = numel / B, built column by column
    with JVPs by finite-free autograd (forward differences are not used). Sample-separable f only.
    """
    B = z.shape[0]
    n = z[0].numel()
    cols = []
    zz = z.detach()
    for j in range(n):
        e = torch.zeros(B, n, dtype=z.dtype, device=z.device)
        e[:, j] = 1
        _, jv = torch.func.jvp(lambda u: f(u, x), (zz,), (e.reshape(z.shape),))
        cols.append(jv.reshape(B, n))
    return torch.stack(cols, dim=-1)  # [B, n(out), n(in)]
