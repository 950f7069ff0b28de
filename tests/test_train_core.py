"""eqprop.train.core / config / checkpoint: strict configs and their CLI, checkpoints that say when they are
broken, runs that are never lost, signals, clear errors, and the loop training a second kind of model."""

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import eqprop
from eqprop.cli import build_parser, main
from eqprop.train import markov as tm
from eqprop.train.checkpoint import load_checkpoint_file, save_checkpoint
from eqprop.train.config import RunConfig

TINY = dict(
    k=1,
    seq_len=64,
    n_layer=1,
    n_head=2,
    d_model=16,
    batch_size=8,
    lr=3e-3,
    warmup_steps=2,
    eval_every=2,
    eval_batches=2,
    eval_batch_size=8,
    final_eval_batches=2,
    log_every=1,
    progress=False,
    device="cpu",
)


# ---- configs -----------------------------------------------------------------------------------------


def test_constructor_rejects_unknown_keys_listing_the_valid_ones():
    for make in (lambda: tm.TrainConfig(bogus=1), lambda: tm.TrainConfig.from_dict({"bogus": 1})):
        with pytest.raises(
            TypeError,
            match=r"unknown TrainConfig key\(s\) \['bogus'\]; valid keys are: .*\bk\b.*"
            r"n_layer.*max_steps.*overwrite",
        ):
            make()
    with pytest.raises(TypeError, match=r"unknown RunConfig key\(s\) \['k'\]"):
        RunConfig(k=2)


def test_types_come_from_the_annotations():
    with pytest.raises(TypeError, match=r"TrainConfig.seq_len must be int or None, got str '64'"):
        tm.TrainConfig(seq_len="64")
    with pytest.raises(TypeError, match=r"TrainConfig.final_eval_seeds must be a tuple of int, got tuple \(1, 'a'\)"):
        tm.TrainConfig(final_eval_seeds=(1, "a"))
    with pytest.raises(TypeError, match=r"TrainConfig.max_steps must be int, got bool True"):
        tm.TrainConfig(max_steps=True)
    with pytest.raises(
        ValueError,
        match=r"TrainConfig.pos_enc must be one of \('learned', 'sinusoidal', 'rope', "
        r"'alibi', 'none'\), got 'relative'",
    ):
        tm.TrainConfig(pos_enc="relative")
    with pytest.raises(ValueError, match=r"TrainConfig.overwrite must be False when resume is True"):
        tm.TrainConfig(resume=True, overwrite=True)
    cfg = tm.TrainConfig(alpha=2, final_eval_seeds=[5, 6])
    assert cfg.alpha == 2.0 and type(cfg.alpha) is float and cfg.final_eval_seeds == (5, 6)


def _to_argv(cfg, skip=()):
    argv = []
    for key, value in cfg.to_dict().items():
        if key in skip or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def test_config_to_command_line_and_back():
    cfg = tm.TrainConfig(
        k=3,
        seq_len=120,
        n_layer=3,
        pos_enc="alibi",
        schedule="wsd",
        lr=1e-3,
        min_lr=1e-5,
        bf16=True,
        progress=False,
        early_stop=False,
        final_eval_seeds=(11, 12),
        out_dir="runs/x",
        alpha=0.5,
        device="cpu",
    )
    parser = argparse.ArgumentParser()
    tm.TrainConfig.add_options(parser)
    assert tm.TrainConfig.from_args(parser.parse_args(_to_argv(cfg))) == cfg
    # nothing on the line: the defaults
    assert tm.TrainConfig.from_args(parser.parse_args([])) == tm.TrainConfig()
    text = parser.format_help()
    assert "{cosine,wsd,constant}" in text and "{learned,sinusoidal,rope,alibi,none}" in text
    assert "(default: 400)" in text and "(default: runs/markov)" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--schedule", "linear"])


# ---- checkpoints -----------------------------------------------------------------------------------


