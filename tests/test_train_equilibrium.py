"""eqprop.train.equilibrium: every estimator trains; the gradient the trainer applies is the library
estimator's; the estimator schedule switches when configured and resumes exactly; a fuse trip or a
diverged relaxation stops cleanly; the text task reuses its tokenizer; the CLI."""

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eqprop.cli import main
from eqprop.ep import EP, CrossEntropyReadout
from eqprop.estimators import BPTT
from eqprop.solvers import fixed_point
from eqprop.train import equilibrium as te
from eqprop.train import markov as tm
from eqprop.train.checkpoint import load_checkpoint_file
from eqprop.train.core import DistInfo, Run

TINY = dict(
    task="markov",
    k=1,
    seq_len=32,
    batch_size=16,
    d_model=16,
    n_head=2,
    warmup_steps=3,
    lr=2e-2,
    min_lr=2e-3,
    eval_batches=2,
    eval_batch_size=32,
    final_eval_batches=1,
    probe_every=0,
    relax_max_steps=20,
    ep_t2=(10,),
    log_every=1,
    device="cpu",
    progress=False,
    early_stop=False,
)


def _cfg(tmp_path, **kw):
    return te.EqlmConfig(**{**TINY, "out_dir": str(tmp_path), **kw})


def _run(cfg):
    return Run(cfg, "cpu", DistInfo(), Path(cfg.out_dir))


ESTIMATORS = {
    "bp": dict(model="transformer", estimator="bp"),
    "bptt": dict(estimator="bptt", bptt_horizon=8),
    "implicit": dict(estimator="implicit"),
    "ep_symmetric": dict(estimator="ep", ep_beta=0.1),
    "ep_tracking": dict(estimator="ep", ep_beta=0.1, ep_correction="tracking"),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_each_estimator_lowers_the_gap_on_markov_k1(tmp_path, name):
    cfg = _cfg(tmp_path, max_steps=20, eval_every=20, **ESTIMATORS[name])
    task = te.EqlmTask(cfg)
    torch.manual_seed(cfg.seed)  # the model fit builds: same seed, same constructor
    initial = te.build_model(cfg, cfg.vocab_size)
    eval_set = tm.make_eval_set(task.mcfg, cfg.eval_seed, cfg.eval_batches, "cpu")
    s = te.train(cfg)
    assert s.status == "max_steps" and s.steps == 20
    trained, *_ = te.load_checkpoint(tmp_path / "best.pt")
    before = tm.evaluate_set(initial, eval_set, task.mcfg, DistInfo(), breakdowns=False)
    after = tm.evaluate_set(trained, eval_set, task.mcfg, DistInfo(), breakdowns=False)
    assert after.gap_pct == s.best["gap_pct"]
    # paired on the same sequences: the per-sequence NLL drop is positive by more than 3 standard errors
    drop = (before.model_token_nll - after.model_token_nll)[:, cfg.k :].mean(1)
    se = drop.std() / drop.numel() ** 0.5
    assert drop.mean() > 3 * se, (before.gap_pct, after.gap_pct, float(drop.mean()), float(se))


def _block_and_readout(lm):
    """The LM's parameters under the names an Estimate gives them."""
    out = dict(lm.block.named_parameters())
    out.update({f"readout.ln.{n}": p for n, p in lm.ln_f.named_parameters()})
    out.update({f"readout.head.{n}": p for n, p in lm.head.named_parameters()})
    return out


@pytest.mark.parametrize("correction", ["none", "tracking"])
def test_the_ep_gradient_applied_is_ep_grad_called_directly(tmp_path, correction):
    cfg = _cfg(tmp_path, estimator="ep", ep_beta=0.05, ep_correction=correction, spectral_rho=None)
    task, run = te.EqlmTask(cfg), _run(cfg)
    torch.manual_seed(0)
    lm = te.build_model(cfg, 2)
    twin = copy.deepcopy(lm)
    tokens = task.train_batch(run, 0, 0)
    task.backward(run, lm, tokens, 1)
    ro = CrossEntropyReadout.for_lm(twin, tokens)
    corr = None if correction == "none" else correction
    est = EP(0.05, correction=corr, t2=[10], **cfg.relax_options()).grad(twin.block, twin.inject(tokens).detach(), ro)
    got = {n: p.grad for n, p in _block_and_readout(lm).items()}
    assert set(got) == set(est.grads)
    for n, g in est.grads.items():  # the same computation on the same batch: equal up to float32 rounding
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7, msg=n)
    # the injection's gradient is (dF/dx)^T v; the coupled block has dF/dx = I, so tok_emb gets v summed by token
    v = est.stats["cotangent"]
    want = torch.zeros_like(lm.tok_emb.weight).index_add_(0, tokens.flatten(), v.reshape(-1, v.shape[-1]))
    torch.testing.assert_close(lm.tok_emb.weight.grad, want, rtol=1e-5, atol=1e-7)


