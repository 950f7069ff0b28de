"""Cost of the sequence-mixing layers of the length-generalization study (docs/design.md §9).

One layer ``[B, T, C] -> [B, T, C]`` (projections included), forward + backward of a scalar loss, for

* ``full``: causal softmax attention (``F.scaled_dot_product_attention``, is_causal);
* ``sliding``: sliding-window attention of window W (``eqprop.models.attention``: ``chunked`` on CPU,
  and ``flex`` besides ``chunked`` on CUDA);
* ``ttt_linear`` / ``ttt_mlp``: TTT layers (``eqprop.models.TTTLayer``) with the C++ dual form
  (``dual``) and with the plain primal reference ``eqprop.reference.ttt`` (``primal``, explicit
  per-token weights; only at the shortest T, it is slow by design).

Per (layer, implementation, T): seconds per forward + backward (best of ``--repeats`` after a warm-up;
wall and, on CPU, the process's CPU time, which a shared machine disturbs less), tokens/s = B·T / seconds
(CPU time on CPU), and peak memory: on CPU the peak RSS growth during one forward + backward in a
fresh subprocess (malloc's mmap threshold lowered so that RSS tracks live tensors); on CUDA
``max_memory_allocated`` growth. Goals (recorded with the measured values, whatever they are): sliding
memory linear in T; the dual form ≥ 3× the primal reference; TTT-Linear within 2× of sliding attention
per token at the longest T.

Run: ``python benchmarks/bench_lengthgen.py`` (CPU defaults: B=1, C=64, H=4, W=256, T = 2k, 4k, 8k, one
thread; GPU: B=4, C=512, H=8, W=512). Results: ``benchmarks/results/lengthgen.json`` (+ ``.png``), written
again after every point (``"complete": false`` until the end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

from common import Results, environment, rss_kib, size_defaults, sync

HERE = os.path.dirname(os.path.abspath(__file__))


def _layer(args, layer, impl, device):
    """(module, forward function) for one configuration."""
    from eqprop.models import TTTLayer
    from eqprop.models.attention import sliding_window_attention
    from eqprop.models.transformer import CausalSelfAttention
    from eqprop.reference import ttt as ref

    torch.manual_seed(0)
    if layer in ("full", "sliding"):
        mod = CausalSelfAttention(args.C, args.H, "none", 10000.0, window=args.W if layer == "sliding" else None)
        mod = mod.to(device)
        if layer == "full":
            return mod, mod
        B, H = args.B, args.H

        def fwd(x):  # the module's own forward with the implementation pinned
            T = x.shape[1]
            q, k, v = mod.qkv(x).view(B, T, 3, H, args.C // H).permute(2, 0, 3, 1, 4)
            y = sliding_window_attention(q, k, v, args.W, impl=impl)
            return mod.proj(y.transpose(1, 2).reshape(B, T, args.C))

        return mod, fwd
    kind = layer.removeprefix("ttt_")
    mod = TTTLayer(args.C, args.H, kind, mini_batch=args.ttt_batch).to(device)
    if impl == "dual":
        return mod, mod
    fn = ref.ttt_linear if kind == "linear" else ref.ttt_mlp
    return mod, lambda x: mod.mix(x, fn)


def point(args, layer, impl, T, device):
    """{'seconds', 'peak_bytes'} of forward + backward at length T (run in a fresh process on CPU)."""
    mod, fwd = _layer(args, layer, impl, device)
    x = torch.randn(args.B, T, args.C, device=device, requires_grad=True)

    def step():
        fwd(x).square().mean().backward()
        mod.zero_grad(set_to_none=True)
        x.grad = None

    step()  # warm-up (allocator, lazy init, compilation of flex)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with open("/proc/self/clear_refs", "w") as fh:  # reset the peak RSS (VmHWM) to the current RSS
            fh.write("5")
        base = rss_kib("VmRSS:")
        step()
        peak = (rss_kib("VmHWM:") - base) * 1024
    repeats = 1 if impl == "primal" else args.repeats
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync(device)
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return {"seconds": best, "cpu_seconds": best_cpu, "peak_bytes": int(peak)}


def run_point(args, layer, impl, T, device):
    if device.type == "cuda":
        return point(args, layer, impl, T, device)
    cmd = [sys.executable, __file__, "--point", layer, impl, str(T), "--device", "cpu"]
    for name in ("B", "C", "H", "W", "ttt_batch", "repeats", "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # blocks >= 64 KiB mmapped: freed memory leaves RSS
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, timeout=args.point_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.point_timeout} s"}
    except subprocess.CalledProcessError as err:
        return {"error": err.stderr.strip().splitlines()[-1] if err.stderr.strip() else f"exit {err.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _summary(rows, args):
    key_t = "cpu_seconds" if args.device == "cpu" else "seconds"

    def get(layer, impl, T, key=key_t):
        for r in rows:
            if (r["layer"], r["impl"], r["T"]) == (layer, impl, T) and key in r:
                return r[key]
        return None

    Ts = sorted({r["T"] for r in rows})
    out = {}
    sl_impl = "chunked"
    mem = [(T, get("sliding", sl_impl, T, "peak_bytes")) for T in Ts]
    mem = [(T, m) for T, m in mem if m]
    if len(mem) >= 2:
        (t0, m0), (t1, m1) = mem[0], mem[-1]
        out["sliding_memory_linear_in_T"] = {
            "goal": "peak memory ∝ T (log-log slope ≈ 1; full attention's scores would give 2)",
            "bytes_per_token": {str(T): m / (args.B * T) for T, m in mem},
            "loglog_slope": math.log(m1 / m0) / math.log(t1 / t0),
        }
    for kind in ("linear", "mlp"):
        T = Ts[0]
        d, p = get(f"ttt_{kind}", "dual", T), get(f"ttt_{kind}", "primal", T)
        if d and p:
            out[f"ttt_{kind}_dual_vs_primal"] = {"goal": ">= 3", "T": T, "speedup": p / d}
    T = Ts[-1]
    tl, sw = get("ttt_linear", "dual", T), get("sliding", sl_impl, T)
    if tl and sw:
        out["ttt_linear_vs_sliding_per_token"] = {"goal": "<= 2", "T": T, "time_ratio": tl / sw}
    return out


def _figure(rows, path, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    series = sorted({(r["layer"], r["impl"]) for r in rows if "seconds" in r})
    for layer, impl in series:
        pts = sorted((r["T"], r) for r in rows if (r["layer"], r["impl"]) == (layer, impl) and "seconds" in r)
        Ts = [t for t, _ in pts]
        style = "--" if impl == "primal" else "-"
        ax1.plot(Ts, [r["tokens_per_s"] for _, r in pts], style, marker="o", label=f"{layer} ({impl})")
        ax2.plot(Ts, [r["peak_bytes"] / 2**20 for _, r in pts], style, marker="o", label=f"{layer} ({impl})")
    for ax, ylabel in ((ax1, "tokens / s (forward + backward)"), (ax2, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--B", type=int, default=None)
    p.add_argument("--C", type=int, default=None)
    p.add_argument("--H", type=int, default=None)
    p.add_argument("--W", type=int, default=None, help="sliding window")
    p.add_argument("--T", type=int, nargs="*", default=[2048, 4096, 8192])
    p.add_argument("--primal-T", type=int, nargs="*", default=None, help="lengths for the primal reference")
    p.add_argument("--ttt-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: the shared dev box)")
    p.add_argument("--point-timeout", type=float, default=150.0, help="seconds per CPU point")
    p.add_argument("--point", nargs=3, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(HERE, "results", "lengthgen.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    size_defaults(args, (("B", 4, 1), ("C", 512, 64), ("H", 8, 4), ("W", 512, 256)), gpu)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.point is not None:
        layer, impl, T = args.point
        print(json.dumps(point(args, layer, impl, int(T), device)))
        return
    primal_T = args.primal_T if args.primal_T is not None else [min(args.T)]

    plan = [("full", "sdpa", T) for T in args.T]
    plan += [("sliding", "chunked", T) for T in args.T]
    if gpu:
        plan += [("sliding", "flex", T) for T in args.T]
    for layer in ("ttt_linear", "ttt_mlp"):
        plan += [(layer, "dual", T) for T in args.T] + [(layer, "primal", T) for T in primal_T]

    res = Results(
        args.out,
        environment=environment(),
        config={
            "device": str(device),
            "B": args.B,
            "C": args.C,
            "H": args.H,
            "window": args.W,
            "ttt_batch": args.ttt_batch,
            "dtype": "float32",
            "repeats": args.repeats,
            "timer": "best of repeats after one warm-up (primal: one run)",
            "memory": "CPU: peak RSS growth during one forward + backward, fresh process per point; "
            "CUDA: max_memory_allocated growth",
        },
        units={
            "seconds": "wall s per forward + backward",
            "cpu_seconds": "process CPU s per forward + backward",
            "tokens_per_s": "B·T / cpu_seconds on CPU, B·T / seconds on CUDA",
            "peak_bytes": "bytes",
        },
        rows=[],
    )
    rows = res.doc["rows"]
    png = os.path.splitext(args.out)[0] + ".png"
    for layer, impl, T in plan:
        r = run_point(args, layer, impl, T, device)
        row = {"layer": layer, "impl": impl, "T": T, **r}
        if "seconds" in r:
            # one CPU thread on a shared machine: the process's CPU time is the stable measure
            row["tokens_per_s"] = args.B * T / (r["seconds"] if gpu else r["cpu_seconds"])
            print(
                f"{layer:11s} {impl:8s} T={T:6d}  {r['seconds']:8.3f} s  {row['tokens_per_s']:10.0f} tok/s  "
                f"{r['peak_bytes'] / 2**20:9.1f} MiB",
                flush=True,
            )
        else:
            print(f"{layer:11s} {impl:8s} T={T:6d}  {r['error']}", flush=True)
        res.append("rows", row)
        res.set("goals", _summary(rows, args))
    title = (
        f"one layer, forward + backward, {device.type}, B={args.B}, C={args.C}, H={args.H}, "
        f"W={args.W}, TTT b={args.ttt_batch}, float32"
    )
    _figure(rows, png, title)
    res.finish(goals=_summary(rows, args), figure=os.path.basename(png))
    print(json.dumps(res.doc["goals"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
