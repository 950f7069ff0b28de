"""Relaxation to a fixed point and differentiable fixed points (docs/design.md §4, §5).

Every function takes the vector field ``f`` in one of three forms:

* an ``eqprop._C.VectorField`` handle (x already bound; pass ``x`` anyway or give ``z0``);
* an object with a ``.vector_field(x)`` method (e.g. ``eqprop.EquilibriumBlock``): its native C++
  field runs the loop with no Python inside;
* any callable / ``nn.Module`` ``f(z, x) -> F(z; x)``, wrapped by the C++ ``ModuleField`` adapter
  (Python runs only inside ``f``); its trainable parameters are the field's parameters.

The loops run in C++ (``csrc/solvers/relax.cpp``). State ``z`` is ``[B, ...]``: the first dimension
indexes samples, and the field must not mix samples (stats and stopping are per sample).

No silent non-convergence: a relaxation or adjoint solve that ends above its tolerance for some
sample (status ``max_steps`` or ``diverged``) is reported once per call as a
:class:`NonConvergenceWarning` (``on_nonconvergence="warn"``, the default), raised as
:class:`NonConvergenceError` (``"raise"``) or left to the returned per-sample status
(``"ignore"``); a relative ``tol`` below the dtype's resolution (:func:`min_rel_tol`) is warned
about before the loop starts.
"""

from __future__ import annotations

import logging
import operator
import warnings
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable, Optional

import torch

from . import _C

__all__ = [
    "RelaxOptions",
    "BackwardOptions",
    "RelaxInfo",
    "as_field",
    "relax",
    "fixed_point",
    "STATUS_NAMES",
    "NonConvergenceWarning",
    "NonConvergenceError",
    "min_rel_tol",
]

log = logging.getLogger(__name__)

#: Per-sample status codes in ``RelaxInfo.status`` (int8), same order as the C++ enum.
STATUS_NAMES = ("converged", "max_steps", "diverged")


class NonConvergenceWarning(UserWarning):
    """A relaxation or adjoint solve ended above its tolerance for some sample (status
    ``max_steps`` or ``diverged``), or its tolerance is below what its dtype can resolve.

    Issued by :func:`relax`, :func:`fixed_point` and the estimators under
    ``on_nonconvergence="warn"`` (the default), at most once per call. Turn it into an error
    with ``warnings.simplefilter("error", eqprop.NonConvergenceWarning)`` (tests, notebooks) or
    pass ``on_nonconvergence="raise"``.
    """


class NonConvergenceError(ArithmeticError):
    """Raised under ``on_nonconvergence="raise"`` when a relaxation or adjoint solve ends above its
    tolerance for some sample. A numerical failure, not bad input, so neither ValueError nor
    TypeError: catch it as ``eqprop.NonConvergenceError`` (or ``ArithmeticError``). ``info`` holds
    the :class:`RelaxInfo` of the forward relaxation (with ``info.backward`` for an adjoint
    failure) when there is one, else None.
    """

    def __init__(self, message: str, info: Optional["RelaxInfo"] = None):
        super().__init__(message)
        self.info = info


#: The relaxation options: one class, defined and checked in C++ (``csrc/solvers/relax.h``,
#: ``csrc/bindings/relax_options.cpp``). ``RelaxOptions(max_steps=50, tol=1e-6)``; unknown keys and
#: wrong types raise TypeError (listing the valid keys), values out of range ValueError;
#: ``RelaxOptions.from_kwargs(where, kwargs)`` does the same with errors prefixed by ``where``;
#: ``opts.replace(**changes)``, ``opts.to_dict()``, ``RelaxOptions.fields()``. It pickles.
#:
#: ``eps`` is the damping of ``z <- z + eps (F(z) - z)`` (and Anderson's mixing beta);
#: ``stop="rel"`` stops a sample at ``||F(z) - z|| / ||F(z)|| <= tol``, ``"abs"`` at
#: ``||F(z) - z|| <= tol``; a sample is *diverged* when its residual is non-finite or exceeds
#: ``divergence`` times its first residual. ``check_every``: the host checks whether every sample
#: has stopped (one device sync) after every that many steps; larger values save syncs (and, with
#: a CUDA graph, launches) at the cost of up to ``check_every - 1`` batched steps after the last
#: sample stopped, counted in ``n_evals``. ``cuda_graph``: replay the step as a CUDA graph — None
#: (auto) does when the state is on CUDA, the solver is Picard, there is no ``drive`` and the field
#: is a native block field; True demands it (ValueError saying why not); False never.
#: ``on_nonconvergence``: "warn", "raise" or "ignore" when a sample ends above tolerance.
RelaxOptions = _C.RelaxOptions


