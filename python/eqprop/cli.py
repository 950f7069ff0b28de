"""The ``eqprop`` command line. ``eqprop --help`` lists the commands; each has its own ``--help``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional, Sequence


def _markov_bayes(args: argparse.Namespace) -> int:
    """Sample Markov-k sequences and report the exact Bayes NLL next to the anchors of docs/design.md §8."""
    import torch

    from eqprop import markov
    from eqprop.train.core import resolve_device

    args.device = resolve_device(args.device)  # a clear error for cuda on a torch without CUDA

    rows = []
    header = (
        f"{'k':>2} {'L':>6} {'Bayes NLL/token':>16} {'+-SE':>8} {'anchor':>7} {'z':>6} "
        f"{'p5 visits':>9} {'<10 visits':>10} {'unvisited':>9} {'sec':>6}"
    )
    print(
        f"Markov-k Bayes NLL (V={args.vocab_size}, alpha={args.alpha}, {args.batch} sequences each, "
        f"seed={args.seed}, device={args.device})"
    )
    print(header)
    for k in args.k:
        t0 = time.perf_counter()
        seq_len = args.seq_len or markov.default_seq_len(k)
        x = markov.sample(
            args.batch,
            k,
            seq_len=seq_len,
            vocab_size=args.vocab_size,
            alpha=args.alpha,
            seed=args.seed + k,
            device=args.device,
        )
        nll = markov.bayes_nll(x, k, vocab_size=args.vocab_size, alpha=args.alpha, dtype=torch.float64)
        per_seq = nll[:, k:].mean(1)
        mean, se = float(per_seq.mean()), float(per_seq.std() / per_seq.numel() ** 0.5)
        _, cov = markov.context_coverage(x, k, vocab_size=args.vocab_size)
        standard = args.vocab_size == 2 and args.alpha == 1.0 and args.seq_len is None
        quoted = markov.BAYES_NLL_ANCHORS.get(k) if standard else None
        anchor = quoted.nll if quoted is not None else None
        # the anchor is a Monte-Carlo mean too: z uses both standard errors
        z = (mean - anchor) / math.hypot(se, quoted.se) if quoted is not None else None
        secs = time.perf_counter() - t0
        rows.append(dict(k=k, seq_len=seq_len, bayes_nll=mean, se=se, anchor=anchor, z=z, coverage=cov, seconds=secs))
        print(
            f"{k:>2} {seq_len:>6} {mean:>16.4f} {se:>8.4f} "
            f"{(f'{anchor:.4f}' if anchor is not None else '-'):>7} "
            f"{(f'{z:+.1f}' if z is not None else '-'):>6} {cov['p5']:>9.0f} {cov['frac_lt10']:>10.3f} "
            f"{cov['frac_unvisited']:>9.3f} {secs:>6.2f}"
        )
    print(
        "z = (measured - anchor) / sqrt(SE^2 + SE_anchor^2); |z| < 3 agrees with the anchor. "
        "Visits count, per sequence, how often each of the V^k contexts precedes a target."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _setup_logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _fmt_gap(gap, se) -> str:
    return "n/a" if gap is None else f"{gap:+.2f}% +- {se:.2f}"


#: Exit status of a run stopped by a signal: 128 + the signal number, as a shell reports it.
_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def _print_eval(result: dict, indent: str = "  ") -> None:
    pos = result["by_position"]
    print(
        f"{indent}by position (t >= k): "
        + ", ".join(
            f"{name} {_fmt_gap(pos[name]['gap_pct'], pos[name]['gap_se'])}" for name in ("early", "middle", "late")
        )
    )
    parts = []
    for b in result["by_visit_count"]:
        lo, hi = b["visits"]
        label = f"{lo}+" if hi is None else (f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}")
        parts.append(f"{label}: {_fmt_gap(b['gap_pct'], b['gap_se'])} ({100 * b['frac_tokens']:.0f}% of tokens)")
    print(f"{indent}by earlier visits of the context: " + "; ".join(parts))


def _markov_train(args: argparse.Namespace) -> int:
    """Train a transformer on Markov-k sequences and report its gap to the exact Bayes NLL.

    With no options this is the CPU demo: a 2-layer, width-64 rope transformer at k = 2 (L = 400), up to 400
    steps (it stops once the eval gap + 2 SE is below 3%). Every TrainConfig field is an option
    (eqprop.train.markov.TrainConfig); artifacts go to --out-dir, and a folder that already holds a run is
    refused unless --resume (continue it) or --overwrite (move it aside) is given. Under torchrun it trains
    data-parallel. Exit status: 0, 1 if the loss diverged, 130 / 143 if stopped by SIGINT / SIGTERM.
    """
    _setup_logging(args.verbose)
    from eqprop.train.markov import TrainConfig, train

    cfg = TrainConfig.from_args(args)
    s = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    print(
        f"{cfg.n_layer}-layer width-{cfg.d_model} {cfg.pos_enc} transformer; best eval gap on the fixed eval set "
        f"of {cfg.eval_batches * cfg.eval_batch_size} sequences, final gaps on fresh ones"
    )
    print(s)
    for f in s.final:
        print(
            f"final gap to Bayes of best.pt: {_fmt_gap(f['gap_pct'], f['gap_se'])}  "
            f"(model {f['model_nll']:.4f} vs Bayes {f['bayes_nll']:.4f} nats/token; {f['n_seqs']} fresh "
            f"sequences, seed {f['seed']})"
        )
    if s.final:
        _print_eval(s.final[0])
    for name, path in s.figures.items():
        print(f"figure {name}: {path}")
    print(f"summary: {s.out_dir}/summary.json   history: {s.out_dir}/training_history.csv")
    if s.status == "interrupted":
        return _SIGNAL_EXIT.get(s.stop_signal, 130)
    return 1 if s.status == "diverged" else 0


def _markov_eval(args: argparse.Namespace) -> int:
    """Score a checkpoint (best.pt / last.pt) on fresh sequences: gap to Bayes with SE and its breakdowns."""
    _setup_logging(args.verbose)
    from eqprop.train.markov import evaluate

    rows = []
    for seed in args.seed:
        r = evaluate(
            args.checkpoint,
            n_batches=args.batches,
            batch_size=args.batch_size,
            seed=seed,
            seq_len=args.seq_len,
            device=args.device,
        )
        rows.append(r.to_dict())
        print(
            f"{args.checkpoint}: gap to Bayes {_fmt_gap(r.gap_pct, r.gap_se)} (model {r.model_nll:.4f} vs "
            f"Bayes {r.bayes_nll:.4f} nats/token; {r.n_seqs} sequences of length {r.seq_len}, seed {seed})"
        )
        _print_eval(rows[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _markov_ladder(args: argparse.Namespace) -> int:
    """Grow transformers for each k until the gate passes: more steps while the gap still falls, else
    deeper, then wider. The other options set the first rung (a TrainConfig); the start is
    eqprop.train.ladder.LADDER_START (4 layers, width 128, 64 x 2 sequences per step, 2000 steps), not
    the train command's CPU demo defaults."""
    _setup_logging(args.verbose)
    from eqprop.train.ladder import LADDER_START, ladder
    from eqprop.train.markov import TrainConfig

    base = TrainConfig.from_args(args, skip=_LADDER_SKIP, defaults=LADDER_START)
    results = ladder(
        args.k,
        base=base,
        out_dir=args.out_dir,
        max_rungs=args.max_rungs,
        max_layers=args.max_layers,
        max_width=args.max_width,
        max_steps_cap=args.max_steps_cap,
        overwrite=base.overwrite,
    )
    for k, res in results.items():
        best = min(
            (r for r in res["rungs"] if r["best_gap_pct"] is not None), key=lambda r: r["best_gap_pct"], default=None
        )
        tail = (
            f"best {best['n_layer']}x{best['d_model']}, {best['max_steps']} steps: {best['best_gap_pct']:+.2f}%"
            if best
            else "no evaluated rung"
        )
        print(f"k={k}: {'PASS' if res['passed'] else 'FAIL'} after {len(res['rungs'])} rungs ({res['reason']}); {tail}")
    print(f"ladder summary: {args.out_dir}/ladder_summary.json   plot: {args.out_dir}/ladder.png")
    return 0 if all(r["passed"] for r in results.values()) else 1


