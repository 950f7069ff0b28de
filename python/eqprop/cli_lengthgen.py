"""``eqprop lengthgen train | status | compare``: length generalization runs (docs/design.md §9, docs/lengthgen.md).

``add_parser(sub)`` registers the command group on the main parser's subparsers (``eqprop.cli.build_parser``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

#: Exit status of a run stopped by a signal: 128 + the signal number, as a shell reports it.
_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}
#: Health states after which ``status --watch`` stops watching (the run will not change by itself).
_ENDED = ("finished", "diverged", "interrupted")


def _fmt_time(seconds) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _ppl_pm(nll: float, se: float) -> str:
    import math

    ppl = math.exp(nll)
    return f"{ppl:.4g} +- {ppl * se:.2g}"  # delta method: SE(exp(x)) = exp(x) SE(x)


def _gap_pm(row) -> str:
    return "-" if row is None else f"{row['gap_pct']:+.2f} +- {row['gap_se']:.2f}"


def _diff_pm(row) -> str:
    return "-" if row is None else f"{row['d_nll']:+.4f} +- {row['d_nll_se']:.4f}"


def _train(args: argparse.Namespace) -> int:
    """Train on windows of W tokens and evaluate the per-position NLL out to eval_factor * W.

    Every LengthGenConfig field is an option (eqprop.train.lengthgen). Data errors (a missing --data path, an
    empty corpus, a tokenizer that differs from the run's on --resume, a validation split shorter than
    eval_factor * W) stop the command before anything is written. Exit status: 0, 1 if the loss diverged,
    130 / 143 if stopped by SIGINT / SIGTERM (continue with --resume), 2 for bad options or data.
    """
    from eqprop.cli import _setup_logging
    from eqprop.train.lengthgen import LengthGenConfig, train

    _setup_logging(args.verbose)
    cfg = LengthGenConfig.from_args(args)
    s = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    print(s)
    for name, path in s.figures.items():
        print(f"figure {name}: {path}")
    print(
        f"summary: {s.out_dir}/summary.json   per position: {s.out_dir}/per_position.csv, "
        f"{s.out_dir}/evals/step_*.json   history: {s.out_dir}/training_history.csv"
    )
    if s.status == "interrupted":
        return _SIGNAL_EXIT.get(s.stop_signal, 130)
    return 1 if s.status == "diverged" else 0


def format_status(st: dict) -> str:
    """The few lines ``eqprop lengthgen status`` prints for one ``run_status`` dict."""
    cfg = st["config"]
    pct = 100.0 * st["step"] / max(1, st["max_steps"])
    eta = "" if st["health"] in _ENDED else f"  ETA {_fmt_time(st['eta_s'])}"
    speed = f" ({st['sec_per_step']:.3g} s/step)" if st["sec_per_step"] else ""
    data = f"Markov k={cfg['k']}" if cfg["task"] == "markov" else f"text ({cfg['tokenizer']})"
    lines = [
        f"{st['run']}: {st['health'].upper()}  step {st['step']}/{st['max_steps']} ({pct:.0f}%){eta}{speed}",
        f"  {cfg['attention']} attention, W={cfg['window']}, {cfg['pos_enc']}, {data}",
    ]
    if st["reason"]:
        lines.append(f"  {st['reason']}")
    latest = st["latest"]
    if latest:
        parts = []
        for b in cfg["buckets"]:
            p = f"{b}xW PPL {_ppl_pm(latest[f'nll_{b}w'], latest[f'nll_se_{b}w'])}"
            if latest.get(f"gap_{b}w") is not None:
                p += f" (gap {latest[f'gap_{b}w']:+.2f}% +- {latest[f'gap_se_{b}w']:.2f})"
            parts.append(p)
        lines.append(f"  latest eval (step {latest['step']}, best so far at step {st['best_step']}):")
        lines += [f"    {p}" for p in parts]
    else:
        lines.append("  no evaluation yet")
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    """Progress, latest bucket PPLs, ETA and health of a run, also one another process is writing (only
    atomically written files are read). Health: finished, diverged, interrupted (from summary.json written
    after the latest start), stalled (no history write for --stall-factor x the typical interval between
    writes, or no improvement of the 1xW log-PPL in `patience` evaluations), running, starting.
    With --watch SECONDS it reprints every SECONDS until the run has ended (Ctrl-C stops watching).
    Exit status: 0 running / starting / finished, 1 diverged / stalled / interrupted."""
    from eqprop.train.lengthgen import run_status

    while True:
        st = run_status(args.run, stall_factor=args.stall_factor)
        if args.json:
            print(json.dumps({key: v for key, v in st.items() if key != "config"}))
        else:
            print(format_status(st), flush=True)
        if not args.watch or st["health"] in _ENDED:
            break
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            break
        print()
    return 1 if st["health"] in ("diverged", "stalled", "interrupted") else 0


def format_compare(rows: list) -> str:
    """The table ``eqprop lengthgen compare`` prints: one row per run, PPL +- SE per bucket (and the Markov
    gap to Bayes per bucket; and for runs scored on the first run's held-out sequences the paired NLL
    difference to it)."""
    buckets = sorted({b["b"] for r in rows for b in r["buckets"]})
    head = f"{'run':<18} {'attention':<10} {'W':>5} {'pos':<6} {'steps':>6} {'health':<11} {'from':<10}"
    lines = [head + "".join(f" {f'{b}xW PPL':>17}" for b in buckets)]
    for r in rows:
        by_b = {b["b"]: b for b in r["buckets"]}
        line = (
            f"{r['run'][:18]:<18} {r['attention']:<10} {r['window']:>5} {r['pos_enc']:<6} {r['steps']:>6} "
            f"{r['health']:<11} {r['source']:<10}"
        )
        line += "".join(f" {_ppl_pm(by_b[b]['nll'], by_b[b]['nll_se']) if b in by_b else '-':>17}" for b in buckets)
        lines.append(line)
    if any("gap_pct" in b for r in rows for b in r["buckets"]):
        lines.append("gap to Bayes per bucket (%, paired, +- SE):")
        for r in rows:
            by_b = {b["b"]: b for b in r["buckets"]}
            cells = "".join(f" {_gap_pm(by_b.get(b)):>17}" for b in buckets)
            lines.append(f"{r['run'][:18]:<18} {'':<10} {'':>5} {'':<6} {'':>6} {'':<11} {'':<10}" + cells)
    if any(r.get("paired") for r in rows):
        ref = rows[0]
        lines.append(f"NLL difference to {ref['run']} per bucket (nats, paired on the same held-out sequences, +- SE):")
        for r in rows[1:]:
            by_b = {p["b"]: p for p in r["paired"] or []}
            cells = "".join(f" {_diff_pm(by_b.get(b)):>17}" for b in buckets)
            lines.append(f"{r['run'][:18]:<18} {'':<10} {'':>5} {'':<6} {'':>6} {'':<11} {'':<10}" + cells)
    return "\n".join(lines)


def _compare(args: argparse.Namespace) -> int:
    """One table (architecture, W, PPL +- SE per bucket; Markov: gap to Bayes per bucket) and one figure
    (PPL per bucket, per-position curves, evolution of the last bucket) across runs, e.g. SW vs TTT vs full,
    or W = 64 vs 128. A finished run shows best.pt (final_eval.json), a running one its latest evaluation."""
    from eqprop.train.lengthgen import compare_plot, compare_runs

    rows = compare_runs(args.runs)
    print(format_compare(rows))
    path = compare_plot(rows, args.figure)
    print(f"figure: {path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{key: v for key, v in r.items() if key not in ("result", "history")} for r in rows], f, indent=2)
        print(f"wrote {args.json}")
    return 0


def add_parser(sub) -> None:
    """Register ``eqprop lengthgen train | status | compare`` on the main parser's subparsers."""
    from eqprop.train.lengthgen import LengthGenConfig

    lg = sub.add_parser("lengthgen", help="length generalization: train on W tokens, evaluate out to 20*W")
    lg_sub = lg.add_subparsers(dest="command", required=True)

    tr = lg_sub.add_parser("train", help="train one architecture and evaluate per position", description=_train.__doc__)
    LengthGenConfig.add_options(tr)
    tr.add_argument("-v", "--verbose", action="store_true", help="log every evaluation")
    tr.set_defaults(func=_train)

    st = lg_sub.add_parser(
        "status", help="progress, latest buckets, ETA and health of a run", description=_status.__doc__
    )
    st.add_argument("run", help="the run's out_dir")
    st.add_argument("--watch", type=float, default=None, metavar="SECONDS", help="reprint every SECONDS until it ends")
    st.add_argument(
        "--stall-factor", type=float, default=5.0, help="stalled after this many typical write intervals (default: 5)"
    )
    st.add_argument("--json", action="store_true", help="print one JSON object per report")
    st.set_defaults(func=_status)

    cp = lg_sub.add_parser("compare", help="one table and one figure across runs", description=_compare.__doc__)
    cp.add_argument("runs", nargs="+", help="run folders")
    cp.add_argument("--figure", default="lengthgen_compare.png", help="where the figure goes (default: %(default)s)")
    cp.add_argument("--json", default=None, help="also write the table to this JSON file")
    cp.set_defaults(func=_compare)
