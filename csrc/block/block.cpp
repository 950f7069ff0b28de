// The equilibrium transformer block (docs/design.md §4); see block.h for the equations.
#include "block/block.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <map>

namespace eqprop::block {
namespace {

using at::Tensor;

// ---- config parsing --------------------------------------------------------------------------

template <typename E>
E parse_option(const std::string& arg, const std::string& value,
               const std::vector<std::pair<std::string, E>>& choices) {
  std::string valid;
  for (const auto& [name, e] : choices) {
    if (name == value) return e;
    valid += (valid.empty() ? "\"" : ", \"") + name + "\"";
  }
  TORCH_CHECK_VALUE(false, arg, " must be one of ", valid, "; got \"", value, "\"");
}

bool is_real_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// ---- holomorphic building blocks ---------------------------------------------------------------

// LayerNorm over the last dim, y = (z − μ)·(mean((z − μ)²) + ε)^(−1/2)·w + b. Complex input uses
// the squares themselves (not |·|²) and the principal branch of the inverse square root, so the
// map is holomorphic; real input takes the fused kernel (same function).
Tensor layer_norm(const Tensor& z, const Tensor& w, const Tensor& b, double eps) {
  if (!z.is_complex()) return at::layer_norm(z, {z.size(-1)}, w, b, eps);
  Tensor zc = z - z.mean(-1, /*keepdim=*/true);
  Tensor y = zc * at::rsqrt((zc * zc).mean(-1, true) + eps) * w;
  return b.defined() ? y + b : y;
}

// RMS norm of each head vector (qk-norm): a·(mean(a²) + ε)^(−1/2)·g, holomorphic as above.
Tensor rms_norm(const Tensor& a, const Tensor& g, double eps) {
  return a * at::rsqrt((a * a).mean(-1, true) + eps) * g;
}

// (∂ rms_norm / ∂a)ᵀ G for the energy gradient: with r = (mean(a²) + ε)^(−1/2), w = g ⊙ G,
//   Jᵀ G = r·w − r³·a·mean(a ⊙ w)      (plain transpose, valid for complex a)
Tensor rms_norm_transpose(const Tensor& a, const Tensor& g, double eps, const Tensor& G) {
  Tensor r = at::rsqrt((a * a).mean(-1, true) + eps);
  Tensor w = g * G;
  return r * w - r * r * r * a * (a * w).mean(-1, true);
}

// tanh-form GELU, 0.5·x·(1 + tanh(√(2/π)(x + 0.044715 x³))): an entire-function composition.
Tensor gelu_tanh(const Tensor& x) {
  if (!x.is_complex()) return at::gelu(x, "tanh");
  const double k = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1.0 + at::tanh(k * (x + 0.044715 * x * x * x)));
}

// Boolean [T, T] mask, true where key s may be seen by query t (s ≤ t).
Tensor causal_mask(int64_t T, const at::Device& device) {
  return at::ones({T, T}, at::TensorOptions().dtype(at::kBool).device(device)).tril();
}

// Causal softmax over the last dim. Complex: exp(S − m) with m the detached max of Re S over the
// visible keys (softmax is invariant to it, so the map stays holomorphic); hidden entries are
// computed from 0 and then set to exactly 0, so no inf·0 reaches the backward pass.
Tensor causal_softmax(const Tensor& S, const Tensor& mask) {
  if (!S.is_complex()) return at::softmax(S.masked_fill(mask.logical_not(), -INFINITY), -1);
  Tensor m = at::where(mask, at::real(S), -INFINITY).amax(-1, true).detach();
  Tensor e = at::where(mask, at::exp(at::where(mask, S - m, at::zeros({}, S.options()))),
                       at::zeros({}, S.options()));
  return e / e.sum(-1, true);
}

// log Σ_{s≤t} exp(S_ts) over the last dim, holomorphic as causal_softmax.
Tensor causal_logsumexp(const Tensor& S, const Tensor& mask) {
  if (!S.is_complex()) return at::logsumexp(S.masked_fill(mask.logical_not(), -INFINITY), -1);
  Tensor m = at::where(mask, at::real(S), -INFINITY).amax(-1, true).detach();
  Tensor e = at::where(mask, at::exp(at::where(mask, S - m, at::zeros({}, S.options()))),
                       at::zeros({}, S.options()));
  return at::log(e.sum(-1)) + m.squeeze(-1);
}

// ---- heads and rotary positions ----------------------------------------------------------------

Tensor split_heads(const Tensor& a, int64_t H) {  // [B, T, C] -> [B, H, T, d]
  return a.unflatten(-1, {H, a.size(-1) / H}).transpose(1, 2);
}
Tensor merge_heads(const Tensor& a) {  // [B, H, T, d] -> [B, T, C]
  return a.transpose(1, 2).flatten(2);
}

// RoPE (rotate-half convention): position t, pair (i, i + d/2) rotated by angle t·base^(−2i/d).
// cos, sin: [T, d] in the real dtype of the input, computed in float64 first.
struct Rope {
  Tensor cos, sin;
};
Rope rope_tables(int64_t T, int64_t d, double base, const Tensor& like) {
  auto opts = at::TensorOptions().dtype(at::kDouble).device(like.device());
  Tensor inv_freq = at::pow(base, -at::arange(0, d / 2, opts) * (2.0 / d));  // [d/2]
  Tensor ang = at::outer(at::arange(0, T, opts), inv_freq);                  // [T, d/2]
  ang = at::cat({ang, ang}, -1);                                             // [T, d]
  auto real = c10::toRealValueType(like.scalar_type());
  return {ang.cos().to(real), ang.sin().to(real)};
}
Tensor rotate_half(const Tensor& a) {
  auto halves = a.chunk(2, -1);
  return at::cat({-halves[1], halves[0]}, -1);
}
Tensor rope_apply(const Tensor& a, const Rope& r) { return a * r.cos + rotate_half(a) * r.sin; }
// Rᵀ g: the rotation by −angle (cos and sin are equal on both halves, so sin commutes with the swap).
Tensor rope_transpose(const Tensor& g, const Rope& r) { return g * r.cos - rotate_half(g) * r.sin; }

// The query or key projection of every head (the same code makes both): `linear` is u W^T + b
// split into heads, before qk-norm and rope (the energy gradient pulls back through it); `vec` is
// the vector the scores use, after qk-norm and rope. Both [B, H, T, d].
struct HeadProj {
  Tensor linear, vec;
};
HeadProj project(const BlockConfig& cfg, const Tensor& u, const Tensor& W, const Tensor& b, const Tensor& g,
                 const Rope* rope) {
  HeadProj p;
  p.linear = split_heads(at::linear(u, W, b), cfg.n_heads);  // [B, T, C] -> [B, H, T, d]
  p.vec = cfg.qk_norm ? rms_norm(p.linear, g, cfg.qk_eps) : p.linear;
  if (rope) p.vec = rope_apply(p.vec, *rope);
  return p;
}

Tensor softmax_attention(const BlockConfig& cfg, const Weights& w, const Tensor& u) {
  const int64_t T = u.size(1), d = cfg.head_dim();
  Rope rope;
  if (cfg.rope) rope = rope_tables(T, d, cfg.rope_base, u);
  const Rope* rp = cfg.rope ? &rope : nullptr;
  Tensor q, k, v;  // [B, H, T, d]
  if (w.wqkv.defined()) {
    auto qkv = at::linear(u, w.wqkv, w.bqkv).chunk(3, -1);  // [B, T, 3C] -> 3 x [B, T, C]
    auto finish = [&](const Tensor& a, const Tensor& g) {
      Tensor h = split_heads(a, cfg.n_heads);
      if (cfg.qk_norm) h = rms_norm(h, g, cfg.qk_eps);
      return rp ? rope_apply(h, *rp) : h;
    };
    q = finish(qkv[0], w.q_norm);
    k = finish(qkv[1], w.k_norm);
    v = split_heads(qkv[2], cfg.n_heads);
  } else {
    q = project(cfg, u, w.wq, w.bq, w.q_norm, rp).vec;
    k = project(cfg, u, w.wk, w.bk, w.k_norm, rp).vec;
    v = split_heads(at::linear(u, w.wv, w.bv), cfg.n_heads);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  Tensor o;
  if (cfg.attn_kernel == AttnKernel::kAuto && !u.is_complex() && !at::GradMode::is_enabled()) {
    o = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true,
                                         /*scale=*/scale);
  } else {
    Tensor P = causal_softmax(at::matmul(q, k.transpose(-1, -2)) * scale,  // [B, H, T, T]
                              causal_mask(T, u.device()));
    o = at::matmul(P, v);  // [B, H, T, T] @ [B, H, T, d] -> [B, H, T, d]
  }
  return at::linear(merge_heads(o), w.wo, w.bo);
}

// Energy attention: −∇_u E(u) in closed form (E in block.h). With P = causal softmax(β q kᵀ),
//   −∂E/∂q = γ P k,   −∂E/∂k = γ Pᵀ q,
// pulled back through rope (Rᵀ), qk-norm (rms_norm_transpose) and the projections (·W).
// Being a gradient, its Jacobian in u is −∇²E: symmetric.
Tensor energy_attention(const BlockConfig& cfg, const Weights& w, const Tensor& u) {
  const int64_t T = u.size(1), d = cfg.head_dim();
  Rope rope;
  if (cfg.rope) rope = rope_tables(T, d, cfg.rope_base, u);
  const Rope* rp = cfg.rope ? &rope : nullptr;
  HeadProj q = project(cfg, u, w.wq, w.bq, w.q_norm, rp);
  HeadProj k = project(cfg, u, w.wk, w.bk, w.k_norm, rp);
  const double beta = 1.0 / std::sqrt(static_cast<double>(d));
  Tensor P = causal_softmax(at::matmul(q.vec, k.vec.transpose(-1, -2)) * beta, causal_mask(T, u.device()));
  Tensor gamma = w.energy_gain.view({1, -1, 1, 1});            // [1, H, 1, 1]
  Tensor gq = gamma * at::matmul(P, k.vec);                    // [B, H, T, d]
  Tensor gk = gamma * at::matmul(P.transpose(-1, -2), q.vec);  // [B, H, T, d]
  if (rp) {
    gq = rope_transpose(gq, rope);
    gk = rope_transpose(gk, rope);
  }
  if (cfg.qk_norm) {
    gq = rms_norm_transpose(q.linear, w.q_norm, cfg.qk_eps, gq);
    gk = rms_norm_transpose(k.linear, w.k_norm, cfg.qk_eps, gk);
  }
  // [B, T, C] @ [C, C]: the transpose of u ↦ u Wᵀ
  return at::matmul(merge_heads(gq), w.wq) + at::matmul(merge_heads(gk), w.wk);
}

int64_t count_spectral(const std::vector<ParamSpec>& specs) {
  int64_t n = 0;
  for (const auto& s : specs) n += s.spectral;
  return n;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

// ---- config ------------------------------------------------------------------------------------

std::string to_string(Coupling c) { return c == Coupling::kCoupled ? "coupled" : "sequential"; }
std::string to_string(Attention a) { return a == Attention::kSoftmax ? "softmax" : "energy"; }
std::string to_string(Ffn f) { return f == Ffn::kMlp ? "mlp" : "monotone"; }
std::string to_string(AttnKernel k) { return k == AttnKernel::kAuto ? "auto" : "math"; }

BlockConfig make_config(int64_t d_model, int64_t n_heads, int64_t d_ff, const std::string& coupling,
                        const std::string& attention, const std::string& ffn, bool qk_norm, bool bias,
                        bool rope, double rope_base, std::optional<double> spectral_rho, double monotone_m,
                        double ln_eps, double qk_eps, const std::string& attn_kernel) {
  BlockConfig c;
  TORCH_CHECK_VALUE(d_model >= 1, "d_model must be >= 1, got ", d_model);
  TORCH_CHECK_VALUE(n_heads >= 1, "n_heads must be >= 1, got ", n_heads);
  TORCH_CHECK_VALUE(d_model % n_heads == 0, "d_model must be divisible by n_heads, got d_model=", d_model,
                    " and n_heads=", n_heads);
  c.d_model = d_model;
  c.n_heads = n_heads;
  c.coupling = parse_option<Coupling>(
      "coupling", coupling, {{"coupled", Coupling::kCoupled}, {"sequential", Coupling::kSequential}});
  c.attention = parse_option<Attention>("attention", attention,
                                        {{"softmax", Attention::kSoftmax}, {"energy", Attention::kEnergy}});
  c.ffn = parse_option<Ffn>("ffn", ffn, {{"mlp", Ffn::kMlp}, {"monotone", Ffn::kMonotone}});
  c.attn_kernel = parse_option<AttnKernel>("attn_kernel", attn_kernel,
                                           {{"auto", AttnKernel::kAuto}, {"math", AttnKernel::kMath}});
  if (c.ffn == Ffn::kMlp) {
    TORCH_CHECK_VALUE(d_ff >= 1, "d_ff (d_model * mlp_ratio) must be >= 1 for ffn=\"mlp\", got ", d_ff);
  }
  c.d_ff = d_ff;
  c.qk_norm = qk_norm;
  c.bias = bias;
  c.rope = rope;
  if (rope) {
    TORCH_CHECK_VALUE(c.head_dim() % 2 == 0, "rope needs an even head dimension d_model / n_heads, got ",
                      c.head_dim(), " (d_model=", d_model, ", n_heads=", n_heads, ")");
  }
  TORCH_CHECK_VALUE(std::isfinite(rope_base) && rope_base > 1.0,
                    "rope_base must be a finite number > 1, got ", rope_base);
  c.rope_base = rope_base;
  if (spectral_rho.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*spectral_rho) && *spectral_rho > 0.0,
                      "spectral_rho must be a finite number > 0 (or None), got ", *spectral_rho);
  }
  c.spectral_rho = spectral_rho;
  TORCH_CHECK_VALUE(monotone_m > 0.0 && monotone_m < 1.0, "monotone_m must be in (0, 1), got ", monotone_m);
  c.monotone_m = monotone_m;
  TORCH_CHECK_VALUE(ln_eps > 0.0 && std::isfinite(ln_eps), "ln_eps must be a finite number > 0, got ",
                    ln_eps);
  TORCH_CHECK_VALUE(qk_eps > 0.0 && std::isfinite(qk_eps), "qk_eps must be a finite number > 0, got ",
                    qk_eps);
  c.ln_eps = ln_eps;
  c.qk_eps = qk_eps;
  return c;
}

