// The implicit (recurrent-backprop) gradient estimator over the VectorField interface (docs/design.md §5):
//
//   ∇θ L = (∂F/∂θ)ᵀ λ,   (I − Jᵀ) λ = ∂ℓ/∂z*,   λ ← Jᵀλ + ∂ℓ/∂z*   (VJPs only, at z*)
//
// Everything happens on one linearization of F at z*, so a field keeps one graph for the adjoint
// iteration and the final parameter VJP. The EP estimators (nudged relaxations with a drive, see
// solvers/relax.h) will sit next to this one and return the same per-parameter gradients.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "fields/vector_field.h"
#include "solvers/relax.h"

namespace eqprop::estimators {

struct ImplicitResult {
  std::vector<at::Tensor> param_grads;  // (∂F/∂θ)ᵀλ per parameter (plain transpose), parameters() order
  solvers::AdjointResult adjoint;       // λ and the per-sample stats of its iteration
};

// g = ∂ℓ/∂z* in the plain-transpose convention (conj of autograd's cotangent for complex z).
inline ImplicitResult implicit_grads(VectorField& field, const at::Tensor& z_star, const at::Tensor& g,
                                     int64_t max_steps, double tol,
                                     solvers::Method method = solvers::Method::picard, int64_t anderson_m = 5,
                                     double eps = 1.0) {
  auto lin = field.linearize(z_star.detach());
  ImplicitResult r;
  r.adjoint = solvers::adjoint_solve(*lin, g, max_steps, tol, method, anderson_m, /*divergence=*/1e6, eps);
  r.param_grads = lin->param_vjp(r.adjoint.lambda);
  return r;
}

}  // namespace eqprop::estimators