_LADDER_SKIP = ("k", "out_dir", "resume")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqprop", description=__doc__)
    sub = parser.add_subparsers(dest="group", required=True)

    mk = sub.add_parser("markov", help="the Markov-k in-context-learning benchmark")
    mk_sub = mk.add_subparsers(dest="command", required=True)

    bayes = mk_sub.add_parser(
        "bayes", help="sample sequences and report the exact Bayes NLL per token", description=_markov_bayes.__doc__
    )
    bayes.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="Markov orders")
    bayes.add_argument("--batch", type=int, default=4096, help="sequences per order")
    bayes.add_argument("--seq-len", type=int, default=None, help="sequence length (default 100*2^k)")
    bayes.add_argument("--vocab-size", type=int, default=2)
    bayes.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration")
    bayes.add_argument("--seed", type=int, default=0)
    bayes.add_argument("--device", default="cpu")
    bayes.add_argument("--json", default=None, help="also write the table to this JSON file")
    bayes.set_defaults(func=_markov_bayes)

    fmt = argparse.ArgumentDefaultsHelpFormatter
    from eqprop.train.markov import TrainConfig

    tr = mk_sub.add_parser(
        "train",
        help="train a transformer and report its gap to Bayes (the CPU demo by default)",
        description=_markov_train.__doc__,
    )
    TrainConfig.add_options(tr)
    tr.add_argument("-v", "--verbose", action="store_true", help="log every evaluation")
    tr.set_defaults(func=_markov_train)

    ev = mk_sub.add_parser(
        "eval", help="score a checkpoint on fresh sequences", description=_markov_eval.__doc__, formatter_class=fmt
    )
    ev.add_argument("checkpoint", help="best.pt or last.pt written by `eqprop markov train`")
    ev.add_argument("--batches", type=int, default=16, help="batches per evaluation set (>= 1)")
    ev.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: the run's)")
    ev.add_argument(
        "--seed", type=int, nargs="+", default=[2_000_003, 3_000_017], help="one independent evaluation set per seed"
    )
    ev.add_argument("--seq-len", type=int, default=None, help="evaluation length (default: the run's)")
    ev.add_argument("--device", default=None, help="default: cpu")
    ev.add_argument("--json", default=None, help="also write the results to this JSON file")
    ev.add_argument("-v", "--verbose", action="store_true")
    ev.set_defaults(func=_markov_eval)

    ld = mk_sub.add_parser("ladder", help="grow models per k until the gate passes", description=_markov_ladder.__doc__)
    ld.add_argument("--k", type=int, nargs="+", required=True, help="Markov orders")
    ld.add_argument("--out-dir", default="runs/ladder", help="where rungs and the summary go (default: runs/ladder)")
    ld.add_argument("--max-rungs", type=int, default=8, help="rungs per k (default: 8)")
    ld.add_argument("--max-layers", type=int, default=8, help="deepest model (default: 8)")
    ld.add_argument("--max-width", type=int, default=512, help="widest model (default: 512)")
    ld.add_argument("--max-steps-cap", type=int, default=100_000, help="longest run (default: 100000)")
    from eqprop.train.ladder import LADDER_START

    TrainConfig.add_options(ld, skip=_LADDER_SKIP, defaults=LADDER_START)
    ld.add_argument("-v", "--verbose", action="store_true")
    ld.set_defaults(func=_markov_ladder)
    from eqprop import cli_eqlm, cli_lengthgen

    cli_eqlm.add_parser(sub)  # eqprop eqlm train | eval | probe
    cli_lengthgen.add_parser(sub)  # eqprop lengthgen train | status | compare
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; a ``ValueError`` (bad option values, a folder that holds a run, a broken
    checkpoint, a config too large for the device) is reported in one line with exit status 2."""
    from eqprop.train.config import cli_style

    args = build_parser().parse_args(argv)
    with cli_style():  # messages name --resume / --overwrite, not resume=True
        try:
            return args.func(args)
        except (ValueError, FileNotFoundError) as err:
            if getattr(args, "verbose", False):
                raise
            print(f"eqprop {args.group} {args.command}: error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