const std::vector<ParamInfo>& param_table() {
  using S = ParamShape;
  using I = ParamInit;
  static const std::vector<ParamInfo> table = {
      {"ln1_weight", kAlways, S::kC, false, &Weights::ln1_w, I::kOne},
      {"ln1_bias", kBias, S::kC, false, &Weights::ln1_b, I::kZero},
      {"q_weight", kAlways, S::kCxC, true, &Weights::wq, I::kFanIn},
      {"k_weight", kAlways, S::kCxC, true, &Weights::wk, I::kFanIn},
      {"v_weight", kSoftmax, S::kCxC, true, &Weights::wv, I::kFanIn},
      {"o_weight", kSoftmax, S::kCxC, true, &Weights::wo, I::kFanInResinit},
      {"q_bias", kBias, S::kC, false, &Weights::bq, I::kZero},
      {"k_bias", kBias, S::kC, false, &Weights::bk, I::kZero},
      {"v_bias", kSoftmax | kBias, S::kC, false, &Weights::bv, I::kZero},
      {"o_bias", kSoftmax | kBias, S::kC, false, &Weights::bo, I::kZero},
      {"q_norm_weight", kQkNorm, S::kHeadDim, false, &Weights::q_norm, I::kOne},
      {"k_norm_weight", kQkNorm, S::kHeadDim, false, &Weights::k_norm, I::kOne},
      {"energy_gain", kEnergy, S::kHeads, false, &Weights::energy_gain, I::kResinit},
      {"ln2_weight", kAlways, S::kC, false, &Weights::ln2_w, I::kOne},
      {"ln2_bias", kBias, S::kC, false, &Weights::ln2_b, I::kZero},
      {"ffn_in_weight", kMlp, S::kDxC, true, &Weights::w1, I::kFanIn},
      {"ffn_out_weight", kMlp, S::kCxD, true, &Weights::w2, I::kFanInResinit},
      {"ffn_in_bias", kMlp | kBias, S::kD, false, &Weights::b1, I::kZero},
      {"ffn_out_bias", kMlp | kBias, S::kC, false, &Weights::b2, I::kZero},
      {"mono_A", kMonotone, S::kCxC, false, nullptr, I::kMonotone},
      {"mono_B", kMonotone, S::kCxC, false, nullptr, I::kMonotone},
      {"mono_bias", kMonotone | kBias, S::kC, false, &Weights::b_mono, I::kZero},
  };
  return table;
}