def test_implicit_and_bptt_gradients_are_autograd_through_fixed_point(tmp_path):
    for est_name, backward in (
        ("implicit", dict(backward="implicit")),
        ("bptt", dict(backward="bptt", bptt_horizon=6)),
    ):
        cfg = _cfg(tmp_path, estimator=est_name, bptt_horizon=6, spectral_rho=None, relax_tol=1e-6, relax_max_steps=60)
        task, run = te.EqlmTask(cfg), _run(cfg)
        torch.manual_seed(1)
        lm = te.build_model(cfg, 2)
        twin = copy.deepcopy(lm)
        tokens = task.train_batch(run, 3, 0)
        task.backward(run, lm, tokens, 1)
        # the oracle: ordinary autograd through eqprop.fixed_point, embeddings included
        z = fixed_point(twin.block, twin.inject(tokens), **backward, **{**cfg.relax_options(), "tol": 1e-6})
        CrossEntropyReadout.for_lm(twin, tokens)(z).backward()
        for (n, p), (_, q) in zip(lm.named_parameters(), twin.named_parameters()):
            # implicit: the trainer's adjoint (Implicit) and the oracle's (fixed_point hook) are the same
            # solve, to tol 1e-6 relative; the injection goes through the cotangent path
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=f"{est_name} {n}")
        if est_name == "bptt":  # and the library's BPTT estimator agrees on the block and readout
            ro = CrossEntropyReadout.for_lm(twin, tokens)
            est = BPTT(6, **{**cfg.relax_options(), "tol": 1e-6}).grad(twin.block, twin.inject(tokens).detach(), ro)
            params = _block_and_readout(lm)
            assert set(params) == set(est.grads)
            for n, g in est.grads.items():
                torch.testing.assert_close(params[n].grad, g, rtol=1e-4, atol=1e-6, msg=n)


def test_accumulated_micro_batches_give_the_gradient_of_their_union(tmp_path):
    # implicit differentiation is linear in the loss: the mean of two half-batch gradients (scale 2) is
    # the gradient of the mean loss over both halves, embeddings included
    cfg = _cfg(tmp_path, estimator="implicit", spectral_rho=None, relax_tol=1e-6, relax_max_steps=60)
    task, run = te.EqlmTask(cfg), _run(cfg)
    torch.manual_seed(2)
    lm = te.build_model(cfg, 2)
    twin = copy.deepcopy(lm)
    tokens = task.train_batch(run, 0, 0)
    half = tokens.shape[0] // 2
    for micro, part in enumerate((tokens[:half], tokens[half:])):
        task._micro = micro
        task.backward(run, lm, part, 2)
    task._micro = 0
    te.EqlmTask(cfg).backward(run, twin, tokens, 1)
    for (n, p), (_, q) in zip(lm.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_cprewarm_steps_train_the_penalty_only(tmp_path):
    cfg = _cfg(tmp_path, estimator="ep", jacreg=1e-2, cprewarm=1, spectral_rho=None)
    task, run = te.EqlmTask(cfg), _run(cfg)
    torch.manual_seed(3)
    lm = te.build_model(cfg, 2)
    tokens = task.train_batch(run, 0, 0)
    task.backward(run, lm, tokens, 1)  # step 0: penalty only
    assert lm.head.weight.grad is None and lm.tok_emb.weight.grad is None
    # the block's gradient is that of the controller's penalty jr * ||J||_F^2 at z* (same probe seeds)
    z = task.estimators[0].grad(lm.block, lm.inject(tokens).detach(), CrossEntropyReadout.for_lm(lm, tokens)).z
    params = list(lm.block.parameters())
    want = torch.autograd.grad(task.ctl.penalty(lm.block, lm.inject(tokens).detach(), z), params, allow_unused=True)
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g if g is not None else torch.zeros_like(p), rtol=1e-5, atol=1e-9)
    lm.zero_grad(set_to_none=True)
    task._step = 1
    task.backward(run, lm, task.train_batch(run, 1, 0), 1)  # step 1: the task trains
    assert lm.head.weight.grad is not None and lm.tok_emb.weight.grad.abs().sum() > 0


