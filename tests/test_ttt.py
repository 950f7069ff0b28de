"""TTT-Linear and TTT-MLP (eqprop.models.ttt, csrc/ttt; docs/design.md §9): the C++ dual form against the
primal reference (explicit per-token weights) and against mini-batch gradient descent written with
autograd, gradcheck through the C++ op, bad inputs, and the layer inside the Transformer."""

import pytest
import torch
import torch.nn.functional as F

from eqprop import markov
from eqprop.models import Transformer, TTTLayer, ttt_linear, ttt_mlp
from eqprop.reference import ttt as ref
from testing import tol

F64 = torch.float64
EPS = 1e-6  # the inner LayerNorm's ε


def _problem(kind, B=2, H=2, T=13, d=4, h=8, seed=0, dtype=F64, eta_scale=0.5):
    """q, k, v, η and inner weights large enough that the inner updates change the output a lot."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g, dtype=F64) * sc).to(dtype)
    q, k, v = r(B, H, T, d), r(B, H, T, d), r(B, H, T, d)
    eta = (torch.rand(B, H, T, generator=g, dtype=F64) * eta_scale).to(dtype)
    if kind == "linear":
        theta = [r(H, d, d, sc=0.4), r(H, d, sc=0.2)]
    else:
        theta = [r(H, d, h, sc=0.4), r(H, h, sc=0.2), r(H, h, d, sc=0.4), r(H, d, sc=0.2)]
    ln = [1 + r(H, d, sc=0.2), r(H, d, sc=0.2)]
    return [q, k, v, eta, *theta, *ln]


DUAL = {"linear": ttt_linear, "mlp": ttt_mlp}
PRIMAL = {"linear": ref.ttt_linear, "mlp": ref.ttt_mlp}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("b", [1, 3, 4, 13, 16], ids=lambda b: f"b={b}")
def test_dual_equals_primal(kind, b):
    """T = 13: b = 3, 4 leave a short last mini-batch, b = 13 is one mini-batch, b = 16 > T."""
    args = _problem(kind)
    dual = DUAL[kind](*args, mini_batch=b, eps=EPS)
    primal = PRIMAL[kind](*args, mini_batch=b, eps=EPS)
    torch.testing.assert_close(dual, primal, rtol=0, atol=1e-10)
    # not vacuous: without the inner updates (η = 0) the output is far from this
    frozen = DUAL[kind](*args[:3], torch.zeros_like(args[3]), *args[4:], mini_batch=b, eps=EPS)
    assert (frozen - dual).abs().max() > 1e-2


def _autograd_minibatch_gd(kind, q, k, v, eta, theta, gamma, beta, b):
    """Mini-batch TTT written from the definition, one (sample, head) at a time, gradients by autograd:
    θ_t = θ_p − Σ_{s ≤ t in the mini-batch} η_s ∇ℓ_s(θ_p),  ℓ_s = ½‖k_s + LN(f(k_s))γ + β − v_s‖²,
    z_t = q_t + LN(f(q_t; θ_t))γ + β. With b = 1 this is token-by-token online gradient descent."""
    B, H, T, d = q.shape

    def f(u, th):
        if kind == "linear":
            return u @ th[0] + th[1]
        return F.gelu(u @ th[0] + th[1], approximate="tanh") @ th[2] + th[3]

    def wrap(u, th, i):
        return u + F.layer_norm(f(u, th), (d,), eps=EPS) * gamma[i] + beta[i]

    out = torch.empty_like(q)
    for n in range(B):
        for i in range(H):
            th_p = [p[i].clone() for p in theta]
            for start in range(0, T, b):
                th_t = [p.clone() for p in th_p]
                for t in range(start, min(start + b, T)):
                    th = [p.clone().requires_grad_() for p in th_p]
                    loss = 0.5 * (wrap(k[n, i, t], th, i) - v[n, i, t]).square().sum()
                    grads = torch.autograd.grad(loss, th)
                    th_t = [p - eta[n, i, t] * g for p, g in zip(th_t, grads)]
                    out[n, i, t] = wrap(q[n, i, t], th_t, i)
                th_p = th_t
    return out


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("b", [1, 4], ids=["b=1 (online GD)", "b=4"])
def test_dual_equals_gradient_descent_by_autograd(kind, b):
    args = _problem(kind, B=1, T=10)
    q, k, v, eta, *rest = args
    theta, (gamma, beta) = rest[:-2], rest[-2:]
    expected = _autograd_minibatch_gd(kind, q, k, v, eta, theta, gamma, beta, b)
    torch.testing.assert_close(DUAL[kind](*args, mini_batch=b, eps=EPS), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gradcheck_through_the_cpp_op(kind):
    args = [a.requires_grad_() for a in _problem(kind, B=1, H=2, T=5, d=3, h=4, seed=3)]
    fn = lambda *a: DUAL[kind](*a, mini_batch=2, eps=EPS)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_opcheck():
    """Schema, autograd registration, fake tensors and AOT dispatch (torch.compile) of the registered op."""
    args = _problem("linear", B=1, H=2, T=7, d=4)
    torch.library.opcheck(torch.ops.eqprop.ttt_linear, (*args, 3, EPS))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_float32_matches_the_float64_primal(kind):
    args = _problem(kind, T=40, d=8, h=16, seed=4)
    primal = PRIMAL[kind](*args, mini_batch=16, eps=EPS)
    dual32 = DUAL[kind](*[a.float() for a in args], mini_batch=16, eps=EPS)
    # a few chained matmuls of length ≤ max(b, h) per mini-batch, 3 mini-batches, LayerNorms that
    # divide by σ ≳ 0.1 (factor 10); 10·(3·16 + 16)·ε·max|z| leaves > 3x room on this data
    bound = tol(torch.float32, n=3 * 16 + 16, scale=primal.abs().max(), factor=10.0)
    torch.testing.assert_close(dual32.double(), primal, rtol=0, atol=bound)


def test_bad_inputs_name_the_argument():
    q, k, v, eta, W, b, g, beta = _problem("linear")
    with pytest.raises(ValueError, match=r"eta must be \[B, H, T\]"):
        ttt_linear(q, k, v, eta[..., :-1], W, b, g, beta)
    with pytest.raises(ValueError, match=r"W must be \[2, 4, 4\]"):
        ttt_linear(q, k, v, eta, W[:, :3], b, g, beta)
    with pytest.raises(ValueError, match=r"k must have q's shape"):
        ttt_linear(q, k[:, :, :5], v, eta, W, b, g, beta)
    with pytest.raises(ValueError, match=r"q must be \[B, H, T, d\]"):
        ttt_linear(q[0], k[0], v[0], eta[0], W, b, g, beta)
    with pytest.raises(TypeError, match="W must have q's dtype"):
        ttt_linear(q, k, v, eta, W.float(), b, g, beta)
    with pytest.raises(TypeError, match="q must be a real floating-point tensor"):
        ttt_linear(q.long(), k.long(), v.long(), eta.long(), W.long(), b.long(), g.long(), beta.long())
    with pytest.raises(ValueError, match="mini_batch must be >= 1, got 0"):
        ttt_linear(q, k, v, eta, W, b, g, beta, mini_batch=0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        ttt_linear(q, k, v, eta, W, b, g, beta, eps=0.0)
    q, k, v, eta, W1, b1, W2, b2, g, beta = _problem("mlp")
    with pytest.raises(ValueError, match=r"W2 must be \[2, 8, 4\]"):
        ttt_mlp(q, k, v, eta, W1, b1, W2.transpose(1, 2), b2, g, beta)
    with pytest.raises(ValueError, match=r"b1 must be \[2, 8\]"):
        ttt_mlp(q, k, v, eta, W1, b2, W2, b2, g, beta)
    with pytest.raises(ValueError, match="kind must be one of"):
        TTTLayer(16, 2, "conv")
    with pytest.raises(ValueError, match="mini_batch must be an int >= 1"):
        TTTLayer(16, 2, mini_batch=0)


# ---- the layer and the Transformer ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_layer_learning_rate_and_its_dual_primal_agreement(kind):
    torch.manual_seed(0)
    layer = TTTLayer(12, 3, kind, mini_batch=4).double()
    x = torch.randn(2, 9, 12, dtype=F64)
    q, k, v, eta, *_ = layer.inner_inputs(x)
    base = 1.0 if kind == "linear" else 0.1
    expected = base / 4 * torch.sigmoid(x @ layer.lr.weight.T + layer.lr.bias).transpose(1, 2)
    torch.testing.assert_close(eta, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(layer(x), layer.mix(x, PRIMAL[kind]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("attention", ["ttt_linear", "ttt_mlp"])
def test_ttt_transformer_is_causal_and_trains(attention):
    torch.manual_seed(0)
    model = Transformer(2, n_layer=2, n_head=2, d_model=16, pos_enc="none", attention=attention, ttt_batch=4)
    x = markov.sample(2, 1, seq_len=30, seed=3)
    y = x.clone()
    y[:, 13] = 1 - y[:, 13]  # mid mini-batch: tokens 12..15 share their weights θ_p
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :13], b[:, :13])
    assert (a[:, 13:] - b[:, 13:]).abs().max() > 1e-6
    # every parameter, the inner initial weights and the rate included, gets a finite gradient
    model.token_nll(x)[:, 1:].mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[0].attn.lr.weight.grad.abs().max() > 0


def test_ttt_transformer_under_bf16_autocast():
    torch.manual_seed(0)
    model = Transformer(2, n_layer=1, n_head=2, d_model=32, pos_enc="none", attention="ttt_linear").eval()
    x = markov.sample(2, 1, seq_len=40, seed=0)
    with torch.no_grad():
        ref_nll = model.token_nll(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.token_nll(x)
    assert out.dtype == torch.float32
    assert (out - ref_nll).abs().max() < 0.02  # bf16 projections; the inner loop runs in float32