std::string to_string(ParamInit i) {
  switch (i) {
    case ParamInit::kOne:
      return "one";
    case ParamInit::kZero:
      return "zero";
    case ParamInit::kFanIn:
      return "fan_in";
    case ParamInit::kFanInResinit:
      return "fan_in_resinit";
    case ParamInit::kResinit:
      return "resinit";
    case ParamInit::kMonotone:
      return "monotone";
  }
  return "?";
}

namespace {
bool holds(unsigned needs, const BlockConfig& cfg) {
  const bool energy = cfg.attention == Attention::kEnergy;
  return (!(needs & kBias) || cfg.bias) && (!(needs & kSoftmax) || !energy) &&
         (!(needs & kEnergy) || energy) && (!(needs & kQkNorm) || cfg.qk_norm) &&
         (!(needs & kMlp) || cfg.ffn == Ffn::kMlp) && (!(needs & kMonotone) || cfg.ffn == Ffn::kMonotone);
}
std::vector<int64_t> shape_of(ParamShape s, const BlockConfig& cfg) {
  const int64_t C = cfg.d_model, D = cfg.d_ff;
  switch (s) {
    case ParamShape::kC:
      return {C};
    case ParamShape::kCxC:
      return {C, C};
    case ParamShape::kHeadDim:
      return {cfg.head_dim()};
    case ParamShape::kHeads:
      return {cfg.n_heads};
    case ParamShape::kDxC:
      return {D, C};
    case ParamShape::kCxD:
      return {C, D};
    case ParamShape::kD:
      return {D};
  }
  return {};
}
}  // namespace