def _payload():
    return {"model": {"w": torch.arange(1000.0)}, "step": 3, "history": [{"a": 1.5, "b": None}], "name": "x"}


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    path = save_checkpoint(_payload(), tmp_path / "c.pt")
    outer = torch.load(path, weights_only=True)  # no pickled code anywhere
    assert outer["format"] == "eqprop-checkpoint" and outer["version"] == 1
    inner = torch.load(io.BytesIO(outer["payload"].numpy().tobytes()), weights_only=True)
    back = load_checkpoint_file(path)
    assert torch.equal(back["model"]["w"], torch.arange(1000.0)) and back["history"] == inner["history"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


def test_flipped_bytes_are_reported_as_corruption_naming_the_file(tmp_path):
    path = save_checkpoint({"model": {"w": torch.randn(20_000)}}, tmp_path / "last.pt")
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 2000] = bytes(b ^ 0x5A for b in data[mid : mid + 2000])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path}.*corrupted"):
        load_checkpoint_file(path)


@pytest.mark.parametrize("breakage", ["empty", "truncated", "garbage", "plain torch.save"])
def test_broken_files_are_a_clear_error(tmp_path, breakage):
    path = save_checkpoint(_payload(), tmp_path / "best.pt")
    if breakage == "empty":
        path.write_bytes(b"")
    elif breakage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif breakage == "garbage":
        path.write_bytes(os.urandom(5000))
    else:
        torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match=rf"{path} is not a valid/complete eqprop checkpoint"):
        load_checkpoint_file(path)


def test_every_checkpoint_the_trainer_writes_loads_weights_only(tmp_path):
    s = tm.train(tm.TrainConfig(**{**TINY, "max_steps": 2}, out_dir=str(tmp_path)))
    for name in ("best.pt", "last.pt"):
        outer = torch.load(tmp_path / name, weights_only=True)
        ckpt = torch.load(io.BytesIO(outer["payload"].numpy().tobytes()), weights_only=True)
        assert ckpt["step"] == 2 and ckpt["trainer"] == "markov"
    model, cfg, _ = tm.load_checkpoint(tmp_path / "best.pt")
    assert cfg == tm.TrainConfig(**{**TINY, "max_steps": 2}, out_dir=str(tmp_path)) and s.steps == 2


# ---- runs are never lost -----------------------------------------------------------------------------


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_fresh_run_into_a_run_refuses_and_overwrite_moves_it_aside(tmp_path):
    out = tmp_path / "run"
    cfg = tm.TrainConfig(**{**TINY, "max_steps": 2}, out_dir=str(out))
    tm.train(cfg)
    before = _snapshot(out)
    with pytest.raises(ValueError, match=rf"{out} already holds a run .*resume=True.*overwrite=True"):
        tm.train(cfg)
    assert _snapshot(out) == before  # nothing was touched
    tm.train(cfg.replace(overwrite=True, seed=1))
    (old,) = tmp_path.glob("run.old-*")
    assert _snapshot(old) == before  # the first run, moved aside intact
    assert json.loads((out / "config.json").read_text())["seed"] == 1


