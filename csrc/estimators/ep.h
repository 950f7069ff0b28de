// Equilibrium Propagation over the VectorField interface (docs/design.md §5).
//
// Nudged phase: from z*, damped Euler steps on
//     dz/dt = F(z) − z − β ∂ℓ/∂z(z) + c(z)
// for every nudging point β_k at once: the points are stacked on the batch axis ([P·B, ...],
// point-major: rows k·B … k·B + B − 1 belong to β_k) and relax as ONE batched relaxation of a
// "stacked" field (the field with its injection x repeated P times; complex when any β_k is).
//
// Estimate (one (∂F/∂θ)ᵀ product at z*, by linearity):
//     v = −Re[(1/N) Σ_k m_k (z_{β_k} − z*) / β_k],      ĝ = (∂F/∂θ)ᵀ v
// N = 1: one-sided (β); N = 2: symmetric (±β); N ≥ 3: holomorphic, β_k = r e^{2πik/N}. With the
// conjugate-symmetry shortcut (real field and loss: z_{β̄} = conj z_β) only the points with
// Im β ≥ 0 relax and a point standing for its conjugate pair counts twice (m_k = 2), else m_k = 1.
// Subtracting z* changes nothing for N ≥ 2 (Σ_k 1/β_k = 0) but keeps the O(β) differences exact.
//
// Corrections (asymmetric EP): c(z) = −2A(z̄)(z − z̄), A = ½(J − Jᵀ), i.e. −(J(z̄)δ − J(z̄)ᵀδ) with
// δ = z − z̄: one JVP and one VJP per step. frozen: z̄ = z*; tracking: z̄ = the common mode of the
// nudged states, Re[(1/N) Σ_k m_k z_k] (the mean of the ± pair or of the N points), re-linearized
// at every step.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/complex.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "fields/vector_field.h"
#include "solvers/relax.h"

namespace eqprop::estimators {

enum class Correction { none, frozen, tracking };
Correction parse_correction(const std::string& s);  // "none" / "frozen" / "tracking"
std::string to_string(Correction c);

// The nudging points of one estimate.
struct EPPoints {
  int64_t n_points = 0;                    // N
  double radius = 0.0;                     // r = |β_k|
  bool conjugate_shortcut = false;         // only Im β ≥ 0 relaxed; pairs weighted m_k = 2
  std::vector<c10::complex<double>> beta;  // the relaxed points β_k, k = 0, 1, …
  std::vector<double> weight;              // m_k
  bool is_complex() const;                 // some relaxed β_k has Im β_k ≠ 0 (N ≥ 3)
  int64_t size() const { return static_cast<int64_t>(beta.size()); }
};
// β_k = r e^{2πik/N}, k = 0 … N − 1 (N = 1: {r}; N = 2: {r, −r}); with the shortcut k = 0 … ⌊N/2⌋.
EPPoints ep_points(int64_t n_points, double radius, bool conjugate_shortcut);

// ∂ℓ/∂z at stacked states z [P·B, ...] in the plain-transpose convention (holomorphic derivative
// for complex z): each block of B rows is the gradient of ℓ at that block alone.
using LossGrad = std::function<at::Tensor(const at::Tensor& z)>;

// ---- the standard readout: final LayerNorm → linear head → cross-entropy ----------------------
//
//   h = LN(z)·w + b,  LN(z) = (z − μ)·(mean((z − μ)²) + ε)^(−1/2)   (holomorphic form, §4)
//   logits = h Wᵀ + b_head,  ℓ = (1/n) Σ_{(b,t): y_bt ≠ ignore} [logsumexp(logits_bt) − logits_bt[y_bt]]
//
// n counts the positions with a target in one block of B samples, so ℓ is the mean cross-entropy
// (what nn.functional.cross_entropy(ignore_index=…) gives). The gradient is closed form:
//   ∂ℓ/∂logits = (softmax − onehot(y))/n,  ∂ℓ/∂h = (∂ℓ/∂logits) W,  g = w ⊙ ∂ℓ/∂h,
//   ∂ℓ/∂z = r·(g − mean(g) − x̂·mean(g ⊙ x̂)),  x̂ = (z − μ)·r   (LN's Jacobian is symmetric)
// with softmax as exp(l − m)/Σ exp(l − m), m = max Re l (a constant): no conj or abs, so for complex
// z this is the holomorphic derivative.
struct CrossEntropyReadout {
  at::Tensor ln_weight, ln_bias;      // [C]; ln_bias may be undefined
  at::Tensor head_weight, head_bias;  // [V, C]; [V] or undefined
  at::Tensor targets;                 // [B, T] int64 in [0, V) or ignore_index
  int64_t ignore_index = -100;
  double ln_eps = 1e-5;
  // Checks shapes, dtypes, devices, target range, at least one target (once, at construction).
  CrossEntropyReadout(at::Tensor ln_weight, at::Tensor ln_bias, at::Tensor head_weight, at::Tensor head_bias,
                      at::Tensor targets, int64_t ignore_index, double ln_eps);
  // ℓ of each block: z [P·B, T, C] -> [P] (complex for complex z).
  at::Tensor loss(const at::Tensor& z) const;
  // ∂ℓ/∂z, [P·B, T, C] (plain transpose).
  at::Tensor grad(const at::Tensor& z) const;

