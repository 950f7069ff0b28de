"""Plain PyTorch twins of eqprop's core, written for clarity, not speed.

They exist only to check the C++/CUDA kernels (tests) and to be the baseline the benchmarks
measure against; nothing else in eqprop imports them.
"""

from . import block, markov, solvers, ttt

__all__ = ["block", "markov", "solvers", "ttt"]
