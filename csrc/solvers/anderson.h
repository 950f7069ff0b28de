// Type-II Anderson acceleration of the relaxation (docs/design.md §4), per sample:
//   α = argmin ‖Σ αᵢ Gᵢ‖ s.t. Σ αᵢ = 1,  Gᵢ = F(zᵢ) − zᵢ  over the last m iterates,
// from the bordered system [[0, 1ᵀ], [1, GᴴG + λI]] [ν; α] = [1; 0] (λ = reg × the mean diagonal of
// GᴴG); then z ← β Σ αᵢ F(zᵢ) + (1 − β) Σ αᵢ zᵢ. Samples whose system fails take the Picard step.
// Its small per-sample solves run eagerly: an Anderson relaxation is never captured as a CUDA graph.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace eqprop::solvers::detail {

class Anderson {
 public:
  // z0 [B, ...]: the initial state (shape, dtype, device); m: history length; beta: mixing β.
  Anderson(const at::Tensor& z0, int64_t m, double beta, double reg);
  // The next iterate after step t (t = 0, 1, ...: the slot of the ring buffer) from z, F(z) and
  // the damped Picard step z + β(F(z) − z), which it returns for a sample whose solve fails.
  at::Tensor step(const at::Tensor& z, const at::Tensor& fz, const at::Tensor& picard, int64_t t);

 private:
  int64_t m_;
  double beta_, reg_;
  int64_t batch_, n_;
  at::Tensor X_, F_;  // ring buffers [B, m, n] of iterates and their F values
};

}  // namespace eqprop::solvers::detail
