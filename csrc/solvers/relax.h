// Relaxation to the fixed point z* = F(z*; x) (docs/design.md §4), the adjoint iteration of implicit
// differentiation (§5), and the differentiable unroll used by BPTT(h).
//
// Every solver has the same signature and the same result: the lowest-residual iterate per sample
// plus per-sample stats (TorchDEQ's convention, docs/design.md §4). Samples are the first dimension of z;
// fields are assumed sample-separable (F of one sample does not read another), as the block is.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <tuple>

#include "fields/vector_field.h"

namespace eqprop::solvers {

enum class Stop { abs, rel };
enum class Method { picard, anderson };
// Per-sample outcome; int8 codes in RelaxResult::status.
enum class Status : int8_t { converged = 0, max_steps = 1, diverged = 2 };
// Replay the relaxation step as a CUDA graph: auto = when it can (CUDA state, Picard, no drive,
// a field that declares itself capturable); on = demand it (an error says why it cannot).
enum class CudaGraph { off, on, automatic };
// What the caller does when a sample ends above tolerance (status max_steps or diverged). The
// engine only reports per-sample status; the policy is applied by its caller (eqprop.solvers).
enum class OnNonconvergence { warn, raise, ignore };

struct RelaxOptions {
  int64_t max_steps = 100;  // F evaluations at most
  double eps = 1.0;         // damping: z ← z + ε(F(z) − z); Anderson mixes β = ε
  double tol = 1e-4;        // stop a sample once its residual (per `stop`) ≤ tol
  Stop stop = Stop::rel;    // rel ‖F(z) − z‖/‖F(z)‖ or abs ‖F(z) − z‖
  Method method = Method::picard;
  int64_t anderson_m = 5;      // history length
  double anderson_reg = 1e-8;  // Tikhonov λ relative to the mean diagonal of the Gram matrix
  double divergence = 1e4;     // diverged: residual non-finite or > divergence × the first residual
  bool trace = true;           // keep the residual trace [T, B]
  // The host asks "has every sample stopped?" (one device sync) after every `check_every` steps
  // (a CUDA graph holds min(check_every, 32) steps, and the host asks after each replay). Larger
  // values save syncs and launches and may evaluate up to check_every − 1 batched steps after the
  // last sample stopped (counted in n_evals; they change nothing: stopped samples are frozen).
  int64_t check_every = 1;
  CudaGraph cuda_graph = CudaGraph::automatic;
  OnNonconvergence on_nonconvergence = OnNonconvergence::warn;
};

// Parse "rel"/"abs" and "picard"/"anderson", naming the argument and the valid values on error.
Stop parse_stop(const std::string& s);
Method parse_method(const std::string& s);
CudaGraph parse_cuda_graph(const std::string& s);                // "auto" / "on" / "off"
OnNonconvergence parse_on_nonconvergence(const std::string& s);  // "warn" / "raise" / "ignore"
std::string to_string(Stop s);
std::string to_string(Method m);
std::string to_string(OnNonconvergence o);
// Every numeric option in range (ValueError naming the option, its value and what it needs).
void check_options(const RelaxOptions& opt);

// The interrupt hook: called at every host check of the loops (after each group of check_every
// steps, or each graph replay; the adjoint solve and nudged phases run the same loop). A hook
// that throws stops the relaxation with its exception. The Python bindings install one that
// raises KeyboardInterrupt when Ctrl-C is pending; the engine itself knows nothing of Python.
// Empty: none (the default).
void set_interrupt_check(std::function<void()> fn);
void check_interrupt();

// An additive drive d(z) turns the relaxation into dz/dt = F(z) + d(z) − z: the nudged phase of
// EP is d(z) = −β ∂ℓ/∂z + c(z) (docs/design.md §5), complex β included. Empty: the free phase.
using Drive = std::function<at::Tensor(const at::Tensor& z)>;

struct RelaxResult {
  at::Tensor z;             // [B, ...] lowest-residual iterate per sample
  at::Tensor steps;         // [B] int64: F evaluations until the sample stopped
  at::Tensor abs_residual;  // [B] ‖F(z) − z‖ at the returned iterate (real dtype)
  at::Tensor rel_residual;  // [B] ‖F(z) − z‖/‖F(z)‖ at the returned iterate
  at::Tensor trace_abs;     // [T, B] abs residual of every evaluated iterate (empty if !trace)
  at::Tensor trace_rel;     // [T, B]
  at::Tensor status;        // [B] int8 (Status)
  int64_t n_evals = 0;      // batched F evaluations
  bool cuda_graph = false;  // whether steps were replayed as a CUDA graph
};

RelaxResult relax(VectorField& field, const at::Tensor& z0, const RelaxOptions& opt, const Drive& drive = {});

struct AdjointResult {
  at::Tensor lambda;    // [B, ...] solution of (I − Jᵀ)λ = g
  at::Tensor steps;     // [B] int64
  at::Tensor residual;  // [B] relative residual ‖Jᵀλ + g − λ‖/‖Jᵀλ + g‖ of the returned λ
  at::Tensor status;    // [B] int8 (Status)
  int64_t n_vjps = 0;
};

// (I − Jᵀ)λ = g at the linearization point, VJPs only (docs/design.md §5): the relaxation of the
// adjoint field λ ↦ Jᵀλ + g from λ = g, by the same solvers as the forward pass — Picard is the
// recurrent-backprop iteration λ ← λ + ε(Jᵀλ + g − λ) (ε = 1: λ ← Jᵀλ + g); Anderson accelerates
// it. Pass the forward damping ε: Jᵀ has the spectrum of J, so a forward pass that needed damping
// to converge needs the same damping here (same fixed point). Stops a sample at
// ‖Jᵀλ + g − λ‖/‖Jᵀλ + g‖ ≤ tol; returns its lowest-residual λ.
AdjointResult adjoint_solve(Linearization& lin, const at::Tensor& g, int64_t max_steps, double tol,
                            Method method = Method::picard, int64_t anderson_m = 5, double divergence = 1e6,
                            double eps = 1.0);

// `steps` damped Picard steps from z with plain ATen ops, on the autograd graph when grad mode is
// on: BPTT(h) differentiates through this.
at::Tensor unroll(VectorField& field, const at::Tensor& z, int64_t steps, double eps);

// The fused damped update and residual norms (CUDA kernel on GPU, C++ twin on CPU):
//   z_new = z + ε(Fz − z),  res_sq[b] = ‖Fz_b − z_b‖²,  f_sq[b] = ‖Fz_b‖²
// z, fz: [B, ...] same shape/dtype/device; norms in float32 for half/bfloat16, else the real dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_step(const at::Tensor& z, const at::Tensor& fz,
                                                           double eps);

// Per-sample squared 2-norm over all but the first dimension (|·|² for complex), real dtype.
at::Tensor sq_norm_per_sample(const at::Tensor& t);

}  // namespace eqprop::solvers
