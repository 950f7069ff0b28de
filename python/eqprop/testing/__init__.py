"""Regression checks for equilibrium models, for your own test suite (docs/testing.md).

Assertions with failure messages that say *where* a check broke:

* :func:`assert_grads_close` — two gradient estimates (``Estimate`` or dicts) agree; a table per
  parameter or group (cosine, norm ratio, max abs / rel error, worst entry).
* :func:`assert_field_consistent` — a field's JVP and plain-transpose VJP agree with each other and
  with finite differences, it is sample-separable and, for complex states, holomorphic.
* :func:`assert_converged`, :func:`assert_contractive` — a relaxation converged; ρ(J) <= rho_max.
* :func:`assert_markov_gap` — a model's gap to the exact Bayes NLL on Markov-k, judged with its SE.
* :func:`tol`, :func:`fd_tol`, :func:`central_difference`, ... — dtype-aware tolerances.

Importing this module does not import pytest; the pytest plugin (fixtures ``device``,
``float_dtype``, ``eqprop_seed``, the ``cuda`` marker, ``--eqprop-seed``) is
``eqprop.testing.plugin``, registered as a ``pytest11`` entry point.
Example: ``from eqprop.testing import assert_field_consistent; assert_field_consistent(layer, x)``
"""

from ._fields import assert_contractive, assert_converged, assert_field_consistent
from ._grads import assert_grads_close
from ._markov import assert_markov_gap
from ._tolerance import central_difference, condition_scale, eps, fd_tol, oracle_dtype, third_difference, tol

__all__ = [
    "assert_grads_close",
    "assert_field_consistent",
    "assert_converged",
    "assert_contractive",
    "assert_markov_gap",
    "tol",
    "eps",
    "oracle_dtype",
    "condition_scale",
    "fd_tol",
    "central_difference",
    "third_difference",
]
