"""eqprop.models: the NLL convention gap_pct relies on, the interface shared with EquilibriumLM, positional
encodings, causality."""

import math

import pytest
import torch
import torch.nn.functional as F

from eqprop import markov
import eqprop
from eqprop.models import (
    POS_ENCODINGS,
    Transformer,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    next_token_nll,
    sinusoidal_table,
)
from testing import devices


def _bayes_logits(x, k):
    """Logits whose softmax at t is the exact Bayes predictive of x_{t+1} (V = 2), built from bayes_nll."""
    b = markov.bayes_nll(x, k, dtype=torch.float64)  # [B, L]
    p_next = torch.exp(-b[:, 1:])  # P_Bayes(x_{t+1} = the symbol that occurred)
    logits = torch.zeros(*x.shape, 2, dtype=torch.float64)
    nxt = x[:, 1:]
    logits[:, :-1].scatter_(2, nxt[..., None], p_next.log()[..., None])
    logits[:, :-1].scatter_(2, (1 - nxt)[..., None], torch.log1p(-p_next)[..., None])
    return logits, b


@pytest.mark.parametrize("k", [1, 3])
def test_nll_convention_gives_zero_gap_for_the_bayes_predictive(k):
    x = markov.sample(16, k, seed=5)
    logits, b = _bayes_logits(x, k)
    nll = next_token_nll(logits, x)
    assert nll.dtype == torch.float64  # float64 logits keep float64 (bf16 / float32 ones give float32)
    assert nll[:, 0].allclose(torch.full((16,), math.log(2), dtype=torch.float64))
    assert torch.allclose(nll[:, 1:].double(), b[:, 1:], atol=1e-5)
    gap, se = markov.gap_pct(nll, b.float(), k)
    assert abs(gap) < 1e-3 and se < 1e-3
    # reading the prediction off the wrong position (logits[:, t] for x_t) is far from Bayes
    shifted = F.cross_entropy(logits.reshape(-1, 2).float(), x.reshape(-1), reduction="none").view(x.shape)
    assert markov.gap_pct(shifted, b.float(), k)[0] > 20


def test_sinusoidal_table_values():
    d = 8
    pe = sinusoidal_table(50, d)
    p = torch.arange(50, dtype=torch.float64)
    for i in range(d // 2):
        freq = 10000.0 ** (-2 * i / d)
        assert torch.allclose(pe[:, 2 * i].double(), torch.sin(p * freq), atol=1e-6)
        assert torch.allclose(pe[:, 2 * i + 1].double(), torch.cos(p * freq), atol=1e-6)
    assert pe[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-7)


def test_rope_scores_depend_on_offset_only_and_keep_norms():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    for m, n, s in [(5, 2, 7), (0, 0, 11), (9, 3, 100)]:
        a = apply_rope(q, torch.tensor([m] * 3)) @ apply_rope(k, torch.tensor([n] * 3)).T
        b = apply_rope(q, torch.tensor([m + s] * 3)) @ apply_rope(k, torch.tensor([n + s] * 3)).T
        assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(apply_rope(q, torch.zeros(3)), q)
    rot = apply_rope(q, torch.tensor([1, 2, 3]))
    assert torch.allclose(rot.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    # one explicit rotation: pair (0, 8) of a d=16 vector at position 1 turns by 1 radian
    e = torch.zeros(1, 16)
    e[0, 0] = 1.0
    r = apply_rope(e, torch.tensor([1]))
    assert r[0, 0].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert r[0, 8].item() == pytest.approx(math.sin(1.0), abs=1e-6)


def test_alibi_slopes_and_bias():
    assert torch.allclose(alibi_slopes(8), 2.0 ** -torch.arange(1, 9, dtype=torch.float32))
    assert torch.allclose(alibi_slopes(4), torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256]))
    # 6 heads: the 4-head slopes plus every other slope of 8 heads (Press et al.)
    assert torch.allclose(alibi_slopes(6), torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]))
    bias = alibi_bias(4, 3)
    inf = float("-inf")
    assert torch.equal(bias[0], torch.tensor([[0, inf, inf], [-0.25, 0, inf], [-0.5, -0.25, 0]]))


def test_sdpa_with_alibi_mask_matches_plain_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g, dtype=torch.float64) for _ in range(3))
    bias = alibi_bias(4, 7, dtype=torch.float64)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) + bias  # [B, H, L, L]
    assert torch.allclose(y, scores.softmax(-1) @ v, atol=1e-10)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("pos_enc", POS_ENCODINGS)
