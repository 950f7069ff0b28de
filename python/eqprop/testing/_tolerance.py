"""Dtype-aware tolerances and the one central difference (docs/testing.md).

Tolerances. A result computed in a low precision is compared with an oracle evaluated in float64 /
complex128 on the same (upcast) weights and inputs, so the difference is the low-precision path's own
rounding error. `tol(dtype, n, scale)` bounds that error the way a rounding-error analysis does:
a chain of operations that accumulates ``n`` terms of magnitude ``scale`` in a dtype with unit
roundoff ``u = ε/2`` is off by at most ``γ_n·scale ≈ n·u·scale`` (a dot product of length n, Higham,
*Accuracy and Stability of Numerical Algorithms*, §3.1). ``factor`` states what else the computation
does to the error (a transcendental's condition number, a few roundings per term), next to the
computation it describes. The bound depends on the dtype and the computation, not on one CPU's
summation order, and the same check fails if the computation is wrong by more than that.
"""

import torch

__all__ = ["eps", "oracle_dtype", "tol", "condition_scale", "fd_tol", "central_difference", "third_difference"]


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype`` (of its real part for a complex dtype)."""
    return torch.finfo(dtype.to_real() if dtype.is_complex else dtype).eps


def oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    """The float64 / complex128 dtype in which the oracle of a ``dtype`` computation runs."""
    return torch.complex128 if dtype.is_complex else torch.float64


def tol(dtype: torch.dtype, n: int = 1, scale: float = 1.0, factor: float = 1.0) -> float:
    """Bound on the absolute rounding error of a computation in ``dtype``: ``factor · n · ε · scale``.

    n: the number of terms accumulated along the computation (the longest chain of sums, e.g. the
    contraction length of a matmul, plus one per elementwise stage); scale: the magnitude of the
    values summed (e.g. max |result|, or Σ|terms| where the result cancels); factor: the growth the
    computation adds (a condition number; ε = 2u absorbs the few roundings per term). Complex dtypes
    use the ε of their real part.

    Example: ``tol(torch.float32, n=64, scale=x.abs().sum())`` for a float32 dot product of length 64.
    """
    scale = float(scale.detach().abs().max()) if isinstance(scale, torch.Tensor) else float(scale)
    return factor * n * eps(dtype) * scale


def condition_scale(fn, tensors, rel=1e-7, draws=4, seed=0) -> float:
    """max |fn(t ⊙ (1 + rel·s)) − fn(t)| / rel over a few random sign patterns s: how much a relative
    perturbation of every input (real and imaginary parts separately) moves the result, to first order.

    A rounding of size ε at each input moves fn by about ``ε · condition_scale``, and each stage of a
    computation rounds its intermediates the same way; so ``tol(dtype, n=stages, scale=condition_scale)``
    bounds a ``dtype`` evaluation of fn against the float64 / complex128 oracle. It grows where the
    computation amplifies errors (cancellation, exp of a large argument, a LayerNorm near its branch
    point) and nowhere else. fn takes and returns float64 / complex128 tensors; rel = 1e-7 keeps the
    perturbation far above float64 rounding and in the linear regime.
    Example: ``condition_scale(lambda a, b: a @ b, [a, b])``.
    """
    g = torch.Generator().manual_seed(seed)

    def perturb(t):
        def one(r):
            s = 2.0 * torch.randint(0, 2, r.shape, generator=g, dtype=r.dtype) - 1.0
            return r * (1 + rel * s)

        return torch.complex(one(t.real), one(t.imag)) if t.is_complex() else one(t)

    with torch.no_grad():
        base = fn(*tensors)
        return max(float((fn(*[perturb(t) for t in tensors]) - base).abs().max()) for _ in range(draws)) / rel


def fd_tol(h: float, noise: float, curvature: float, factor: float = 1.0) -> float:
    """Bound on the error of a central difference (f(θ + h) − f(θ − h)) / 2h as a derivative.

    Truncation: the leading term h²·|f'''|/6, with curvature an estimate of |f'''| (`third_difference`)
    and a factor 6 because that estimate is taken at a coarser step and f''' varies; plus the
    evaluation error of f (noise: rounding, or the tolerance a solver stopped at) amplified by 1/h.
    Example: ``fd_tol(1e-6, noise=1e-14, curvature=1.0)`` ≈ 1e-8.
    """
    return float(factor * (h * h * curvature + noise / h))


def _along(fun, params, directions):
    """g(t): fun(t) without params; with params, fun() with each p moved in place to p + t·d (restored)."""
    if params is None:
        return fun
    params, directions = list(params), list(directions)

    def g(t):
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.add_(t * d)
            try:
                return fun()
            finally:
                for p, d in zip(params, directions):
                    p.sub_(t * d)

    return g


def central_difference(fun, h, params=None, directions=None):
    """The central difference (g(h) − g(−h)) / 2h, the one finite difference of the tests.

    Without params, g(t) = fun(t) (fun takes the step, e.g. ``lambda t: F(z + t * v)``; t may be
    complex to differentiate along an imaginary direction). With params (tensors) and directions
    (tensors of the same shapes), g(t) = fun() evaluated with each p moved in place to p + t·d and
    restored afterwards.
    Example: ``central_difference(lambda t: torch.sin(x + t), 1e-6)`` ≈ cos(x).
    """
    g = _along(fun, params, directions)
    return (g(h) - g(-h)) / (2 * h)


def third_difference(fun, H, params=None, directions=None):
    """|g'''| estimated as |g(2H) − 2g(H) + 2g(−H) − g(−2H)| / 2H³ (max over entries), with g as in
    `central_difference`: the curvature in `fd_tol`, measured at a step H where rounding is negligible.
    Example: ``third_difference(lambda t: torch.sin(x + t), 1e-2)`` ≈ max |cos(x)|.
    """
    g = _along(fun, params, directions)
    return float(torch.as_tensor(g(2 * H) - 2 * g(H) + 2 * g(-H) - g(-2 * H)).abs().max()) / (2 * abs(H) ** 3)
