"""Training throughput of the Markov-k transformer: tokens/s and peak memory per optimizer step.

On a GPU: k = 6 (L = 6400), fp32 with the math attention kernel vs bf16 autocast with the flash kernel,
each with and without per-block gradient checkpointing (goal: bf16 + flash >= 3x the tokens/s of fp32 +
math); then the default k = 4 recipe trained to its end, recording the gap reached and the wall time.
Results go to benchmarks/results/markov_train.json.

Without a GPU the same comparison runs at a reduced size (k = 3, L = 800, a small model, no flash kernel
on CPU: "flash" rows use the default SDPA choice) and is written, labelled ``"device": "cpu"`` and
``"reduced_size": true``, to benchmarks/results/markov_train_cpu.json. Nothing trains on CPU.

    python benchmarks/bench_markov_train.py             # the full benchmark for this machine
    python benchmarks/bench_markov_train.py --no-recipe # throughput only
    python benchmarks/bench_markov_train.py --recipe-only --out recipe.json   # the k = 4 run only

The JSON is written again after every throughput row and every evaluation of the recipe run, so a
crash or a time limit keeps what ran ("complete": false). SIGTERM during the recipe run stops it
cleanly (status "interrupted", no final evaluation) and the script still writes its summary.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import platform
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import Results, environment
from eqprop import markov
from eqprop.models import Transformer, next_token_nll

ROOT = pathlib.Path(__file__).resolve().parents[1]

GPU_SIZE = dict(k=6, seq_len=6400, batch=8, n_layer=4, n_head=8, d_model=256, steps=10, warmup=3)
CPU_SIZE = dict(k=3, seq_len=800, batch=4, n_layer=2, n_head=4, d_model=64, steps=4, warmup=1)
# The k = 4 recipe the GPU run trains end to end (a TrainConfig; eval and final sets at their defaults).
RECIPE_K4 = dict(
    k=4,
    n_layer=4,
    n_head=8,
    d_model=256,
    batch_size=64,
    lr=1e-3,
    min_lr=1e-4,
    warmup_steps=200,
    max_steps=3000,
    eval_every=250,
    eval_batches=8,
    eval_batch_size=32,
    final_eval_batches=32,
    bf16=True,
    target_gap_pct=3.0,
    progress=False,
)


def throughput(size: dict, *, bf16: bool, kernel: str, checkpointing: bool, device: str) -> dict:
    """tokens/s and peak memory of full optimizer steps (forward, backward, AdamW) at one setting."""
    torch.manual_seed(0)
    model = Transformer(
        2,
        n_layer=size["n_layer"],
        n_head=size["n_head"],
        d_model=size["d_model"],
        max_len=size["seq_len"],
        pos_enc="rope",
        grad_checkpointing=checkpointing,
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = markov.sample(size["batch"], size["k"], seq_len=size["seq_len"], seed=0, device=device)
    backends = {"math": [SDPBackend.MATH], "flash": [SDPBackend.FLASH_ATTENTION]}
    kernel_ctx = sdpa_kernel(backends[kernel]) if kernel in backends else contextlib.nullcontext()
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    row = dict(bf16=bf16, attention=kernel, grad_checkpointing=checkpointing)
    try:
        with kernel_ctx:
            for i in range(size["warmup"] + size["steps"]):
                if i == size["warmup"]:
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                with autocast:
                    loss = next_token_nll(model(x), x)[:, size["k"] :].mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row["tokens_per_s"] = size["steps"] * x.numel() / dt
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    except torch.OutOfMemoryError:
        row["tokens_per_s"], row["peak_mem_mib"], row["error"] = None, None, "out of memory"
    except RuntimeError as err:  # e.g. no flash kernel for this shape / dtype
        row["tokens_per_s"], row["peak_mem_mib"], row["error"] = None, None, str(err).splitlines()[0][:200]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-recipe", action="store_true", help="skip the k = 4 training run (GPU only)")
    parser.add_argument("--recipe-only", action="store_true", help="only the k = 4 training run (GPU only)")
    parser.add_argument(
        "--recipe-dir",
        default=str(ROOT / "runs" / "bench_markov_k4"),
        help="the recipe run's out_dir (checkpoints, history, figures)",
    )
    parser.add_argument("--out", default=None, help="output JSON (default depends on the device)")
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    size = GPU_SIZE if gpu else CPU_SIZE
    out = (
        pathlib.Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / ("markov_train.json" if gpu else "markov_train_cpu.json")
    )
    res = Results(
        str(out),
        environment=environment(),
        reduced_size=not gpu,
        size=size,
        goal_speedup=3.0,
        note=None
        if gpu
        else "CPU, reduced size: no flash kernel (the fast rows use SDPA's default "
        "CPU kernel); peak memory is only measured on CUDA",
    )
    if not args.recipe_only:
        fast_kernel = "flash" if gpu else "default"  # CPU has no flash kernel: SDPA picks its fused CPU kernel
        settings = [
            (False, "math", False),
            (False, "math", True),
            (True, fast_kernel, False),
            (True, fast_kernel, True),
        ]
        rows = []
        print(f"device {torch.cuda.get_device_name() if gpu else platform.processor() or 'cpu'}; size {size}")
        print(f"{'bf16':>5} {'attention':>9} {'ckpt':>5} {'tokens/s':>10} {'peak MiB':>9}")
        for bf16, kernel, ckpt in settings:
            row = throughput(size, bf16=bf16, kernel=kernel, checkpointing=ckpt, device=device)
            rows.append(row)
            res.append("throughput", row)
            tps = f"{row['tokens_per_s']:.0f}" if row["tokens_per_s"] else row.get("error", "-")
            mem = f"{row['peak_mem_mib']:.0f}" if row["peak_mem_mib"] else "-"
            print(f"{str(bf16):>5} {kernel:>9} {str(ckpt):>5} {tps:>10} {mem:>9}")
        base = rows[0]["tokens_per_s"]
        fast = rows[2]["tokens_per_s"]
        speedup = fast / base if base and fast else None
        res.set("speedup_bf16_fast_vs_fp32_math", speedup)
        print(f"bf16+{fast_kernel} vs fp32+math: {speedup:.2f}x" if speedup else "speedup: n/a")

    if gpu and not args.no_recipe:
        from eqprop.train.markov import TrainConfig, train

        res.set("recipe_k4", {"config": RECIPE_K4, "status": "running", "evals": []})
        t0 = time.perf_counter()

        def record_eval(record, _model):  # every evaluation reaches the JSON as it happens
            if record.get("gap_pct") is not None:
                res.doc["recipe_k4"]["evals"].append(
                    {
                        key: record.get(key)
                        for key in ("step", "train_loss", "gap_pct", "gap_se", "tokens_per_s", "elapsed_s")
                    }
                )
                res.set("recipe_k4", "wall_s", time.perf_counter() - t0)

        s = train(TrainConfig(**RECIPE_K4, out_dir=args.recipe_dir), callback=record_eval)
        res.doc["recipe_k4"].update(
            status=s.status,
            steps=s.steps,
            wall_s=time.perf_counter() - t0,
            best_gap_pct=s.best_gap_pct,
            final=[{key: f[key] for key in ("seed", "n_seqs", "gap_pct", "gap_se")} for f in s.final],
            gate_passed=s.gate_passed,
            figures=s.figures,
            message=s.message,
        )
        print(
            f"k=4 recipe: {s.status} after {s.steps} steps, {res.doc['recipe_k4']['wall_s']:.0f} s; final gaps "
            + (", ".join(f"{f['gap_pct']:+.2f}% +- {f['gap_se']:.2f}" for f in s.final) or "none")
        )
    elif args.recipe_only:
        print("no CUDA device: the k = 4 recipe runs on a GPU only")
    res.finish()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
