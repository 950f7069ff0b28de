// TTT-Linear and TTT-MLP in the dual form (docs/design.md §9); the equations are in ttt.h.
//
// Dual form of one mini-batch (tokens 1..b, weights θ_p from the previous mini-batch). Every token's
// gradient is taken at θ_p, so all b gradients come from one batched forward/backward of the inner
// model on the keys. For the linear model, with G = ∂ℓ/∂Z at Z = K W_p + b_p ([b, d], one row per
// token), ∇_W ℓ_s = k_sᵀ G_s and ∇_b ℓ_s = G_s, hence
//   q_t W_t + b_t = q_t W_p + b_p − Σ_{s ≤ t} η_s (q_t·k_s + 1) G_s
//                 = [Q W_p + b_p − (tril(Q Kᵀ + 1) ⊙ η_colᵀ) G]_t,
// a masked b×b matmul instead of b materialized weights; the weights are written once per
// mini-batch, W_next = W_p − Kᵀ (η ⊙ G), b_next = b_p − Σ_s η_s G_s. The MLP applies the same
// identity per layer: layer 1 with inputs K, Q and gradient G1; layer 2 with inputs X2 = gelu(Z1)
// (keys, at θ_p) and X̂2 = gelu(Ẑ1) (queries, at θ_t) and gradient G2.
#include "ttt/ttt.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <vector>

namespace eqprop::ttt {
namespace {

using at::Tensor;

std::string shape_of(const Tensor& t) { return t.defined() ? c10::str(t.sizes()) : std::string("None"); }

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& eta, int64_t mini_batch,
                  double eps) {
  TORCH_CHECK_VALUE(q.defined() && q.dim() == 4, "q must be [B, H, T, d], got ", shape_of(q));
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "q must be a real floating-point tensor, got ",
                   q.scalar_type());
  TORCH_CHECK_VALUE(k.defined() && k.sizes() == q.sizes(), "k must have q's shape ", q.sizes(), ", got ",
                    shape_of(k));
  TORCH_CHECK_VALUE(v.defined() && v.sizes() == q.sizes(), "v must have q's shape ", q.sizes(), ", got ",
                    shape_of(v));
  TORCH_CHECK_VALUE(eta.defined() && eta.sizes() == q.sizes().slice(0, 3),
                    "eta must be [B, H, T] = ", q.sizes().slice(0, 3), ", got ", shape_of(eta));
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"k", &k}, {"v", &v}, {"eta", &eta}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(),
                     ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), name, " must be on q's device ", q.device(), ", got ",
                      t->device());
  }
  TORCH_CHECK_VALUE(mini_batch >= 1, "mini_batch must be >= 1, got ", mini_batch);
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0, got ", eps);
}

void check_param(const char* name, const Tensor& p, at::IntArrayRef shape, const Tensor& q) {
  TORCH_CHECK_VALUE(p.defined() && p.sizes() == shape, name, " must be ", shape, ", got ", shape_of(p));
  TORCH_CHECK_TYPE(p.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(),
                   ", got ", p.scalar_type());
  TORCH_CHECK_VALUE(p.device() == q.device(), name, " must be on q's device ", q.device(), ", got ",
                    p.device());
}

// The sequence cut into n mini-batches of b tokens, [B, H, T, ...] -> [B, H, n, b, ...]. The last one is
// padded with zeros; padded tokens get η = 0 (they add nothing to any update) and their outputs are dropped.
struct MiniBatches {
  int64_t T, b, n;
  Tensor Q, K, target, eta, causal;  // [B, H, n, b, d] ×3, [B, H, n, b], [b, b] bool (s ≤ t)
};

