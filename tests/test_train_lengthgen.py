"""eqprop.train.lengthgen and `eqprop lengthgen`: bucket arithmetic against hand computations, per-position
NLL against the model's own, the Markov gap per bucket, early stopping, exact resume, data errors before the
first step, run health, comparisons and the curriculum (docs/design.md §9)."""

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

from eqprop import markov
from eqprop.cli import main
from eqprop.models import Transformer
from eqprop.train import lengthgen as lg
from eqprop.train.checkpoint import load_checkpoint_file

TINY = dict(
    window=8,
    eval_factor=4,
    buckets=(1, 2, 4),
    n_layer=1,
    n_head=2,
    d_model=16,
    batch_size=8,
    warmup_steps=2,
    eval_every=3,
    eval_seqs=6,
    eval_batch_size=4,
    log_every=1,
    progress=False,
    device="cpu",
)


# ---- the arithmetic ----------------------------------------------------------------------------------


def test_buckets_and_positions_match_a_hand_computation():
    # 3 sequences, W = 3, length 12; bucket b covers positions [(b-1)W, bW), scored from position 1 on
    nll = torch.tensor(
        [
            [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0],
            [9.0, 3.0, 1.0, 0.0, 2.0, 2.0, 5.0, 1.0, 1.0, 4.0, 0.0, 2.0],
            [9.0, 2.0, 2.0, 6.0, 0.0, 1.0, 3.0, 3.0, 3.0, 1.0, 1.0, 1.0],
        ]
    )
    rows = lg.bucket_stats(nll, 3, (1, 2, 4), first=1)
    for row, (lo, hi) in zip(rows, [(1, 3), (3, 6), (9, 12)]):
        per_seq = [statistics.fmean(seq[lo:hi]) for seq in nll.tolist()]
        assert row["positions"] == [lo, hi]
        assert row["nll"] == pytest.approx(statistics.fmean(per_seq), rel=1e-12)
        assert row["nll_se"] == pytest.approx(statistics.stdev(per_seq) / math.sqrt(3), rel=1e-12)
        assert row["ppl"] == pytest.approx(math.exp(statistics.fmean(per_seq)), rel=1e-12)
    # bucket 1 by hand: per-sequence means 1.5, 2, 2 -> mean 11/6
    assert rows[0]["nll"] == pytest.approx(11 / 6, rel=1e-12)
    mean, se = lg.position_stats(nll, first=1)
    assert math.isnan(mean[0]) and math.isnan(se[0])
    assert mean[3] == pytest.approx(3.0) and se[3] == pytest.approx(statistics.stdev([3.0, 0.0, 6.0]) / math.sqrt(3))
    bins = lg.binned_stats(nll, [1, 4, 12])
    assert bins["mean"][0] == pytest.approx(statistics.fmean([2.0, 4 / 3, 10 / 3]))
    with pytest.raises(ValueError, match="bucket 5 needs positions up to 15"):
        lg.bucket_stats(nll, 3, (5,))
    edges = lg.log_bin_edges(1, 1280)
    assert edges[0] == 1 and edges[-1] == 1280 and all(b > a for a, b in zip(edges, edges[1:]))


def test_per_position_nll_is_the_models_token_nll():
    torch.manual_seed(0)
    model = Transformer(5, n_layer=1, n_head=2, d_model=16, max_len=40, pos_enc="rope")
    x = torch.randint(0, 5, (7, 40))
    got = lg.token_nll_of(model, x, batch_size=3)  # 3 does not divide 7
    with torch.no_grad():
        logp = torch.log_softmax(model(x).double(), -1)  # [7, 40, 5]
    direct = -logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]  # NLL of x_t under logits[:, t-1]
    assert torch.allclose(got[:, 1:], direct, atol=1e-5, rtol=1e-5)  # float32 forward vs float64 softmax
    ev = lg.evaluate_positions(got, 10, (1, 4), first=1)
    want = direct.mean(0)
    assert ev["positions"]["nll_mean"][0] is None
    assert ev["positions"]["nll_mean"][1:] == pytest.approx(want.tolist(), abs=1e-5)
    assert ev["buckets"][1]["nll"] == pytest.approx(float(direct[:, 29:].mean()), abs=1e-5)


