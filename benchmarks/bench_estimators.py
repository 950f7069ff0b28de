"""Time and peak memory of one gradient estimate on the equilibrium block (docs/design.md §5).

Estimators, each on the same block, injection and readout (final LayerNorm -> head -> CE, the
native C++ readout for EP):

* ``implicit``: free phase + adjoint solve (``Implicit``);
* ``bptt20`` / ``bptt80``: free phase + backprop through 20 / 80 steps (``BPTT``);
* ``ep_symmetric``, ``ep_holo4`` (N = 4: three complex points relaxed as one batch),
  ``ep_tracking4`` (N = 4 with the tracking correction): T2 = 20, both phases stop at tol = 1e-4;
* ``*_fixed`` rows run every step (tol = 0): ``ep_onesided_fixed`` is one nudged relaxation, the
  cost unit of the batched points of ``ep_holo4_fixed``; ``ep_symmetric_fixed_t2_20`` / ``_80``
  show that EP's memory does not grow with T2 (BPTT's grows with h).

Per row: median wall seconds per estimate, peak memory (CPU: growth of the peak RSS in a fresh
process; CUDA: ``max_memory_allocated`` growth), and both as ratios to ``implicit``. Rows are
written to the JSON as they finish.

Run: ``python benchmarks/bench_estimators.py`` (CPU default C=64, H=4, T=32, B=4, one thread;
on a GPU pass ``--device cuda --C 512 --H 16 --T 256 --B 24``). Results:
``benchmarks/results/estimators.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

import eqprop
from common import environment, rss_kib, write_results
from eqprop.ep import EP, CrossEntropyReadout
from eqprop.estimators import BPTT, Implicit

FREE = dict(max_steps=30, tol=1e-4)


def estimators(t2: int) -> dict:
    fixed = dict(max_steps=30, tol=0.0)  # every step runs: the T2 comparison and the cost per point
    return {
        "implicit": Implicit(backward_max_steps=30, **FREE),
        "bptt20": BPTT(20, **FREE),
        "bptt80": BPTT(80, **FREE),
        "ep_symmetric": EP(0.05, n_points=2, t2=t2, **FREE),
        "ep_holo4": EP(0.05, n_points=4, t2=t2, **FREE),
        "ep_tracking4": EP(0.05, n_points=4, correction="tracking", t2=t2, **FREE),
        "ep_onesided_fixed": EP(0.05, n_points=1, t2=t2, **fixed),
        "ep_holo4_fixed": EP(0.05, n_points=4, t2=t2, **fixed),
        "ep_symmetric_fixed_t2_20": EP(0.05, n_points=2, t2=20, **fixed),
        "ep_symmetric_fixed_t2_80": EP(0.05, n_points=2, t2=80, **fixed),
    }


def setup(args, device):
    torch.manual_seed(0)
    blk = eqprop.EquilibriumBlock(args.C, args.H, spectral_rho=1.0, device=device).eval()
    x = 0.5 * torch.randn(args.B, args.T, args.C, device=device)
    ln = torch.nn.LayerNorm(args.C, device=device)
    head = torch.nn.Linear(args.C, args.V, bias=False, device=device)
    targets = torch.randint(0, args.V, (args.B, args.T), device=device)
    return blk, x, CrossEntropyReadout(ln, head, targets)


def memory_point(args, device, name):
    """Peak memory (bytes) of one estimate, after a warm-up estimate; run in a fresh process."""
    blk, x, ro = setup(args, device)
    est = estimators(args.t2)[name]
    est.grad(blk, x, ro)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        est.grad(blk, x, ro)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak RSS (VmHWM) to the current RSS
        fh.write("5")
    base = rss_kib("VmRSS:")
    est.grad(blk, x, ro)
    return (rss_kib("VmHWM:") - base) * 1024


def time_point(args, device, name):
    blk, x, ro = setup(args, device)
    est = estimators(args.t2)[name]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    est.grad(blk, x, ro)  # warm-up
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        est.grad(blk, x, ro)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--C", type=int, default=64)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--T", type=int, default=32)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--V", type=int, default=2)
    p.add_argument("--t2", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="estimators")
    p.add_argument("--memory-point", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_point is not None:
        print(memory_point(args, device, args.memory_point))
        return
    results = {
        "environment": environment(),
        "config": {k: getattr(args, k) for k in ("device", "C", "H", "T", "B", "V", "t2", "repeats", "threads")},
        "units": {
            "seconds": "median wall seconds per estimate (free phase included)",
            "memory": "bytes: peak growth during one estimate (fresh process)",
        },
        "rows": {},
    }
    names = list(estimators(args.t2))
    for name in names:
        cmd = [sys.executable, __file__, "--memory-point", name] + [
            f"--{k}={getattr(args, k)}" for k in ("device", "C", "H", "T", "B", "V", "t2", "threads")
        ]
        # Blocks >= 64 KiB from mmap, returned on free: RSS then tracks live tensor memory.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        mem = int(
            subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        )
        row = {"seconds": time_point(args, device, name), "memory": mem}
        base = results["rows"].get("implicit", row)
        row["time_vs_implicit"] = row["seconds"] / base["seconds"]
        row["memory_vs_implicit"] = row["memory"] / base["memory"] if base["memory"] > 0 else None
        results["rows"][name] = row
        write_results(args.name, results)  # row by row
        print(
            f"{name:24s} {row['seconds'] * 1e3:9.1f} ms  x{row['time_vs_implicit']:5.2f}   "
            f"{row['memory'] / 2**20:8.1f} MiB",
            flush=True,
        )
    r = results["rows"]
    results["holo4_vs_one_nudged_relaxation"] = r["ep_holo4_fixed"]["seconds"] / r["ep_onesided_fixed"]["seconds"]
    results["memory_t2_80_vs_t2_20"] = r["ep_symmetric_fixed_t2_80"]["memory"] / max(
        1, r["ep_symmetric_fixed_t2_20"]["memory"]
    )
    write_results(args.name, results)


if __name__ == "__main__":
    main()
