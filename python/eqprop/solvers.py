"""Relaxation to a fixed point and differentiable fixed points (DESIGN.md §4, §5).

Every function takes the vector field ``f`` in one of three forms:

* an ``eqprop._C.VectorField`` handle (x already bound; pass ``x`` anyway or give ``z0``);
* an object with a ``.vector_field(x)`` method (e.g. ``eqprop.EquilibriumBlock``): its native C++
  field runs the loop with no Python inside;
* any callable / ``nn.Module`` ``f(z, x) -> F(z; x)``, wrapped by the C++ ``ModuleField`` adapter
  (Python runs only inside ``f``); its trainable parameters are the field's parameters.

The loops run in C++ (``csrc/solvers/relax.cpp``). State ``z`` is ``[B, ...]``: the first dimension
indexes samples, and the field must not mix samples (stats and stopping are per sample).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable, Optional

import torch

from . import _C

__all__ = ["RelaxOptions", "BackwardOptions", "RelaxInfo", "as_field", "relax", "fixed_point", "STATUS_NAMES"]

log = logging.getLogger(__name__)

#: Per-sample status codes in ``RelaxInfo.status`` (int8), same order as the C++ enum.
STATUS_NAMES = ("converged", "max_steps", "diverged")


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
    """Per-sample statistics of a relaxation (TorchDEQ convention; DESIGN.md §4).

    steps [B] (int64): F evaluations until the sample stopped; abs_lowest / rel_lowest [B]: the abs
    and rel residual of the returned (lowest-residual, by ``stop``) iterate; trace_abs / trace_rel
    [T, B]: residuals of every evaluated iterate up to the step the last sample stopped at;
    status [B] (int8, see ``STATUS_NAMES``); n_evals: batched F evaluations; cuda_graph: whether
    steps were replayed as a CUDA graph (the first step always runs eagerly).
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
        """Batch max of the abs residual of the returned iterates (DESIGN.md §4)."""
        return float(self.abs_lowest.max())

    @property
    def rel_max(self) -> float:
        """Batch max of the rel residual of the returned iterates (DESIGN.md §4)."""
        return float(self.rel_lowest.max())

    @property
    def converged(self) -> torch.Tensor:
        return self.status == 0

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
    if x is not None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        _C.check_injection(x)
    if hasattr(f, "vector_field") and callable(f.vector_field):
        fld = f.vector_field(x)
        if not isinstance(fld, _C.VectorField):
            raise TypeError(f"{type(f).__name__}.vector_field(x) must return an eqprop._C.VectorField, "
                            f"got {type(fld).__name__}")
        return fld
    if not callable(f):
        raise TypeError(f"f must be an eqprop._C.VectorField, an object with .vector_field(x), or a "
                        f"callable f(z, x); got {type(f).__name__}")
    if x is None:
        raise ValueError("x must be a tensor when f is a callable f(z, x), got None")
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
    return RelaxInfo(steps=d["steps"], abs_lowest=d["abs_residual"], rel_lowest=d["rel_residual"],
                     trace_abs=d["trace_abs"], trace_rel=d["trace_rel"], status=d["status"],
                     n_evals=int(d["n_evals"]), cuda_graph=bool(d["cuda_graph"]))


def _relax(fld, z0: torch.Tensor, opts: RelaxOptions, drive=None) -> tuple[torch.Tensor, RelaxInfo]:
    d = _C.relax(fld, z0, opts, drive)
    info = _info(d)
    if bool(info.diverged.any()):
        log.warning("relax: %d of %d samples diverged", int(info.diverged.sum()), info.status.numel())
    return d["z"], info


def relax(f: Any, x: Optional[torch.Tensor], *, z0: Optional[torch.Tensor] = None,
          drive: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, **options,
          ) -> tuple[torch.Tensor, RelaxInfo]:
    """Relax to the fixed point z* = F(z*; x) (DESIGN.md §4), never differentiated through.

    Damped Picard ``z <- z + eps (F(z) - z)`` or type-II Anderson (``anderson_m`` history,
    regularization ``anderson_reg``, mixing ``eps``) from ``z0`` (default zeros like x).
    ``options`` are those of :data:`RelaxOptions` (``print(eqprop.RelaxOptions())`` shows the
    defaults); an unknown option raises TypeError listing the valid ones.
    Returns ``(z, info)``: z [B, ...] is the lowest-residual iterate per sample (among the
    ``max_steps`` evaluated ones, z_0 ... z_{T-1}); ``info`` is a
    :class:`RelaxInfo`. Divergence is reported per sample in ``info.status``, never raised.
    ``drive(z)`` (optional, [B, ...] -> [B, ...]) is added to F: the relaxation then follows
    dz/dt = F(z) + drive(z) - z, the nudged phase of EP with drive = -β ∂ℓ/∂z + c(z) (DESIGN.md §5);
    residuals are those of the driven field. ``check_every`` and ``cuda_graph``: see
    :data:`RelaxOptions`.

    Example: ``z, info = eqprop.relax(lambda z, x: 0.5 * torch.tanh(z) + x, torch.randn(4, 8))``.
    """
    opts = RelaxOptions.from_kwargs("relax", options)
    fld = as_field(f, x)
    if drive is not None and not callable(drive):
        raise TypeError(f"drive must be callable as drive(z) or None, got {type(drive).__name__}")
    return _relax(fld, _initial_state(x, z0), opts, drive)


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
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"backward_max_steps must be an int >= 1, got {max_steps!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"backward_tol must be a float >= 0, got {tol!r}")
    if solver not in ("picard", "anderson"):
        raise ValueError(f"backward_solver must be one of 'picard', 'anderson', got {solver!r}")
    if isinstance(anderson_m, bool) or not isinstance(anderson_m, int) or anderson_m < 1:
        raise ValueError(f"backward_anderson_m must be an int >= 1, got {anderson_m!r}")
    return BackwardOptions(max_steps, float(tol), solver, anderson_m, float(opts.eps))