@dataclass
class RelaxInfo:
    """Per-sample statistics of a relaxation (TorchDEQ convention; docs/design.md §4).

    steps [B] (int64): F evaluations until the sample stopped; abs_lowest / rel_lowest [B]: the abs
    and rel residual of the returned (lowest-residual, by ``stop``) iterate; trace_abs / trace_rel
    [T, B]: residuals of every evaluated iterate up to the step the last sample stopped at;
    status [B] (int8, see ``STATUS_NAMES``; ``nonconverged`` is ``status != 0``); n_evals: batched F
    evaluations; cuda_graph: whether steps were replayed as a CUDA graph (the first step always
    runs eagerly). ``backward`` (implicit backward of :func:`fixed_point`, filled when it runs):
    the adjoint solve's per-sample ``steps``, ``residual`` (relative), ``status``,
    ``nonconverged`` [B] and ``n_vjps``.
    """

    steps: torch.Tensor
    abs_lowest: torch.Tensor
    rel_lowest: torch.Tensor
    trace_abs: torch.Tensor
    trace_rel: torch.Tensor
    status: torch.Tensor
    n_evals: int
    cuda_graph: bool = False
    backward: dict = dc_field(default_factory=dict)

    @property
    def status_names(self) -> list[str]:
        return [STATUS_NAMES[int(s)] for s in self.status.tolist()]

    @property
    def abs_max(self) -> float:
        """Batch max of the abs residual of the returned iterates (docs/design.md §4)."""
        return float(self.abs_lowest.max())

    @property
    def rel_max(self) -> float:
        """Batch max of the rel residual of the returned iterates (docs/design.md §4)."""
        return float(self.rel_lowest.max())

    @property
    def converged(self) -> torch.Tensor:
        return self.status == 0

    @property
    def nonconverged(self) -> torch.Tensor:
        """[B] bool: the sample ended above ``tol`` (status ``max_steps`` or ``diverged``); the
        adjoint solve's counterpart is ``backward["nonconverged"]``."""
        return self.status != 0

    @property
    def diverged(self) -> torch.Tensor:
        return self.status == 2


def _module_params(f: Any) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(f, torch.nn.Module):
        named = [(n, p) for n, p in f.named_parameters() if p.requires_grad]
        return [n for n, _ in named], [p for _, p in named]
    return [], []


def as_field(f: Any, x: Optional[torch.Tensor]) -> "_C.VectorField":
    """The C++ vector field for ``f`` with ``x`` bound (see the module docstring for the forms).

    Example: ``field = as_field(lambda z, x: torch.tanh(z) + x, x); field.eval(z)``.
    """
    if isinstance(f, _C.VectorField):
        return f
    if x is None:
        raise ValueError(
            f"x must be a tensor (the injection, [B, ...]) when f is a {type(f).__name__}, got None; "
            "only an eqprop._C.VectorField handle carries its own x"
        )
    if x is not None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        _C.check_injection(x)
    if hasattr(f, "vector_field") and callable(f.vector_field):
        fld = f.vector_field(x)
        if not isinstance(fld, _C.VectorField):
            raise TypeError(
                f"{type(f).__name__}.vector_field(x) must return an eqprop._C.VectorField, got {type(fld).__name__}"
            )
        return fld
    if not callable(f):
        raise TypeError(
            f"f must be an eqprop._C.VectorField, an object with .vector_field(x), or a "
            f"callable f(z, x); got {type(f).__name__}"
        )
    names, params = _module_params(f)
    return _C.ModuleField(f, x, names, params)


