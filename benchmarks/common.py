"""Shared bits of the benchmark scripts: timing and the facts every results JSON records."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time

import torch


def timeit(fn, *, repeat: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Median wall seconds of fn() over `repeat` runs (CUDA-synchronized on GPU)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment() -> dict:
    """Device, versions and commit, recorded next to every figure."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    import eqprop

    env = {
        "torch": torch.__version__,
        "eqprop": eqprop.build_info(),
        "commit": commit,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return env


def write_results(name: str, results: dict) -> str:
    path = os.path.join(os.path.dirname(__file__), "results", f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    return path
