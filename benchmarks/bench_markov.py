"""bayes_nll: the C++ kernel against the plain PyTorch reference, and the CUDA kernel on a GPU.

    python benchmarks/bench_markov.py [--quick] [--out PATH]

Goals: CPU kernel >= 30x the reference at k = 4 and 6 (B = 256, L = 100*2^k);
CUDA kernel >= 1e10 tokens/s on an H100 at B = 4096, k = 6. Writes benchmarks/results/markov.json
(or --out), again after every row: a crash keeps the rows before it ("complete": false).
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import Results, environment, results_path, timeit
from eqprop import markov
from eqprop.reference import markov as ref


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repeat, for a smoke test")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--name", default="markov", help="results file benchmarks/results/NAME.json")
    parser.add_argument("--out", default=None, help="results file (overrides --name)")
    parser.add_argument("--no-cpu", action="store_true", help="only the CUDA kernel (GPU sessions)")
    args = parser.parse_args()
    repeat = 1 if args.quick else 5
    out = None if args.no_write else (args.out or results_path(args.name))
    res = Results(out, environment=environment())
    rows = res.doc.setdefault("rows", [])
    print(f"{'path':>10} {'k':>2} {'B':>5} {'L':>5} {'seconds':>10} {'tokens/s':>12} {'vs reference':>13}")
    for k in () if args.no_cpu else (4, 6):
        B, L = 256, markov.default_seq_len(k)
        x = markov.sample(B, k, seed=k)
        t_ref = timeit(lambda x=x, k=k: ref.bayes_nll(x, k), repeat=1 if args.quick else 2, warmup=0)
        t_cpp = timeit(lambda x=x, k=k: markov.bayes_nll(x, k), repeat=repeat)
        for path, t in (("reference", t_ref), ("cpp-cpu", t_cpp)):
            row = dict(
                path=path, k=k, batch=B, seq_len=L, seconds=t, tokens_per_s=B * L / t, speedup_vs_reference=t_ref / t
            )
            res.append("rows", row)
            print(f"{path:>10} {k:>2} {B:>5} {L:>5} {t:>10.5f} {B * L / t:>12.3e} {t_ref / t:>12.1f}x")
    if torch.cuda.is_available():
        k, B = 6, 4096
        L = markov.default_seq_len(k)
        x = markov.sample(B, k, seed=1, device="cuda")
        t_cuda = timeit(lambda: markov.bayes_nll(x, k), repeat=max(repeat, 20), device="cuda")
        res.append("rows", dict(path="cuda", k=k, batch=B, seq_len=L, seconds=t_cuda, tokens_per_s=B * L / t_cuda))
        print(f"{'cuda':>10} {k:>2} {B:>5} {L:>5} {t_cuda:>10.5f} {B * L / t_cuda:>12.3e}")
    else:
        print("no CUDA device: the CUDA kernel was not measured")

    cpu_ratios = [r["speedup_vs_reference"] for r in rows if r["path"] == "cpp-cpu"]
    goals = {}
    if cpu_ratios:
        goals.update(cpu_speedup_min=min(cpu_ratios), cpu_goal=30.0, cpu_goal_met=min(cpu_ratios) >= 30.0)
    cuda_rows = [r for r in rows if r["path"] == "cuda"]
    if cuda_rows:
        goals.update(
            cuda_tokens_per_s=cuda_rows[0]["tokens_per_s"],
            cuda_goal=1e10,
            cuda_goal_met=cuda_rows[0]["tokens_per_s"] >= 1e10,
        )
    print("goals:", goals)
    res.finish(goals=goals)
    if out:
        print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
