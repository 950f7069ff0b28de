"""Gradient and influence diagnostics (docs/design.md §7).

- :func:`alignment`: cosine and norm ratio ‖ĝ_a‖/‖ĝ_b‖ of two gradient estimates, overall and per
  parameter group (attention q/k/v/o, FFN in/out, layer norms, embeddings, head).
- :func:`self_cosine`: one estimator on different batches (how consistent is its direction).
- :func:`decompose`: the split of an update into task and penalty parts.
- :func:`lr_sweep`: ΔCE after one SGD step at each learning rate, parameters restored bit-identically.
- :func:`influence`: ‖∂z*_t/∂x_{t−d}‖ against distance d through the implicit JVP
  (I − J)⁻¹(∂F/∂x)v.

Pure Python over the engine's public API: estimates from :mod:`eqprop.estimators`, JVPs from
:func:`eqprop.solvers.as_field`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import torch

from .solvers import as_field, relax

__all__ = [
    "Alignment",
    "alignment",
    "SelfCosine",
    "self_cosine",
    "Decomposition",
    "decompose",
    "LrSweep",
    "lr_sweep",
    "Influence",
    "influence",
    "default_group",
]


# ---- parameter groups ---------------------------------------------------------------------------

# EquilibriumBlock parameter names (the block's C++ parameter table) -> group.
_BLOCK_LEAF = {
    "q_weight": "attn.q",
    "q_bias": "attn.q",
    "k_weight": "attn.k",
    "k_bias": "attn.k",
    "v_weight": "attn.v",
    "v_bias": "attn.v",
    "o_weight": "attn.o",
    "o_bias": "attn.o",
    "energy_gain": "attn.o",  # the energy attention's per-head output gain
    "q_norm_weight": "norm",
    "k_norm_weight": "norm",
    "ln1_weight": "norm",
    "ln1_bias": "norm",
    "ln2_weight": "norm",
    "ln2_bias": "norm",
    "ffn_in_weight": "ffn.in",
    "ffn_in_bias": "ffn.in",
    "ffn_out_weight": "ffn.out",
    "ffn_out_bias": "ffn.out",
    "mono_A": "ffn.in",  # monotone FFN: W = (1 - m)I - AᵀA + B - Bᵀ is its one (in = out) map
    "mono_B": "ffn.in",
    "mono_bias": "ffn.in",
}

# models.Transformer / EquilibriumLM submodule (the part before the leaf) -> group.
_MODULE_RULES = [
    (re.compile(r"(^|\.)(tok_emb|pos_emb)$"), "embed"),
    (re.compile(r"(^|\.)(ln1|ln2|ln_f)$"), "norm"),
    (re.compile(r"(^|\.)attn\.qkv$"), "attn.qkv"),
    (re.compile(r"(^|\.)attn\.proj$"), "attn.o"),
    (re.compile(r"(^|\.)mlp\.0$"), "ffn.in"),
    (re.compile(r"(^|\.)mlp\.2$"), "ffn.out"),
    (re.compile(r"(^|\.)head$"), "head"),
]


def default_group(name: str) -> str:
    """The default group of a parameter name of :class:`eqprop.EquilibriumBlock`,
    :class:`eqprop.EquilibriumLM` or ``eqprop.models.Transformer`` (docs/design.md §7): one of
    ``attn.q attn.k attn.v attn.o attn.qkv ffn.in ffn.out norm embed head``. Names under
    ``readout.`` (an estimator's readout) are ``head``. An unmapped name raises ValueError.

    Example: ``default_group("block.q_weight") == "attn.q"``.
    """
    if not isinstance(name, str):
        raise TypeError(f"parameter name must be a str, got {type(name).__name__}")
    if name.startswith("readout.") or name == "readout":
        return "head"
    module, _, leaf = name.rpartition(".")
    if leaf in _BLOCK_LEAF:
        return _BLOCK_LEAF[leaf]
    for pattern, group in _MODULE_RULES:
        if pattern.search(module):
            return group
    raise ValueError(
        f"parameter {name!r} has no default group (docs/design.md §7); pass groups= as a dict "
        "name -> group or a callable"
    )


def _as_grads(g: Any, what: str) -> dict:
    grads = getattr(g, "grads", g)
    if not isinstance(grads, dict):
        raise TypeError(f"{what} must be an eqprop.Estimate or a dict name -> Tensor, got {type(g).__name__}")
    for k, v in grads.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{what}[{k!r}] must be a Tensor, got {type(v).__name__}")
    return grads


def _same_keys(a: dict, b: dict, na: str, nb: str) -> list:
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if missing or extra:
        raise ValueError(
            f"{na} and {nb} must have the same parameter names; only in {na}: {missing}, only in {nb}: {extra}"
        )
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{na}[{k!r}] has shape {tuple(a[k].shape)} but {nb}[{k!r}] has {tuple(b[k].shape)}")
    return list(a)


def _group_map(names: list, groups: Any) -> dict:
    """group -> [names], each name in exactly one group."""
    if groups is None:
        assign = {n: n for n in names}
    elif isinstance(groups, str):
        if groups != "default":
            raise ValueError(f'groups must be None, "default", a dict or a callable; got {groups!r}')
        assign = {n: default_group(n) for n in names}
    elif isinstance(groups, dict):
        unmapped = [n for n in names if n not in groups]
        if unmapped:
            raise ValueError(f"groups does not map parameter(s) {unmapped}; every parameter needs exactly one group")
        unknown = sorted(set(groups) - set(names))
        if unknown:
            raise ValueError(f"groups names parameter(s) {unknown} that the gradients do not have")
        assign = {n: groups[n] for n in names}
    elif callable(groups):
        assign = {n: groups(n) for n in names}
    else:
        raise TypeError(f'groups must be None, "default", a dict or a callable; got {type(groups).__name__}')
    out: dict = {}
    for n in names:
        out.setdefault(assign[n], []).append(n)
    return out


def _flat(grads: dict, names: list) -> torch.Tensor:
    if not names:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([grads[n].detach().reshape(-1).to(torch.float64) for n in names])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    return float(torch.dot(a, b) / (na * nb))


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    nb = float(b.norm())
    return float(a.norm()) / nb if nb != 0 else float("inf") if float(a.norm()) != 0 else float("nan")


# ---- alignment ------------------------------------------------------------------------------------


@dataclass
class Alignment:
    """Cosine and norm ratio k = ‖a‖/‖b‖ of two gradients, overall and per group (docs/design.md §7).

    ``per_group``: {group: (cos, ratio, n)} with n the number of scalar parameters in the group.
    Cosines are NaN where either part is zero.
    """

    overall_cos: float
    overall_ratio: float
    per_group: dict = field(default_factory=dict)
    labels: tuple = ("a", "b")

    def table(self) -> str:
        """A plain-text table: one line per group, then the overall line."""
        w = max([len("overall")] + [len(str(g)) for g in self.per_group])
        la, lb = self.labels
        lines = [f"{'group':<{w}}  {'cos':>8}  {'|' + la + '|/|' + lb + '|':>10}  {'n':>10}"]
        for g, (c, r, n) in self.per_group.items():
            lines.append(f"{str(g):<{w}}  {c:>8.4f}  {r:>10.4g}  {n:>10d}")
        n_all = sum(n for _, _, n in self.per_group.values())
        lines.append(f"{'overall':<{w}}  {self.overall_cos:>8.4f}  {self.overall_ratio:>10.4g}  {n_all:>10d}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, axes=None):
        """cos and k per group as bars (two panels); returns the Figure (:func:`eqprop.plots.plot_alignments`)."""
        from .plots import plot_alignments

        return plot_alignments(self, axes=axes)


def alignment(a: Any, b: Any, groups: Any = None) -> Alignment:
    """Alignment of two gradient estimates (docs/design.md §7): cos(a, b) and k = ‖a‖/‖b‖, overall
    and per group.

    a, b: :class:`eqprop.Estimate` or {name: Tensor} with the same names and shapes (else
    ValueError naming the differences). groups: None (one group per parameter), ``"default"``
    (:func:`default_group`), a dict name -> group covering every name, or a callable name -> group.

    Example: ``print(alignment(Implicit().grad(f, x, loss), BPTT(30).grad(f, x, loss), "default").table())``.
    """
    ga, gb = _as_grads(a, "a"), _as_grads(b, "b")
    names = _same_keys(ga, gb, "a", "b")
    per = {}
    for g, ns in _group_map(names, groups).items():
        fa, fb = _flat(ga, ns), _flat(gb, ns)
        per[g] = (_cos(fa, fb), _ratio(fa, fb), int(fa.numel()))
    fa, fb = _flat(ga, names), _flat(gb, names)
    return Alignment(_cos(fa, fb), _ratio(fa, fb), per)


# ---- batch self-cosine ----------------------------------------------------------------------------


class SelfCosine(NamedTuple):
    """Batch self-cosine (docs/design.md §7): ``mean`` pairwise cosine, its jackknife ``se`` and the
    [N, N] cosine ``matrix``; unpacks as ``mean, se, matrix``."""

    mean: float
    se: float
    matrix: torch.Tensor

    def plot(self, ax=None):
        """The cosine matrix as an image; returns the Figure (:func:`eqprop.plots.plot_self_cosine`)."""
        from .plots import plot_self_cosine

        return plot_self_cosine(self, ax=ax)


def self_cosine(estimator: Any, f: Any, batches: Iterable, loss_fn: Optional[Callable] = None) -> SelfCosine:
    """Batch self-cosine of one estimator (docs/design.md §7): the mean pairwise cosine of its
    flattened gradients on N ≥ 2 batches.

    ``batches``: x tensors [B, ...] (with ``loss_fn``) or (x, loss_fn) pairs; each runs
    ``estimator.grad(f, x, loss_fn)``. Returns ``(mean, se, matrix)`` with matrix [N, N] the
    cosines. The standard error is a jackknife over batches (leave one batch out, recompute the
    mean pairwise cosine), since the pairs share batches and are not independent; N = 2 gives
    NaN (one pair cannot estimate its own spread).

    Example: ``m, se, C = self_cosine(Implicit(), layer, [x1, x2, x3], loss)``.
    """
    flats = []
    for i, item in enumerate(batches):
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise ValueError(f"batches[{i}] must be x or (x, loss_fn), got a sequence of length {len(item)}")
            x, lf = item
        else:
            x, lf = item, loss_fn
        if lf is None:
            raise ValueError(f"batches[{i}] has no loss_fn: pass loss_fn= or (x, loss_fn) pairs")
        est = estimator.grad(f, x, lf)
        grads = _as_grads(est, f"estimator.grad(...) on batches[{i}]")
        names = sorted(grads)
        flats.append(_flat(grads, names))
    n = len(flats)
    if n < 2:
        raise ValueError(f"batches must hold at least 2 batches for a pairwise cosine, got {n}")
    m = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            m[i, j] = _cos(flats[i], flats[j])
    off = ~torch.eye(n, dtype=torch.bool)
    mean = float(m[off].mean())
    if n == 2:
        return SelfCosine(mean, float("nan"), m)
    # Jackknife over batches: leave batch i out, mean over the remaining pairs.
    loo = []
    for i in range(n):
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        sub = m[keep][:, keep]
        loo.append(float(sub[~torch.eye(n - 1, dtype=torch.bool)].mean()))
    loo_t = torch.tensor(loo, dtype=torch.float64)
    se = float(math.sqrt((n - 1) / n * float(((loo_t - loo_t.mean()) ** 2).sum())))
    return SelfCosine(mean, se, m)


# ---- task / penalty split -------------------------------------------------------------------------


@dataclass
class Decomposition:
    """Task / penalty split of an update (docs/design.md §7), overall and per group:
    ``cos`` = cos(task, penalty), ``ratio`` = ‖penalty‖/‖task‖, ``cos_total`` = cos(task, task + penalty).
    ``per_group``: {group: (cos, ratio, cos_total, n)}.
    """

    cos: float
    ratio: float
    cos_total: float
    per_group: dict = field(default_factory=dict)

    def table(self) -> str:
        """A plain-text table: one line per group, then the overall line."""
        w = max([len("overall")] + [len(str(g)) for g in self.per_group])
        lines = [f"{'group':<{w}}  {'cos(t,p)':>9}  {'|p|/|t|':>9}  {'cos(t,t+p)':>10}"]
        for g, (c, r, ct, _) in self.per_group.items():
            lines.append(f"{str(g):<{w}}  {c:>9.4f}  {r:>9.4g}  {ct:>10.4f}")
        lines.append(f"{'overall':<{w}}  {self.cos:>9.4f}  {self.ratio:>9.4g}  {self.cos_total:>10.4f}")
        return "\n".join(lines)

    def plot(self, axes=None):
        """cos(task, penalty), cos(task, total) and ‖penalty‖/‖task‖ per group; returns the Figure
        (:func:`eqprop.plots.plot_decomposition`)."""
        from .plots import plot_decomposition

        return plot_decomposition(self, axes=axes)


def decompose(task: Any, penalty: Any, groups: Any = None) -> Decomposition:
    """Split of an update into task and penalty parts (docs/design.md §7): cos(task, penalty),
    ‖penalty‖/‖task‖ and cos(task, task + penalty), overall and per group.

    task, penalty: :class:`eqprop.Estimate` or {name: Tensor} with the same names; groups as in
    :func:`alignment`. Example: ``print(decompose(g_task, g_jr, "default").table())``.
    """
    gt, gp = _as_grads(task, "task"), _as_grads(penalty, "penalty")
    names = _same_keys(gt, gp, "task", "penalty")

    def parts(ns):
        t, p = _flat(gt, ns), _flat(gp, ns)
        return _cos(t, p), _ratio(p, t), _cos(t, t + p), int(t.numel())

    per = {g: parts(ns) for g, ns in _group_map(names, groups).items()}
    c, r, ct, _ = parts(names)
    return Decomposition(c, r, ct, per)


# ---- one-step learning-rate sweep -----------------------------------------------------------------


class LrSweep(list):
    """[(lr, ΔCE), ...] from :func:`lr_sweep`, with a ``plot`` helper."""

    def plot(self, ax=None):
        """ΔCE against lr (log x); returns the Figure (:func:`eqprop.plots.plot_lr_sweep`)."""
        from .plots import plot_lr_sweep

        return plot_lr_sweep(self, ax=ax)


def lr_sweep(model: torch.nn.Module, grads: Any, lrs: Iterable[float], batch: Any, loss: Callable) -> LrSweep:
    """One-step learning-rate sweep (docs/design.md §7): for each lr, ΔCE = loss(model after
    p <- p - lr·g, batch) - loss(model, batch), every step from the same parameters, which are
    restored bit-identically afterwards (also on error).

    grads: {name: Tensor} or :class:`eqprop.Estimate` whose names are among
    ``model.named_parameters()`` (parameters without a gradient stay put). loss(model, batch) ->
    scalar tensor, evaluated under ``torch.no_grad``. Returns an :class:`LrSweep` list of
    (lr, ΔCE) with ``.plot()``.

    Example: ``lr_sweep(lm, est.grads, [1e-3, 1e-2, 1e-1], tokens, lambda m, b: ce(m(b), b))``.
    """
    g = _as_grads(grads, "grads")
    params = dict(model.named_parameters())
    unknown = sorted(set(g) - set(params))
    if unknown:
        raise ValueError(f"grads names parameter(s) {unknown} that model.named_parameters() lacks")
    for n, t in g.items():
        if t.shape != params[n].shape:
            raise ValueError(f"grads[{n!r}] has shape {tuple(t.shape)}, parameter has {tuple(params[n].shape)}")
    lrs = [float(lr) for lr in lrs]
    saved = {n: params[n].detach().clone() for n in g}
    out = LrSweep()
    try:
        with torch.no_grad():
            base = float(loss(model, batch))
            for lr in lrs:
                for n, t in g.items():
                    params[n].sub_(t.to(params[n].dtype), alpha=lr)
                after = float(loss(model, batch))
                for n in g:
                    params[n].copy_(saved[n])
                out.append((lr, after - base))
    finally:
        with torch.no_grad():
            for n in g:
                params[n].copy_(saved[n])
    return out


# ---- influence of input position t - d on state position t ----------------------------------------


@dataclass
class Influence:
    """‖∂z*_t/∂x_{t−d}‖ (probe-projected) against distance d (docs/design.md §7).

    ``distances`` [D] ints; ``mean``, ``se`` [D] over samples, positions t ≥ d and probes;
    ``normalized`` = mean / mean at d = 1; ``n`` [D] the number of values averaged.
    """

    distances: list
    mean: torch.Tensor
    se: torch.Tensor
    normalized: torch.Tensor
    n: list

    def plot(self, axes=None):
        """Mean with SE band and normalized curve against d (two panels); returns the Figure
        (:func:`eqprop.plots.plot_influence`)."""
        from .plots import plot_influence

        return plot_influence(self, axes=axes)


def _x_jvp(f: Callable, z: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(∂F/∂x)(z, x) v by double backward: with s a dummy cotangent, g(s) = (∂F/∂x)ᵀ s is linear
    in s, so ∂(g·v)/∂s = (∂F/∂x) v."""
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        y = f(z.detach(), xx)
        s = torch.zeros_like(y, requires_grad=True)
        (g,) = torch.autograd.grad(y, xx, s, create_graph=True)
        (u,) = torch.autograd.grad(g, s, v)
    return u.detach()


def influence(
    f: Any,
    x: torch.Tensor,
    z: torch.Tensor,
    distances: Iterable[int],
    *,
    probes: Union[int, torch.Tensor] = 1,
    seed: int = 0,
    tol: float = 1e-10,
    max_steps: int = 2000,
    max_elements: int = 1 << 22,
    sources: Optional[Iterable[int]] = None,
) -> Influence:
    """Influence of input position t − d on state position t at the fixed point z* (docs/design.md §7):
    ‖w_t‖ with w = (I − J)⁻¹(∂F/∂x)v, v a unit probe [C] on position t − d of x (zero elsewhere).

    f: a callable F(z, x) differentiable by torch.autograd (e.g. :class:`eqprop.EquilibriumBlock`);
    x, z: [B, T, C] (z the fixed point, e.g. from :func:`eqprop.relax`); distances: ints in
    [0, T). probes: a count (Gaussian directions from ``seed``, normalized) or a tensor [P, C] of
    directions (used normalized). u = (∂F/∂x)v is a double-backward JVP; (I − J)w = u is solved by
    relaxing w <- Jw + u (J-vector products of ``as_field(f, x)``) with :func:`eqprop.relax` to a
    relative residual ≤ tol per sample (else :class:`eqprop.NonConvergenceError`, an ArithmeticError).
    One solve per source position s and probe gives every d = t − s at once; all (source, probe)
    pairs are stacked on the batch axis and solved by one relaxation (in chunks of at most
    ``max_elements`` numbers), so f must treat the samples of a batch independently.
    sources: the source positions s = t − d to average over (ints in [0, T); default all): the
    cost is one solve per source and probe, so a subset shortens long sequences.
    Averages over samples, positions t ≥ d (with t − d in ``sources``) and probes; SE = std / sqrt(n)
    treats those values as independent (they are not quite: positions share a sample).

    Example: ``z, _ = eqprop.relax(blk, x); inf = influence(blk, x, z, range(1, 6))``.
    """
    if not callable(f):
        raise TypeError(f"f must be a callable F(z, x) differentiable by torch.autograd, got {type(f).__name__}")
    if not isinstance(x, torch.Tensor) or not isinstance(z, torch.Tensor):
        raise TypeError(f"x and z must be tensors, got {type(x).__name__} and {type(z).__name__}")
    if x.dim() != 3 or z.shape != x.shape:
        raise ValueError(f"x and z must be [B, T, C] of the same shape, got {tuple(x.shape)} and {tuple(z.shape)}")
    B, T, C = x.shape
    distances = [int(d) for d in distances]
    bad = [d for d in distances if not 0 <= d < T]
    if not distances or bad:
        raise ValueError(f"distances must be a non-empty list of ints in [0, T={T}), got {distances}")
    if isinstance(probes, torch.Tensor):
        if probes.dim() != 2 or probes.shape[1] != C:
            raise ValueError(f"probes as a tensor must be [P, C={C}], got {tuple(probes.shape)}")
        dirs = probes.to(x.dtype)
    else:
        if int(probes) < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        gen = torch.Generator().manual_seed(int(seed))
        dirs = torch.randn(int(probes), C, generator=gen, dtype=torch.float64).to(x.dtype)
    if sources is None:
        sources = list(range(T))
    else:
        sources = sorted({int(s) for s in sources})
        if not sources or not all(0 <= s < T for s in sources):
            raise ValueError(f"sources must be a non-empty list of ints in [0, T={T}), got {sources}")
    far = [d for d in distances if not any(s + d < T for s in sources)]
    if far:
        raise ValueError(f"distances {far} have no target position s + d < T={T} for any source in {sources}")
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 1:
        raise ValueError(f"max_elements must be an int >= 1, got {max_elements!r}")
    norms = dirs.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("probes must be nonzero directions")
    dirs = (dirs / norms).to(x.device)

    # Training mode refreshes a block's spectral vectors on every call, which would change F
    # between the JVPs of one solve; evaluate in eval mode and restore the flag.
    was_training = isinstance(f, torch.nn.Module) and f.training
    if was_training:
        f.eval()
    try:
        # Pairs per relaxation: the stacked batch holds n·B·T·C numbers; keep it near max_elements.
        chunk = max(1, min(dirs.shape[0] * len(sources), int(max_elements) // max(1, x.numel())))
        return _influence(f, x, z.detach(), distances, dirs, tol, max_steps, chunk, sources)
    finally:
        if was_training:
            f.train(True)


def _influence(f, x, zs, distances, dirs, tol, max_steps, chunk, sources) -> Influence:
    B, T, C = x.shape
    # d = 1 normalizes the curve (NaN when no source has a target at d = 1)
    wanted = sorted(set(distances) | ({1} if any(s + 1 < T for s in sources) else set()))
    values = {d: [] for d in wanted}  # each: tensor [n, B] per chunk of (probe, source) pairs
    pairs = [(p, s) for p in range(dirs.shape[0]) for s in sources]
    for lo in range(0, len(pairs), chunk):
        chunk_pairs = pairs[lo : lo + chunk]
        m = len(chunk_pairs)
        # Every (probe, source) pair is one more copy of the batch: [m, B, T, C] -> [m·B, T, C], so
        # a single relaxation solves them all (samples are independent: J is block diagonal).
        v = torch.zeros(m, B, T, C, dtype=x.dtype, device=x.device)
        for i, (p, s) in enumerate(chunk_pairs):
            v[i, :, s, :] = dirs[p]
        xs = x.unsqueeze(0).expand(m, B, T, C).reshape(m * B, T, C)
        zr = zs.unsqueeze(0).expand(m, B, T, C).reshape(m * B, T, C)
        u = _x_jvp(f, zr, xs, v.reshape(m * B, T, C))
        fld = as_field(f, xs)
        # (I − J)w = u: the engine's relaxation of w ↦ Jw + u (per sample, rel residual ≤ tol)
        w, _ = relax(
            lambda w, u, fld=fld, zr=zr: fld.jvp(zr, w) + u,
            u,
            z0=u,
            tol=tol,
            max_steps=max_steps,
            on_nonconvergence="raise",
        )
        wn = w.norm(dim=2).reshape(m, B, T)  # ‖w_t‖ for every pair, sample, target position t
        for d in wanted:
            rows = [(i, s + d) for i, (_, s) in enumerate(chunk_pairs) if s + d < T]
            if rows:
                idx, tgt = zip(*rows)
                values[d].append(wn[list(idx), :, list(tgt)])  # [rows, B]
    mean, se, n = [], [], []
    for d in distances:
        vals = torch.cat([v.reshape(-1) for v in values[d]]).to(torch.float64)
        mean.append(float(vals.mean()))
        se.append(float(vals.std() / math.sqrt(vals.numel())) if vals.numel() > 1 else float("nan"))
        n.append(int(vals.numel()))
    mean_t, se_t = torch.tensor(mean, dtype=torch.float64), torch.tensor(se, dtype=torch.float64)
    if values.get(1):
        ref = torch.cat([v.reshape(-1) for v in values[1]]).to(torch.float64).mean()
    else:
        ref = torch.tensor(float("nan"), dtype=torch.float64)
    return Influence(distances, mean_t, se_t, mean_t / ref, n)
