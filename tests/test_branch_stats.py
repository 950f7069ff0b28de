"""Model diagnostics (docs/design.md §7): branch_stats against the C++ F and closed forms,
per_position_ce against a hand computation with F.cross_entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

import eqprop
from eqprop import EquilibriumBlock, EquilibriumLM
from eqprop.diagnostics import branch_stats, per_position_ce
from eqprop.models import Transformer
from testing import tol

F64 = torch.float64

OPTIONS = [
    dict(coupling="coupled"),
    dict(coupling="sequential"),
    dict(coupling="coupled", bias=True, rope=True, spectral_rho=0.5),
    dict(coupling="sequential", ffn="monotone", qk_norm=False, bias=True),
]


def _point(seed=0, B=3, T=7, C=8, H=2, dtype=F64, **kw):
    torch.manual_seed(seed)
    blk = EquilibriumBlock(C, H, dtype=dtype, resinit=1.0, **kw).eval()
    with torch.no_grad():  # nonzero biases and LayerNorm affine parts, so every term is exercised
        for n, p in blk.named_parameters():
            if n.endswith("bias") or n.startswith("ln"):
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(B, T, C, dtype=dtype)
    z = torch.randn(B, T, C, dtype=dtype)
    return blk, z, x


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_branches_recombine_to_the_block_field(opts):
    blk, z, x = _point(**opts)
    s = branch_stats(blk, z, x)
    with torch.no_grad():
        Fz = blk(z, x)  # the C++ F(z; x)
    # F = x + Attn + FFN for both couplings (docs/design.md §4): the sequential FFN reads LN2(x + Attn).
    # Both sides are float64 chains of ~C + d_ff accumulated terms of size max|F|.
    err = float((x + s.attn + s.ffn - Fz).abs().max())
    assert err <= tol(F64, n=8 + 32, scale=Fz.abs().max(), factor=3.0)
    # ratios by hand: Frobenius norm of each sequence's branch over that of its x
    for name, br in (("attn", s.attn), ("ffn", s.ffn)):
        per = br.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
        assert torch.allclose(getattr(s, f"{name}_ratio"), per, rtol=1e-13, atol=0)
        assert getattr(s, f"{name}_ratio_overall") == pytest.approx(float(br.norm() / x.norm()), rel=1e-13)
    # the two branches are different maps: a mix-up of attn / ffn would not pass
    assert float((s.attn - s.ffn).abs().max()) > 1e-3


def test_recombination_float32_against_float64_oracle():
    blk, z, x = _point(dtype=torch.float32, coupling="sequential", bias=True)
    s = branch_stats(blk, z, x)
    blk64 = EquilibriumBlock(8, 2, dtype=F64, coupling="sequential", bias=True).eval()
    blk64.load_state_dict({k: v.to(F64) for k, v in blk.state_dict().items()})
    with torch.no_grad():
        F64z = blk64(z.to(F64), x.to(F64))
    err = float((x + s.attn + s.ffn).to(F64).sub(F64z).abs().max())
    # float32 rounding through LayerNorm (rsqrt), softmax and two matmul chains of length <= d_ff = 32
    assert err <= tol(torch.float32, n=8 + 32, scale=F64z.abs().max(), factor=3.0)


@pytest.mark.parametrize("rope", [False, True])
def test_zero_qk_weights_give_uniform_attention(rope):
    blk, z, x = _point(B=2, T=9, rope=rope, qk_norm=True)
    with torch.no_grad():
        blk.q_weight.zero_()
        blk.k_weight.zero_()
    s = branch_stats(blk, z, x)
    T = 9
    # q = k = 0 (qk-norm and RoPE keep 0 at 0): every logit is 0, so query t attends uniformly to
    # its t + 1 keys and its entropy is ln(t + 1) exactly (to float64 rounding of a sum of t + 1 terms).
    want = torch.log(torch.arange(1, T + 1, dtype=F64))
    assert torch.allclose(s.entropy_per_query, want.expand(2, T), rtol=0, atol=tol(F64, n=T, scale=math.log(T)))
    assert torch.allclose(s.entropy, want.mean().expand(2), rtol=0, atol=tol(F64, n=T, scale=math.log(T)))
    assert torch.equal(s.qk_rms, torch.zeros(2, dtype=F64))
    assert torch.allclose(s.uniform_entropy, want, rtol=0, atol=0)
    # and the branch is then the causal running mean of the values: Attn_t = W_O · mean_{s≤t} W_V u_s
    with torch.no_grad():
        u = F.layer_norm(z, (8,), blk.ln1_weight, None, blk.config.ln_eps)
        v = u @ blk.v_weight.T
        run = v.cumsum(1) / torch.arange(1, T + 1, dtype=F64).view(1, T, 1)
        attn = run @ blk.o_weight.T
    assert float((attn - s.attn).abs().max()) <= tol(F64, n=T + 8, scale=attn.abs().max(), factor=3.0)


def test_entropy_bounds_and_qk_rms_by_hand():
    blk, z, x = _point(B=3, T=11, qk_norm=False, rope=False)
    with torch.no_grad():
        blk.q_weight.mul_(3.0)  # peaked attention: entropy well below its bound
    s = branch_stats(blk, z, x)
    T, H, d = 11, 2, 4
    bound = torch.log(torch.arange(1, T + 1, dtype=F64))
    assert bool((s.entropy_per_query <= bound + 1e-12).all()) and bool((s.entropy_per_query >= 0).all())
    assert bool((s.entropy <= math.log(T)).all())
    assert float(s.entropy_per_query[:, 0].abs().max()) == 0.0  # the first query has one key
    assert float((bound - s.entropy_per_query).max()) > 0.1  # not uniform: the check above has teeth
    # logits by hand (no qk-norm, no RoPE, no bias): S = (W_Q u)(W_K u)ᵀ/√d per head, causal entries
    with torch.no_grad():
        u = F.layer_norm(z, (8,), blk.ln1_weight, None, blk.config.ln_eps)
        q = (u @ blk.q_weight.T).view(3, T, H, d).transpose(1, 2)
        k = (u @ blk.k_weight.T).view(3, T, H, d).transpose(1, 2)
        S = q @ k.transpose(-1, -2) / math.sqrt(d)  # [B, H, T, T]
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        rms = torch.stack([S[:, h][:, mask].square().mean().sqrt() for h in range(H)])
        P = torch.softmax(S.masked_fill(~mask, float("-inf")), dim=-1)
        ent = -(P * torch.log(P.clamp_min(1e-300))).sum(-1).mean(0)  # [H, T]
    assert torch.allclose(s.qk_rms, rms, rtol=1e-12, atol=0)
    assert torch.allclose(s.entropy_per_query, ent, rtol=0, atol=tol(F64, n=T, scale=math.log(T), factor=10.0))


def test_weight_norms():
    for opts in ({}, dict(spectral_rho=0.05), dict(ffn="monotone")):
        blk, z, x = _point(**opts)
        s = branch_stats(blk, z, x)
        w = {k: v.detach() for k, v in blk.effective_weights().items()}
        w2 = w["ffn_out_weight"] if "ffn_out_weight" in w else w["mono_W"]
        assert s.wo_fro == pytest.approx(float(torch.linalg.matrix_norm(w["o_weight"], "fro")), rel=1e-14)
        assert s.wo_spectral == pytest.approx(float(torch.linalg.matrix_norm(w["o_weight"], 2)), rel=1e-14)
        assert s.ffn_out_fro == pytest.approx(float(torch.linalg.matrix_norm(w2, "fro")), rel=1e-14)
        assert s.ffn_out_spectral == pytest.approx(float(torch.linalg.matrix_norm(w2, 2)), rel=1e-14)
        if not opts:  # no cap: the raw weights
            assert s.wo_fro == pytest.approx(float(torch.linalg.matrix_norm(blk.o_weight.detach())), rel=1e-14)
        if "spectral_rho" in opts:  # capped at ρ (power iteration converged at init: 50 steps)
            assert s.wo_spectral <= 0.05 * (1 + 1e-6) and s.ffn_out_spectral <= 0.05 * (1 + 1e-6)


def test_branch_stats_bad_input():
    blk, z, x = _point()
    with pytest.raises(TypeError, match="EquilibriumBlock"):
        branch_stats(torch.nn.Linear(8, 8), z, x)
    with pytest.raises(ValueError, match="same shape"):
        branch_stats(blk, z[:, :3], x)
    with pytest.raises(TypeError, match="dtype"):
        branch_stats(blk, z.float(), x.float())
    with pytest.raises(NotImplementedError, match="energy"):
        branch_stats(EquilibriumBlock(8, 2, attention="energy", dtype=F64), z, x)
    with pytest.raises(NotImplementedError, match="real"):
        branch_stats(blk, z.to(torch.complex128), x.to(torch.complex128))


# ---- per-position CE ------------------------------------------------------------------------------


def _by_hand(logits, tokens):
    B, T, V = logits.shape
    ce = torch.stack(
        [F.cross_entropy(logits[:, t - 1].to(F64), tokens[:, t], reduction="none") for t in range(1, T)], 1
    )  # [B, T - 1]
    nll = torch.cat([torch.full((B, 1), math.log(V), dtype=F64), ce], 1)
    return nll.mean(0), nll.std(0) / math.sqrt(B)


@pytest.mark.parametrize("kind", ["lm", "transformer"])
def test_per_position_ce_by_hand(kind):
    torch.manual_seed(5)
    V, T, B = 3, 9, 6
    if kind == "lm":
        model = EquilibriumLM(
            V, 8, 2, max_len=T, dtype=F64, spectral_rho=0.8, fixed_point=dict(tol=1e-12, max_steps=300)
        )
    else:
        model = Transformer(V, n_layer=2, n_head=2, d_model=8, max_len=T).to(F64)
    tokens = torch.randint(0, V, (B, T))
    model.train()
    sn = [u.clone() for u in model.block.sn_u_list()] if kind == "lm" else []
    res = per_position_ce(model, tokens)
    assert model.training  # flag restored ...
    if kind == "lm":  # ... and evaluated in eval mode: spectral vectors untouched
        assert len(sn) > 0 and all(torch.equal(a, b) for a, b in zip(sn, model.block.sn_u_list()))
    model.eval()
    with torch.no_grad():
        mean, se = _by_hand(model(tokens), tokens)
    assert res.n == B and res.mean.shape == (T,) and res.se.shape == (T,)
    assert torch.allclose(res.mean, mean, rtol=1e-12, atol=0)
    assert torch.allclose(res.se, se, rtol=1e-10, atol=1e-15)
    assert res.mean[0] == pytest.approx(math.log(V), rel=1e-15) and float(res.se[0]) == 0.0
    if kind == "lm":
        with torch.no_grad():  # positions 1..T-1 average to the model's own loss
            assert float(res.mean[1:].mean()) == pytest.approx(float(model.loss(tokens)), rel=1e-12)


def test_per_position_ce_batches_and_errors():
    torch.manual_seed(6)
    model = Transformer(4, n_layer=1, n_head=2, d_model=8, max_len=6).to(F64)
    tokens = torch.randint(0, 4, (7, 6))
    full, parts = per_position_ce(model, tokens), per_position_ce(model, tokens, batch_size=3)
    assert torch.allclose(full.mean, parts.mean, rtol=1e-14, atol=0)
    assert torch.allclose(full.se, parts.se, rtol=1e-12, atol=1e-16)
    one = per_position_ce(model, tokens[:1])
    assert one.n == 1 and bool(one.se.isnan().all())
    with pytest.raises(TypeError, match="token_nll"):
        per_position_ce(torch.nn.Linear(2, 2), tokens)
    with pytest.raises(ValueError, match="int64"):
        per_position_ce(model, tokens.float())
    with pytest.raises(ValueError, match="batch_size"):
        per_position_ce(model, tokens, batch_size=0)
    assert eqprop.diagnostics.per_position_ce is per_position_ce
