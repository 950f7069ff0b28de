"""Shared test parametrization (pytorch_scatter style): write a check once, run it on every device."""

import pytest
import torch

devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: CUDA-only tests (CUDA path against the CPU path) use this mark; skipped without a GPU.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
