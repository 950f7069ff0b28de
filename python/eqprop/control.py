"""The contraction controller (docs/design.md §6): keeps the equilibrium map contractive while training.

One :class:`ContractionController` bundles the knobs of docs/design.md §6:

* an adaptive Jacobian penalty ``jr·‖J‖²_F`` whose weight ``jr`` rises (×rate) while the free-phase
  residual is above ``res_target`` and decays (÷rate) otherwise, inside ``[jr_floor, jr_max]``;
* an optional homeostatic term ``homeostasis·½‖J − Jᵀ‖²_F`` (Jacobian symmetry, for EP);
* a fuse: a residual above ``fuse`` stops training cleanly (keep the last good checkpoint);
* ``cprewarm``: the first steps are penalty-only (``task_enabled`` False);
* ``spectral_rho``: the spectral cap of an :class:`eqprop.EquilibriumBlock` (fixed at construction);
* ``pema``: an exponential moving average of the parameters for evaluation.

Trainer loop (one optimizer step)::

    z, info = eqprop.relax(block, x)                      # free phase
    d = ctl.step(info)                                    # decide jr for this step
    if d.stop: break                                      # fuse tripped: keep last checkpoint
    loss = (task_loss if d.task_enabled else 0) + ctl.penalty(block, x, z.detach())
    loss.backward(); opt.step(); ctl.update_ema(model)

``ctl.record_penalty_share(share)`` adds the penalty's share of the update to the step's log entry
and ``ctl.plot()`` draws the history (jr, residual, share against step).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional

import torch

from . import diagnostics

__all__ = ["ContractionController", "Decision", "FuseTrippedError"]

_log = logging.getLogger(__name__)


class FuseTrippedError(RuntimeError):
    """Raised by :meth:`ContractionController.step` once the fuse has tripped (docs/design.md §6)."""


@dataclass
class Decision:
    """One controller decision (docs/design.md §6).

    step: 0-based index of the decision; jr: the Jacobian-penalty weight to use for this step;
    residual: the free-phase residual the decision was made from (batch max, relative);
    action: ``"rise"`` (jr ×rate), ``"decay"`` (jr ÷rate) or ``"hold"`` (jr unchanged: frozen,
    already at its bound, or fuse tripped); fuse_tripped / stop: the residual exceeded ``fuse``
    (the trainer must stop); reason: why it stopped (``""`` otherwise); task_enabled: False during
    the ``cprewarm`` penalty-only steps; penalty_share: what the caller passed, or None.
    """

    step: int
    jr: float
    residual: float
    action: str
    fuse_tripped: bool
    task_enabled: bool
    stop: bool = False
    reason: str = ""
    penalty_share: Optional[float] = None

    def as_dict(self) -> dict:
        return asdict(self)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _float(name: str, v: Any, *, lo: float, lo_open: bool, optional: bool = False) -> Optional[float]:
    if v is None and optional:
        return None
    if not _is_number(v):
        need = "a real number or None" if optional else "a real number"
        raise TypeError(f"{name} must be {need}, got {type(v).__name__} {v!r}")
    v = float(v)
    bad = not math.isfinite(v) or (v <= lo if lo_open else v < lo)
    if bad:
        raise ValueError(f"{name} must be finite and {'>' if lo_open else '>='} {lo:g}, got {v!r}")
    return v


def _int(name: str, v: Any, *, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


class ContractionController:
    """Adaptive contraction control for equilibrium training (docs/design.md §6).

    Args (defaults make a plain, fixed penalty: the controller changes nothing unless asked):
        jacreg: initial Jacobian-penalty weight jr (>= 0, default 0: no penalty).
        jr_floor, jr_max: bounds of jr (default: both ``jacreg``, i.e. jr frozen). jr adapts only
            when ``jr_floor < jr_max``; then ``jr_floor`` must be > 0 (jr moves multiplicatively and
            could never leave 0) and ``jr_floor <= jacreg <= jr_max``.
        res_target: target batch-max relative free-phase residual (> 0, default 1e-3).
        rate: multiplicative step of jr (> 1, default 2): ``jr ← min(jr·rate, jr_max)`` while the
            residual is above ``res_target``, ``jr ← max(jr/rate, jr_floor)`` otherwise.
        homeostasis: weight of ``½‖J − Jᵀ‖²_F / numel(z)`` (>= 0, default 0).
        spectral_rho: spectral cap ρ expected on the block (> 0 or None, default None); see
            :meth:`apply_spectral_cap`.
        fuse: residual above which training stops (> 0 or None = no fuse, default None).
        cprewarm: number of initial penalty-only steps (int >= 0, default 0).
        pema: decay of the parameter EMA (in [0, 1) or None = no EMA, default None).
        probes: Hutchinson probes per penalty (int >= 1, default 1).
        seed: base seed of the probes (int >= 0, default 0). The penalty of the controller's step
            k uses seeds ``seed + 2k`` (‖J‖²) and ``seed + 2k + 1`` (homeostasis), so probes differ
            step to step and a resumed controller reproduces them.

    A non-finite residual counts as above every threshold (jr rises; the fuse trips if set).

    Example: ``ctl = ContractionController(jacreg=1e-3, jr_floor=1e-4, jr_max=1.0, fuse=0.5)``
    """

    def __init__(
        self,
        jacreg: float = 0.0,
        jr_floor: Optional[float] = None,
        jr_max: Optional[float] = None,
        res_target: float = 1e-3,
        rate: float = 2.0,
        homeostasis: float = 0.0,
        spectral_rho: Optional[float] = None,
        fuse: Optional[float] = None,
        cprewarm: int = 0,
        pema: Optional[float] = None,
        probes: int = 1,
        seed: int = 0,
    ):
        jacreg = _float("jacreg", jacreg, lo=0.0, lo_open=False)
        jr_floor = _float("jr_floor", jr_floor, lo=0.0, lo_open=False, optional=True)
        jr_max = _float("jr_max", jr_max, lo=0.0, lo_open=False, optional=True)
        self.jr_floor = jacreg if jr_floor is None else jr_floor
        self.jr_max = jacreg if jr_max is None else jr_max
        if self.jr_floor > self.jr_max:
            raise ValueError(f"jr_floor must be <= jr_max, got jr_floor={self.jr_floor!r} > jr_max={self.jr_max!r}")
        if not self.jr_floor <= jacreg <= self.jr_max:
            raise ValueError(
                f"jacreg must lie in [jr_floor, jr_max] = [{self.jr_floor!r}, {self.jr_max!r}], got {jacreg!r}"
            )
        if self.jr_floor < self.jr_max and self.jr_floor == 0.0:
            raise ValueError(
                "jr_floor must be > 0 when jr adapts (jr_floor < jr_max): jr moves multiplicatively, "
                f"got jr_floor=0.0 with jr_max={self.jr_max!r}"
            )
        self.jacreg = jacreg
        self.res_target = _float("res_target", res_target, lo=0.0, lo_open=True)
        self.rate = _float("rate", rate, lo=1.0, lo_open=True)
        self.homeostasis = _float("homeostasis", homeostasis, lo=0.0, lo_open=False)
        self.spectral_rho = _float("spectral_rho", spectral_rho, lo=0.0, lo_open=True, optional=True)
        self.fuse = _float("fuse", fuse, lo=0.0, lo_open=True, optional=True)
        self.cprewarm = _int("cprewarm", cprewarm, lo=0)
        self.pema = _float("pema", pema, lo=0.0, lo_open=False, optional=True)
        if self.pema is not None and self.pema >= 1.0:
            raise ValueError(f"pema must be in [0, 1) or None, got {self.pema!r}")
        self.probes = _int("probes", probes, lo=1)
        self.seed = _int("seed", seed, lo=0)
        # Dynamic state (all of it goes into state_dict()).
        self.jr = jacreg
        self.step_count = 0
        self.fuse_tripped = False
        self.trip_reason = ""
        self.history: list[dict] = []
        self._ema: Optional[dict[str, torch.Tensor]] = None

    # ---- jr schedule ---------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        """True when jr cannot move (``jr_floor == jr_max``)."""
        return self.jr_floor == self.jr_max

    @property
    def task_enabled(self) -> bool:
        """Whether the next decided step trains on the task (False for the first ``cprewarm``)."""
        return self.step_count >= self.cprewarm

    def step(self, info: Any, penalty_share: Optional[float] = None) -> Decision:
        """Decide jr for this step from the free-phase residual (docs/design.md §6).

        info: an :class:`eqprop.solvers.RelaxInfo` (its ``rel_max``, the batch-max relative
        residual, is used) or that residual as a float. penalty_share: optional float logged with
        the decision (e.g. penalty / total loss). Returns a :class:`Decision`; ``decision.stop``
        is True when the fuse trips, after which every further call raises
        :class:`FuseTrippedError`.

        Example: ``d = ctl.step(info); if d.stop: break``
        """
        if self.fuse_tripped:
            raise FuseTrippedError(f"the contraction fuse tripped earlier ({self.trip_reason}); refusing further steps")
        if hasattr(info, "rel_max"):
            residual = float(info.rel_max)
        elif _is_number(info):
            residual = float(info)
        else:
            raise TypeError(f"info must be a RelaxInfo or a float residual, got {type(info).__name__}")
        if penalty_share is not None:
            if not _is_number(penalty_share):
                raise TypeError(f"penalty_share must be a real number or None, got {type(penalty_share).__name__}")
            penalty_share = float(penalty_share)
        above = not math.isfinite(residual) or residual > self.res_target
        stop, reason = False, ""
        if self.fuse is not None and (not math.isfinite(residual) or residual > self.fuse):
            stop, reason = True, f"residual {residual:.3g} > fuse {self.fuse:.3g} at step {self.step_count}"
            self.fuse_tripped, self.trip_reason = True, reason
            action = "hold"
        else:
            old = self.jr
            if above:
                self.jr = min(self.jr * self.rate, self.jr_max)
            else:
                self.jr = max(self.jr / self.rate, self.jr_floor)
            action = "hold" if self.jr == old else ("rise" if above else "decay")
        d = Decision(
            step=self.step_count,
            jr=self.jr,
            residual=residual,
            action=action,
            fuse_tripped=stop,
            task_enabled=self.step_count >= self.cprewarm,
            stop=stop,
            reason=reason,
            penalty_share=penalty_share,
        )
        self.history.append(
            dict(step=d.step, jr=d.jr, residual=d.residual, action=d.action, penalty_share=d.penalty_share)
        )
        _log.debug(
            "contraction step %d: residual=%.4g jr=%.4g action=%s task=%s%s",
            d.step,
            residual,
            d.jr,
            action,
            d.task_enabled,
            f" STOP ({reason})" if stop else "",
        )
        if not stop:
            self.step_count += 1
        return d

    def record_penalty_share(self, share: float) -> None:
        """Log the penalty share of the update of the step just decided (known only after the
        backward pass, so :meth:`step` cannot take it): sets ``history[-1]["penalty_share"]``.

        share: a real number, e.g. ‖∇penalty‖ / (‖∇task‖ + ‖∇penalty‖) (docs/design.md §6).
        Example: ``d = ctl.step(info); ...; ctl.record_penalty_share(float(gp / (gt + gp)))``
        """
        if not _is_number(share):
            raise TypeError(f"share must be a real number, got {type(share).__name__} {share!r}")
        if not self.history:
            raise ValueError("no decision to attach the share to: call step(info) first")
        self.history[-1]["penalty_share"] = float(share)

    def plot(self, axes=None):
        """jr, residual (with res_target and fuse) and penalty share against step from
        ``history``; returns the Figure (:func:`eqprop.plots.plot_controller_history`).

        Example: ``ctl.plot().savefig("controller.png")``
        """
        from .plots import plot_controller_history

        return plot_controller_history(self.history, axes=axes, res_target=self.res_target, fuse=self.fuse)

    # ---- penalty -------------------------------------------------------------------------------
    def probe_seeds(self) -> tuple[int, int]:
        """The (‖J‖², homeostasis) probe seeds of the current step: ``seed + 2k``, ``seed + 2k + 1``."""
        k = max(self.step_count - 1, 0)  # the step just decided (step() has already counted it)
        return self.seed + 2 * k, self.seed + 2 * k + 1

    def penalty(self, f: Any, x: Optional[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """``jr·‖J‖²_F/numel(z) + homeostasis·½‖J − Jᵀ‖²_F/numel(z)`` at z, a 0-dim tensor on the
        autograd graph of f's parameters (docs/design.md §6; Hutchinson estimates from
        :func:`eqprop.diagnostics.jacobian_penalty` / :func:`eqprop.diagnostics.homeostatic_loss`).

        f, x, z: as in :mod:`eqprop.diagnostics` (z [B, ...], usually the detached fixed point).
        Returns a zero 0-dim tensor of z's dtype/device when both weights are 0.

        Example: ``(task_loss + ctl.penalty(block, x, z.detach())).backward()``
        """
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        s_j, s_h = self.probe_seeds()
        out = torch.zeros((), dtype=z.dtype, device=z.device)
        if self.jr > 0.0:
            out = out + diagnostics.jacobian_penalty(f, x, z, probes=self.probes, seed=s_j, weight=self.jr)
        if self.homeostasis > 0.0:
            out = out + diagnostics.homeostatic_loss(f, x, z, probes=self.probes, seed=s_h, weight=self.homeostasis)
        return out

    # ---- spectral cap --------------------------------------------------------------------------
    def apply_spectral_cap(self, module: Any) -> None:
        """Check / apply ``spectral_rho`` on an :class:`eqprop.EquilibriumBlock` or
        :class:`eqprop.EquilibriumLM` (its ``.block``) (docs/design.md §6).

        The block's cap lives in its immutable C++ config, fixed at construction (its
        power-iteration buffers exist only when it is set), so this cannot change it: it is a
        no-op when ``spectral_rho`` is None or equals the block's cap, and raises ValueError when
        they differ (construct the block with ``spectral_rho=...`` instead).

        Example: ``ctl.apply_spectral_cap(lm)``
        """
        block = getattr(module, "block", module)
        config = getattr(block, "config", None)
        if config is None or not hasattr(config, "spectral_rho"):
            raise TypeError(
                f"module must be an EquilibriumBlock or EquilibriumLM (with .config.spectral_rho), got "
                f"{type(module).__name__}"
            )
        if self.spectral_rho is None:
            return
        have = config.spectral_rho
        if have is None or not math.isclose(float(have), self.spectral_rho, rel_tol=1e-12, abs_tol=0.0):
            raise ValueError(
                f"spectral_rho={self.spectral_rho!r} differs from the block's cap {have!r}; the cap is fixed "
                f"at construction: build the block with spectral_rho={self.spectral_rho!r}"
            )

    # ---- parameter EMA -------------------------------------------------------------------------
    def _require_ema(self) -> float:
        if self.pema is None:
            raise ValueError("pema is None: construct the controller with pema=<decay in [0, 1)> to keep an EMA")
        return self.pema

    @torch.no_grad()
    def update_ema(self, module: torch.nn.Module) -> None:
        """After an optimizer step: ``ema ← pema·ema + (1 − pema)·θ`` for every parameter of module
        (the first call copies θ). Example: ``opt.step(); ctl.update_ema(model)``"""
        decay = self._require_ema()
        params = dict(module.named_parameters())
        if self._ema is None:
            self._ema = {k: p.detach().clone() for k, p in params.items()}
            return
        if set(params) != set(self._ema):
            raise ValueError(f"module's parameters {sorted(params)} do not match the EMA's {sorted(self._ema)}")
        for k, p in params.items():
            self._ema[k].mul_(decay).add_(p.detach(), alpha=1.0 - decay)

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA parameters by name (clones). Example: ``torch.save(ctl.ema_state_dict(), path)``"""
        self._require_ema()
        if self._ema is None:
            raise ValueError("the EMA is empty: call update_ema(module) after an optimizer step first")
        return {k: v.clone() for k, v in self._ema.items()}

    @contextlib.contextmanager
    def swap_in_ema(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Context manager: module's parameters are the EMA inside, restored bit-identically after.

        Example: ``with ctl.swap_in_ema(model): evaluate(model)``
        """
        ema = self.ema_state_dict()
        params = dict(module.named_parameters())
        if set(params) != set(ema):
            raise ValueError(f"module's parameters {sorted(params)} do not match the EMA's {sorted(ema)}")
        saved = {k: p.detach().clone() for k, p in params.items()}
        try:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(ema[k])
            yield module
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved[k])

    # ---- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: jr, step count, fuse state, history, EMA tensors.

        Example: ``torch.save({"ctl": ctl.state_dict(), ...}, path)``
        """
        return {
            "jr": self.jr,
            "step_count": self.step_count,
            "fuse_tripped": self.fuse_tripped,
            "trip_reason": self.trip_reason,
            "history": copy.deepcopy(self.history),
            "ema": None if self._ema is None else {k: v.clone() for k, v in self._ema.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (the hyper-parameters come from the constructor).

        Example: ``ctl = ContractionController(**cfg); ctl.load_state_dict(ckpt["ctl"])``
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = {"jr", "step_count", "fuse_tripped", "trip_reason", "history", "ema"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        self.jr = float(state["jr"])
        self.step_count = int(state["step_count"])
        self.fuse_tripped = bool(state["fuse_tripped"])
        self.trip_reason = str(state["trip_reason"])
        self.history = copy.deepcopy(list(state["history"]))
        ema = state["ema"]
        self._ema = None if ema is None else {k: v.clone() for k, v in ema.items()}