std::vector<ParamSpec> param_specs(const BlockConfig& cfg) {
  const bool sn = cfg.spectral_rho.has_value();
  std::vector<ParamSpec> s;
  for (const auto& p : param_table())
    if (holds(p.needs, cfg)) s.push_back({p.name, shape_of(p.shape, cfg), sn && p.spectral});
  return s;
}

void check_params(const BlockConfig& cfg, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& sn_u) {
  const auto specs = param_specs(cfg);
  TORCH_CHECK_VALUE(params.size() == specs.size(), "params must hold the ", specs.size(),
                    " parameters of this config (eqprop._C.block_param_specs), got ", params.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const auto& p = params[i];
    const auto& name = specs[i].name;
    TORCH_CHECK_VALUE(p.defined(), "parameter ", name, " must be a tensor, got None");
    TORCH_CHECK_VALUE(p.sizes().vec() == specs[i].shape, "parameter ", name, " must have shape ",
                      shape_str(specs[i].shape), ", got ", p.sizes());
    TORCH_CHECK_VALUE(is_real_float(p.scalar_type()), "parameter ", name,
                      " must be a real floating tensor (complex input promotes it), got ", p.scalar_type());
    TORCH_CHECK_VALUE(p.scalar_type() == params[0].scalar_type(), "all parameters must share one dtype; ",
                      specs[0].name, " is ", params[0].scalar_type(), " but ", name, " is ", p.scalar_type());
    TORCH_CHECK_VALUE(p.device() == params[0].device(), "all parameters must be on one device; ",
                      specs[0].name, " is on ", params[0].device(), " but ", name, " is on ", p.device());
  }
  const int64_t n_sn = count_spectral(specs);
  TORCH_CHECK_VALUE(static_cast<int64_t>(sn_u.size()) == n_sn, "sn_u must hold ", n_sn,
                    " power-iteration vectors (one per spectrally normalized weight",
                    cfg.spectral_rho ? "" : "; spectral_rho is None", "), got ", sn_u.size());
  size_t j = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    if (!specs[i].spectral) continue;
    const auto& u = sn_u[j++];
    TORCH_CHECK_VALUE(u.defined() && u.dim() == 1 && u.size(0) == specs[i].shape[0], "sn_u for ",
                      specs[i].name, " must have shape [", specs[i].shape[0], "], got ",
                      u.defined() ? c10::str(u.sizes()) : std::string("None"));
    TORCH_CHECK_VALUE(u.scalar_type() == params[i].scalar_type() && u.device() == params[i].device(),
                      "sn_u for ", specs[i].name, " must match its weight's dtype and device (",
                      params[i].scalar_type(), ", ", params[i].device(), "), got ", u.scalar_type(), ", ",
                      u.device());
  }
}