def test_switch_happens_at_the_configured_step(tmp_path):
    cfg = _cfg(
        tmp_path,
        estimator="ep",
        switch_to="ep:correction=tracking,beta=0.05",
        switch_at_step=4,
        max_steps=7,
        eval_every=7,
    )
    s = te.train(cfg)
    phases = [(r["step"], r["phase"], r["estimator"]) for r in s.history]
    # optimizer step s (1-based in the history) ran with phase 1 from 0-based step 4, i.e. row 5 on
    assert [p for _, p, _ in phases] == [0, 0, 0, 0, 1, 1, 1]
    assert phases[-1][2] == "ep(b=0.05,n=2,tracking)" and s.switched_at == 4
    assert s.phases == ["ep(b=0.1,n=2)", "ep(b=0.05,n=2,tracking)"]


def test_plateau_switch_and_exact_resume_across_it(tmp_path):
    # min_delta larger than any change: every evaluation after the first is a plateau evaluation, so
    # with patience 2 the switch comes at the third evaluation (step 6)
    opts = dict(
        estimator="ep",
        switch_to="ep:correction=tracking",
        switch_on_plateau=True,
        plateau_patience=2,
        plateau_min_delta=1e6,
        max_steps=10,
        eval_every=2,
        probe_every=3,
        batch_size=8,
        seq_len=16,
        jacreg=1e-3,
        jr_floor=1e-4,
        jr_max=1e-1,
        res_target=1e-3,
    )
    straight = te.train(_cfg(tmp_path / "straight", **opts))
    assert straight.switched_at == 6
    assert [r["phase"] for r in straight.history] == [0] * 6 + [1] * 4  # steps 7.. run the second phase
    assert {r["ctl_action"] for r in straight.history} <= {"rise", "decay", "hold"}
    probed = [r for r in straight.history if r.get("cos_ref") is not None]
    assert [r["step"] for r in probed] == [3, 6, 9] and all(-1 <= r["cos_ref"] <= 1 for r in probed)
    assert all(-1 <= r["cos_block"] <= 1 and r["nudged_res"] >= 0 for r in probed)
    assert all(r["penalty_share"] > 0 for r in probed)

    def interrupt_at_7(record, model):
        if record["step"] == 7:
            os.kill(os.getpid(), signal.SIGINT)

    cut = _cfg(tmp_path / "cut", **opts)
    first = te.train(cut, callback=interrupt_at_7)
    assert first.status == "interrupted" and first.steps == 7
    resumed = te.train(cut.replace(resume=True))
    assert resumed.switched_at == 6 and resumed.steps == 10
    keys = ("train_loss", "grad_norm", "gap_pct", "jr", "free_res", "phase", "cos_ref", "self_cos")
    assert [[r.get(k) for k in keys] for r in resumed.history] == [[r.get(k) for k in keys] for r in straight.history]
    a = load_checkpoint_file(tmp_path / "straight" / "last.pt")
    b = load_checkpoint_file(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    assert a["task_state"]["ctl"]["jr"] == b["task_state"]["ctl"]["jr"]


@pytest.mark.parametrize("fuse", [0.5, None], ids=["fuse", "diverged"])
def test_fuse_trip_or_diverged_relaxation_stops_cleanly(tmp_path, fuse):
    cfg = _cfg(tmp_path, estimator="implicit", fuse=fuse, spectral_rho=None, max_steps=10, eval_every=3)
    saved = {}

    def poison(record, model):
        if record["step"] == 3:
            saved.update({n: p.detach().clone() for n, p in model.named_parameters()})
        if record["step"] == 4:  # a block that cannot contract: the next relaxation blows up
            with torch.no_grad():
                model.block.o_weight.mul_(1e4 if fuse else float("nan"))

    s = te.train(cfg, callback=poison)
    status = "fuse" if fuse else "relaxation_diverged"
    assert s.status == status and s.steps == 4
    assert ("contraction fuse tripped" if fuse else "relaxation diverged") in s.message
    assert "optimizer step 5" in s.message and "last.pt / best.pt" in s.message
    last = load_checkpoint_file(tmp_path / "last.pt")
    assert last["step"] == 3  # the last good checkpoint, untouched by the halted step
    assert all(torch.equal(last["model"][n], saved[n]) for n in saved)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == status


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="estimator must be 'bp' exactly when model='transformer'"):
        _cfg(tmp_path, model="transformer", estimator="ep")
    with pytest.raises(ValueError, match="switch_to must start with bptt, implicit or ep"):
        _cfg(tmp_path, switch_to="adam")
    with pytest.raises(ValueError, match="key one of horizon, beta"):
        _cfg(tmp_path, switch_to="ep:bogus=1")
    with pytest.raises(ValueError, match="switch_on_plateau must be used with switch_to"):
        _cfg(tmp_path, switch_on_plateau=True)
    with pytest.raises(TypeError, match="unknown EqlmConfig key"):
        te.EqlmConfig(ep_betaa=0.1)