def _initial_state(x: Optional[torch.Tensor], z0: Optional[torch.Tensor]) -> torch.Tensor:
    if z0 is not None:
        if not isinstance(z0, torch.Tensor):
            raise TypeError(f"z0 must be a torch.Tensor or None, got {type(z0).__name__}")
        if x is not None and z0.device != x.device:
            raise ValueError(f"z0 must be on the device of x ({x.device}), got {z0.device}")
        if x is not None and z0.dtype != x.dtype:
            raise ValueError(f"z0 must have the dtype of x ({x.dtype}), got {z0.dtype}")
        return z0.detach()
    if x is None:
        raise ValueError("z0 must be given when x is None (a VectorField handle with x bound)")
    return torch.zeros_like(x, memory_format=torch.contiguous_format).detach()


def _info(d: dict) -> RelaxInfo:
    return RelaxInfo(
        steps=d["steps"],
        abs_lowest=d["abs_residual"],
        rel_lowest=d["rel_residual"],
        trace_abs=d["trace_abs"],
        trace_rel=d["trace_rel"],
        status=d["status"],
        n_evals=int(d["n_evals"]),
        cuda_graph=bool(d["cuda_graph"]),
    )


def _int_option(name: str, v) -> int:
    """v as an int; TypeError for anything that is not an integer (2.5, True, "3") rather than a
    silent truncation. Integer scalars of numpy / torch are accepted."""
    if not isinstance(v, bool):
        try:
            return operator.index(v)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")


# ---- non-convergence policy (docs/design.md §4) ------------------------------------------------------


def min_rel_tol(dtype: torch.dtype) -> float:
    """The smallest relative tolerance that a state of ``dtype`` can be relied on to reach:
    ``finfo(dtype).eps`` (bfloat16 7.8e-3, float16 9.8e-4, float32 1.2e-7, float64 2.2e-16).

    F(z) is evaluated in the state's dtype, so near the fixed point ``F(z) - z`` is rounding noise:
    for the equilibrium block the relative residual bottoms out at 0.1-0.5 eps (measured in
    bfloat16 and float16), and a ``stop="rel"`` tolerance (or adjoint tolerance) below eps is met
    only by luck, e.g. never for bfloat16 and the default ``tol=1e-4``. Use ``tol >= 2 * eps``
    (bfloat16: 1.6e-2, float16: 2e-3), or ``tol=0`` to run exactly ``max_steps`` steps. Complex
    dtypes use their real part's eps.

    Example: ``eqprop.solvers.min_rel_tol(torch.bfloat16)  # 0.0078125``
    """
    if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"dtype must be a floating-point or complex torch.dtype, got {dtype!r}")
    return float(torch.finfo(dtype.to_real()).eps)


def _warn_unreachable_tol(
    where: str, dtype: torch.dtype, opts: RelaxOptions, backward_tol: Optional[float] = None, stacklevel: int = 3
) -> None:
    """Warn before relaxing when a relative tolerance is below the dtype's resolution (then every
    sample would run to max_steps and end with status max_steps)."""
    if opts.on_nonconvergence == "ignore" or not (dtype.is_floating_point or dtype.is_complex):
        return
    floor = min_rel_tol(dtype)
    low = []
    if opts.stop == "rel" and 0 < opts.tol < floor:
        low.append(f"tol={opts.tol:g}")
    if backward_tol is not None and 0 < backward_tol < floor:  # the adjoint residual is relative
        low.append(f"backward_tol={backward_tol:g}")
    if low:
        warnings.warn(
            f"{where}: {' and '.join(low)} is below what {dtype} resolves (its eps = {floor:.1e}: relative "
            f"residuals bottom out near it, see eqprop.solvers.min_rel_tol), so samples will likely run to "
            f"max_steps; use tol >= {2 * floor:.1e}, or tol=0 for exactly max_steps steps",
            NonConvergenceWarning,
            stacklevel=stacklevel,
        )


