"""Time the relaxation engine against eager PyTorch loops (docs/design.md §4, §5).

Per relaxation step (one F evaluation + update + residual bookkeeping), for the equilibrium block:

* ``engine_picard`` / ``engine_anderson``: ``eqprop.relax`` (the loop in C++ over the native block field;
  on CUDA Picard's steps are replayed as a CUDA graph, the default);
* on CUDA also ``engine_picard_no_graph`` (``cuda_graph=False``: the same loop launching each
  kernel) and ``engine_picard_graph_check8`` (graphs of 8 steps, one host sync per 8 steps);
* ``eager_reference``: the plain-PyTorch Picard loop (``eqprop.reference.solvers.picard``) over the
  plain-PyTorch block (``eqprop.reference.block``): what a user would write without eqprop;
* ``eager_cpp_block``: the same eager loop over the C++ block forward (isolates the solver loop);
* ``torchdeq_fixed_point_iter``: TorchDEQ's fixed-point iteration over the C++ block, if installed.

Per implicit backward: time per adjoint VJP, ``eqprop.fixed_point(...).backward()`` (C++ adjoint
iteration) against an eager autograd loop λ <- Jᵀλ + g. Peak memory of the implicit backward and
of full BPTT against the number of forward steps (fresh subprocess per point; CPU: peak RSS growth,
CUDA: ``max_memory_allocated``).

Run: ``python benchmarks/bench_relax.py`` (defaults: C=512, H=16, T=256, B=24 in fp32 and bf16 on a
GPU; C=128, H=4, T=64, B=4 in fp32 on CPU, one thread). Results: ``benchmarks/results/relax.json``
(or ``--out``), written again after every figure so that a crash or a time limit keeps what ran
(``"complete": false`` until the end).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import logging

import torch

import eqprop
from common import Results, environment, rss_kib, size_defaults, sync
from eqprop.reference import block as ref_block
from eqprop.reference import solvers as ref_solvers

HERE = os.path.dirname(os.path.abspath(__file__))


def _time(fn, device, repeats):
    fn()  # warm-up (allocator, kernels)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _make(args, device, dtype, seed=0):
    torch.manual_seed(seed)
    blk = eqprop.EquilibriumBlock(args.C, args.H, device=device, dtype=dtype).eval()
    x = 0.5 * torch.randn(args.B, args.T, args.C, device=device, dtype=dtype)
    params = dict(blk.named_parameters())
    opts = blk._reference_options()
    ref_F = lambda z, x: ref_block.block(z, x, params, **opts)  # noqa: E731
    return blk, x, ref_F


def _figure(out, record, key, measure):
    """out[key] = measure(), or the error it raised as a string: one failing loop (say a CUDA-graph
    capture on a new torch) is recorded and the others are still measured."""
    try:
        value = measure()
    except Exception as err:  # recorded in the JSON, not hidden
        value = f"error: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    out[key] = value
    record(key, value)


def _ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) else None


def bench_steps(args, device, dtype, record=lambda key, value: None):
    """Seconds per step of each loop; record(key, value) is called as each figure is measured."""
    blk, x, ref_F = _make(args, device, dtype)
    n = args.steps
    out = {}

    def put(key, fn):
        _figure(out, record, key, lambda: _time(fn, device, args.repeats) / n)

    with torch.no_grad():
        put("engine_picard", lambda: eqprop.relax(blk, x, max_steps=n, tol=0.0))
        if device.type == "cuda":
            put("engine_picard_no_graph", lambda: eqprop.relax(blk, x, max_steps=n, tol=0.0, cuda_graph=False))
            put(
                "engine_picard_graph_check8",
                lambda: eqprop.relax(blk, x, max_steps=n, tol=0.0, cuda_graph=True, check_every=8),
            )
        put("engine_anderson", lambda: eqprop.relax(blk, x, max_steps=n, tol=0.0, solver="anderson"))
        put("eager_reference", lambda: ref_solvers.picard(ref_F, x, max_steps=n, tol=0.0))
        put("eager_cpp_block", lambda: ref_solvers.picard(blk, x, max_steps=n, tol=0.0))
        try:
            from torchdeq.solver import get_solver

            fp = get_solver("fixed_point_iter")
            z0 = torch.zeros_like(x)
            put("torchdeq_fixed_point_iter", lambda: fp(lambda z: blk(z, x), z0, max_iter=n, tol=0.0, stop_mode="rel"))
        except Exception as err:  # recorded, not hidden: the JSON says why TorchDEQ is missing
            why = f"unavailable: {type(err).__name__}: {err}"
            _figure(out, record, "torchdeq_fixed_point_iter", lambda: why)
    return out


def bench_backward(args, device, dtype, record=lambda key, value: None):
    blk, x, ref_F = _make(args, device, dtype)
    k = args.backward_steps
    with torch.no_grad():
        z_star, _ = eqprop.relax(blk, x, max_steps=args.steps, tol=1e-6, on_nonconvergence="ignore")  # a start point

    def engine():
        z = eqprop.fixed_point(blk, x, z0=z_star, max_steps=1, tol=0.0, backward_max_steps=k, backward_tol=0.0)
        z.float().square().mean().backward()

    def eager_adjoint(F):
        """Plain eager adjoint loop (reference solver) over F, then one parameter VJP."""

        def run():
            zz = z_star.detach().requires_grad_(True)
            g = torch.autograd.grad(zz.float().square().mean(), zz)[0]
            lam = ref_solvers.adjoint(F, x, z_star, g, max_steps=k, tol=0.0)
            with torch.enable_grad():
                torch.autograd.grad(F(z_star, x), list(blk.parameters()), lam)

        return run

    out = {}
    for key, fn in (
        ("engine_implicit", engine),
        ("eager_reference_adjoint", eager_adjoint(ref_F)),
        ("eager_cpp_block_adjoint", eager_adjoint(blk)),
    ):
        _figure(out, record, key, lambda fn=fn: _time(fn, device, args.repeats) / k)
    return out


def memory_point(args, device, dtype, mode, steps):
    """Peak memory (bytes) of forward + backward of one fixed_point; run in a fresh process on CPU."""
    blk, x, _ = _make(args, device, dtype)
    kw = dict(max_steps=steps, tol=0.0)
    if mode == "implicit":
        kw.update(backward="implicit", backward_max_steps=args.backward_steps, backward_tol=0.0)
    else:
        kw.update(backward="bptt")  # plain BPTT through all `steps` forward steps
    eqprop.fixed_point(blk, x, **kw).float().square().mean().backward()  # warm-up
    blk.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        eqprop.fixed_point(blk, x, **kw).float().square().mean().backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak RSS (VmHWM) to the current RSS
        fh.write("5")
    base = rss_kib("VmRSS:")
    eqprop.fixed_point(blk, x, **kw).float().square().mean().backward()
    return (rss_kib("VmHWM:") - base) * 1024


def bench_memory(args, device, dtype, record=lambda mode, steps, value: None):
    """Peak memory per (mode, forward steps). CUDA: in this process (the allocator's peak is reset
    per point); CPU: a fresh subprocess per point (peak RSS cannot be reset across allocations)."""
    out = {}
    for mode in ("implicit", "bptt"):
        out[mode] = {}
        for steps in args.memory_steps:
            if device.type == "cuda":
                _figure(
                    out[mode],
                    lambda key, value, mode=mode: record(mode, key, value),
                    str(steps),
                    lambda mode=mode, steps=steps: memory_point(args, device, dtype, mode, steps),
                )
                continue
            cmd = [
                sys.executable,
                __file__,
                "--memory-point",
                mode,
                str(steps),
                "--device",
                str(device),
                "--dtypes",
                str(dtype).replace("torch.", ""),
                "--C",
                str(args.C),
                "--H",
                str(args.H),
                "--T",
                str(args.T),
                "--B",
                str(args.B),
                "--threads",
                str(args.threads),
                "--backward-steps",
                str(args.backward_steps),
            ]
            # Blocks >= 64 KiB from mmap, returned on free: RSS then tracks live tensor memory.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            out[mode][str(steps)] = int(res.stdout.strip().splitlines()[-1])
            record(mode, str(steps), out[mode][str(steps)])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default=None, help="comma list, e.g. float32,bfloat16")
    p.add_argument("--C", type=int, default=None)
    p.add_argument("--H", type=int, default=None)
    p.add_argument("--T", type=int, default=None)
    p.add_argument("--B", type=int, default=None)
    p.add_argument("--steps", type=int, default=20, help="forward steps per timing")
    p.add_argument("--backward-steps", type=int, default=20, help="adjoint VJPs per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: the shared dev box)")
    p.add_argument("--memory-steps", type=int, nargs="*", default=[5, 10, 20, 40])
    p.add_argument("--memory-point", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(HERE, "results", "relax.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    size_defaults(args, (("C", 512, 128), ("H", 16, 4), ("T", 256, 64), ("B", 24, 4)), gpu)
    dtypes = [getattr(torch, d) for d in (args.dtypes or ("float32,bfloat16" if gpu else "float32")).split(",")]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    # backward_tol=0 runs a fixed number of adjoint steps on purpose: no "did not converge" warnings.
    logging.getLogger("eqprop").setLevel(logging.ERROR)

    if args.memory_point is not None:
        print(memory_point(args, device, dtypes[0], args.memory_point[0], int(args.memory_point[1])))
        return

    try:
        import importlib.metadata

        import torchdeq  # noqa: F401

        torchdeq_version = importlib.metadata.version("torchdeq")
    except Exception as err:
        torchdeq_version = f"not available ({type(err).__name__}: {err})"
    res = Results(
        args.out,
        environment=environment(),
        torchdeq=torchdeq_version,
        config={
            "C": args.C,
            "H": args.H,
            "T": args.T,
            "B": args.B,
            "forward_steps": args.steps,
            "backward_steps": args.backward_steps,
            "repeats": args.repeats,
            "timer": "best of repeats",
        },
        units={
            "per_step": "seconds per relaxation step",
            "per_vjp": "seconds per adjoint VJP",
            "memory": "bytes (peak growth during forward + backward)",
        },
        runs={},
    )
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        res.set("runs", name, {})

        def fmt(k, v):
            return f"{k} {v * 1e3:.3f} ms" if isinstance(v, float) else f"{k} {v}"

        def on_step(k, v, name=name):
            res.set("runs", name, "per_step", k, v)
            print(f"[{name}] per step: {fmt(k, v)}")

        def on_vjp(k, v, name=name):
            res.set("runs", name, "per_vjp", k, v)
            print(f"[{name}] per VJP:  {fmt(k, v)}")

        steps = bench_steps(args, device, dtype, on_step)
        back = bench_backward(args, device, dtype, on_vjp)
        run = res.doc["runs"][name]
        run.update(
            {
                "speedup_per_step_vs_eager_reference": _ratio(steps["eager_reference"], steps["engine_picard"]),
                "speedup_per_step_vs_eager_cpp_block": _ratio(steps["eager_cpp_block"], steps["engine_picard"]),
                "speedup_per_vjp_vs_eager_reference": _ratio(back["eager_reference_adjoint"], back["engine_implicit"]),
            }
        )
        if device.type == "cuda":
            run["speedup_per_step_graph_vs_no_graph"] = _ratio(steps["engine_picard_no_graph"], steps["engine_picard"])
        res.set("runs", name, run)
        if args.memory_steps:
            bench_memory(
                args,
                device,
                dtype,
                lambda mode, n, v, name=name: res.set("runs", name, "memory_vs_forward_steps", mode, n, v),
            )
            print(f"[{name}] memory:   {run['memory_vs_forward_steps']}")
    res.finish()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
