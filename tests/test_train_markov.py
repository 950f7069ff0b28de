"""eqprop.train.markov (on the shared loop of eqprop.train.core): config checks, schedules, the gap
breakdowns, learning, resume, DDP, gate, ladder, CLI."""

import csv
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from eqprop import markov
from eqprop.models import next_token_nll
from eqprop.train import core
from eqprop.train import markov as tm
from eqprop.train.checkpoint import load_checkpoint_file
from eqprop.train.core import derive_seed, lr_at
from eqprop.train.ladder import ladder

context_visits = markov.context_visits

# A model small enough that a few steps take well under a second on CPU.
TINY = dict(
    k=1,
    seq_len=64,
    n_layer=1,
    n_head=2,
    d_model=16,
    batch_size=8,
    lr=3e-3,
    warmup_steps=2,
    eval_every=4,
    eval_batches=2,
    eval_batch_size=8,
    final_eval_batches=2,
    log_every=1,
    progress=False,
    device="cpu",
)


def test_config_rejects_unknown_keys_and_lists_valid_ones():
    with pytest.raises(TypeError, match=r"unknown TrainConfig key\(s\) \['n_layers'\].*valid keys are:.*n_layer"):
        tm.TrainConfig.from_dict({"k": 3, "n_layers": 4})
    with pytest.raises(TypeError, match="learning_rate"):
        tm.TrainConfig().replace(learning_rate=1.0)
    with pytest.raises(
        ValueError, match=r"TrainConfig.schedule must be one of \('cosine', 'wsd', 'constant'\), got 'linear'"
    ):
        tm.TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match=r"TrainConfig.min_lr must be in \[0, lr=0.001\], got 0.01"):
        tm.TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(TypeError, match="TrainConfig.k must be int, got str '3'"):
        tm.TrainConfig(k="3")
    with pytest.raises(TypeError, match="TrainConfig.bf16 must be bool"):
        tm.TrainConfig(bf16="yes")
    assert tm.TrainConfig(lr=1).lr == 1.0 and isinstance(tm.TrainConfig(lr=1).lr, float)
    with pytest.raises(ValueError, match="final_eval_seeds"):
        tm.TrainConfig(final_eval_seeds=(5, 5))
    cfg = tm.TrainConfig(k=3)
    assert cfg.train_len == 800 == cfg.eval_len  # 100 * 2^k, and eval length follows train length
    assert tm.TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_lr_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=111)  # steps 0..110; 110 is the last
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)  # warmup: (step + 1) / warmup
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(0.55)  # half way: (lr + min_lr) / 2
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(0.1)  # the last step is at min_lr
    # wsd: constant to 80% of max_steps (step round(88.8) = 89), then linear to min_lr at the last step
    assert lr_at(88, schedule="wsd", **kw) == 1.0
    assert lr_at(99, schedule="wsd", **kw) == pytest.approx(1.0 - 0.9 * 10 / 21)
    assert lr_at(110, schedule="wsd", **kw) == pytest.approx(0.1)
    assert lr_at(100, schedule="constant", **kw) == 1.0
    # a decay phase of a single step: the last step is at min_lr (steps 0..3, decay from round(3.2) = 3)
    assert [lr_at(i, schedule="wsd", lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=4) for i in range(4)] == [
        0.5,
        1.0,
        1.0,
        0.1,
    ]


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "train", 3, 0) == derive_seed(0, "train", 3, 0)
    seeds = {derive_seed(s, "train", step, m) for s in range(3) for step in range(50) for m in range(2)}
    assert len(seeds) == 300 and all(0 <= s < 2**62 for s in seeds)