def _unconverged(phase: str, status: torch.Tensor, residual: torch.Tensor, tol: float, what: str) -> Optional[str]:
    """One line on the samples of ``status`` [B] that did not converge, or None if all did.

    With tol = 0 the caller asked for exactly max_steps steps, so only divergence counts."""
    bad = (status == 2) if tol == 0 else (status != 0)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    n_div = int((status == 2).sum())
    r = residual[bad].double()
    worst = float("nan") if bool(r.isnan().any()) else float(r.max())
    kinds = ", ".join(
        k for k in (f"{n_bad - n_div} at max_steps" if n_bad > n_div else "", f"{n_div} diverged" if n_div else "") if k
    )
    return (
        f"the {phase} did not converge for {n_bad} of {status.numel()} samples ({kinds}); "
        f"worst {what} residual {worst:.2e} > tol {tol:g}"
    )


def _forward_unconverged(info: "RelaxInfo", opts: RelaxOptions) -> Optional[str]:
    if opts.on_nonconvergence == "ignore":
        return None
    residual = info.rel_lowest if opts.stop == "rel" else info.abs_lowest
    return _unconverged("forward relaxation", info.status, residual, opts.tol, opts.stop)


def _adjoint_unconverged(res: dict, bo: "BackwardOptions", mode: str) -> Optional[str]:
    if mode == "ignore":
        return None
    return _unconverged("adjoint solve", res["status"], res["residual"], bo.tol, "rel")


def _report(where: str, parts: list, mode: str, info: Optional["RelaxInfo"], stacklevel: int = 3) -> None:
    """One warning (or NonConvergenceError) for all the phases of one call that did not converge."""
    parts = [p for p in parts if p]
    if not parts or mode == "ignore":
        return
    msg = (
        f"{where}: " + "; ".join(parts) + ". Per-sample status and residuals are in the returned info; "
        "give more steps (max_steps / backward_max_steps), damping (eps < 1) or solver='anderson', make the "
        "field contractive, or pass on_nonconvergence='ignore' where this is expected"
    )
    if mode == "raise":
        raise NonConvergenceError(msg, info)
    warnings.warn(msg, NonConvergenceWarning, stacklevel=stacklevel + 1)


def _relax(fld, z0: torch.Tensor, opts: RelaxOptions, drive=None) -> tuple[torch.Tensor, RelaxInfo]:
    d = _C.relax(fld, z0, opts, drive)
    # Non-convergence is reported by the public callers, once per call (``_report``).
    return d["z"], _info(d)


def relax(
    f: Any,
    x: Optional[torch.Tensor],
    *,
    z0: Optional[torch.Tensor] = None,
    drive: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    **options,
) -> tuple[torch.Tensor, RelaxInfo]:
    """Relax to the fixed point z* = F(z*; x) (docs/design.md §4), never differentiated through.

    Damped Picard ``z <- z + eps (F(z) - z)`` or type-II Anderson (``anderson_m`` history,
    regularization ``anderson_reg``, mixing ``eps``) from ``z0`` (default zeros like x).
    ``options`` are those of :data:`RelaxOptions` (``print(eqprop.RelaxOptions())`` shows the
    defaults); an unknown option raises TypeError listing the valid ones.
    Returns ``(z, info)``: z [B, ...] is the lowest-residual iterate per sample (among the
    ``max_steps`` evaluated ones, z_0 ... z_{T-1}); ``info`` is a
    :class:`RelaxInfo`. Divergence is reported per sample in ``info.status``, never raised.
    ``drive(z)`` (optional, [B, ...] -> [B, ...]) is added to F: the relaxation then follows
    dz/dt = F(z) + drive(z) - z, the nudged phase of EP with drive = -β ∂ℓ/∂z + c(z) (docs/design.md §5);
    residuals are those of the driven field. ``check_every``, ``cuda_graph`` and
    ``on_nonconvergence`` (samples that end above ``tol``: one :class:`NonConvergenceWarning`
    per call by default, ``"raise"``: :class:`NonConvergenceError`, ``"ignore"``): see
    :data:`RelaxOptions`.

    Example: ``z, info = eqprop.relax(lambda z, x: 0.5 * torch.tanh(z) + x, torch.randn(4, 8))``.
    """
    opts = RelaxOptions.from_kwargs("relax", options)
    fld = as_field(f, x)
    if drive is not None and not callable(drive):
        raise TypeError(f"drive must be callable as drive(z) or None, got {type(drive).__name__}")
    start = _initial_state(x, z0)
    _warn_unreachable_tol("relax", start.dtype, opts)
    z, info = _relax(fld, start, opts, drive)
    _report("relax", [_forward_unconverged(info, opts)], opts.on_nonconvergence, info)
    return z, info