MiniBatches split(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& eta, int64_t mini_batch) {
  MiniBatches m;
  m.T = q.size(2);
  m.b = std::min(mini_batch, std::max<int64_t>(m.T, 1));
  m.n = (m.T + m.b - 1) / m.b;
  const int64_t pad = m.n * m.b - m.T;
  auto cut = [&](const Tensor& a) {
    return (pad ? at::constant_pad_nd(a, {0, 0, 0, pad}) : a).unflatten(2, {m.n, m.b});
  };
  m.Q = cut(q);
  m.K = cut(k);
  m.target = cut(v - k);  // f̃(k) = k + LN(f(k)) fits v  ⇔  LN(f(k)) fits v − k
  m.eta = (pad ? at::constant_pad_nd(eta, {0, pad}) : eta).unflatten(2, {m.n, m.b});
  m.causal = at::ones({m.b, m.b}, q.options().dtype(at::kBool)).tril();
  return m;
}

// (tril(A + 1) ⊙ η_s): the coefficient of token s's gradient in token t's pre-activation, [..., b, b].
Tensor dual_coefficients(const Tensor& A, const Tensor& eta, const Tensor& causal) {
  return (A + 1).mul(eta.unsqueeze(-2)).masked_fill(causal.logical_not(), 0);
}

// Per-head LayerNorm over the last dim: (z − μ)/√(σ² + ε) · γ + β, γ, β [H, 1, d].
Tensor layer_norm_heads(const Tensor& z, const Tensor& gamma, const Tensor& beta, double eps) {
  return at::layer_norm(z, {z.size(-1)}, {}, {}, eps) * gamma + beta;
}

// ∂ℓ/∂z of ℓ = ½‖LN(z)·γ + β − target‖² (z [..., d]): with x̂ = (z − μ)·r, r = (σ² + ε)^(−1/2),
// e = x̂γ + β − target and g = γ ⊙ e,   ∂ℓ/∂z = r·(g − mean(g) − x̂·mean(g ⊙ x̂)).
Tensor ln_l2_grad(const Tensor& z, const Tensor& target, const Tensor& gamma, const Tensor& beta,
                  double eps) {
  Tensor zc = z - z.mean(-1, true);
  Tensor r = at::rsqrt((zc * zc).mean(-1, true) + eps);
  Tensor xh = zc * r;
  Tensor g = (xh * gamma + beta - target) * gamma;
  return r * (g - g.mean(-1, true) - xh * (g * xh).mean(-1, true));
}

// [B, H, n, b, d] rows of every mini-batch, joined back into [B, H, T, d].
Tensor join(const std::vector<Tensor>& per_batch, int64_t T) {
  return at::stack(per_batch, 2).flatten(2, 3).narrow(2, 0, T);
}

}  // namespace

Tensor ttt_linear(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& eta, const Tensor& W,
                  const Tensor& b, const Tensor& ln_weight, const Tensor& ln_bias, int64_t mini_batch,
                  double eps) {
  check_inputs(q, k, v, eta, mini_batch, eps);
  const int64_t B = q.size(0), H = q.size(1), d = q.size(3);
  check_param("W", W, {H, d, d}, q);
  check_param("b", b, {H, d}, q);
  check_param("ln_weight", ln_weight, {H, d}, q);
  check_param("ln_bias", ln_bias, {H, d}, q);
  if (q.size(2) == 0) return q.clone();
  const MiniBatches m = split(q, k, v, eta, mini_batch);
  const Tensor gamma = ln_weight.unsqueeze(1), beta = ln_bias.unsqueeze(1);  // [H, 1, d]
  const Tensor coef =
      dual_coefficients(at::matmul(m.Q, m.K.transpose(-1, -2)), m.eta, m.causal);  // [B, H, n, b, b]

  Tensor Wc = W.unsqueeze(0).expand({B, H, d, d});
  Tensor bc = b.unsqueeze(0).unsqueeze(2).expand({B, H, 1, d});
  std::vector<Tensor> zq;
  zq.reserve(m.n);
  for (int64_t i = 0; i < m.n; ++i) {
    const Tensor Ki = m.K.select(2, i), Qi = m.Q.select(2, i);  // [B, H, b, d]
    const Tensor G = ln_l2_grad(at::matmul(Ki, Wc) + bc, m.target.select(2, i), gamma, beta, eps);
    zq.push_back(at::matmul(Qi, Wc) + bc - at::matmul(coef.select(2, i), G));
    if (i + 1 < m.n) {
      const Tensor eG = G * m.eta.select(2, i).unsqueeze(-1);  // η_s G_s
      Wc = Wc - at::matmul(Ki.transpose(-1, -2), eG);
      bc = bc - eG.sum(-2, true);
    }
  }
  return q + layer_norm_heads(join(zq, m.T), gamma, beta, eps);
}