def test_bayes_predictive_is_the_visit_count_formula():
    # at k=1, V=2, alpha=1 the Bayes probability of x_t is (N(c, x_t) + 1) / (visits + 2): the visit count
    # is the denominator the posterior conditions on
    x = markov.sample(3, 1, seq_len=80, seed=2)
    visits = context_visits(x, 1)
    b = markov.bayes_nll(x, 1, dtype=torch.float64)
    for i in range(3):
        seq = x[i].tolist()
        for t in range(1, 80):
            n_ca = sum(seq[s - 1] == seq[t - 1] and seq[s] == seq[t] for s in range(1, t))
            assert b[i, t].item() == pytest.approx(-math.log((n_ca + 1) / (visits[i, t].item() + 2)), abs=1e-9)


def _fake_eval(seed=0):
    x = markov.sample(32, 2, seq_len=200, seed=seed)
    bayes = markov.bayes_nll(x, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    model = bayes * (1.1 + 0.1 * torch.rand(bayes.shape, generator=g, dtype=torch.float64))
    return x, bayes, model


def test_breakdowns_partition_the_gap():
    x, bayes, model = _fake_eval()
    by_pos, by_visits = markov.gap_breakdowns(model, bayes, x, 2)
    total, _ = markov.gap_pct(model, bayes, 2)
    # pooled gaps of a partition, weighted by the Bayes NLL in each part, add up to the total gap
    for parts, mask_of in [
        (
            [by_pos[n] for n in ("early", "middle", "late")],
            lambda p: (torch.arange(200) >= p["positions"][0]) & (torch.arange(200) < p["positions"][1]),
        ),
        ([b for b in by_visits if b["gap_pct"] is not None], None),
    ]:
        if mask_of is None:
            visits = context_visits(x, 2)

            def mask_of(p, visits=visits):
                return (visits >= p["visits"][0]) & (visits < (p["visits"][1] or 10**9))

        weights = [float((bayes * mask_of(p)).sum()) for p in parts]
        combined = sum(p["gap_pct"] * w for p, w in zip(parts, weights)) / sum(weights)
        assert combined == pytest.approx(total, rel=1e-9)
    assert sum(b["frac_tokens"] for b in by_visits) == pytest.approx(1.0)
    # a multiplicative error of 10-20% per token is a 15% gap wherever you look
    assert all(14 < by_pos[n]["gap_pct"] < 16 for n in ("early", "middle", "late"))


def test_gate_needs_both_final_sets_below_target():
    f = lambda *g: [{"gap_pct": x} for x in g]  # noqa: E731
    assert tm.gate_passed(f(2.9, 2.95), 3.0)
    assert not tm.gate_passed(f(2.9, 3.01), 3.0)
    assert not tm.gate_passed(f(3.2, 1.0), 3.0)
    assert not tm.gate_passed(f(1.0), 3.0)  # one evaluation is not enough
    assert tm.gate_passed(f(3.0, 3.0), 3.0)


def test_tiny_model_learns_and_writes_artifacts(tmp_path):
    cfg = tm.TrainConfig(
        k=1,
        seq_len=200,
        n_layer=2,
        n_head=2,
        d_model=32,
        batch_size=16,
        lr=5e-3,
        min_lr=5e-4,
        warmup_steps=10,
        max_steps=120,
        eval_every=40,
        eval_batches=2,
        eval_batch_size=16,
        final_eval_batches=2,
        target_gap_pct=1.0,
        early_stop=False,
        log_every=10,
        progress=False,
        device="cpu",
        out_dir=str(tmp_path),
    )
    s = tm.train(cfg)
    x = markov.sample(64, 1, seq_len=200, seed=0)
    bayes = markov.bayes_nll(x, 1)
    uniform_gap, _ = markov.gap_pct(torch.full_like(bayes, math.log(2)), bayes, 1)
    assert 30 < uniform_gap < 50  # docs/design.md §8: uniform is ~ +38%
    assert s.status == "max_steps" and s.steps == 120
    assert len(s.final) == 2 and [f["seed"] for f in s.final] == list(cfg.final_eval_seeds)
    for f in s.final:
        # well below uniform (it has learned in-context statistics), and not below Bayes beyond noise (a
        # model that could see its target would be far below)
        assert -3 * f["gap_se"] < f["gap_pct"] < uniform_gap / 2, f
    evals = [r["gap_pct"] for r in s.history if r.get("gap_pct") is not None]
    assert evals[-1] < evals[0] - 3  # the paired eval gap falls during training

    # artifacts exist and parse
    assert tm.TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg
    rows = list(csv.DictReader((tmp_path / "training_history.csv").open()))
    assert list(rows[0]) == list(tm.HISTORY_COLUMNS)
    assert [int(r["step"]) for r in rows] == list(range(10, 121, 10))
    evals = [r for r in rows if r["gap_pct"]]
    assert [int(r["step"]) for r in evals] == [40, 80, 120]
    best_row = min(evals, key=lambda r: float(r["gap_pct"]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_step"] == int(best_row["step"]) == s.best_step
    assert summary["best_gap_pct"] == pytest.approx(float(best_row["gap_pct"]))
    for name in ("training_curve", "gap_by_position"):
        png = tmp_path / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # best.pt re-evaluated on the first final set reproduces the summary's number
    again = tm.evaluate(tmp_path / "best.pt", n_batches=2, seed=cfg.final_eval_seeds[0])
    assert again.gap_pct == pytest.approx(s.final[0]["gap_pct"], abs=1e-9)
    last = load_checkpoint_file(tmp_path / "last.pt")
    assert last["step"] == 120
    # print(summary) is a few readable lines, not the nested dicts
    text = str(s)
    assert len(text.splitlines()) <= 8 and "max_steps after 120 steps" in text
    assert f"{s.final[0]['gap_pct']:+.2f}% +- {s.final[0]['gap_se']:.2f}" in text
    assert ("gate (both final gaps <= 1.0%): " + ("PASS" if s.gate_passed else "FAIL")) in text


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_resume_after_a_signal_reproduces_the_uninterrupted_run(tmp_path, sig):
    cfg = tm.TrainConfig(max_steps=12, **TINY, out_dir=str(tmp_path / "straight"))
    straight = tm.train(cfg)

    def interrupt_at_7(record, model):
        if record["step"] == 7:
            os.kill(os.getpid(), sig)  # handled by the trainer: checkpoint, clean exit

    cut = cfg.replace(out_dir=str(tmp_path / "cut"))
    first = tm.train(cut, callback=interrupt_at_7)
    assert first.status == "interrupted" and first.steps == 7 and first.final == []
    assert sig.name in first.message and first.stop_signal == sig.name and "resume=True" in first.message
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    resumed = tm.train(cut.replace(resume=True))
    assert resumed.status == "max_steps" and resumed.steps == 12
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    assert [r["step"] for r in resumed.history] == list(range(1, 13))
    assert [r.get("gap_pct") for r in resumed.history] == [r.get("gap_pct") for r in straight.history]
    assert resumed.final[0]["gap_pct"] == straight.final[0]["gap_pct"]
    a = load_checkpoint_file(tmp_path / "straight" / "last.pt")["model"]
    b = load_checkpoint_file(tmp_path / "cut" / "last.pt")["model"]
    assert all(torch.equal(a[n], b[n]) for n in a)
    record = (tmp_path / "cut" / "config.json").read_text()
    with pytest.raises(ValueError, match="d_model: checkpoint 16 vs config 32"):
        tm.train(cut.replace(resume=True, d_model=32, max_steps=14))
    assert (tmp_path / "cut" / "config.json").read_text() == record  # a refused resume leaves the record


def test_resume_takes_optimizer_hyperparameters_from_the_config(tmp_path):
    cfg = tm.TrainConfig(max_steps=4, **TINY, out_dir=str(tmp_path))
    tm.train(cfg)
    changed = cfg.replace(resume=True, max_steps=6, weight_decay=0.5, beta2=0.99)
    model = tm.build_model(changed)
    optimizer = core.adamw(model, changed)
    state = core._restore(tmp_path / "last.pt", tm.MarkovTask(changed), changed, model, optimizer)
    assert state["step"] == 4 and len(optimizer.state) > 0  # the moments come from the checkpoint
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    assert all(g["betas"] == (changed.beta1, 0.99) for g in optimizer.param_groups)


def test_divergence_stops_cleanly(tmp_path):
    cfg = tm.TrainConfig(max_steps=10, **{**TINY, "eval_every": 2}, out_dir=str(tmp_path))

    def poison(record, model):
        if record["step"] == 3:
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))

    s = tm.train(cfg, callback=poison)
    assert s.status == "diverged" and s.steps == 3 and "non-finite loss at step 4" in s.message
    assert "last.pt / best.pt" in s.message  # both exist (evaluated at step 2)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert load_checkpoint_file(tmp_path / "last.pt")["step"] == 2  # the last good checkpoint
    assert len(s.final) == 2 and all(math.isfinite(f["gap_pct"]) for f in s.final)  # best.pt from step 2


def test_early_stop_at_target(tmp_path):
    cfg = tm.TrainConfig(max_steps=20, **TINY, target_gap_pct=1000.0, out_dir=str(tmp_path))
    s = tm.train(cfg)
    assert s.status == "reached_target" and s.steps == 4 and s.gate_passed
    # resuming a finished run (a retry script) does not train past its early stop
    again = tm.train(cfg.replace(resume=True))
    assert again.status == "reached_target" and again.steps == 4
    assert again.final[0]["gap_pct"] == s.final[0]["gap_pct"]


def _run_cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "eqprop", *args], capture_output=True, text=True, env=env, **kw)


