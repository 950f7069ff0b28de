// One engine, many fields (DESIGN.md §5): solvers, estimators and diagnostics are written once
// against this interface, implemented natively by the equilibrium transformer block and by an
// adapter for any user nn.Module f(z, x). The injection x is bound when a field is made.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace eqprop {

class VectorField {
 public:
  virtual ~VectorField() = default;
  // F(z; x), same shape as z ([B, ...]; the first dimension indexes samples).
  virtual at::Tensor eval(const at::Tensor& z) = 0;
  // Jᵀv with J = ∂F/∂z at z. For complex (holomorphic) fields this is the plain transpose, not
  // autograd's conjugate (Wirtinger) form: d(z²)/dz at 0.2i applied to 1 is 0.4i.
  virtual at::Tensor vjp(const at::Tensor& z, const at::Tensor& v) = 0;
  // Jv at z.
  virtual at::Tensor jvp(const at::Tensor& z, const at::Tensor& v) = 0;
  // (∂F/∂θ)ᵀv at z, one tensor per parameter (same order as parameters()); plain transpose as vjp.
  virtual std::vector<at::Tensor> param_vjp(const at::Tensor& z, const at::Tensor& v) = 0;
  virtual std::vector<at::Tensor> parameters() = 0;
};

}  // namespace eqprop
