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
// (keys, at θ_p) and X̂2 = gelu(Ẑ1) (queries, at θ_t) and gradient G2. The code carries the descent
// direction D = −G, so that every update above is an addition.
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

// The sequence cut into n mini-batches of b tokens, with batch and heads flattened into one batch axis
// of size B·H for bmm: [B, H, T, d] -> n × [B·H, b, d]. The last mini-batch is padded with zeros; padded
// tokens get η = 0 (they add nothing to any update) and their outputs are dropped. Each sequence is
// unbound once: a select per step would give each step's backward a zero-filled gradient of the whole
// sequence (O(n²) work), unbind's backward is one stack.
struct MiniBatches {
  int64_t B, H, T, d, b, n;
  std::vector<Tensor> Q, K, eta;     // [q, 1], [k, 1]: [B·H, b, d + 1]; η [B·H, b]
  std::vector<Tensor> c;             // ((v − k) − β)·γ, [B·H, b, d]: the constant part of −γ ⊙ ∂ℓ/∂LN
  std::vector<Tensor> coef;          // tril([Q, 1][K, 1]ᵀ) ⊙ η_s = tril(Q Kᵀ + 1) ⊙ η_s, [B·H, b, b]
  Tensor gamma, neg_gamma2, causal;  // γ, −γ² [B·H, 1, d]; [b, b] bool (s ≤ t)
};

// tril(A) ⊙ η_s with A = [Q, 1][K, 1]ᵀ = Q Kᵀ + 1: the coefficient of token s's gradient in token t's
// pre-activation, [..., b, b].
Tensor dual_coefficients(const Tensor& A, const Tensor& eta, const Tensor& causal) {
  return A.mul(eta.unsqueeze(-2)).masked_fill(causal.logical_not(), 0);
}

// [a, 1]: inputs with a ones column, so that a layer u W + b is [u, 1] [W; b] (one matmul, and one
// update [W; b] += [k, 1]ᵀ(η ⊙ D) for weight and bias together).
Tensor with_ones(const Tensor& a) { return at::cat({a, at::ones_like(a.narrow(-1, 0, 1))}, -1); }

// [W; b]: [H, d_in, d_out] and [H, d_out] -> [B·H, d_in + 1, d_out], shared by the B samples.
Tensor stacked_weights(const Tensor& W, const Tensor& b, int64_t B) {
  Tensor Wb = at::cat({W, b.unsqueeze(1)}, 1);
  return Wb.unsqueeze(0).expand({B, Wb.size(0), Wb.size(1), Wb.size(2)}).flatten(0, 1);
}

// A per-head [H, ...] tensor broadcast to the flattened [B·H, 1, ...] layout.
Tensor per_head(const Tensor& p, int64_t B) {
  auto sizes = p.sizes().vec();
  sizes.insert(sizes.begin(), B);
  return p.unsqueeze(0).expand(sizes).flatten(0, 1).unsqueeze(1);
}

MiniBatches split(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& eta,
                  const Tensor& ln_weight, const Tensor& ln_bias, int64_t mini_batch) {
  MiniBatches m;
  m.B = q.size(0), m.H = q.size(1), m.T = q.size(2), m.d = q.size(3);
  m.b = std::min(mini_batch, m.T);
  m.n = (m.T + m.b - 1) / m.b;
  const int64_t pad = m.n * m.b - m.T;
  m.gamma = per_head(ln_weight, m.B);  // [B·H, 1, d]
  m.neg_gamma2 = -(m.gamma * m.gamma);
  auto cut = [&](const Tensor& a) {  // [B, H, T, d] -> [B·H, n, b, d]
    return (pad ? at::constant_pad_nd(a, {0, 0, 0, pad}) : a).flatten(0, 1).unflatten(1, {m.n, m.b});
  };
  const Tensor Q = with_ones(cut(q)), K = with_ones(cut(k));  // [B·H, n, b, d + 1]
  // f̃(k) = k + LN(f(k)) fits v  ⇔  LN(f(k))·γ + β fits v − k
  const Tensor c = (cut(v - k) - per_head(ln_bias, m.B).unsqueeze(1)) * m.gamma.unsqueeze(1);
  const Tensor E = (pad ? at::constant_pad_nd(eta, {0, pad}) : eta).flatten(0, 1).unflatten(1, {m.n, m.b});
  m.causal = at::ones({m.b, m.b}, q.options().dtype(at::kBool)).tril();
  const Tensor coef = dual_coefficients(at::matmul(Q, K.transpose(-1, -2)), E, m.causal);  // [B·H, n, b, b]
  m.Q = Q.unbind(1), m.K = K.unbind(1), m.c = c.unbind(1), m.eta = E.unbind(1), m.coef = coef.unbind(1);
  return m;
}

// The descent direction −∂ℓ/∂z of ℓ = ½‖LN(z)·γ + β − target‖² (z [..., d]): with x̂ = LN(z) (no affine)
// and g = −∂ℓ/∂x̂ = −γ ⊙ (x̂γ + β − target) = x̂·(−γ²) + c, it is LayerNorm's own backward applied to g,
//   −∂ℓ/∂z = r·(g − mean(g) − x̂·mean(g ⊙ x̂)),   r = (σ² + ε)^(−1/2),
// one fused kernel (native_layer_norm_backward, whose derivative autograd has: layer norm's double
// backward) instead of a dozen small ops per step. Carrying −∂ℓ/∂z makes every update an addition.
Tensor ln_l2_descent(const Tensor& z, const Tensor& c, const Tensor& neg_gamma2, double eps) {
  const int64_t d = z.size(-1);
  auto [xh, mean, rstd] = at::native_layer_norm(z, {d}, {}, {}, eps);
  const Tensor g = at::addcmul(c, xh, neg_gamma2);
  return std::get<0>(at::native_layer_norm_backward(g, z, {d}, mean, rstd, {}, {}, {true, false, false}));
}