def test_cli_refusal_names_the_flags(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    rc = main(["markov", "train", "--out-dir", str(out), "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and str(out) in err and "--resume" in err and "--overwrite" in err and "resume=True" not in err
    assert (out / "summary.json").read_text() == "{}"


def test_an_unwritable_figure_warns_and_keeps_the_results(tmp_path):
    (tmp_path / "figures").write_text("not a folder")  # figures/ cannot be created, even by root
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = tm.train(tm.TrainConfig(**{**TINY, "max_steps": 2}, out_dir=str(tmp_path)))
    texts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    for name in ("training_curve", "gap_by_position"):
        assert any(f"figure '{name}' could not be written" in t for t in texts), texts
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "max_steps" and len(summary["final"]) == 2 and summary["figures"] == {}
    assert s.final[0]["gap_pct"] == summary["final"][0]["gap_pct"]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_from_outside_exits_128_plus_its_number_with_a_resume_hint(tmp_path, sig, code):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "eqprop",
        "markov",
        "train",
        "--k",
        "1",
        "--seq-len",
        "64",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--d-model",
        "16",
        "--batch-size",
        "8",
        "--eval-every",
        "1",
        "--eval-batches",
        "1",
        "--eval-batch-size",
        "4",
        "--max-steps",
        "100000",
        "--device",
        "cpu",
        "--no-progress",
        "--out-dir",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.time() + 120
    while not (out / "last.pt").exists():  # written inside the loop, after the handlers are installed
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code == 128 + sig, stderr[-2000:]
    assert sig.name in stdout and "--resume" in stdout and "resume=True" not in stdout
    assert load_checkpoint_file(out / "last.pt")["status"] == "max_steps"  # a clean checkpoint to resume


# ---- clear errors before anything is written ---------------------------------------------------------


def test_a_config_too_large_for_the_machine_is_refused_before_writing(tmp_path):
    out = tmp_path / "k20"
    with pytest.raises(ValueError, match=r"needs at least .* GiB on cpu \(.*training tokens 25.0 GiB"):
        tm.train(tm.TrainConfig(k=20, out_dir=str(out), progress=False, device="cpu"))
    assert not out.exists()


def test_eval_with_no_batches_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"n_batches \(--batches\) must be an int >= 1, got 0"):
        tm.evaluate(tmp_path / "best.pt", n_batches=0)
    assert main(["markov", "eval", str(tmp_path / "best.pt"), "--batches", "0"]) == 2
    assert "--batches" in capsys.readouterr().err


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the message of a torch without CUDA")
def test_cuda_on_a_cpu_torch_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["markov", "train", "--device", "cuda", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no CUDA" in err and "--device cpu" in err
    assert not out.exists()


def test_each_rank_takes_its_own_gpu(monkeypatch):
    from eqprop.train.core import resolve_device

    monkeypatch.setattr(torch.version, "cuda", "12.0")  # a CUDA build with 4 GPUs, as seen by resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [resolve_device("cuda:0", rank, 4) for rank in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [resolve_device(d, 3, 4) for d in ("auto", "cuda", "cuda:1")] == ["cuda:3"] * 3
    assert [resolve_device("cuda"), resolve_device("cuda:2"), resolve_device("cpu", 1, 2)] == [
        "cuda:0",
        "cuda:2",
        "cpu",
    ]  # one process keeps the index it is given
    with pytest.raises(ValueError, match=r"needs GPU 5, but only 4 are visible"):
        resolve_device("cuda:5")
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        resolve_device("gpu")


# ---- the loop trains the other model of the shared interface -----------------------------------------


class _EquilibriumMarkov(tm.MarkovTask):
    name = "markov-equilibrium"

    def build_model(self, run):
        return eqprop.EquilibriumLM(
            self.cfg.vocab_size,
            self.cfg.d_model,
            self.cfg.n_head,
            max_len=self.cfg.train_len,
            pos_enc=self.cfg.pos_enc,
            mlp_ratio=2,
            spectral_rho=1.0,
            fixed_point=dict(max_steps=15, tol=1e-4),
        )


def test_the_core_trains_an_equilibrium_lm_and_resumes_it_exactly(tmp_path):
    from eqprop.train.core import fit

    cfg = tm.TrainConfig(**{**TINY, "max_steps": 4, "lr": 1e-2, "schedule": "constant"}, out_dir=str(tmp_path / "a"))
    straight = fit(_EquilibriumMarkov(cfg), cfg)
    assert straight.status == "max_steps" and straight.steps == 4 and len(straight.final) == 2
    losses = [r["train_loss"] for r in straight.history]
    assert len(losses) == 4 and len(set(losses)) == 4  # four different batches, all finite
    assert all(0.3 < loss < 1.5 for loss in losses)  # near ln 2 = 0.693 this early, as a fresh predictor is

    cut = cfg.replace(out_dir=str(tmp_path / "b"), max_steps=2)
    fit(_EquilibriumMarkov(cut), cut)
    resumed = fit(_EquilibriumMarkov(cfg), cfg.replace(out_dir=cut.out_dir, resume=True))
    assert [r["train_loss"] for r in resumed.history] == losses
    a = load_checkpoint_file(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint_file(tmp_path / "b" / "last.pt")["model"]
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_cli_parser_builds():
    assert build_parser().parse_args(["markov", "train", "--overwrite"]).overwrite is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_parser().format_help()