def test_markov_gap_per_bucket_is_model_minus_bayes_on_the_same_sequences():
    k, w = 2, 16
    x = markov.sample(12, k, seq_len=4 * w, seed=3)
    bayes = markov.bayes_nll(x, k, dtype=torch.float64)
    torch.manual_seed(1)
    model = Transformer(2, n_layer=1, n_head=2, d_model=16, max_len=4 * w)
    nll = lg.token_nll_of(model, x, batch_size=5)
    for row in lg.bucket_stats(nll, w, (1, 2, 4), first=k, bayes=bayes):
        lo, hi = row["positions"]
        assert lo == (k if row["b"] == 1 else (row["b"] - 1) * w)
        d = (nll[:, lo:hi] - bayes[:, lo:hi]).mean(1)
        assert row["gap_nats"] == pytest.approx(float(d.mean()), rel=1e-12)
        assert row["gap_nats_se"] == pytest.approx(float(d.std() / math.sqrt(12)), rel=1e-12)
        ratio = (nll[:, lo:hi].mean() - bayes[:, lo:hi].mean()) / bayes[:, lo:hi].mean()
        assert row["gap_pct"] == pytest.approx(100 * float(ratio), rel=1e-9)
        assert row["bayes_nll"] == pytest.approx(float(bayes[:, lo:hi].mean()), rel=1e-12)


def test_curriculum_lengths_and_batches():
    cfg = lg.LengthGenConfig(**TINY, curriculum=(4, 6), curriculum_steps=4)
    assert [lg.train_length_at(s, cfg) for s in range(10)] == [4, 4, 4, 4, 6, 6, 6, 6, 8, 8]
    assert lg.train_length_at(0, lg.LengthGenConfig(**TINY)) == 8
    task = lg.LengthGenTask(cfg)
    run = lg.Run(cfg, "cpu", lg.DistInfo(), cfg.out_dir)
    assert task.train_batch(run, 5, 0).shape == (8, 6) and task.train_batch(run, 8, 0).shape == (8, 8)
    with pytest.raises(ValueError, match=r"curriculum must be increasing lengths, each in \(3, window=8\)"):
        lg.LengthGenConfig(**TINY, curriculum=(5, 4), curriculum_steps=2)
    with pytest.raises(ValueError, match="curriculum_steps must be >= 1 when curriculum is set"):
        lg.LengthGenConfig(**TINY, curriculum=(4,))
    with pytest.raises(ValueError, match=r"buckets must be increasing, containing 1"):
        lg.LengthGenConfig(**{**TINY, "buckets": (2, 4)})


def test_early_stop_rule_on_constructed_plateaus():
    assert lg.early_stop_reason([1.0, 0.9, 0.8], 2, 0.0) is None
    assert lg.early_stop_reason([1.0, 0.9, 0.95, 0.9], 2, 0.0) is not None  # 0.9 again is no improvement
    assert lg.early_stop_reason([1.0, 0.9, 0.95], 2, 0.0) is None
    # improvements smaller than min_delta do not count: 0.89, 0.88 are within 0.05 of 0.9
    assert "in 2 evaluations" in lg.early_stop_reason([1.0, 0.9, 0.89, 0.88], 2, 0.05)
    assert lg.early_stop_reason([1.0, 0.9, 0.89, 0.84], 2, 0.05) is None


def test_a_plateaued_run_stops_after_patience_evaluations(tmp_path):
    # lr so small that nll_1w cannot improve by min_delta: the first evaluation is the best, and the run
    # stops at the (patience + 1)-th
    cfg = lg.LengthGenConfig(
        **TINY,
        lr=1e-9,
        min_lr=0.0,
        patience=2,
        min_delta=1e-3,
        max_steps=30,
        write_figures=False,
        out_dir=str(tmp_path),
    )
    s = lg.train(cfg)
    assert s.status == "reached_target" and s.steps == 3 * TINY["eval_every"]
    evals = [r for r in s.history if r.get("nll_1w") is not None]
    assert s.best_step == min(evals, key=lambda r: r["nll_1w"])["step"]  # best.pt: the lowest, however small the gain
    assert "nll_1w" in s.message and "patience 2" in s.message
    assert sorted(p.name for p in tmp_path.glob("ckpt_step*.pt")) == ["ckpt_step3.pt", "ckpt_step6.pt", "ckpt_step9.pt"]
    assert lg.run_status(tmp_path)["health"] == "finished"


