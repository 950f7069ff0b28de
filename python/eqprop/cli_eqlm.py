"""``eqprop eqlm train | eval | probe``: the equilibrium-LM trainer on the command line (docs/design.md §10).

``add_parser(sub)`` registers the commands on the ``eqprop`` parser's subcommands.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def _setup_logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _train(args: argparse.Namespace) -> int:
    """Train an equilibrium LM (or the bp transformer baseline) on Markov-k or text.

    Every EqlmConfig field is an option (eqprop.train.equilibrium.EqlmConfig). The default is a width-32
    equilibrium LM on Markov k = 1 trained with implicit differentiation. Examples:

      eqprop eqlm train --task text --estimator ep --ep-beta 0.1 --out-dir runs/ep
      eqprop eqlm train --task text --estimator ep --switch-on-plateau --switch-to ep:correction=tracking
      eqprop eqlm train --task text --model transformer --estimator bp

    A folder that already holds a run is refused unless --resume or --overwrite. Exit status: 0; 1 if the
    loss or the relaxation diverged or the contraction fuse tripped; 130 / 143 if stopped by SIGINT / SIGTERM.
    """
    _setup_logging(args.verbose)
    from eqprop.train.equilibrium import EqlmConfig, train

    cfg = EqlmConfig.from_args(args)
    s = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(s)
    if isinstance(s.final, dict) and s.final.get("sample"):
        print("sample from best.pt:\n" + s.final["sample"])
    for name, path in s.figures.items():
        print(f"figure {name}: {path}")
    print(f"summary: {s.out_dir}/summary.json   history: {s.out_dir}/training_history.csv")
    if s.status == "interrupted":
        return _SIGNAL_EXIT.get(s.stop_signal, 130)
    return 0 if s.status in ("max_steps", "reached_target") else 1


def _eval(args: argparse.Namespace) -> int:
    """Score a checkpoint (best.pt / last.pt) on fresh data: the gap to Bayes (markov) or validation CE (text)."""
    _setup_logging(args.verbose)
    from eqprop.train.equilibrium import evaluate

    r = evaluate(args.checkpoint, batches=args.batches, seed=args.seed, device=args.device)
    if "val_ce" in r:
        print(
            f"{args.checkpoint}: validation CE {r['val_ce']:.4f} nats/token "
            f"({r['n_windows']} windows, seed {args.seed})"
        )
    else:
        print(
            f"{args.checkpoint}: gap to Bayes {r['gap_pct']:+.2f}% +- {r['gap_se']:.2f} (model {r['model_nll']:.4f} "
            f"vs Bayes {r['bayes_nll']:.4f} nats/token; {r['n_seqs']} sequences, seed {args.seed})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    """Gradient diagnostics at a checkpoint (docs/design.md §7): alignment of the run's estimators with
    BPTT(h) and implicit per parameter group, batch self-cosine, task/penalty decomposition, influence
    by distance and a one-step lr sweep; a table (probe.txt), probe.json and figures in --out."""
    _setup_logging(args.verbose)
    from eqprop.train.equilibrium import probe

    out = args.out or str(Path(args.checkpoint).parent / "probe")
    r = probe(
        args.checkpoint,
        out,
        horizon=args.horizon,
        batches=args.batches,
        distances=args.distances,
        lrs=args.lrs,
        jr=args.jr,
        device=args.device,
    )
    print(r["text"])
    print(f"wrote {out}/probe.json, {out}/probe.txt and figures: {', '.join(r['figures'].values())}")
    return 0


def _positive_int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an int, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return parse


def add_parser(sub) -> None:
    """Register ``eqprop eqlm train | eval | probe`` on the subparsers ``sub`` of the ``eqprop`` parser."""
    from eqprop.train.equilibrium import EqlmConfig

    fmt = argparse.RawDescriptionHelpFormatter
    eq = sub.add_parser("eqlm", help="the equilibrium LM trained with BP / BPTT / implicit / EP")
    eq_sub = eq.add_subparsers(dest="command", required=True)

    tr = eq_sub.add_parser(
        "train", help="train (every config field is an option)", description=_train.__doc__, formatter_class=fmt
    )
    EqlmConfig.add_options(tr)
    tr.add_argument("-v", "--verbose", action="store_true", help="log every evaluation and the estimator switch")
    tr.set_defaults(func=_train)

    ev = eq_sub.add_parser("eval", help="score a checkpoint on fresh data", description=_eval.__doc__)
    ev.add_argument("checkpoint", help="RUN/best.pt or RUN/last.pt")
    ev.add_argument("--batches", type=_positive_int("--batches"), default=8, help="evaluation batches (default 8)")
    ev.add_argument("--seed", type=int, default=2_000_003, help="seed of the evaluation set")
    ev.add_argument("--device", default=None, help="default: cpu")
    ev.add_argument("--json", default=None, help="also write the result to this JSON file")
    ev.add_argument("-v", "--verbose", action="store_true")
    ev.set_defaults(func=_eval)

    pr = eq_sub.add_parser("probe", help="gradient diagnostics at a checkpoint", description=_probe.__doc__)
    pr.add_argument("checkpoint", help="RUN/best.pt or RUN/last.pt of an equilibrium model")
    pr.add_argument("--out", default=None, help="output folder (default: RUN/probe)")
    pr.add_argument("--horizon", type=_positive_int("--horizon"), default=30, help="BPTT reference horizon")
    pr.add_argument("--batches", type=int, default=3, help="batches for the self-cosine (>= 2)")
    pr.add_argument("--distances", type=int, nargs="+", default=[1, 2, 4, 8], help="influence distances")
    pr.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1], help="lr sweep")
    pr.add_argument("--jr", type=float, default=1e-2, help="Jacobian-penalty weight of the decomposition")
    pr.add_argument("--device", default=None, help="default: cpu")
    pr.add_argument("-v", "--verbose", action="store_true")
    pr.set_defaults(func=_probe)