// ---- effective weights ----------------------------------------------------------------------

Weights effective_weights(const BlockConfig& cfg, const std::vector<at::Tensor>& params,
                          const std::vector<at::Tensor>& sn_u) {
  const auto specs = param_specs(cfg);
  std::map<std::string, Tensor> p;
  size_t j = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    Tensor t = params[i];
    if (specs[i].spectral) {
      // W / max(1, σ/ρ) with σ = ‖Wᵀu‖; the gradient flows through σ (u is a constant). The graph
      // keeps a copy of u: training-mode forwards update sn_u in place before earlier graphs
      // (e.g. several BPTT steps) have run backward.
      Tensor sigma = at::linalg_vector_norm(at::matmul(sn_u[j++].detach().clone(), t));
      t = t / at::clamp_min(sigma / *cfg.spectral_rho, 1.0);
    }
    p[specs[i].name] = t;
  }
  Weights w;
  for (const auto& info : param_table()) {
    auto it = p.find(info.name);
    if (info.weight && it != p.end()) w.*(info.weight) = it->second;
  }
  if (cfg.ffn == Ffn::kMonotone) {
    // W = (1−m)I − AᵀA + B − Bᵀ scaled by c = min(1, cap/β), β ≥ ‖W‖₂ (block.h).
    const Tensor& A = p["mono_A"];
    const Tensor& B = p["mono_B"];
    const double m = cfg.monotone_m;
    Tensor K = B - B.t();
    Tensor W = (1.0 - m) * at::eye(cfg.d_model, A.options()) - at::matmul(A.t(), A) + K;
    Tensor bound = at::clamp_min(A.square().sum() - (1.0 - m), 1.0 - m) + at::linalg_vector_norm(K);
    const double cap = cfg.spectral_rho ? std::min(1.0 - m, *cfg.spectral_rho) : 1.0 - m;
    w.w_mono = W * at::clamp_max(cap / bound, 1.0);
  }
  return w;
}

