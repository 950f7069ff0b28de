// The equilibrium transformer block F(z; x) (docs/design.md §4), computed with ATen ops from parameter
// tensors passed in, so that autograd records it when it is called from Python and the engine can
// differentiate it (first and second order) through eqprop::AutogradField.
//
//   coupled     F(z; x) = x + Attn(LN1(z)) + FFN(LN2(z))
//   sequential  F(z; x) = h + FFN(LN2(h)),   h = x + Attn(LN1(z))
//
// z, x: [B, T, C] real (float32/float64/bfloat16/float16) or complex (complex64/complex128). Complex
// input runs the holomorphic extension: the (real) parameters are promoted to complex and every
// nonlinearity is a holomorphic function (no abs, conj, or real-part except in detached constants).
//
// The raw parameters are the ones the optimizer updates; the weights F actually uses ("effective"
// weights) are derived from them on the autograd graph: spectral normalization W / max(1, σ/ρ)
// with σ = ‖Wᵀu‖ for a power-iteration vector u that is updated off-graph, and the monotone FFN
// matrix W̃ built from A and B (see MonotoneFFN below).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace eqprop::block {

enum class Coupling { kCoupled, kSequential };
enum class Attention { kSoftmax, kEnergy };
enum class Ffn { kMlp, kMonotone };
// Which attention kernel the softmax branch uses: "auto" takes at::scaled_dot_product_attention for
// real input when autograd is not recording (its backward is not twice differentiable, and the
// engine's JVPs are double VJPs), the explicit masked softmax otherwise; "math" always the latter.
enum class AttnKernel { kAuto, kMath };

struct BlockConfig {
  int64_t d_model = 0;
  int64_t n_heads = 0;
  int64_t d_ff = 0;  // hidden width of the mlp FFN (d_model * mlp_ratio); unused by monotone
  Coupling coupling = Coupling::kCoupled;
  Attention attention = Attention::kSoftmax;
  Ffn ffn = Ffn::kMlp;
  bool qk_norm = true;
  bool bias = false;  // biases of every linear map and of the LayerNorms (nanoGPT convention)
  bool rope = false;  // rotate q and k by their positions 0..T-1 inside attention
  double rope_base = 10000.0;
  std::optional<double> spectral_rho;  // cap on ‖W‖₂ of the attention / FFN weights; none if unset
  double monotone_m = 0.1;             // monotonicity margin m of the monotone FFN: I − W̃ ⪰ m I
  double ln_eps = 1e-5;
  double qk_eps = 1e-6;
  AttnKernel attn_kernel = AttnKernel::kAuto;

  int64_t head_dim() const { return d_model / n_heads; }
};

// Validates every field (TORCH_CHECK_VALUE naming the option, its value and what is needed) and
// returns the config; string options are parsed here so the Python side has one source of truth.
BlockConfig make_config(int64_t d_model, int64_t n_heads, int64_t d_ff, const std::string& coupling,
                        const std::string& attention, const std::string& ffn, bool qk_norm, bool bias,
                        bool rope, double rope_base, std::optional<double> spectral_rho, double monotone_m,
                        double ln_eps, double qk_eps, const std::string& attn_kernel);
std::string to_string(Coupling c);
std::string to_string(Attention a);
std::string to_string(Ffn f);
std::string to_string(AttnKernel k);

struct Weights;

// ---- the parameter table: the one list of the block's parameter names --------------------------
//
// Every raw parameter a block may have, in order: its name (also the nn.Parameter name in Python,
// the key of the plain reference eqprop.reference.block, and the state_dict key), which options
// it needs, its shape, whether spectral_rho normalizes it, the Weights member the effective weight
// lands in, and how EquilibriumBlock.reset_parameters starts it. param_specs, effective_weights,
// Weights::named, the Python init rule and the reference's list of spectral weights all read it.

// Options a parameter needs (bit mask; all must hold).
enum Needs : unsigned {
  kAlways = 0,
  kBias = 1,       // bias=True
  kSoftmax = 2,    // attention="softmax" (value and output projections)
  kEnergy = 4,     // attention="energy"
  kQkNorm = 8,     // qk_norm=True
  kMlp = 16,       // ffn="mlp"
  kMonotone = 32,  // ffn="monotone"
};
// Shape in terms of C = d_model, d = head_dim, H = n_heads, D = d_ff.
enum class ParamShape { kC, kCxC, kHeadDim, kHeads, kDxC, kCxD, kD };
// The initial value (docs/design.md §4): one; zero; N(0, 1/fan_in); N(0, 1/fan_in) times resinit (the
// output projections); the constant resinit (the energy gain); N(0, 1/C²) (monotone A, B).
enum class ParamInit { kOne, kZero, kFanIn, kFanInResinit, kResinit, kMonotone };

