// Test-time-training layers (Sun et al. 2024, "Learning to (Learn at Test Time)"), docs/design.md §9:
// the mini-batch update of TTT-Linear and TTT-MLP in the dual form, written with ATen ops so autograd
// differentiates it (registered as CompositeImplicitAutograd ops in bindings/ttt.cpp).
//
// Per head (row vectors, head dim d), inner model f(·; θ), wrapped as f̃(u) = u + LN(f(u)) with a
// per-head LayerNorm (γ, β over d):
//   loss of token s    ℓ_s(θ) = ½ ‖f̃(k_s) − v_s‖²
//   mini-batch update  θ_t = θ_p − Σ_{s ≤ t, s in t's mini-batch} η_s ∇ℓ_s(θ_p)
//   output             z_t = f̃(q_t; θ_t)
// where θ_p are the weights at the end of the previous mini-batch (the learned θ_0 for the first).
//   linear  f(u) = u W + b                         W [d, d], b [d]
//   mlp     f(u) = gelu_tanh(u W1 + b1) W2 + b2    W1 [d, h], b1 [h], W2 [h, d], b2 [d]
#pragma once
#include <ATen/core/Tensor.h>

namespace eqprop::ttt {

// q, k, v [B, H, T, d]; eta [B, H, T] (the per-token inner learning rate η_t);
// W [H, d, d], b [H, d]; ln_weight, ln_bias [H, d]. Returns z [B, H, T, d].
at::Tensor ttt_linear(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                      const at::Tensor& W, const at::Tensor& b, const at::Tensor& ln_weight,
                      const at::Tensor& ln_bias, int64_t mini_batch, double eps);

// As ttt_linear with W1 [H, d, h], b1 [H, h], W2 [H, h, d], b2 [H, d].
at::Tensor ttt_mlp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                   const at::Tensor& W1, const at::Tensor& b1, const at::Tensor& W2, const at::Tensor& b2,
                   const at::Tensor& ln_weight, const at::Tensor& ln_bias, int64_t mini_batch, double eps);

}  // namespace eqprop::ttt
