"""The ``eqprop`` command line. ``eqprop --help`` lists the commands; each has its own ``--help``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence


def _markov_bayes(args: argparse.Namespace) -> int:
    """Sample Markov-k sequences and report the exact Bayes NLL next to DESIGN.md §8's anchors."""
    import torch

    from eqprop import markov

    rows = []
    header = f"{'k':>2} {'L':>6} {'Bayes NLL/token':>16} {'+-SE':>8} {'anchor':>7} {'z':>6} " \
             f"{'p5 visits':>9} {'<10 visits':>10} {'unvisited':>9} {'sec':>6}"
    print(f"Markov-k Bayes NLL (V={args.vocab_size}, alpha={args.alpha}, {args.batch} sequences each, "
          f"seed={args.seed}, device={args.device})")
    print(header)
    for k in args.k:
        t0 = time.perf_counter()
        seq_len = args.seq_len or markov.default_seq_len(k)
        x = markov.sample(args.batch, k, seq_len=seq_len, vocab_size=args.vocab_size, alpha=args.alpha,
                          seed=args.seed + k, device=args.device)
        nll = markov.bayes_nll(x, k, vocab_size=args.vocab_size, alpha=args.alpha, dtype=torch.float64)
        per_seq = nll[:, k:].mean(1)
        mean, se = float(per_seq.mean()), float(per_seq.std() / per_seq.numel() ** 0.5)
        _, cov = markov.context_coverage(x, k, vocab_size=args.vocab_size)
        standard = args.vocab_size == 2 and args.alpha == 1.0 and args.seq_len is None
        anchor = markov.BAYES_NLL_ANCHORS.get(k) if standard else None
        z = (mean - anchor) / se if anchor is not None else None
        secs = time.perf_counter() - t0
        rows.append(dict(k=k, seq_len=seq_len, bayes_nll=mean, se=se, anchor=anchor, z=z, coverage=cov,
                         seconds=secs))
        print(f"{k:>2} {seq_len:>6} {mean:>16.4f} {se:>8.4f} "
              f"{(f'{anchor:.4f}' if anchor is not None else '-'):>7} "
              f"{(f'{z:+.1f}' if z is not None else '-'):>6} {cov['p5']:>9.0f} {cov['frac_lt10']:>10.3f} "
              f"{cov['frac_unvisited']:>9.3f} {secs:>6.2f}")
    print("z = (measured - anchor) / SE; |z| < 3 agrees with the anchor. Visits count, per sequence, "
          "how often each of the V^k contexts precedes a target.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqprop", description=__doc__)
    sub = parser.add_subparsers(dest="group", required=True)

    mk = sub.add_parser("markov", help="the Markov-k in-context-learning benchmark")
    mk_sub = mk.add_subparsers(dest="command", required=True)

    bayes = mk_sub.add_parser("bayes", help="sample sequences and report the exact Bayes NLL per token",
                              description=_markov_bayes.__doc__)
    bayes.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="Markov orders")
    bayes.add_argument("--batch", type=int, default=4096, help="sequences per order")
    bayes.add_argument("--seq-len", type=int, default=None, help="sequence length (default 100*2^k)")
    bayes.add_argument("--vocab-size", type=int, default=2)
    bayes.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration")
    bayes.add_argument("--seed", type=int, default=0)
    bayes.add_argument("--device", default="cpu")
    bayes.add_argument("--json", default=None, help="also write the table to this JSON file")
    bayes.set_defaults(func=_markov_bayes)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