@dataclass
class BackwardOptions:
    """The adjoint solve of the implicit backward: relax λ ↦ Jᵀλ + g with ``solver`` ("picard" is
    the recurrent-backprop iteration λ <- λ + eps (Jᵀλ + g - λ); "anderson" accelerates it) until
    ``||Jᵀλ + g - λ|| / ||Jᵀλ + g|| <= tol`` or ``max_steps`` VJPs. ``eps`` is the forward
    relaxation's damping: Jᵀ has J's spectrum, so the adjoint needs the damping the forward did."""

    max_steps: int
    tol: float
    solver: str = "picard"
    anderson_m: int = 5
    eps: float = 1.0


def _backward_options(max_steps, tol, solver, anderson_m, opts: RelaxOptions) -> BackwardOptions:
    """None takes the forward relaxation's max_steps / tol (TorchDEQ's b_* defaults)."""
    max_steps = opts.max_steps if max_steps is None else max_steps
    tol = opts.tol if tol is None else tol
    max_steps = _int_option("backward_max_steps", max_steps)
    if max_steps < 1:
        raise ValueError(f"backward_max_steps must be an int >= 1, got {max_steps!r}")
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"backward_tol must be a float >= 0, got {tol!r}")
    if solver not in ("picard", "anderson"):
        raise ValueError(f"backward_solver must be one of 'picard', 'anderson', got {solver!r}")
    anderson_m = _int_option("backward_anderson_m", anderson_m)
    if anderson_m < 1:
        raise ValueError(f"backward_anderson_m must be an int >= 1, got {anderson_m!r}")
    return BackwardOptions(max_steps, float(tol), solver, anderson_m, float(opts.eps))


def _adjoint_hook(fld, z_star: torch.Tensor, bo: BackwardOptions, info: RelaxInfo, mode: str) -> Callable:
    def hook(g: torch.Tensor) -> torch.Tensor:
        # Autograd hands the conjugate (Wirtinger) cotangent for complex z; the engine solves with
        # the plain transpose: λ = conj(λ_plain(conj g)) solves λ = Jᴴλ + g (docs/design.md §5).
        gp = g.conj().resolve_conj() if g.is_complex() else g
        res = _C.adjoint_solve(fld, z_star, gp, bo.max_steps, bo.tol, bo.solver, bo.anderson_m, bo.eps)
        info.backward.update({k: v for k, v in res.items() if k != "lambda"})
        info.backward["nonconverged"] = res["status"] != 0
        # An adjoint stopped above tol gives a gradient off by about its residual; one that diverged
        # (ρ(J) ≥ 1) has no Neumann series to sum (docs/design.md §5). Raised here, the error leaves
        # through loss.backward().
        _report("fixed_point (implicit backward)", [_adjoint_unconverged(res, bo, mode)], mode, info, stacklevel=1)
        lam = res["lambda"]
        return lam.conj().resolve_conj() if lam.is_complex() else lam

    return hook


