"""The Bayes anchors: Monte-Carlo mean Bayes NLL per token of the Markov-k benchmark, with its SE.

    python benchmarks/bayes_anchors.py [--k 1 2 3 4 5 6] [--sequences 1000000] [--threads 2]

Setting (docs/design.md §8): V = 2, alpha = 1, uniform first k tokens, L = 100 * 2^k, the mean over
positions t >= k of -ln P_Bayes(x_t | x_<t). Every sequence has the same number of scored tokens,
so the mean per token is the mean of the per-sequence means; its standard error is the sample
standard deviation of those per-sequence means over sqrt(n) (sequences are independent draws).

Sequences are drawn by the C++ sampler (eqprop.markov.sample) in chunks of at most ~2^23 tokens
(bounded memory); chunk j of order k uses seed BASE_SEED + 1000 * k + j, so every chunk is an
independent stream and a rerun reproduces the numbers bit for bit. Per-chunk statistics (count,
mean, sum of squared deviations) are kept in benchmarks/results/bayes_anchors.partial.json after
every chunk, so an interrupted run resumes where it stopped (several processes may share one k with
--chunks and one --partial file each); finished orders go to
benchmarks/results/bayes_anchors.json, which python/eqprop/markov.py's BAYES_NLL_ANCHORS quotes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from common import environment, write_results
from eqprop import markov

BASE_SEED = 8_000_000  # the tests draw their fresh sequences from other seeds (tests/test_markov_anchors.py)
TOKENS_PER_CHUNK = 1 << 23
RESULTS = os.path.join(os.path.dirname(__file__), "results")
PARTIAL = os.path.join(RESULTS, "bayes_anchors.partial.json")


def chunk_stats(k: int, batch: int, seed: int) -> dict:
    """(n, mean, m2) of the per-sequence mean Bayes NLL over t >= k for one chunk of sequences."""
    x = markov.sample(batch, k, seed=seed)
    per_seq = markov.bayes_nll(x, k, dtype=torch.float64)[:, k:].mean(1)
    mean = per_seq.mean()
    return {"seed": seed, "n": batch, "mean": float(mean), "m2": float(((per_seq - mean) ** 2).sum())}


def combine(chunks: list[dict]) -> tuple[int, float, float]:
    """Pooled (n, mean, sample variance) from per-chunk (n, mean, m2) (Chan et al.'s pairwise update)."""
    n, mean, m2 = 0, 0.0, 0.0
    for c in chunks:
        nb, mb, m2b = c["n"], c["mean"], c["m2"]
        delta = mb - mean
        tot = n + nb
        mean += delta * nb / tot
        m2 += m2b + delta * delta * n * nb / tot
        n = tot
    return n, mean, m2 / (n - 1)


def _load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _save(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--sequences", type=int, default=1_000_000, help="sequences per order k")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--partial",
        nargs="+",
        default=[PARTIAL],
        help="progress files: this run writes the first; chunks found in any count as done "
        "(several processes can share the chunks of one k, each with its own file)",
    )
    parser.add_argument(
        "--chunks",
        default=None,
        metavar="START:STOP",
        help="compute only chunk indices in [START, STOP) (for one of several processes)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(RESULTS, exist_ok=True)

    own = _load(args.partial[0])
    others = [_load(p) for p in args.partial[1:]]
    final_path = os.path.join(RESULTS, "bayes_anchors.json")
    for k in args.k:
        L = markov.default_seq_len(k)
        batch = max(1, TOKENS_PER_CHUNK // L)
        n_chunks = math.ceil(args.sequences / batch)
        done = own.setdefault(str(k), {"seq_len": L, "batch": batch, "chunks": []})
        found = {c["seed"]: c for part in [own, *others] for c in part.get(str(k), {}).get("chunks", [])}
        for part in [own, *others]:
            if str(k) in part and part[str(k)]["batch"] != batch:
                raise SystemExit(
                    f"k={k} was started with batch {part[str(k)]['batch']}, not {batch}; "
                    "delete the progress files to start over"
                )
        lo, hi = (int(v) for v in args.chunks.split(":")) if args.chunks else (0, n_chunks)
        todo = [j for j in range(lo, min(hi, n_chunks)) if BASE_SEED + 1000 * k + j not in found]
        t0 = time.perf_counter()
        for i, j in enumerate(todo):
            b = min(batch, args.sequences - j * batch)
            c = chunk_stats(k, b, BASE_SEED + 1000 * k + j)
            done["chunks"].append(c)
            found[c["seed"]] = c
            _save(args.partial[0], own)
            n, mean, var = combine(list(found.values()))
            print(
                f"k={k} chunk {j + 1}/{n_chunks} ({len(found)} done): n={n} mean={mean:.6f} "
                f"se={math.sqrt(var / n):.6f} ({(i + 1) / (time.perf_counter() - t0):.2f} chunks/s)",
                flush=True,
            )
        seeds = sorted(found)
        if seeds != [BASE_SEED + 1000 * k + j for j in range(n_chunks)]:
            print(f"k={k}: {len(seeds)} of {n_chunks} chunks done; not written", flush=True)
            continue
        n, mean, var = combine([found[s] for s in seeds])
        final = _load(final_path) or {"anchors": {}}  # re-read: another process may have written other orders
        final["anchors"][str(k)] = {
            "k": k,
            "seq_len": L,
            "n_sequences": n,
            "mean_nll": mean,
            "se": math.sqrt(var / n),
            "sd_per_sequence": math.sqrt(var),
            "chunk_batch": batch,
            "seeds": seeds,
        }
        final["anchors"] = dict(sorted(final["anchors"].items()))
        final["setting"] = {
            "vocab_size": 2,
            "alpha": 1.0,
            "seq_len": "100 * 2^k",
            "positions": "t >= k",
            "start": "uniform",
            "seed_rule": f"{BASE_SEED} + 1000 k + chunk index",
        }
        final["environment"] = environment()
        write_results("bayes_anchors", final)
        print(f"k={k}: {mean:.6f} +- {math.sqrt(var / n):.6f} (n={n}) written", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