def _cli_options(cfg: dict) -> list:
    out = []
    for key, value in cfg.items():
        flag = "--" + key.replace("_", "-")
        out += (
            ([flag] if value else ["--no-" + key.replace("_", "-")]) if isinstance(value, bool) else [flag, str(value)]
        )
    return out


def test_ddp_two_processes_match_a_single_process(tmp_path):
    opts = {**TINY, "batch_size": 8, "grad_accum_steps": 2, "max_steps": 6, "eval_every": 3}
    single = tm.train(tm.TrainConfig(**opts, out_dir=str(tmp_path / "single")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "eqprop",
        "markov",
        "train",
        *_cli_options(opts),
        "--out-dir",
        str(tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    rows = list(csv.DictReader((tmp_path / "ddp" / "training_history.csv").open()))
    ddp_losses = [float(r["train_loss"]) for r in rows]
    assert ddp_losses == pytest.approx([r["train_loss"] for r in single.history], rel=1e-5)
    assert summary["final"][0]["gap_pct"] == pytest.approx(single.final[0]["gap_pct"], abs=1e-3)
    a = load_checkpoint_file(tmp_path / "single" / "last.pt")["model"]
    b = load_checkpoint_file(tmp_path / "ddp" / "last.pt")["model"]
    assert all(torch.allclose(a[n], b[n], atol=1e-5) for n in a)
    assert "final gap to Bayes of best.pt" in proc.stdout and proc.stdout.count("gate (both") == 1  # rank 0 only

    # the eval command re-scores the checkpoint on the first final set: the same number
    out = _run_cli(
        [
            "markov",
            "eval",
            str(tmp_path / "ddp" / "best.pt"),
            "--batches",
            "2",
            "--seed",
            str(opts.get("final_eval_seeds", tm.TrainConfig().final_eval_seeds)[0]),
        ]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{summary['final'][0]['gap_pct']:+.2f}%" in out.stdout


def test_cli_help_lists_the_config():
    from eqprop.cli import build_parser

    text = (
        build_parser()
        ._subparsers._group_actions[0]
        .choices["markov"]
        ._subparsers._group_actions[0]
        .choices["train"]
        .format_help()
    )
    for option in (
        "--k",
        "--n-layer",
        "--pos-enc",
        "--grad-accum-steps",
        "--target-gap-pct",
        "--resume",
        "--overwrite",
        "--final-eval-seeds",
        "--bf16",
    ):
        assert option in text


def test_cli_config_file_does_not_take_the_runs_out_dir(tmp_path):
    import argparse

    saved = tm.TrainConfig(**{**TINY, "lr": 0.01}, out_dir=str(tmp_path / "old"), resume=True)
    (tmp_path / "config.json").write_text(json.dumps(saved.to_dict()))
    args = argparse.Namespace(config=str(tmp_path / "config.json"))  # no options on the line
    cfg = tm.TrainConfig.from_args(args, defaults={"out_dir": str(tmp_path / "new")})
    assert cfg.lr == 0.01 and cfg.d_model == TINY["d_model"]  # the file's settings are taken
    assert cfg.out_dir == str(tmp_path / "new") and cfg.resume is False  # its run is not


class _FakeSummary:
    def __init__(self, gaps, best, history, passed, n_params=1):
        self.final = [{"gap_pct": g} for g in gaps]
        self.best_gap_pct, self.history, self.status = best, history, "max_steps"
        self.gate_passed = passed
        self.n_params, self.wall_s = n_params, 0.0


def test_ladder_grows_steps_then_depth_then_width(tmp_path):
    def hist(gaps):  # evaluations at steps 100, 200, ...
        return [{"step": 100 * (i + 1), "gap_pct": g, "gap_se": 0.1} for i, g in enumerate(gaps)]

    def fake_train(cfg):
        key = (cfg.n_layer, cfg.d_model, cfg.max_steps)
        table = {
            (2, 64, 400): (20.0, hist([40, 30, 25, 20])),  # still falling in the last quarter -> longer
            (2, 64, 800): (15.0, hist([40, 30, 20, 16, 15, 15, 15, 15])),  # plateau -> deeper
            (4, 64, 800): (10.0, hist([30, 20, 12, 10, 10, 10, 10, 10])),  # deeper helped, plateau -> deeper
            (8, 64, 800): (10.5, hist([30, 20, 12, 11, 10.5, 10.5, 10.5, 10.5])),  # no help -> wider
            (8, 128, 800): (2.0, hist([20, 10, 5, 2, 2, 2, 2, 2])),
        }
        best, h = table[key]
        passed = key == (8, 128, 800)
        gaps = (2.5, 2.9) if passed else (best + 0.1, best + 0.2)
        return _FakeSummary(gaps, best, h, passed)

    base = tm.TrainConfig(n_layer=2, d_model=64, max_steps=400)
    res = ladder([3], base=base, out_dir=str(tmp_path), train_fn=fake_train, max_layers=8)
    rungs = res["3"]["rungs"]
    assert [r["action"] for r in rungs] == ["longer", "deeper", "deeper", "wider", "stop"]
    assert res["3"]["passed"] and res["3"]["reason"] == "gate passed"
    assert json.loads((tmp_path / "ladder_summary.json").read_text()) == res
    assert (tmp_path / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    # a second ladder into the same folder is refused; with overwrite the first one is moved aside
    with pytest.raises(ValueError, match=r"already holds a ladder.*overwrite=True"):
        ladder([3], base=base, out_dir=str(tmp_path), train_fn=fake_train, max_layers=8)
    ladder([3], base=base, out_dir=str(tmp_path), train_fn=fake_train, max_layers=8, overwrite=True)
    (old,) = tmp_path.parent.glob(tmp_path.name + ".old-*")
    assert json.loads((old / "ladder_summary.json").read_text()) == res


def test_cli_ladder_runs_one_rung(tmp_path, capsys):
    from eqprop.cli import main

    opts = {**TINY, "max_steps": 4, "n_head": 2}
    opts.pop("k")
    rc = main(["markov", "ladder", "--k", "1", "--max-rungs", "1", "--out-dir", str(tmp_path), *_cli_options(opts)])
    res = json.loads((tmp_path / "ladder_summary.json").read_text())
    rung = res["1"]["rungs"][0]
    assert (rung["n_layer"], rung["d_model"], rung["max_steps"]) == (1, 16, 4)  # options override LADDER_START
    assert rc == (0 if res["1"]["passed"] else 1)
    assert "ladder summary:" in capsys.readouterr().out
    assert (tmp_path / "k1" / "rung0" / "summary.json").exists()


# lr 3e-3, min_lr 3e-4, 2 warmup steps (lr * (step + 1) / 2), 4 steps: by hand, cosine and wsd reach min_lr
# at the last step (wsd decays over round(0.2 * 4) = 1 step), constant stays at lr.
_COSINE = [1.5e-3, 3e-3, 3e-3, 3e-4]


@pytest.mark.parametrize(
    "opts,lrs",
    [
        (dict(pos_enc="alibi", bf16=True, schedule="wsd"), [1.5e-3, 3e-3, 3e-3, 3e-4]),
        (
            dict(pos_enc="learned", grad_checkpointing=True, schedule="constant", grad_accum_steps=2),
            [1.5e-3, 3e-3, 3e-3, 3e-3],
        ),
        (dict(pos_enc="sinusoidal", eval_seq_len=96), _COSINE),
        (dict(pos_enc="none", n_layer=2), _COSINE),
    ],
    ids=["alibi-bf16-wsd", "learned-ckpt-accum", "sinusoidal-longer-eval", "nope"],
)
def test_model_and_optimizer_options_train(tmp_path, opts, lrs):
    cfg = tm.TrainConfig(**{**TINY, "max_steps": 4, **opts}, out_dir=str(tmp_path))
    s = tm.train(cfg)
    assert s.status == "max_steps" and s.steps == 4
    assert all(math.isfinite(r["train_loss"]) for r in s.history)
    assert s.final[0]["seq_len"] == cfg.eval_len
    assert [r["lr"] for r in s.history] == pytest.approx(lrs, rel=1e-12)


def test_divergence_before_any_checkpoint_names_no_checkpoint(tmp_path):
    def poison(record, model):  # diverge before the first evaluation
        with torch.no_grad():
            model.head.weight.fill_(float("nan"))

    s = tm.train(tm.TrainConfig(**{**TINY, "max_steps": 6}, out_dir=str(tmp_path)), callback=poison)
    assert s.status == "diverged" and s.final == [] and not (tmp_path / "best.pt").exists()
    assert "last.pt" not in s.message and "best.pt" not in s.message
    assert "no checkpoint had been written yet" in s.message


class _BayesPredictor(torch.nn.Module):
    """Emits the exact Bayes predictive as logits (V = 2), through the Transformer's NLL convention."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        b = markov.bayes_nll(x, self.k, dtype=torch.float64)
        p_next = torch.exp(-b[:, 1:])  # probability of the symbol that came next
        logits = torch.zeros(*x.shape, 2, dtype=torch.float64)
        logits[:, :-1].scatter_(2, x[:, 1:, None], p_next.log()[..., None])
        logits[:, :-1].scatter_(2, (1 - x[:, 1:])[..., None], torch.log1p(-p_next)[..., None])
        return logits

    def token_nll(self, x):
        return next_token_nll(self(x), x)


def test_evaluate_scores_the_bayes_predictor_at_zero_gap_everywhere():
    cfg = tm.TrainConfig(k=2, seq_len=120, eval_batch_size=16)
    r = tm.evaluate(_BayesPredictor(2), config=cfg, n_batches=2, seed=11)
    assert r.n_seqs == 32 and r.seq_len == 120
    assert abs(r.gap_pct) < 1e-4 and r.model_nll == pytest.approx(r.bayes_nll, abs=1e-6)
    parts = (
        [r.by_position[n] for n in ("early", "middle", "late")]
        + r.by_position["bins"]
        + [b for b in r.by_visit_count if b["gap_pct"] is not None]
    )
    assert len(parts) > 20 and all(abs(p["gap_pct"]) < 1e-4 for p in parts)
