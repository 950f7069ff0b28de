"""The eqprop pytest plugin (loaded through the ``pytest11`` entry point ``eqprop``; docs/testing.md).

* fixture ``device``: parametrized over "cpu" and, when a CUDA device is present, "cuda";
* fixture ``float_dtype``: parametrized over torch.float32 and torch.float64;
* fixture ``eqprop_seed``: the ``--eqprop-seed`` value (0 without it), torch seeded with it;
* marker ``cuda``: the test needs a CUDA device and is skipped cleanly without one;
* option ``--eqprop-seed N``: seeds torch (``torch.manual_seed(N)``) before every test.

The plugin loads in every pytest run of an environment where eqprop is installed, so it changes
nothing unless asked: no seeding without ``--eqprop-seed``, and skips only tests marked ``cuda``.
"""

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("eqprop")
    group.addoption(
        "--eqprop-seed",
        type=int,
        default=None,
        metavar="N",
        help="eqprop: seed torch with N (torch.manual_seed) before every test",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one; eqprop plugin)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    seed = item.config.getoption("eqprop_seed", None)
    if seed is not None:
        torch.manual_seed(seed)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_devices())
def device(request):
    """The device to run on: "cpu", and "cuda" when a CUDA device is present (parametrized)."""
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def float_dtype(request):
    """torch.float32 and torch.float64 (parametrized)."""
    return request.param


@pytest.fixture
def eqprop_seed(request):
    """The ``--eqprop-seed`` value (0 when not given); torch is seeded with it."""
    seed = request.config.getoption("eqprop_seed", None)
    seed = 0 if seed is None else seed
    torch.manual_seed(seed)
    return seed
