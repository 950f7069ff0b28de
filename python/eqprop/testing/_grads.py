"""``assert_grads_close``: two gradient estimates agree, with a per-parameter (or per-group) table
(docs/testing.md; the alignment measures are those of docs/design.md §7)."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Union

import torch

from ._tolerance import eps

__all__ = ["assert_grads_close"]


def _grads(e: Any, which: str) -> dict:
    g = getattr(e, "grads", e)
    if not isinstance(g, Mapping):
        raise TypeError(
            f"{which} must be an eqprop.estimators.Estimate or a dict name -> Tensor, got {type(e).__name__}"
        )
    for n, t in g.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{which}[{n!r}] must be a Tensor, got {type(t).__name__}")
    return dict(g)


def _group_of(groups, name: str) -> str:
    if groups is None:
        return name
    if callable(groups):
        return str(groups(name))
    return str(groups.get(name, name))


def _real(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().reshape(-1)
    return torch.view_as_real(t.resolve_conj()).reshape(-1).double() if t.is_complex() else t.double()


def assert_grads_close(
    a: Any,
    b: Any,
    *,
    cos_min: Optional[float] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    groups: Union[None, Mapping[str, str], Callable[[str], str]] = None,
) -> None:
    """Assert that gradient estimate ``a`` agrees with the reference ``b``, parameter by parameter.

    Args:
        a, b: ``eqprop.estimators.Estimate`` or dicts {parameter name: Tensor}; b is the reference
            (rtol is relative to b). Both must have the same names and shapes.
        cos_min: each group's cosine cos(a, b) = ⟨a, b⟩ / (‖a‖‖b‖) (real inner product over real and
            imaginary parts) must be at least this.
        rtol, atol: elementwise, ``|a − b| <= atol + rtol·|b|`` (as ``torch.isclose``; a missing one
            is 0). With none of cos_min / rtol / atol given, the default asks for half the digits of
            the dtype: ``rtol = √ε`` and ``atol = √ε·max|b|`` per group.
        groups: None (one row per parameter), a dict name -> group, or a callable name -> group;
            a group's tensors are concatenated (e.g. ``lambda n: n.split(".")[0]``).
    Raises:
        AssertionError with a table, one row per group: n (entries), cosine, norm ratio ‖a‖/‖b‖,
        max abs error max|a − b|, rel error max|a − b| / max|b|, and the worst entry
        (``name[index]: a vs b``); failing rows are marked with the reason.
    Example: ``assert_grads_close(BPTT(200).grad(f, x, loss), Implicit().grad(f, x, loss), cos_min=0.999)``
    """
    ga, gb = _grads(a, "a"), _grads(b, "b")
    if set(ga) != set(gb):
        raise AssertionError(
            f"parameter names differ: only in a {sorted(set(ga) - set(gb))}, only in b {sorted(set(gb) - set(ga))}"
        )
    for n in ga:
        if ga[n].shape != gb[n].shape:
            raise AssertionError(f"{n}: shape {tuple(ga[n].shape)} in a, {tuple(gb[n].shape)} in b")
    default = cos_min is None and rtol is None and atol is None
    order: dict = {}
    for n in ga:
        order.setdefault(_group_of(groups, n), []).append(n)

    header = ["group", "n", "cosine", "norm_ratio", "max_abs_err", "rel_err", "worst entry"]
    rows, reasons = [], []
    for grp, names in order.items():
        xa = torch.cat([_real(ga[n]) for n in names])
        xb = torch.cat([_real(gb[n]) for n in names])
        na, nb = float(xa.norm()), float(xb.norm())
        cos = float(xa @ xb) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb == 0 else 0.0)
        ratio = na / nb if nb > 0 else (1.0 if na == 0 else math.inf)
        diff = (xa - xb).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        bmax = float(xb.abs().max()) if xb.numel() else 0.0
        rel = max_abs / bmax if bmax > 0 else (0.0 if max_abs == 0 else math.inf)
        if default:
            e = math.sqrt(eps(torch.promote_types(ga[names[0]].dtype, gb[names[0]].dtype)))
            r_tol, a_tol = e, e * bmax
        else:
            r_tol, a_tol = (rtol or 0.0), (atol or 0.0)
        why = []
        if cos_min is not None and not cos >= cos_min:
            why.append(f"cosine {cos:.4f} < {cos_min}")
        if default or rtol is not None or atol is not None:
            excess = diff - (a_tol + r_tol * xb.abs())
            if excess.numel() and float(excess.max()) > 0:
                nbad = int((excess > 0).sum())
                why.append(f"{nbad} entries beyond atol {a_tol:.2g} + rtol {r_tol:.2g}*|b|")
        worst = ""
        if diff.numel():
            j, off = int(diff.argmax()), 0
            for n in names:
                t = gb[n]
                size = t.numel() * (2 if t.is_complex() else 1)
                if j < off + size:
                    k = (j - off) // 2 if t.is_complex() else j - off
                    idx = [int(i) for i in torch.unravel_index(torch.tensor(k), t.shape)] if t.dim() else []
                    part = "" if not t.is_complex() else ".imag" if (j - off) % 2 else ".real"
                    worst = f"{n}[{', '.join(map(str, idx))}]{part}: {float(xa[j]):.4g} vs {float(xb[j]):.4g}"
                    break
                off += size
        rows.append([grp, str(xb.numel()), f"{cos:.4f}", f"{ratio:.4f}", f"{max_abs:.3g}", f"{rel:.3g}", worst])
        reasons.append("; ".join(why))

    if any(reasons):
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
        fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
        lines = [fmt(header)] + [fmt(r) + (f"  <-- FAIL: {why}" if why else "") for r, why in zip(rows, reasons)]
        nfail = sum(1 for r in reasons if r)
        raise AssertionError(
            f"gradients differ in {nfail} of {len(rows)} "
            f"{'groups' if groups is not None else 'parameters'} (a vs reference b):\n" + "\n".join(lines)
        )