Weights Weights::to(at::ScalarType dtype) const {
  Weights o = *this;
  for (Tensor* t : {&o.ln1_w, &o.ln1_b, &o.ln2_w, &o.ln2_b,  &o.wq,     &o.wk,     &o.wv,          &o.wo,
                    &o.bq,    &o.bk,    &o.bv,    &o.bo,     &o.q_norm, &o.k_norm, &o.energy_gain, &o.w1,
                    &o.b1,    &o.w2,    &o.b2,    &o.w_mono, &o.b_mono, &o.wqkv,   &o.bqkv}) {
    if (t->defined()) *t = t->to(dtype);
  }
  return o;
}

void Weights::fuse_qkv() {
  if (!wv.defined()) return;  // energy attention has no value projection
  wqkv = at::cat({wq, wk, wv}, 0);
  if (bq.defined()) bqkv = at::cat({bq, bk, bv}, 0);
}

std::vector<std::pair<std::string, at::Tensor>> Weights::named() const {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& info : param_table()) {
    if (info.weight && (this->*(info.weight)).defined()) out.emplace_back(info.name, this->*(info.weight));
  }
  if (w_mono.defined()) out.emplace_back("mono_W", w_mono);
  return out;
}

void power_iteration_(const BlockConfig& cfg, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& sn_u, int64_t n_iter) {
  check_params(cfg, params, sn_u);
  TORCH_CHECK_VALUE(n_iter >= 0, "n_iter must be >= 0, got ", n_iter);
  at::NoGradGuard no_grad;
  const auto specs = param_specs(cfg);
  size_t j = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    if (!specs[i].spectral) continue;
    const Tensor W = params[i].detach();
    const Tensor& u = sn_u[j++];
    Tensor uu = u.clone();
    for (int64_t it = 0; it < n_iter; ++it) {
      Tensor v = at::matmul(uu, W);  // Wᵀu: [out] @ [out, in] -> [in]
      v = v / at::clamp_min(at::linalg_vector_norm(v), 1e-12);
      uu = at::matmul(W, v);
      uu = uu / at::clamp_min(at::linalg_vector_norm(uu), 1e-12);
    }
    u.copy_(uu);
  }
}

// ---- F ------------------------------------------------------------------------------------------

at::Tensor attention(const BlockConfig& cfg, const Weights& w, const at::Tensor& u) {
  return cfg.attention == Attention::kSoftmax ? softmax_attention(cfg, w, u) : energy_attention(cfg, w, u);
}

at::Tensor ffn(const BlockConfig& cfg, const Weights& w, const at::Tensor& u) {
  if (cfg.ffn == Ffn::kMlp) return at::linear(gelu_tanh(at::linear(u, w.w1, w.b1)), w.w2, w.b2);
  return at::tanh(at::linear(u, w.w_mono, w.b_mono));  // ‖J‖₂ ≤ ‖W̃‖₂ ≤ 1 − m for real u
}