def test_generate_extends_the_prompt_reproducibly():
    torch.manual_seed(0)
    lm = te.build_model(te.EqlmConfig(**{**TINY, "out_dir": "unused"}), 2)
    prompt = torch.zeros(2, 3, dtype=torch.long)
    a = te.generate(lm, prompt, 5, generator=torch.Generator().manual_seed(1))
    b = te.generate(lm, prompt, 5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 8) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    assert int(a.min()) >= 0 and int(a.max()) < 2
    with pytest.raises(ValueError, match="prompt must be an int64 tensor"):
        te.generate(lm, prompt.float(), 2)


def test_cli_train_eval_probe(tmp_path, capsys):
    run = tmp_path / "run"
    opts = ["--seq-len", "16", "--d-model", "16", "--batch-size", "8", "--max-steps", "4", "--eval-every", "2"]
    opts += ["--eval-batches", "1", "--final-eval-batches", "1", "--relax-max-steps", "20", "--probe-every", "2"]
    assert (
        main(
            ["eqlm", "train", *opts, "--estimator", "ep", "--ep-t2", "5", "10", "--out-dir", str(run), "--no-progress"]
        )
        == 0
    )
    assert "ep(b=0.1,n=2): max_steps after 4 steps" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["ep_t2"] == [5, 10]
    assert main(["eqlm", "eval", str(run / "best.pt"), "--batches", "1"]) == 0
    assert "gap to Bayes" in capsys.readouterr().out
    assert (
        main(["eqlm", "probe", str(run / "best.pt"), "--batches", "2", "--horizon", "5", "--out", str(tmp_path / "p")])
        == 0
    )
    probe = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert set(probe["alignment"]) == {
        "ep(b=0.1,n=2) vs bptt",
        "ep(b=0.1,n=2) vs implicit",
        "implicit vs bptt",
        "bptt(h=5) vs implicit",
    }
    assert all(Path(p).exists() for p in probe["figures"].values())
    for argv, message in (
        (["--estimator", "bp"], "estimator must be 'bp' exactly when model='transformer'"),
        (["--switch-to", "ep:beta=x"], "bad value 'x' for beta"),
    ):
        assert main(["eqlm", "train", *argv, "--out-dir", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert main(["eqlm", "eval", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    # the installed entry point reaches the same parser
    r = subprocess.run([sys.executable, "-m", "eqprop", "eqlm", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "probe" in r.stdout


def test_text_task_resumes_with_its_saved_tokenizer(tmp_path):
    from eqprop.data import load_tokenizer

    words = ["the", "equilibrium", "block", "relaxes", "to", "its", "fixed", "point", "and", "nudges"]
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[int(i)] for i in torch.randint(len(words), (3000,), generator=g)) + "\n"
    (tmp_path / "corpus.txt").write_text(text)
    opts = dict(TINY, task="text", data=str(tmp_path / "corpus.txt"), tokenizer="bpe", bpe_vocab_size=280, seq_len=16)
    opts.update(batch_size=8, eval_batch_size=8, eval_every=2, sample_tokens=5, estimator="ep")
    cfg = te.EqlmConfig(**opts, max_steps=2, out_dir=str(tmp_path / "run"))
    first = te.train(cfg)
    saved = (tmp_path / "run" / "tokenizer.json").read_bytes()
    tok = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    assert tok.vocab_size == 280 and first.final["n_windows"] == 8 and isinstance(first.final["sample"], str)
    assert tok.decode(tok.encode(text).tolist()) == text  # byte-level BPE round-trips the corpus
    resumed = te.train(cfg.replace(max_steps=4, resume=True))
    assert resumed.steps == 4 and (tmp_path / "run" / "tokenizer.json").read_bytes() == saved
    _, _, _, corpus = te.load_checkpoint(tmp_path / "run" / "best.pt")
    assert corpus.tokenizer.fingerprint() == tok.fingerprint()
    with pytest.raises(ValueError, match="bpe_vocab_size|vocab_size"):
        te.train(cfg.replace(max_steps=6, resume=True, bpe_vocab_size=300))
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == saved


def test_a_config_too_large_for_the_machine_is_refused_before_writing(tmp_path):
    # 2^20 sequences of 2^12 tokens at width 1024: the [B, T, C] states alone are 16 TiB
    cfg = _cfg(tmp_path / "huge", batch_size=2**20, seq_len=2**12, d_model=1024, n_head=8)
    with pytest.raises(ValueError, match=r"needs at least .* on cpu \(.*relaxation states"):
        te.train(cfg)
    assert not (tmp_path / "huge").exists()