def _adjoint_hook(fld, z_star: torch.Tensor, bo: BackwardOptions, info: RelaxInfo) -> Callable:
    def hook(g: torch.Tensor) -> torch.Tensor:
        # Autograd hands the conjugate (Wirtinger) cotangent for complex z; the engine solves with
        # the plain transpose: λ = conj(λ_plain(conj g)) solves λ = Jᴴλ + g (DESIGN.md §5).
        gp = g.conj().resolve_conj() if g.is_complex() else g
        res = _C.adjoint_solve(fld, z_star, gp, bo.max_steps, bo.tol, bo.solver, bo.anderson_m, bo.eps)
        info.backward.update({k: v for k, v in res.items() if k != "lambda"})
        # Per-sample outcome in info.backward; divergence (ρ(J) ≥ 1: the implicit gradient does not
        # exist as a Neumann series) is worth a warning, running out of steps is not.
        n_div = int((res["status"] == 2).sum())
        if n_div:
            log.warning("fixed_point: the adjoint iteration diverged for %d of %d samples",
                        n_div, res["status"].numel())
        lam = res["lambda"]
        return lam.conj().resolve_conj() if lam.is_complex() else lam

    return hook


def fixed_point(f: Any, x: Optional[torch.Tensor], *, backward: str = "implicit",
                bptt_horizon: Optional[int] = None, backward_max_steps: Optional[int] = None,
                backward_tol: Optional[float] = None, backward_solver: str = "picard",
                backward_anderson_m: int = 5, z0: Optional[torch.Tensor] = None,
                return_info: bool = False, **relax_options):
    """The fixed point z* = F(z*; x) on the autograd graph (gradients reach f's parameters and x).

    ``backward="implicit"``: relax without a graph, then apply F once differentiably,
    z = F(z*; x); a hook replaces the incoming cotangent g by λ solving (I - Jᵀ)λ = g with the
    adjoint iteration λ <- Jᵀλ + g in C++ (``backward_solver="anderson"`` accelerates it;
    ``backward_max_steps`` VJPs, ``backward_tol`` on ``||Jᵀλ + g - λ|| / ||Jᵀλ + g||``; default:
    the forward ``max_steps`` and ``tol``), so autograd continues with (∂F/∂θ)ᵀλ and (∂F/∂x)ᵀλ
    (DESIGN.md §5).
    ``backward="bptt"``: relax, then ``bptt_horizon`` damped Picard steps from z* on the graph
    (truncated BPTT); ``bptt_horizon=None`` backpropagates through ``max_steps`` steps from z0.
    ``relax_options`` are those of :func:`relax`. Returns z [B, ...] (and the :class:`RelaxInfo`
    with ``return_info=True``; its ``backward`` dict fills in when the adjoint runs).

    Example: ``z = eqprop.fixed_point(layer, x); loss = z.square().sum(); loss.backward()``.
    """
    opts = RelaxOptions.from_kwargs("fixed_point", relax_options)
    if backward not in ("implicit", "bptt"):
        raise ValueError(f"backward must be one of 'implicit', 'bptt', got {backward!r}")
    if bptt_horizon is not None and (isinstance(bptt_horizon, bool) or not isinstance(bptt_horizon, int)
                                     or bptt_horizon < 1):
        raise ValueError(f"bptt_horizon must be an int >= 1 or None, got {bptt_horizon!r}")
    if backward == "implicit" and bptt_horizon is not None:
        raise ValueError("bptt_horizon applies to backward='bptt' only, got backward='implicit'")
    bo = _backward_options(backward_max_steps, backward_tol, backward_solver, backward_anderson_m, opts)
    fld = as_field(f, x)
    start = _initial_state(x, z0)
    if backward == "bptt" and bptt_horizon is None:
        # Plain BPTT: the whole damped Picard relaxation from z0 on the graph.
        info = None
        z = _C.unroll(fld, start, int(opts.max_steps), float(opts.eps))
        if return_info:
            with torch.no_grad():
                _, info = _relax(fld, start, opts)
        return (z, info) if return_info else z
    z_star, info = _relax(fld, start, opts)
    if not torch.is_grad_enabled():
        return (z_star, info) if return_info else z_star
    if backward == "bptt":
        z = _C.unroll(fld, z_star, int(bptt_horizon), float(opts.eps))
    else:
        z = fld.eval(z_star)  # = z* at convergence; its graph carries (∂F/∂θ)ᵀ, (∂F/∂x)ᵀ
        if z.requires_grad:
            z.register_hook(_adjoint_hook(fld, z_star, bo, info))
    return (z, info) if return_info else z
