// Jacobian diagnostics and the contraction penalties over the VectorField interface (docs/design.md §6, §7).
//
// J = ∂F/∂z at z. Fields are sample-separable, so J is block diagonal over the batch: spectral
// quantities are per sample ([B]); Frobenius-type quantities are over the whole state, normalized
// by numel(z). Monte-Carlo estimates use Rademacher (or Gaussian) probes drawn from a CPU
// generator seeded with `seed`, and come with a standard error.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "fields/vector_field.h"

namespace eqprop::diagnostics {

// A Monte-Carlo estimate over random probes (not the gradient estimate of eqprop.estimators).
struct ProbeEstimate {
  double value = 0.0;
  double stderr_ = 0.0;  // standard error of `value` over the probes (delta method for ratios)
  int64_t probes = 0;
};

// abs ‖F(z) − z‖ and rel ‖F(z) − z‖/‖F(z)‖ per sample, [B] each (docs/design.md §4).
std::pair<at::Tensor, at::Tensor> residual(VectorField& f, const at::Tensor& z);

// Spectral radius per sample by power iteration on JVPs: v ← Jv/‖Jv‖; ρ = exp(mean log ‖Jv_t‖)
// over the second half of the iterations (robust to a complex dominant pair, whose ‖Jv_t‖
// oscillates). Returns ρ [B] and the per-iteration growth ‖Jv_t‖ [iters, B].
std::pair<at::Tensor, at::Tensor> spectral_radius(VectorField& f, const at::Tensor& z, int64_t iters,
                                                  uint64_t seed);

// ‖J‖₂ per sample by power iteration on JᴴJ (one JVP and one VJP per iteration); [B] and the
// per-iteration estimates [iters, B].
std::pair<at::Tensor, at::Tensor> spectral_norm(VectorField& f, const at::Tensor& z, int64_t iters,
                                                uint64_t seed);

// ‖J‖²_F / numel(z) by Hutchinson: E‖vᵀJ‖² over probes v (docs/design.md §6).
ProbeEstimate frobenius_sq(VectorField& f, const at::Tensor& z, int64_t probes, uint64_t seed,
                           const std::string& dist);

// sqrt(Σ‖Jv − Jᵀv‖² / Σ‖Jv‖²) over probes → ‖J − Jᵀ‖_F / ‖J‖_F (docs/design.md §7).
ProbeEstimate nonnormality(VectorField& f, const at::Tensor& z, int64_t probes, uint64_t seed,
                           const std::string& dist);

// ‖J_s‖_F / (‖J_s‖_F + ‖J_a‖_F), J_s = ½(J + Jᵀ), J_a = ½(J − Jᵀ), norms by Hutchinson.
ProbeEstimate symmetric_fraction(VectorField& f, const at::Tensor& z, int64_t probes, uint64_t seed,
                                 const std::string& dist);

// jr · mean over probes of ‖vᵀJ‖² / numel(z), on the autograd graph (differentiable in θ).
at::Tensor jacobian_penalty(VectorField& f, const at::Tensor& z, int64_t probes, uint64_t seed, double weight,
                            const std::string& dist);

// λ · mean over probes of (‖Jε‖² − (Jᵀε)·(Jε)) / numel(z): an unbiased estimate of
// λ · ½‖J − Jᵀ‖²_F / numel(z) (Laborieux & Zenke 2024; docs/design.md §6), differentiable in θ.
at::Tensor homeostatic_loss(VectorField& f, const at::Tensor& z, int64_t probes, uint64_t seed, double weight,
                            const std::string& dist);

}  // namespace eqprop::diagnostics
