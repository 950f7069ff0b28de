"""Sliding-window attention (eqprop.models.attention, docs/design.md §9): the window convention against a
hand-written loop, the chunked O(T·W) path against the dense masked reference (values and gradients),
its memory bound checked on every intermediate tensor, and the Transformer's attention="sliding"."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from eqprop import markov
from eqprop.models import Transformer, alibi_bias, alibi_slopes
from eqprop.models.attention import flex_available, sliding_window_attention, sliding_window_mask
from testing import tol

F64 = torch.float64


def _qkv(B, H, T, d, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=g, dtype=dtype) for _ in range(3)]


def test_mask_convention():
    # key s visible to query t iff t - W < s <= t: W = 2 sees itself and its predecessor
    m = sliding_window_mask(4, 2)
    assert torch.equal(m.int(), torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]))
    assert torch.equal(sliding_window_mask(5, 1), torch.eye(5, dtype=torch.bool))
    assert torch.equal(sliding_window_mask(5, 9), torch.ones(5, 5, dtype=torch.bool).tril())


def test_dense_reference_matches_a_loop_over_queries():
    """The oracle itself, against softmax over the visible keys written out query by query."""
    q, k, v = _qkv(1, 2, 9, 4, seed=1)
    W, scale = 3, 0.7
    out = sliding_window_attention(q, k, v, W, scale=scale, impl="dense")
    for t in range(9):
        keys = range(max(0, t - W + 1), t + 1)
        s = torch.stack([(q[0, :, t] * k[0, :, j]).sum(-1) * scale for j in keys], -1)  # [H, n]
        ref = (s.softmax(-1)[..., None] * torch.stack([v[0, :, j] for j in keys], 1)).sum(1)
        torch.testing.assert_close(out[0, :, t], ref, rtol=0, atol=tol(F64, n=2 * W + 4, scale=3.0))


def _max_err_bound(v, T):
    # softmax-weighted mean of ≤ T values: each output sums ≤ T terms bounded by max|v|, after a
    # softmax whose relative error is a few ε times the exponent's size (|score| ≲ 10 here)
    return tol(F64, n=T + 16, scale=v.abs().max(), factor=10.0)


@pytest.mark.parametrize(
    "T,W",
    [(12, 1), (12, 12), (12, 40), (13, 4), (17, 5), (16, 4)],
    ids=["W=1", "W=T", "W>T", "W∤T", "W∤T-prime", "W|T"],
)
@pytest.mark.parametrize("alibi", [False, True])
def test_chunked_matches_dense_values_and_gradients(T, W, alibi):
    q, k, v = (a.requires_grad_() for a in _qkv(2, 3, T, 8, seed=T * 100 + W))
    slopes = alibi_slopes(3).double() if alibi else None
    dense = sliding_window_attention(q, k, v, W, impl="dense", alibi_slopes=slopes)
    chunk = sliding_window_attention(q, k, v, W, impl="chunked", alibi_slopes=slopes)
    bound = _max_err_bound(v, T)
    torch.testing.assert_close(chunk, dense, rtol=0, atol=bound)
    probe = torch.randn(dense.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    g_dense = torch.autograd.grad((dense * probe).sum(), (q, k, v))
    g_chunk = torch.autograd.grad((chunk * probe).sum(), (q, k, v))
    for name, a, b in zip("qkv", g_chunk, g_dense):
        gbound = tol(F64, n=T + 16, scale=b.abs().max() + probe.abs().max() * v.abs().max(), factor=10.0)
        torch.testing.assert_close(a, b, rtol=0, atol=gbound, msg=f"grad {name}")


def test_window_one_returns_v_and_large_window_is_causal_attention():
    q, k, v = _qkv(2, 2, 11, 8, seed=3)
    torch.testing.assert_close(sliding_window_attention(q, k, v, 1), v, rtol=0, atol=tol(F64, 2, v.abs().max()))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for W in (11, 50):
        out = sliding_window_attention(q, k, v, W, impl="chunked")
        torch.testing.assert_close(out, full, rtol=0, atol=_max_err_bound(v, 11))
    # and ALiBi with W >= T: the dense ALiBi bias the full-attention model uses
    slopes = alibi_slopes(2).double()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=alibi_bias(2, 11, dtype=F64))
    out = sliding_window_attention(q, k, v, 11, impl="chunked", alibi_slopes=slopes)
    torch.testing.assert_close(out, ref, rtol=0, atol=_max_err_bound(v, 11))


class _LargestTensor(TorchDispatchMode):
    """Records the numel of every tensor any ATen op returns (autograd's intermediates included)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


@pytest.mark.parametrize("T,W", [(512, 16), (500, 24)])
def test_chunked_memory_is_linear_in_T(T, W):
    """No intermediate of the chunked path (forward or backward) holds more than the
    [B, H, ⌈T/W⌉, W, 2W] scores; the dense path's [B, H, T, T] shows the hook sees them."""
    B, H, d = 1, 2, 8
    q, k, v = (a.requires_grad_() for a in _qkv(B, H, T, d, dtype=torch.float32))
    bound = B * H * math.ceil(T / W) * W * 2 * W
    assert bound < B * H * T * T / 8  # the claim is only interesting when T >> W
    with _LargestTensor() as rec:
        sliding_window_attention(q, k, v, W, impl="chunked").sum().backward()
    assert rec.largest <= bound
    with _LargestTensor() as dense:
        sliding_window_attention(q, k, v, W, impl="dense").sum()
    assert dense.largest >= B * H * T * T


def test_auto_is_chunked_on_cpu_and_flex_is_refused_there():
    assert not flex_available("cpu")
    q, k, v = _qkv(1, 1, 6, 4)
    assert torch.equal(sliding_window_attention(q, k, v, 2), sliding_window_attention(q, k, v, 2, impl="chunked"))
    with pytest.raises(ValueError, match="impl='flex' needs a CUDA tensor"):
        sliding_window_attention(q, k, v, 2, impl="flex")


def test_bad_inputs():
    q, k, v = _qkv(1, 2, 6, 4)
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        sliding_window_attention(q, k, v, 0)
    with pytest.raises(TypeError, match="window must be an int, got float"):
        sliding_window_attention(q, k, v, 2.0)
    with pytest.raises(ValueError, match=r"q, k must be \[B, H, T, d\]"):
        sliding_window_attention(q[0], k[0], v[0], 2)
    with pytest.raises(ValueError, match=r"q, k must be \[B, H, T, d\]"):
        sliding_window_attention(q, k[:, :, :5], v, 2)
    with pytest.raises(ValueError, match="impl must be one of"):
        sliding_window_attention(q, k, v, 2, impl="fast")
    with pytest.raises(ValueError, match=r"alibi_slopes must be \[H\] = \[2\]"):
        sliding_window_attention(q, k, v, 2, alibi_slopes=torch.ones(3))
    with pytest.raises(TypeError, match="q, k, v must be tensors"):
        sliding_window_attention(q.tolist(), k, v, 2)


# ---- the Transformer's attention="sliding" -----------------------------------------------------------


@pytest.mark.parametrize("pos_enc", ["rope", "alibi", "none", "learned"])
def test_sliding_transformer_with_a_long_window_is_the_full_transformer(pos_enc):
    torch.manual_seed(0)
    common = dict(n_layer=2, n_head=2, d_model=16, max_len=32, pos_enc=pos_enc)
    full = Transformer(3, **common).double().eval()
    sliding = Transformer(3, attention="sliding", window=32, **common).double().eval()
    sliding.load_state_dict(full.state_dict())  # same parameter names: only the layer's mask differs
    x = torch.randint(0, 3, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = full(x), sliding(x)
    torch.testing.assert_close(b, a, rtol=0, atol=tol(F64, n=200, scale=a.abs().max(), factor=10.0))


def test_sliding_transformer_receptive_field():
    """Two layers of window W: position t depends on tokens t − 2(W − 1) .. t and on nothing older."""
    torch.manual_seed(0)
    W, L, s = 4, 40, 10
    model = Transformer(2, n_layer=2, n_head=2, d_model=16, pos_enc="rope", attention="sliding", window=W).eval()
    x = markov.sample(2, 1, seq_len=L, seed=3)
    y = x.clone()
    y[:, s] = 1 - y[:, s]
    with torch.no_grad():
        a, b = model(x), model(y)
    reach = s + 2 * (W - 1)  # last position the change can reach
    diff = (a - b).abs().amax(dim=(0, 2))  # [L]
    assert diff[:s].max() == 0 and diff[reach + 1 :].max() == 0
    assert diff[s] > 1e-6 and diff[reach] > 1e-6


def test_transformer_attention_options_are_checked():
    with pytest.raises(ValueError, match="attention must be one of"):
        Transformer(2, attention="linear")
    with pytest.raises(ValueError, match="window must be an int >= 1 for attention='sliding', got None"):
        Transformer(2, attention="sliding")
    with pytest.raises(ValueError, match="ttt_batch must be an int >= 1, got 0"):
        Transformer(2, attention="ttt_linear", ttt_batch=0)
    # the config records the layer, so a checkpoint rebuilds the same architecture
    m = Transformer(2, n_head=2, d_model=16, attention="sliding", window=8)
    assert m.config["attention"] == "sliding" and m.config["window"] == 8
    assert Transformer(**m.config).config == m.config


@pytest.mark.parametrize("pos_enc", ["rope", "alibi"])
def test_sliding_transformer_under_bf16_autocast(pos_enc):
    torch.manual_seed(0)
    model = Transformer(2, n_layer=2, n_head=2, d_model=32, pos_enc=pos_enc, attention="sliding", window=8).eval()
    x = markov.sample(4, 1, seq_len=40, seed=0)
    with torch.no_grad():
        ref = model.token_nll(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.token_nll(x)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.02  # the bound test_models uses for full attention