// The outputs z_t = q_t + LN(Ẑ_t)·γ + β from the per-mini-batch pre-activations Ẑ (n × [B·H, b, d]).
Tensor finish(const MiniBatches& m, const std::vector<Tensor>& zq, const Tensor& q, const Tensor& ln_weight,
              const Tensor& ln_bias, double eps) {
  Tensor z = at::stack(zq, 1).view({m.B, m.H, m.n * m.b, m.d}).narrow(2, 0, m.T);
  return q + at::layer_norm(z, {m.d}, {}, {}, eps) * ln_weight.unsqueeze(1) + ln_bias.unsqueeze(1);
}

}  // namespace

Tensor ttt_linear(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& eta, const Tensor& W,
                  const Tensor& b, const Tensor& ln_weight, const Tensor& ln_bias, int64_t mini_batch,
                  double eps) {
  check_inputs(q, k, v, eta, mini_batch, eps);
  const int64_t H = q.size(1), d = q.size(3);
  check_param("W", W, {H, d, d}, q);
  check_param("b", b, {H, d}, q);
  check_param("ln_weight", ln_weight, {H, d}, q);
  check_param("ln_bias", ln_bias, {H, d}, q);
  if (q.size(2) == 0) return q.clone();
  const MiniBatches m = split(q, k, v, eta, ln_weight, ln_bias, mini_batch);
  Tensor Wb = stacked_weights(W, b, m.B);  // θ_p = [W_p; b_p], [B·H, d + 1, d]
  std::vector<Tensor> zq;
  zq.reserve(m.n);
  for (int64_t i = 0; i < m.n; ++i) {
    const Tensor D = ln_l2_descent(at::bmm(m.K[i], Wb), m.c[i], m.neg_gamma2, eps);  // −G, [B·H, b, d]
    // Ẑ = Q W_p + b_p − (tril(Q Kᵀ + 1) ⊙ η) G
    zq.push_back(at::baddbmm(at::bmm(m.Q[i], Wb), m.coef[i], D));
    // [W; b] ← [W_p; b_p] − [K, 1]ᵀ (η ⊙ G)
    if (i + 1 < m.n) Wb = at::baddbmm(Wb, m.K[i].transpose(-1, -2), D * m.eta[i].unsqueeze(-1));
  }
  return finish(m, zq, q, ln_weight, ln_bias, eps);
}

Tensor ttt_mlp(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& eta, const Tensor& W1,
               const Tensor& b1, const Tensor& W2, const Tensor& b2, const Tensor& ln_weight,
               const Tensor& ln_bias, int64_t mini_batch, double eps) {
  check_inputs(q, k, v, eta, mini_batch, eps);
  const int64_t H = q.size(1), d = q.size(3);
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
  const MiniBatches m = split(q, k, v, eta, ln_weight, ln_bias, mini_batch);
  Tensor W1b = stacked_weights(W1, b1, m.B);                          // [W1; b1], [B·H, d + 1, h]
  Tensor W2c = W2.unsqueeze(0).expand({m.B, H, h, d}).flatten(0, 1);  // [B·H, h, d]
  Tensor b2c = per_head(b2, m.B);                                     // [B·H, 1, d]
  std::vector<Tensor> zq;
  zq.reserve(m.n);
  for (int64_t i = 0; i < m.n; ++i) {
    // the inner model on the keys at θ_p, and its gradients (one row per token)
    const Tensor Z1 = at::bmm(m.K[i], W1b);  // [B·H, b, h]
    const Tensor X2 = at::gelu(Z1, "tanh");
    const Tensor D2 = ln_l2_descent(at::baddbmm(b2c, X2, W2c), m.c[i], m.neg_gamma2, eps);  // [B·H, b, d]
    const Tensor D1 = at::gelu_backward(at::bmm(D2, W2c.transpose(-1, -2)), Z1, "tanh");    // [B·H, b, h]
    // the queries under θ_t, layer by layer (dual form of each layer's update)
    const Tensor Xq2 = at::gelu(at::baddbmm(at::bmm(m.Q[i], W1b), m.coef[i], D1), "tanh");
    const Tensor coef2 = dual_coefficients(at::bmm(Xq2, X2.transpose(-1, -2)) + 1, m.eta[i], m.causal);
    zq.push_back(at::baddbmm(at::baddbmm(b2c, Xq2, W2c), coef2, D2));
    if (i + 1 < m.n) {
      const Tensor e = m.eta[i].unsqueeze(-1);
      const Tensor eD1 = D1 * e, eD2 = D2 * e;
      W1b = at::baddbmm(W1b, m.K[i].transpose(-1, -2), eD1);
      W2c = at::baddbmm(W2c, X2.transpose(-1, -2), eD2);
      b2c = b2c + eD2.sum(-2, true);
    }
  }
  return finish(m, zq, q, ln_weight, ln_bias, eps);
}

}  // namespace eqprop::ttt
