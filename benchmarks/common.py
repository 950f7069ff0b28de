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


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def rss_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB ("VmRSS:" now, "VmHWM:" its
    peak); -1 where the file lacks it."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return -1


def size_defaults(args, table, gpu: bool) -> None:
    """Fill the size options left None: ``table`` rows are (name, GPU default, CPU default)."""
    for name, on_gpu, on_cpu in table:
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)


def environment() -> dict:
    """Device, versions and commit, recorded next to every figure."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__), check=True
        ).stdout.strip()
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


def results_path(name: str) -> str:
    """benchmarks/results/NAME.json"""
    return os.path.join(os.path.dirname(__file__), "results", f"{name}.json")


def _write_json(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)  # a reader (or a kill) never sees half a file


def write_results(name: str, results: dict) -> str:
    path = results_path(name)
    _write_json(path, results)
    return path


class Results:
    """A results JSON written again after every figure, so that a crash or a time limit keeps what
    ran. ``"complete"`` is false until :meth:`finish`.

        res = Results("out.json", environment=environment())
        res.append("rows", {"k": 4, "seconds": 0.1})      # file now holds rows = [that row]
        res.set("runs", "float32", "per_step", {"engine_picard": 1e-3})   # nested keys
        res.finish(goals={...})
    """

    def __init__(self, path: str | None, **header):
        self.path = path
        self.doc = dict(header, complete=False)
        self._write()

    def _write(self) -> None:
        if self.path:
            _write_json(self.path, self.doc)

    def append(self, key: str, row: dict) -> None:
        self.doc.setdefault(key, []).append(row)
        self._write()

    def set(self, *keys_and_value) -> None:
        *keys, value = keys_and_value
        node = self.doc
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        self._write()

    def finish(self, **extra) -> str | None:
        self.doc.update(extra)
        self.doc["complete"] = True
        self._write()
        return self.path
