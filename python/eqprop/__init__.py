"""eqprop: equilibrium models, their gradient estimators and diagnostics, and the Markov-k benchmark.

The C++/CUDA core is the extension ``eqprop._C`` (tensor ops in ``torch.ops.eqprop``); the Python
modules are thin wrappers over it. ``eqprop.reference`` is a plain PyTorch twin used only as the
test oracle and benchmark baseline.
"""

from __future__ import annotations

import torch  # must be imported before eqprop._C (docs/design.md §3)

__version__ = "0.1.0"


def _load_core():
    try:
        from . import _build_config
    except ImportError as err:  # pragma: no cover - only in a source tree that was never built
        raise ImportError(
            "eqprop's C++ core is not built. Install with `pip install --no-build-isolation .` (see README)."
        ) from err
    built, running = _build_config.TORCH_VERSION, torch.__version__
    if built != running:
        raise ImportError(
            f"eqprop was built against torch {built} but torch {running} is installed; the C++ core "
            "must be rebuilt for this torch: `pip install --no-build-isolation --force-reinstall "
            "--no-deps .` from the eqprop source tree."
        )
    from . import _C  # noqa: F401  (registers torch.ops.eqprop)

    return _build_config


_build_config = _load_core()


def build_info() -> dict:
    """What this copy of eqprop was built with.

    Returns a dict with ``eqprop`` (version), ``torch`` (the torch version the core was compiled
    against), ``torch_cuda`` (that torch's CUDA version or None), ``cuda_kernels`` (whether CUDA
    kernels are compiled in) and ``compiler``.

    Example: ``eqprop.build_info()["cuda_kernels"]`` -> ``False`` on a CPU-only torch.
    """
    return {
        "eqprop": __version__,
        "torch": _build_config.TORCH_VERSION,
        "torch_cuda": _build_config.TORCH_CUDA or None,
        "cuda_kernels": bool(_build_config.WITH_CUDA),
        "compiler": _build_config.COMPILER,
    }


# eqprop.train is imported on demand: it pulls in torch.distributed.
from . import control, diagnostics, estimators, markov, models, solvers  # noqa: E402
from .block import EquilibriumBlock, EquilibriumLM  # noqa: E402
from .solvers import NonConvergenceError, NonConvergenceWarning, RelaxOptions, fixed_point, relax  # noqa: E402

__all__ = [
    "__version__",
    "build_info",
    "markov",
    "models",
    "EquilibriumBlock",
    "EquilibriumLM",
    "relax",
    "fixed_point",
    "RelaxOptions",
    "NonConvergenceWarning",
    "NonConvergenceError",
    "solvers",
    "estimators",
    "diagnostics",
    "control",
]