def test_model_is_causal(pos_enc, device):
    torch.manual_seed(0)
    model = Transformer(2, n_layer=2, n_head=2, d_model=16, max_len=32, pos_enc=pos_enc).to(device).eval()
    x = markov.sample(2, 1, seq_len=32, seed=3, device=device)
    y = x.clone()
    y[:, 20] = 1 - y[:, 20]
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-5)  # positions before the change
    assert not torch.allclose(a[:, 20:], b[:, 20:], atol=1e-5)
    assert a.shape == (2, 32, 2)


def test_no_position_information_means_permutation_of_the_prefix_is_invisible():
    # with pos_enc="none" the last position's output depends on the SET of earlier tokens only
    torch.manual_seed(0)
    model = Transformer(3, n_layer=1, n_head=2, d_model=16, pos_enc="none").eval()
    x = torch.tensor([[0, 1, 2, 2, 1]])
    y = torch.tensor([[2, 1, 0, 2, 1]])  # same multiset before the last token
    with torch.no_grad():
        assert torch.allclose(model(x)[0, -1], model(y)[0, -1], atol=1e-5)
        rope = Transformer(3, n_layer=1, n_head=2, d_model=16, pos_enc="rope").eval()
        assert not torch.allclose(rope(x)[0, -1], rope(y)[0, -1], atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = Transformer(2, n_layer=2, n_head=2, d_model=16, pos_enc="rope")
    b = Transformer(2, n_layer=2, n_head=2, d_model=16, pos_enc="rope", grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = markov.sample(4, 1, seq_len=24, seed=0)
    a.token_nll(x).mean().backward()
    b.token_nll(x).mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    model = Transformer(2, n_layer=2, n_head=2, d_model=32, pos_enc="rope").eval()
    x = markov.sample(4, 1, seq_len=40, seed=0)
    with torch.no_grad():
        ref = model.token_nll(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.token_nll(x)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.02


def test_clear_errors():
    with pytest.raises(ValueError, match="pos_enc must be one of"):
        Transformer(2, pos_enc="relative")
    with pytest.raises(ValueError, match="divisible by n_head"):
        Transformer(2, d_model=30, n_head=4)
    with pytest.raises(ValueError, match="max_len=8"):
        Transformer(2, max_len=8, d_model=16, n_head=2)(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must be \[B, L, V\]"):
        next_token_nll(torch.zeros(1, 5, 2), torch.zeros(1, 4, dtype=torch.long))


def _lm(kind, pos_enc):
    """The same constructor names build either model (the interface trainers rely on)."""
    torch.manual_seed(0)
    common = dict(d_model=16, n_head=2, max_len=12, pos_enc=pos_enc)
    if kind == "transformer":
        return Transformer(3, n_layer=1, **common).double()
    return eqprop.EquilibriumLM(3, mlp_ratio=2, dtype=torch.float64, fixed_point=dict(max_steps=30, tol=0.0), **common)


@pytest.mark.parametrize("kind", ["transformer", "equilibrium"])
@pytest.mark.parametrize("pos_enc", ["learned", "sinusoidal", "rope"])
def test_both_models_share_one_interface(kind, pos_enc):
    model = _lm(kind, pos_enc)
    assert (model.vocab_size, model.max_len, model.pos_enc) == (3, 12, pos_enc)
    x = torch.tensor([[0, 1, 2, 2, 1, 0, 0, 2], [2, 2, 1, 0, 1, 1, 0, 0]])
    logits = model(x)
    assert logits.shape == (2, 8, 3)
    nll = model.token_nll(x)
    # independent of next_token_nll: -log softmax of the previous position's logits, read by hand
    logp = logits.double().log_softmax(-1)
    for b in range(2):
        assert nll[b, 0].item() == pytest.approx(math.log(3), abs=1e-12)
        for t in range(1, 8):
            assert nll[b, t].item() == pytest.approx(-logp[b, t - 1, x[b, t]].item(), abs=1e-10)
    # causal: changing x_5 leaves the NLL of x_0..x_4 unchanged
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 3
    with torch.no_grad():
        a, b_ = model.token_nll(x), model.token_nll(y)
    assert torch.allclose(a[:, :5], b_[:, :5], atol=1e-10)