def fixed_point(
    f: Any,
    x: Optional[torch.Tensor],
    *,
    backward: str = "implicit",
    bptt_horizon: Optional[int] = None,
    backward_max_steps: Optional[int] = None,
    backward_tol: Optional[float] = None,
    backward_solver: str = "picard",
    backward_anderson_m: int = 5,
    z0: Optional[torch.Tensor] = None,
    return_info: bool = False,
    **relax_options,
):
    """The fixed point z* = F(z*; x) on the autograd graph (gradients reach f's parameters and x).

    ``backward="implicit"``: relax without a graph, then apply F once differentiably,
    z = F(z*; x); a hook replaces the incoming cotangent g by λ solving (I - Jᵀ)λ = g with the
    adjoint iteration λ <- Jᵀλ + g in C++ (``backward_solver="anderson"`` accelerates it;
    ``backward_max_steps`` VJPs, ``backward_tol`` on ``||Jᵀλ + g - λ|| / ||Jᵀλ + g||``; default:
    the forward ``max_steps`` and ``tol``), so autograd continues with (∂F/∂θ)ᵀλ and (∂F/∂x)ᵀλ
    (docs/design.md §5).
    ``backward="bptt"``: relax, then ``bptt_horizon`` damped Picard steps from z* on the graph
    (truncated BPTT); ``bptt_horizon=None`` backpropagates through ``max_steps`` steps from z0.
    ``relax_options`` are those of :func:`relax`. Returns z [B, ...] (and the :class:`RelaxInfo`
    with ``return_info=True``; its ``backward`` dict fills in when the adjoint runs).

    Non-convergence (``on_nonconvergence``, default ``"warn"``; see :class:`RelaxOptions`): a
    forward relaxation that ends above ``tol`` for some sample is reported when fixed_point
    returns, an adjoint solve that ends above ``backward_tol`` when the backward runs (the error
    of ``"raise"`` then leaves through ``loss.backward()``), each once. With plain BPTT
    (``bptt_horizon=None``) the check is the residual of the unrolled z (one more F evaluation).

    Example: ``z = eqprop.fixed_point(layer, x); loss = z.square().sum(); loss.backward()``.
    """
    opts = RelaxOptions.from_kwargs("fixed_point", relax_options)
    mode = opts.on_nonconvergence
    if backward not in ("implicit", "bptt"):
        raise ValueError(f"backward must be one of 'implicit', 'bptt', got {backward!r}")
    if bptt_horizon is not None and _int_option("bptt_horizon", bptt_horizon) < 1:
        raise ValueError(f"bptt_horizon must be an int >= 1 or None, got {bptt_horizon!r}")
    if backward == "implicit" and bptt_horizon is not None:
        raise ValueError("bptt_horizon applies to backward='bptt' only, got backward='implicit'")
    bo = _backward_options(backward_max_steps, backward_tol, backward_solver, backward_anderson_m, opts)
    fld = as_field(f, x)
    start = _initial_state(x, z0)
    adjoint_tol = bo.tol if backward == "implicit" and torch.is_grad_enabled() else None
    _warn_unreachable_tol("fixed_point", start.dtype, opts, adjoint_tol)
    if backward == "bptt" and bptt_horizon is None:
        # Plain BPTT: the whole damped Picard relaxation from z0 on the graph.
        info = None
        z = _C.unroll(fld, start, int(opts.max_steps), float(opts.eps))
        if return_info:
            with torch.no_grad():
                _, info = _relax(fld, start, opts)
            _report("fixed_point", [_forward_unconverged(info, opts)], mode, info)
        elif mode != "ignore" and opts.tol > 0:
            _report("fixed_point", [_unrolled_unconverged(fld, z, opts)], mode, None)
        return (z, info) if return_info else z
    z_star, info = _relax(fld, start, opts)
    _report("fixed_point", [_forward_unconverged(info, opts)], mode, info)
    if not torch.is_grad_enabled():
        return (z_star, info) if return_info else z_star
    if backward == "bptt":
        z = _C.unroll(fld, z_star, int(bptt_horizon), float(opts.eps))
    else:
        z = fld.eval(z_star)  # = z* at convergence; its graph carries (∂F/∂θ)ᵀ, (∂F/∂x)ᵀ
        if z.requires_grad:
            z.register_hook(_adjoint_hook(fld, z_star, bo, info, mode))
    return (z, info) if return_info else z


def _unrolled_unconverged(fld, z: torch.Tensor, opts: RelaxOptions) -> Optional[str]:
    """Plain BPTT keeps no per-sample stats: judge its last iterate by its residual (per ``stop``)."""
    with torch.no_grad():
        zd = z.detach()
        fz = fld.eval(zd)
        res = (fz - zd).flatten(1).norm(dim=1).double()  # [B]
        if opts.stop == "rel":
            res = res / fz.flatten(1).norm(dim=1).double()
    status = torch.where(res.isfinite(), (res > opts.tol).to(torch.int8), torch.full_like(res, 2, dtype=torch.int8))
    return _unconverged("unrolled relaxation", status, res, opts.tol, opts.stop)