# ---- a run: artifacts, resume ------------------------------------------------------------------------


def test_resume_is_exact_and_artifacts_redraw(tmp_path):
    cfg = lg.LengthGenConfig(
        **TINY, max_steps=9, curriculum=(4,), curriculum_steps=2, early_stop=False, out_dir=str(tmp_path / "a")
    )
    straight = lg.train(cfg.replace(write_figures=False))  # figures are checked on the resumed run below

    def interrupt_at_4(record, model):
        if record["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    cut = cfg.replace(out_dir=str(tmp_path / "b"))
    first = lg.train(cut, callback=interrupt_at_4)
    assert first.status == "interrupted" and first.steps == 4
    assert lg.run_status(cut.out_dir)["health"] == "interrupted"
    resumed = lg.train(cut.replace(resume=True))
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    assert [r.get("nll_4w") for r in resumed.history] == [r.get("nll_4w") for r in straight.history]
    assert resumed.final == straight.final
    a = load_checkpoint_file(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint_file(tmp_path / "b" / "last.pt")["model"]
    assert all(torch.equal(a[n], b[n]) for n in a)
    # what the figures are drawn from is on disk: per-position means / SEs of best.pt and every evaluation
    out = tmp_path / "b"
    final = json.loads((out / "final_eval.json").read_text())["fixed"]
    assert final["buckets"] == resumed.final["fixed"]["buckets"] and len(final["positions"]["nll_mean"]) == 32
    assert sorted(p.name for p in (out / "evals").iterdir()) == [
        "step_0000003.json",
        "step_0000006.json",
        "step_0000009.json",
    ]
    lines = (out / "per_position.csv").read_text().splitlines()
    assert lines[0].startswith("position,nll_mean,nll_se,bayes_mean") and len(lines) == 33
    model, back, ckpt = lg.load_checkpoint(out / f"ckpt_step{resumed.best_step}.pt")
    x, bayes = lg.LengthGenTask(back).eval_set(lg.Run(back, "cpu", lg.DistInfo(), out))
    again = lg.evaluate_positions(lg.token_nll_of(model, x, batch_size=4), 8, (1, 2, 4), first=2, bayes=bayes)
    assert again["buckets"][0]["nll"] == pytest.approx(final["buckets"][0]["nll"], abs=1e-12)
    for name in ("evolution", "per_position", "ratio_to_1w"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="window: checkpoint 8 vs config 16"):
        lg.train(cut.replace(resume=True, window=16, max_steps=12))


# ---- data errors come before the first step ----------------------------------------------------------


def _text_cfg(tmp_path, **kw):
    return lg.LengthGenConfig(**{**TINY, "max_steps": 2, "task": "text", "out_dir": str(tmp_path / "run"), **kw})


def test_data_errors_come_before_anything_is_written(tmp_path):
    pytest.importorskip("eqprop.data")
    with pytest.raises(FileNotFoundError, match="data='.*nowhere.txt'"):
        lg.train(_text_cfg(tmp_path, data=str(tmp_path / "nowhere.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="data='.*empty.txt'.* is empty"):
        lg.train(_text_cfg(tmp_path, data=str(empty)))
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be, that is the question. " * 20)  # ~860 characters
    with pytest.raises(ValueError, match=r"validation split has \d+ tokens, fewer than eval_factor \* window"):
        lg.train(_text_cfg(tmp_path, data=str(short), window=64))
    with pytest.raises(ValueError, match=r"only 3 distinct windows .* fewer than eval_seqs=6"):
        lg.train(_text_cfg(tmp_path, data=str(short), window=41, eval_factor=2, buckets=(1, 2)))
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_mismatch_on_resume_fails_before_the_first_step(tmp_path):
    pytest.importorskip("eqprop.data")
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60)))
    cfg = _text_cfg(tmp_path, eval_seqs=2, data=str(text))
    s = lg.train(cfg)
    assert s.status == "max_steps" and (tmp_path / "run" / "tokenizer.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    with pytest.raises(ValueError, match="tokenizer='bpe' differs from the one saved in"):
        lg.train(cfg.replace(resume=True, tokenizer="bpe", bpe_vocab_size=300, max_steps=4))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before


# ---- status and compare ------------------------------------------------------------------------------


def _fake_run(folder, *, steps, max_steps=100, eval_every=10, sec_per_step=0.5, summary=None, loss=1.0, **cfg):
    folder.mkdir(parents=True)
    config = lg.LengthGenConfig(**{**TINY, "max_steps": max_steps, "eval_every": eval_every, **cfg}).to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    cols = ["step", "lr", "train_loss", "grad_norm", "nll_1w", "nll_se_1w", "ppl_1w", "elapsed_s"]
    lines = [",".join(cols)]
    for s in range(1, steps + 1):
        ev = [str(2.0 - s / 100), "0.01", str(math.exp(2.0 - s / 100))] if s % eval_every == 0 else ["", "", ""]
        lines.append(",".join([str(s), "0.001", str(loss), "1.0", *ev, str(s * sec_per_step)]))
    (folder / "training_history.csv").write_text("\n".join(lines) + "\n")
    if summary is not None:
        time.sleep(0.01)
        (folder / "summary.json").write_text(json.dumps({"status": summary, "message": ""}))
    return folder


def test_status_health_on_constructed_runs(tmp_path):
    now = time.time()
    run = _fake_run(tmp_path / "running", steps=40)
    st = lg.run_status(run, now=now)
    assert st["health"] == "running" and st["step"] == 40 and st["latest"]["step"] == 40 and st["best_step"] == 40
    assert st["sec_per_step"] == pytest.approx(0.5) and st["eta_s"] == pytest.approx(60 * 0.5)
    # no write for 100 s while the typical interval is 10 steps x 0.5 s: stalled (5x would be 25 s)
    assert lg.run_status(run, now=now + 100)["health"] == "stalled"
    assert lg.run_status(run, now=now + 20)["health"] == "running"
    assert lg.run_status(_fake_run(tmp_path / "done", steps=100, summary="max_steps"))["health"] == "finished"
    assert lg.run_status(_fake_run(tmp_path / "int", steps=30, summary="interrupted"))["health"] == "interrupted"
    assert lg.run_status(_fake_run(tmp_path / "nan", steps=30, loss=float("nan")))["health"] == "diverged"
    # a resumed run (config.json rewritten after the summary) is running again, not interrupted
    again = _fake_run(tmp_path / "again", steps=30, summary="interrupted")
    time.sleep(0.01)
    (again / "config.json").write_text((again / "config.json").read_text())
    assert lg.run_status(again)["health"] == "running"
    # without early stopping, no improvement in `patience` evaluations is a stall too
    flat = tmp_path / "flat"
    _fake_run(flat, steps=20, early_stop=False, patience=1)
    text = (flat / "training_history.csv").read_text().replace(str(2.0 - 20 / 100), "1.9")  # eval 2 = eval 1
    (flat / "training_history.csv").write_text(text)
    st = lg.run_status(flat)
    assert st["health"] == "stalled" and "no improvement" in st["reason"]
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        lg.run_status(tmp_path)


def test_cli_train_status_compare(tmp_path, capsys):
    common = ["--window", "8", "--eval-factor", "4", "--buckets", "1", "2", "4", "--n-layer", "1", "--d-model", "16"]
    common += ["--n-head", "2", "--batch-size", "8", "--eval-every", "3", "--eval-seqs", "4", "--max-steps", "3"]
    common += ["--no-progress", "--device", "cpu", "--no-write-figures"]
    for name, pos in (("a", "rope"), ("b", "none")):
        assert main(["lengthgen", "train", *common, "--pos-enc", pos, "--out-dir", str(tmp_path / name)]) == 0
    capsys.readouterr()
    assert main(["lengthgen", "status", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "FINISHED  step 3/3 (100%)" in out and "4xW PPL" in out
    fig = tmp_path / "cmp.png"
    assert main(["lengthgen", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--figure", str(fig)]) == 0
    table = capsys.readouterr().out.splitlines()
    final = json.loads((tmp_path / "b" / "final_eval.json").read_text())["fixed"]["buckets"]
    row_b = next(line for line in table if line.startswith("b "))
    assert (
        "none" in row_b
        and f"{math.exp(final[2]['nll']):.4g} +- {math.exp(final[2]['nll']) * final[2]['nll_se']:.2g}" in row_b
    )
    assert any(line.startswith("a ") and "rope" in line for line in table) and "gap to Bayes per bucket" in "\n".join(
        table
    )
    assert fig.read_bytes()[:4] == b"\x89PNG"
    # both runs scored the same held-out sequences: the difference per bucket is paired over sequences
    rows = lg.compare_runs([tmp_path / "a", tmp_path / "b"])
    final_a = json.loads((tmp_path / "a" / "final_eval.json").read_text())["fixed"]["buckets"]
    for p, ba, bb in zip(rows[1]["paired"], final_a, final):
        d = [y - x for x, y in zip(ba["seq_nll"], bb["seq_nll"])]
        assert p["d_nll"] == pytest.approx(bb["nll"] - ba["nll"], abs=1e-12)
        assert p["d_nll_se"] == pytest.approx(statistics.stdev(d) / math.sqrt(len(d)), rel=1e-9)
    assert rows[0]["paired"] is None and "NLL difference to a per bucket" in "\n".join(table)
    assert main(["lengthgen", "status", str(tmp_path / "b"), "--watch", "0.01"]) == 0  # an ended run: one report
    assert capsys.readouterr().out.count("FINISHED") == 1
    assert main(["lengthgen", "status", str(tmp_path / "nowhere")]) == 2
    assert "not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("attention", ["sliding", "ttt_linear"])
def test_the_architectures_differ_in_the_mixing_layer_only(tmp_path, attention):
    cfg = lg.LengthGenConfig(**{**TINY, "eval_every": 2}, attention=attention, max_steps=2, write_figures=False)
    model = lg.build_model(cfg, 2)
    full = lg.build_model(cfg.replace(attention="full"), 2)
    assert model.config["attention"] == attention and model.config["window"] == 8 and model.config["ttt_batch"] == 16
    assert lg.build_model(cfg.replace(attn_window=3), 2).config["window"] == 3
    same = [n for n in full.state_dict() if ".attn." not in n]
    assert all(model.state_dict()[n].shape == full.state_dict()[n].shape for n in same)
    s = lg.train(cfg.replace(out_dir=str(tmp_path)))  # trains on W and scores every position out to 4W
    assert s.status == "max_steps" and all(math.isfinite(b["nll"]) for b in s.final["fixed"]["buckets"])


@pytest.mark.slow
def test_ddp_two_processes_match_a_single_process(tmp_path):
    # 6 eval sequences in batches of 4: rank 0 scores rows 0-3, rank 1 rows 4-5, summed back (token_nll_of)
    opts = {**TINY, "max_steps": 3, "write_figures": False}
    single = lg.train(lg.LengthGenConfig(**opts, out_dir=str(tmp_path / "single")))
    argv = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, *map(str, value if isinstance(value, tuple) else [value])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "eqprop"]
    cmd += ["lengthgen", "train", *argv, "--out-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and proc.stdout.count("best.pt (step") == 1  # rank 0 reports
    got = summary["final"]["fixed"]["buckets"]
    for a, b in zip(got, single.final["fixed"]["buckets"]):
        assert a["nll"] == pytest.approx(b["nll"], abs=1e-5) and a["gap_pct"] == pytest.approx(b["gap_pct"], abs=1e-3)
    rows = lg._read_history(tmp_path / "ddp" / "training_history.csv")
    assert [r["train_loss"] for r in rows] == pytest.approx([r["train_loss"] for r in single.history], rel=1e-5)
