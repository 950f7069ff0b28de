"""An equilibrium transformer block: relax it to its fixed point, differentiate through the fixed
point, and look at the Jacobian there. Runs in a few seconds on a CPU."""

import warnings

import torch

import eqprop
from eqprop import diagnostics, estimators

# A relaxation or adjoint solve that stops above its tolerance gives a wrong z* or gradient: make
# that an error here rather than a warning (or pass on_nonconvergence="raise" per call).
warnings.simplefilter("error", eqprop.NonConvergenceWarning)
torch.manual_seed(0)
B, T, C, H = 4, 32, 64, 4
# float64 so that the gradient comparisons below are not limited by float32 round-off
block = eqprop.EquilibriumBlock(C, H, resinit=1.0, spectral_rho=1.0, dtype=torch.float64)
x = torch.randn(B, T, C, dtype=torch.float64)  # injection (token + position embedding in an LM)

# Free phase: damped Picard vs Anderson, per-sample stats, lowest-residual iterate per sample.
for solver in ("picard", "anderson"):
    z, info = eqprop.relax(block, x, solver=solver, tol=1e-8, max_steps=200)
    print(
        f"{solver:>8}: {info.n_evals:3d} F evaluations, max rel residual {info.rel_max:.1e}, status {info.status_names}"
    )

# z* on the autograd graph; the backward solves (I - J^T) lambda = dl/dz* with VJPs only.
target = torch.randn(B, T, C, dtype=torch.float64)
z_star = eqprop.fixed_point(block, x, backward="implicit", tol=1e-6, max_steps=200)
loss = (z_star - target).pow(2).mean()
loss.backward()
print("implicit gradient norms:", {n: f"{p.grad.norm():.2e}" for n, p in list(block.named_parameters())[:3]})

# Spectral normalization takes one power-iteration step per forward in training mode (as
# torch.nn.utils.spectral_norm does); freeze it so that both estimators see the same weights.
block.eval()

# The same gradient as an estimator (the interface the EP estimators share), against BPTT(h).
loss_fn = lambda z: (z - target).pow(2).mean()  # noqa: E731
exact = estimators.Implicit(tol=1e-8, max_steps=300).grad(block, x, loss_fn)
print(
    "adjoint steps per sample:",
    exact.stats["backward"]["steps"].tolist(),
    f"(residual <= {float(exact.stats['backward']['residual'].max()):.1e})",
)
for h in (1, 2, 4, 8, 16):
    bptt = estimators.BPTT(h, tol=1e-8, max_steps=300).grad(block, x, loss_fn)
    num = sum((bptt.grads[n] - g).pow(2).sum() for n, g in exact.grads.items()).sqrt()
    den = sum(g.pow(2).sum() for g in exact.grads.values()).sqrt()
    print(f"BPTT({h:2d}) relative error to implicit: {num / den:.2e}")

# Why relaxation converges (or not): the Jacobian at the fixed point.
z = exact.z.detach()
print("spectral radius per sample:", diagnostics.spectral_radius(block, x, z).tolist())
print("non-normality ||Jv - J^T v|| / ||Jv||:", diagnostics.nonnormality(block, x, z, probes=8))
