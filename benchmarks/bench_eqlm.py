"""The equilibrium-LM comparison on character-level tiny Shakespeare (docs/design.md §5, §10).

Same width, data, token budget and loop for: the backprop transformer (one layer, as wide as the
block), and the equilibrium LM trained with BPTT, implicit differentiation, symmetric EP and the
two-phase EP "warm-track" recipe (symmetric EP until the validation CE plateaus, then
tracking-corrected EP; a switch at half the steps if no plateau comes first). Per method: best
validation CE (nats/token), tokens/s of training, peak memory (CUDA allocator peak on a GPU, the
process's peak RSS on CPU: every method runs in its own process), the gradient alignment with
BPTT(30) over training, and the curves. Goal (issue): EP warm-track within 0.03 nats of BPTT at
equal tokens.

    python benchmarks/bench_eqlm.py                 # C = 64, T = 64, 2000 steps per method (the CPU size)
    python benchmarks/bench_eqlm.py --quick         # C = 32, T = 32, 300 steps (minutes on 2 cores)
    python benchmarks/bench_eqlm.py --gpu           # C = 128, T = 128, 5000 steps
    python benchmarks/bench_eqlm.py --methods bp ep_warmtrack --steps 500

Results: benchmarks/results/eqlm.json (rewritten after every method) and eqlm.png.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from common import Results, environment

ROOT = pathlib.Path(__file__).resolve().parent

SIZES = {
    "cpu": dict(d_model=64, n_head=4, seq_len=64, batch_size=32, max_steps=2000, eval_every=100, probe_every=200),
    "quick": dict(d_model=32, n_head=2, seq_len=32, batch_size=16, max_steps=300, eval_every=50, probe_every=50),
    "gpu": dict(d_model=128, n_head=4, seq_len=128, batch_size=64, max_steps=5000, eval_every=250, probe_every=500),
}
COMMON = dict(
    task="text",
    tokenizer="char",
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=50,
    eval_batches=4,
    eval_batch_size=32,
    final_eval_batches=8,
    relax_max_steps=30,
    relax_tol=1e-4,
    spectral_rho=1.0,
    sample_tokens=200,
    early_stop=False,
    progress=False,
    log_every=10,
)
METHODS = {
    "bp": dict(model="transformer", estimator="bp", n_layer=1),
    "bptt": dict(estimator="bptt", bptt_horizon=10),
    "implicit": dict(estimator="implicit"),
    "ep_symmetric": dict(estimator="ep", ep_beta=0.1, ep_n_points=2, ep_t2=(20,)),
    "ep_warmtrack": dict(
        estimator="ep",
        ep_beta=0.1,
        ep_n_points=2,
        ep_t2=(20,),
        switch_to="ep:correction=tracking",
        switch_on_plateau=True,
        plateau_patience=2,
        plateau_min_delta=0.01,
    ),
}


def run_one(method: str, cfg: dict, out_dir: str, row_path: str) -> None:
    """Train one method in this process and write its row (JSON) to row_path."""
    import torch

    from eqprop.train.equilibrium import EqlmConfig, train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    opts = {**cfg, **METHODS[method]}
    if method == "ep_warmtrack":
        opts["switch_at_step"] = cfg["max_steps"] // 2  # the fallback when no plateau comes first
    s = train(EqlmConfig(**opts, out_dir=out_dir, overwrite=True))
    h = s.history
    plain = [r["tokens_per_s"] for r in h if r.get("cos_ref") is None and r.get("val_ce") is None]
    tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
    row = dict(
        method=method,
        phases=s.phases,
        switched_at=s.switched_at,
        status=s.status,
        steps=s.steps,
        tokens=s.tokens_seen,
        n_params=s.n_params,
        best_val_ce=s.best_score,
        best_step=s.best_step,
        final_val_ce=s.final.get("val_ce") if isinstance(s.final, dict) else None,
        tokens_per_s=statistics.median(plain) if plain else None,
        peak_mem_mb=max(r["mem_mb"] for r in h),
        wall_s=s.wall_s,
        curve=[(r["step"] * tokens_per_step, r["val_ce"]) for r in h if r.get("val_ce") is not None],
        # (step, cos vs BPTT(30) of block + readout, batch self-cosine, cos of the block's parameters only)
        alignment=[
            (r["step"], r["cos_ref"], r.get("self_cos"), r.get("cos_block")) for r in h if r.get("cos_ref") is not None
        ],
        free_res=[(r["step"], r["free_res"]) for r in h if r.get("free_res") is not None],
        sample=s.final.get("sample") if isinstance(s.final, dict) else None,
    )
    pathlib.Path(row_path).write_text(json.dumps(row))


def figure(rows: list, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(rows):
        if r.get("curve"):
            x, y = zip(*r["curve"])
            a.plot(x, y, "o-", ms=3, color=f"C{i}", label=f"{r['method']} (best {r['best_val_ce']:.3f})")
            if r.get("switched_at"):
                a.axvline(r["switched_at"] * r["tokens"] / max(r["steps"], 1), color=f"C{i}", ls=":", lw=1)
        if r.get("alignment"):
            s, c = [a[0] for a in r["alignment"]], [a[1] for a in r["alignment"]]
            b.plot(s, c, "o-", ms=3, color=f"C{i}", label=f"{r['method']} (block + readout)")
            blk = [a[3] if len(a) > 3 else None for a in r["alignment"]]
            if all(v is not None for v in blk):
                b.plot(s, blk, "s--", ms=3, color=f"C{i}", alpha=0.7, label=f"{r['method']} (block only)")
    a.set_xlabel("training tokens")
    a.set_ylabel("validation CE (nats/char)")
    a.set_title(title, fontsize="small")
    a.grid(alpha=0.3)
    a.legend(fontsize="small")
    b.set_xlabel("optimizer step")
    b.set_ylabel("cos(training gradient, BPTT(30))")
    b.set_ylim(-0.1, 1.05)
    b.grid(alpha=0.3)
    b.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="C = 32, T = 32, 300 steps")
    size.add_argument("--gpu", action="store_true", help="C = 128, T = 128, 5000 steps (device auto)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--steps", type=int, default=None, help="override the steps per method")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work-dir", default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "results" / "eqlm.json"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one method
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    name = "gpu" if args.gpu else "quick" if args.quick else "cpu"
    cfg = {**COMMON, **SIZES[name], "device": "auto" if args.gpu else args.device}
    if args.steps is not None:
        cfg["max_steps"] = args.steps
        cfg["warmup_steps"] = min(cfg["warmup_steps"], max(1, args.steps // 10))
    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="eqlm_bench_"))
    if args.one:
        run_one(args.one, cfg, str(work / args.one), args.row)
        return 0
    res = Results(
        args.out,
        environment=environment(),
        size=name,
        config=cfg,
        methods={m: METHODS[m] for m in args.methods},
        note=(
            "every method: same data (char tiny Shakespeare, first 90% train / last 10% val), width, "
            "batch, steps (= tokens) and loop; bp is a one-layer transformer at the same width. "
            "tokens_per_s: median of logged steps without evaluation or probe; peak_mem_mb: "
            "per-process peak (RSS on CPU)."
        ),
    )
    rows = []
    for m in args.methods:
        row_path = work / f"{m}.row.json"
        cmd = [sys.executable, __file__, "--one", m, "--row", str(row_path), "--work-dir", str(work)]
        cmd += ["--quick"] if args.quick else ["--gpu"] if args.gpu else []
        cmd += ["--device", args.device] + (["--steps", str(args.steps)] if args.steps else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not row_path.exists():
            row = dict(method=m, error=proc.stderr[-2000:])
        else:
            row = json.loads(row_path.read_text())
        rows.append(row)
        res.append("rows", row)
        best = row.get("best_val_ce")
        print(
            f"{m:>13}: best val CE {best if best is None else round(best, 4)}  {row.get('tokens_per_s') or 0:.0f} tok/s"
        )
    ok = {r["method"]: r for r in rows if r.get("best_val_ce") is not None}
    goal = None
    if "ep_warmtrack" in ok and "bptt" in ok:
        gap = ok["ep_warmtrack"]["best_val_ce"] - ok["bptt"]["best_val_ce"]
        goal = dict(ep_warmtrack_minus_bptt=gap, target=0.03, met=gap <= 0.03)
    png = pathlib.Path(args.out).with_suffix(".png")
    figure(rows, png, f"char tiny Shakespeare, C={cfg['d_model']}, T={cfg['seq_len']}, {cfg['max_steps']} steps")
    res.finish(goal=goal, figure=str(png.relative_to(ROOT.parent)) if png.is_relative_to(ROOT.parent) else str(png))
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