 private:
  void check_state(const at::Tensor& z) const;
  at::Tensor logits(const at::Tensor& z, at::Tensor* xhat, at::Tensor* r) const;  // [P·B, T, V]
  int64_t n_targets_ = 0;
};

// ---- stacked fields ------------------------------------------------------------------------------

// The field F(·; x) for P copies of its samples on the batch axis, in complex arithmetic when
// `complex` (then x is promoted). The native block is rebuilt with x repeated (one batched
// evaluation per step); any other field is wrapped and evaluated per block of B rows (F, Jᵀv, Jv
// per point; correct for every field, P calls per step). `batch` is B, the rows of one point.
std::shared_ptr<VectorField> stack_points(const std::shared_ptr<VectorField>& field, int64_t points,
                                          int64_t batch, bool complex);

// ---- the nudged phase and the estimate -----------------------------------------------------------

// A nudged row counts as converged once its residual ‖F(z) + d(z) − z‖ has fallen to tol times its
// first one (the kick ‖F(z*) − z* + d(z*)‖, ≈ ‖β ∂ℓ/∂z*‖): the nudge is O(β), so a criterion
// relative to ‖F(z)‖ would stop a small-β phase before it moved. The same drop ranks snapshots.
struct NudgeOptions {
  double eps = 1.0;         // damping of z ← z + ε(F(z) + d(z) − z)
  double tol = 0.0;         // converged once residual ≤ tol × first residual; all rows: stop
  double divergence = 1e4;  // diverged: residual non-finite or > divergence × the first
  bool trace = true;
  int64_t check_every = 1;  // steps between host checks "has every row converged?"
  std::vector<int64_t> t2;  // snapshot step counts, strictly increasing, ≥ 1
  Correction correction = Correction::none;
};

struct NudgeResult {
  at::Tensor z;             // [P·B, ...] the states z_{T2} of the chosen snapshot
  int64_t chosen = 0;       // index into t2 of the chosen snapshot
  std::vector<int64_t> t2;  // the snapshot steps (as given; a run stopped by tol reuses its last state)
  std::vector<double> snapshot_residual;  // max over rows of the residual drop ‖r_T2‖/‖r_0‖ at each T2
  at::Tensor steps;         // [P·B] int64: steps until the sample's residual ≤ tol, else the chosen T2
  at::Tensor abs_residual;  // [P·B] ‖F(z) + d(z) − z‖ at the chosen snapshot
  at::Tensor rel_residual;  // [P·B] ‖F(z) + d(z) − z‖/‖F(z) + d(z)‖ at the chosen snapshot
  at::Tensor drop;          // [P·B] ‖r_T2‖/‖r_0‖ at the chosen snapshot
  at::Tensor status;        // [P·B] int8 (solvers::Status) at the chosen snapshot
  at::Tensor trace_abs, trace_rel;  // [T, P·B] residuals of every evaluated state (empty if !trace)
  int64_t n_evals = 0;              // batched evaluations of the stacked field
};

// The nudged phase from z_start ([P·B, ...]: z* repeated, in the stacked field's dtype). `beta`:
// [P·B] per-row β (dtype of z_start); `pts` gives the common-mode weights for tracking.
NudgeResult nudged_phase(VectorField& stacked, const at::Tensor& z_start, const at::Tensor& beta,
                         const EPPoints& pts, const LossGrad& loss_grad, const NudgeOptions& opt);

struct EPResult {
  std::vector<at::Tensor> param_grads;  // (∂F/∂θ)ᵀ v per parameter, plain transpose, parameters() order
  at::Tensor v;                         // [B, ...] the combination v above (real)
  NudgeResult nudge;
};

// The whole estimate: nudged phase of the stacked field, then one param_vjp of `field` at z*.
// field: the field with x bound (real); z_star [B, ...] real.
EPResult ep_grads(VectorField& field, VectorField& stacked, const at::Tensor& z_star, const EPPoints& pts,
                  const LossGrad& loss_grad, const NudgeOptions& opt);

}  // namespace eqprop::estimators
