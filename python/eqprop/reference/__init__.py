"""Plain PyTorch twins of the C++ core: the test oracle and benchmark baseline (DESIGN.md §2).

Only tests and benchmarks import this package; the library itself never does.
"""

from . import block  # noqa: F401
from . import solvers  # noqa: F401
