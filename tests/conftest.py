import os
import sys

import pytest
import torch

# Tests import their shared helpers (tests/testing.py) as a plain module.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def one_thread():
    """Run every test on one intra-op thread: the tensors in tests are tiny, and on a shared CPU extra
    OpenMP threads only add wake-up latency (seconds per test under load), never speed."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
