"""Shared test helpers (pytorch_scatter style): write a check once, run it on every device; tolerances
from the arithmetic; one central difference.

Tolerances. A result computed in a low precision is compared with an oracle evaluated in float64 /
complex128 on the same (upcast) weights and inputs, so the difference is the low-precision path's own
rounding error. `tol(dtype, n, scale)` bounds that error the way a rounding-error analysis does:
a chain of operations that accumulates ``n`` terms of magnitude ``scale`` in a dtype with unit
roundoff ``u = ε/2`` is off by at most ``γ_n·scale ≈ n·u·scale`` (a dot product of length n, Higham,
*Accuracy and Stability of Numerical Algorithms*, §3.1). ``factor`` states what else the computation
does to the error (a transcendental's condition number, a few roundings per term), in the test, next to
the computation it describes. The bound depends on the dtype and the computation, not on one CPU's
summation order, and the same test fails if the computation is wrong by more than that.

Setting ``EQPROP_TOL_LOG=path`` makes `check` append ``test id, dtype, error, bound`` to a CSV, to
measure each tolerance's headroom (error / bound) on a machine.
"""

import csv
import os

import pytest
import torch

devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: CUDA-only tests (CUDA path against the CPU path) use this mark; skipped without a GPU.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# The tolerance math is eqprop.testing's (one implementation, public for users' own tests).
from eqprop.testing import (  # noqa: E402, F401
    central_difference,
    condition_scale,
    eps,
    fd_tol,
    oracle_dtype,
    third_difference,
    tol,
)


def check(got, expected, bound, what=""):
    """Assert max |got − expected| <= bound (tensors or numbers); the error is recorded under
    ``EQPROP_TOL_LOG``."""
    err = float((torch.as_tensor(got) - torch.as_tensor(expected)).detach().abs().max())
    path = os.environ.get("EQPROP_TOL_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        dtype = getattr(got, "dtype", type(got).__name__)
        with open(path, "a", newline="") as fh:
            csv.writer(fh).writerow(
                [
                    test + (f" [{what}]" if what else ""),
                    str(dtype).replace("torch.", ""),
                    f"{err:.3g}",
                    f"{bound:.3g}",
                    f"{err / bound if bound else float('inf'):.3g}",
                ]
            )
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g}"