Tensor ttt_mlp(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& eta, const Tensor& W1,
               const Tensor& b1, const Tensor& W2, const Tensor& b2, const Tensor& ln_weight,
               const Tensor& ln_bias, int64_t mini_batch, double eps) {
  check_inputs(q, k, v, eta, mini_batch, eps);
  const int64_t B = q.size(0), H = q.size(1), d = q.size(3);
  TORCH_CHECK_VALUE(W1.defined() && W1.dim() == 3 && W1.size(2) >= 1, "W1 must be [H, d, h] = [", H, ", ", d,
                    ", h], got ", shape_of(W1));
  const int64_t h = W1.size(2);
  check_param("W1", W1, {H, d, h}, q);
  check_param("b1", b1, {H, h}, q);
  check_param("W2", W2, {H, h, d}, q);
  check_param("b2", b2, {H, d}, q);
  check_param("ln_weight", ln_weight, {H, d}, q);
  check_param("ln_bias", ln_bias, {H, d}, q);
  if (q.size(2) == 0) return q.clone();
  const MiniBatches m = split(q, k, v, eta, mini_batch);
  const Tensor gamma = ln_weight.unsqueeze(1), beta = ln_bias.unsqueeze(1);
  const Tensor coef1 = dual_coefficients(at::matmul(m.Q, m.K.transpose(-1, -2)), m.eta, m.causal);

  Tensor W1c = W1.unsqueeze(0).expand({B, H, d, h}), W2c = W2.unsqueeze(0).expand({B, H, h, d});
  Tensor b1c = b1.unsqueeze(0).unsqueeze(2).expand({B, H, 1, h});
  Tensor b2c = b2.unsqueeze(0).unsqueeze(2).expand({B, H, 1, d});
  std::vector<Tensor> zq;
  zq.reserve(m.n);
  for (int64_t i = 0; i < m.n; ++i) {
    const Tensor Ki = m.K.select(2, i), Qi = m.Q.select(2, i), eta_i = m.eta.select(2, i);
    // the inner model on the keys at θ_p, and its gradients (one row per token)
    const Tensor Z1 = at::matmul(Ki, W1c) + b1c;  // [B, H, b, h]
    const Tensor X2 = at::gelu(Z1, "tanh");
    const Tensor G2 = ln_l2_grad(at::matmul(X2, W2c) + b2c, m.target.select(2, i), gamma, beta, eps);
    const Tensor G1 = at::gelu_backward(at::matmul(G2, W2c.transpose(-1, -2)), Z1, "tanh");  // [B, H, b, h]
    // the queries under θ_t, layer by layer (dual form of each layer's update)
    const Tensor Xq2 = at::gelu(at::matmul(Qi, W1c) + b1c - at::matmul(coef1.select(2, i), G1), "tanh");
    const Tensor coef2 = dual_coefficients(at::matmul(Xq2, X2.transpose(-1, -2)), eta_i, m.causal);
    zq.push_back(at::matmul(Xq2, W2c) + b2c - at::matmul(coef2, G2));
    if (i + 1 < m.n) {
      const Tensor e = eta_i.unsqueeze(-1);
      const Tensor eG1 = G1 * e, eG2 = G2 * e;
      W1c = W1c - at::matmul(Ki.transpose(-1, -2), eG1);
      b1c = b1c - eG1.sum(-2, true);
      W2c = W2c - at::matmul(X2.transpose(-1, -2), eG2);
      b2c = b2c - eG2.sum(-2, true);
    }
  }
  return q + layer_norm_heads(join(zq, m.T), gamma, beta, eps);
}

}  // namespace eqprop::ttt
