"""Regression checks for my equilibrium model, kept next to it (run: pytest test_my_model.py).

The eqprop pytest plugin gives the fixtures `device` and `float_dtype`, the `cuda` marker and
`--eqprop-seed`; eqprop.testing gives the assertions and their tolerances.
"""

import pytest
import torch

import eqprop
from eqprop import markov
from eqprop.estimators import BPTT, Implicit
from eqprop.testing import (
    assert_contractive,
    assert_converged,
    assert_field_consistent,
    assert_grads_close,
    assert_markov_gap,
)


class MyLayer(torch.nn.Module):
    """My field F(z; x) = tanh(W z + U x), W rescaled to spectral norm 0.7 (a contraction)."""

    def __init__(self, n, *, dtype=torch.float64, device="cpu"):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        W = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.W = torch.nn.Parameter((0.7 * W / torch.linalg.matrix_norm(W, 2)).to(device, dtype))
        self.U = torch.nn.Parameter((torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5).to(device, dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T)


def test_field_products_are_right(device, float_dtype):
    layer = MyLayer(16, dtype=float_dtype, device=device)
    x = torch.randn(4, 16, dtype=float_dtype, device=device)
    assert_field_consistent(layer, x)


def test_relaxes_and_is_contractive():
    layer, x = MyLayer(16), torch.randn(4, 16, dtype=torch.float64)
    z, info = eqprop.relax(layer, x, tol=1e-10, max_steps=500)
    assert_converged(info, tol=1e-10)
    assert_contractive(layer, x, z, rho_max=0.7 + 1e-6)  # ρ(J) <= ‖W‖₂ since |tanh'| <= 1


def test_implicit_gradient_matches_backprop_through_time():
    layer, x = MyLayer(16), torch.randn(4, 16, dtype=torch.float64)
    loss = lambda z: z.square().mean()
    exact = BPTT(100, tol=1e-12, max_steps=500).grad(layer, x, loss)  # truncation ~0.7^100 ~ 3e-16
    implicit = Implicit(tol=1e-12, max_steps=500).grad(layer, x, loss)
    assert_grads_close(implicit, exact, cos_min=0.999999)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    x = torch.randn(4, 16, dtype=torch.float64)
    cpu = eqprop.relax(MyLayer(16), x, tol=1e-12, max_steps=500)[0]
    gpu = eqprop.relax(MyLayer(16, device="cuda"), x.cuda(), tol=1e-12, max_steps=500)[0]
    # both stop within rel 1e-12 of z*: |gpu - cpu| <= 2e-12 |F| / (1 - 0.7) < 1e-11 (10x headroom)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-10)


def test_checkpoint_is_near_bayes():
    # My "checkpoint": a count model with add-1/2 smoothing; a trained model's per-token NLL goes here.
    k = 2
    my_model_nll = lambda tokens: markov.bayes_nll(tokens, k, alpha=0.5, dtype=torch.float64)
    assert_markov_gap(my_model_nll, k, max_gap_pct=1.0, n_sequences=64, seed=0)