at::Tensor energy(const BlockConfig& cfg, const Weights& w, const at::Tensor& u) {
  TORCH_CHECK_VALUE(cfg.attention == Attention::kEnergy, "energy() needs attention=\"energy\", got \"",
                    to_string(cfg.attention), "\"");
  const int64_t T = u.size(1), d = cfg.head_dim();
  Rope rope;
  if (cfg.rope) rope = rope_tables(T, d, cfg.rope_base, u);
  const Rope* rp = cfg.rope ? &rope : nullptr;
  Tensor q = project(cfg, u, w.wq, w.bq, w.q_norm, rp).vec;
  Tensor k = project(cfg, u, w.wk, w.bk, w.k_norm, rp).vec;
  const double beta = 1.0 / std::sqrt(static_cast<double>(d));
  Tensor lse = causal_logsumexp(at::matmul(q, k.transpose(-1, -2)) * beta, causal_mask(T, u.device()));
  // [B, H, T] -> [B]
  return -(w.energy_gain.view({1, -1, 1}) * lse).sum({1, 2}) / beta;
}

at::Tensor apply(const BlockConfig& cfg, const Weights& w, const at::Tensor& z, const at::Tensor& x) {
  Tensor a = attention(cfg, w, layer_norm(z, w.ln1_w, w.ln1_b, cfg.ln_eps));
  if (cfg.coupling == Coupling::kCoupled) {
    return x + a + ffn(cfg, w, layer_norm(z, w.ln2_w, w.ln2_b, cfg.ln_eps));
  }
  Tensor h = x + a;
  return h + ffn(cfg, w, layer_norm(h, w.ln2_w, w.ln2_b, cfg.ln_eps));
}

void check_inputs(const BlockConfig& cfg, const std::vector<at::Tensor>& params, const at::Tensor& z,
                  const at::Tensor& x, bool check_x_finite) {
  TORCH_CHECK_VALUE(z.defined(), "z must be a tensor, got None");
  TORCH_CHECK_VALUE(x.defined(), "x must be a tensor, got None");
  TORCH_CHECK_VALUE(z.dim() == 3 && z.size(2) == cfg.d_model,
                    "z must be [B, T, C] with C = d_model = ", cfg.d_model, ", got shape ", z.sizes());
  TORCH_CHECK_VALUE(x.sizes() == z.sizes(), "x must have the shape of z ", z.sizes(), ", got ", x.sizes());
  TORCH_CHECK_VALUE(z.size(1) >= 1, "z must have at least one position (T >= 1), got shape ", z.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == z.scalar_type(), "x must have the dtype of z (", z.scalar_type(),
                    "), got ", x.scalar_type());
  TORCH_CHECK_VALUE(z.device() == x.device(), "x must be on the device of z (", z.device(), "), got ",
                    x.device());
  const auto pdt = params.at(0).scalar_type();
  if (z.is_complex()) {
    TORCH_CHECK_VALUE(c10::toRealValueType(z.scalar_type()) == pdt, "complex z of dtype ", z.scalar_type(),
                      " needs parameters of dtype ", c10::toRealValueType(z.scalar_type()), ", got ", pdt);
  } else {
    TORCH_CHECK_VALUE(is_real_float(z.scalar_type()), "z must be a floating or complex tensor, got ",
                      z.scalar_type());
    TORCH_CHECK_VALUE(z.scalar_type() == pdt, "z must have the parameters' dtype (", pdt, "), got ",
                      z.scalar_type());
  }
  TORCH_CHECK_VALUE(z.device() == params[0].device(), "z and x must be on the parameters' device (",
                    params[0].device(), "), got ", z.device());
  if (check_x_finite) {
    TORCH_CHECK_VALUE(at::isfinite(x).all().item<bool>(), "x (the injection) must be finite, got ",
                      at::logical_not(at::isfinite(x)).sum().item<int64_t>(), " non-finite entries");
  }
}

at::Tensor forward(const BlockConfig& cfg, const std::vector<at::Tensor>& params,
                   const std::vector<at::Tensor>& sn_u, const at::Tensor& z, const at::Tensor& x) {
  check_params(cfg, params, sn_u);
  check_inputs(cfg, params, z, x, /*check_x_finite=*/true);
  Weights w = effective_weights(cfg, params, sn_u);
  if (z.is_complex()) w = w.to(z.scalar_type());
  return apply(cfg, w, z, x);
}

}  // namespace eqprop::block