struct ParamInfo {
  const char* name;
  unsigned needs;
  ParamShape shape;
  bool spectral;                 // normalized when spectral_rho is set
  at::Tensor Weights::* weight;  // its effective weight in Weights (nullptr: enters through W̃ only)
  ParamInit init;
};
const std::vector<ParamInfo>& param_table();
std::string to_string(ParamInit i);  // "one", "zero", "fan_in", "fan_in_resinit", "resinit", "monotone"

// One raw parameter of a config: its name, shape, and whether it is spectrally normalized (then it
// has a power-iteration vector u of shape [shape[0]]).
struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;
  bool spectral;
};
// The raw parameters of a config (param_table rows whose options hold), in the order every
// function below takes them.
std::vector<ParamSpec> param_specs(const BlockConfig& cfg);

// Checks the parameter list against param_specs (count, shapes, dtype, device) and the spectral
// vectors (one per spectral parameter when spectral_rho is set, else none).
void check_params(const BlockConfig& cfg, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& sn_u);

// The weights F uses, by name; undefined tensors for options that are off. Real dtype.
struct Weights {
  at::Tensor ln1_w, ln1_b, ln2_w, ln2_b;
  at::Tensor wq, wk, wv, wo, bq, bk, bv, bo, q_norm, k_norm, energy_gain;
  at::Tensor w1, b1, w2, b2;  // mlp
  at::Tensor w_mono, b_mono;  // monotone: W̃ and its bias
  at::Tensor wqkv, bqkv;      // optional [3C, C] / [3C] concatenation of q, k, v (one GEMM); set
                              // by fuse_qkv() for the cached weights of the relaxation loop
  void fuse_qkv();
  Weights to(at::ScalarType dtype) const;  // promote all (e.g. to complex)
  std::vector<std::pair<std::string, at::Tensor>> named() const;
};

// Effective weights from raw parameters, on the autograd graph (docs/design.md §4):
//   spectral: W_eff = W / max(1, σ/ρ),  σ = ‖Wᵀu‖₂ (= ‖W‖₂ when u is the top left singular vector)
//   monotone: W = (1−m)I − AᵀA + B − Bᵀ,  W̃ = c·W,  c = min(1, cap / β(A, B)),
//             β = max(1−m, ‖A‖_F² − (1−m)) + ‖B − Bᵀ‖_F  ≥ ‖W‖₂,   cap = min(1−m, ρ)
// so ‖W̃‖₂ ≤ 1 − m < 1 (contractive) and I − W̃ keeps a symmetric part ⪰ m I (monotone).
Weights effective_weights(const BlockConfig& cfg, const std::vector<at::Tensor>& params,
                          const std::vector<at::Tensor>& sn_u);

// One step of power iteration on every spectral parameter, in place on sn_u, off the graph:
// u ← normalize(W normalize(Wᵀu)). No-op without spectral_rho.
void power_iteration_(const BlockConfig& cfg, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& sn_u, int64_t n_iter);

// F(z; x) from effective weights. No input checks (callers check once at their boundary).
at::Tensor apply(const BlockConfig& cfg, const Weights& w, const at::Tensor& z, const at::Tensor& x);

// The attention branch alone, Attn(u) for u = LN1(z) (energy: −∇_u E(u)); for Jacobian tests.
at::Tensor attention(const BlockConfig& cfg, const Weights& w, const at::Tensor& u);
// The FFN branch alone, FFN(u) for u = LN2(·).
at::Tensor ffn(const BlockConfig& cfg, const Weights& w, const at::Tensor& u);
// The attention energy E(u) of attention="energy" ([B]; one value per sample):
//   E(u) = −Σ_h (γ_h/β) Σ_t log Σ_{s≤t} exp(β q_t^h·k_s^h),   β = 1/√d
at::Tensor energy(const BlockConfig& cfg, const Weights& w, const at::Tensor& u);

// Checks z, x (shape [B, T, C], matching dtypes, devices, finite x) against the config and the
// parameters (the finiteness check syncs with the device, so fields do it once, when x is bound).
void check_inputs(const BlockConfig& cfg, const std::vector<at::Tensor>& params, const at::Tensor& z,
                  const at::Tensor& x, bool check_x_finite);

// The public entry: checks, effective weights, F(z; x).
at::Tensor forward(const BlockConfig& cfg, const std::vector<at::Tensor>& params,
                   const std::vector<at::Tensor>& sn_u, const at::Tensor& z, const at::Tensor& x);

}  // namespace eqprop::block
