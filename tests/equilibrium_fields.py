"""Small vector fields with known Jacobians, shared by the engine tests."""

import torch


class TanhLayer(torch.nn.Module):
    """F(z; x) = tanh(W z + U x + b) with ‖W‖₂ = scale, so J = diag(1 - F²) W is a contraction."""

    def __init__(self, n, *, scale=0.8, dtype=torch.float64, seed=0, symmetric=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=g, dtype=torch.float64)
        if symmetric:  # slow modes near 1: the standard case where Anderson beats Picard
            W = W + W.T
        W = W / torch.linalg.matrix_norm(W, 2) * scale
        self.W = torch.nn.Parameter(W.to(dtype))
        self.U = torch.nn.Parameter((torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5).to(dtype))
        self.b = torch.nn.Parameter((0.1 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class Linear(torch.nn.Module):
    """F(z; x) = z Aᵀ + x: J = A exactly; per-sample fixed point (I - A)⁻¹x."""

    def __init__(self, A):
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())

    def forward(self, z, x):
        return z @ self.A.T + x


class Scaled:
    """F(z; x) = s_b z + x with a per-sample scale s [B] (a plain callable, no parameters)."""

    def __init__(self, s):
        self.s = s

    def __call__(self, z, x):
        return self.s.reshape(-1, *([1] * (z.dim() - 1))) * z + x
