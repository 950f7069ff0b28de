// AutogradField: a VectorField whose products come from autograd through eval() (docs/design.md §5).
//
// A subclass implements eval(z) (differentiable: plain ATen ops on z, the bound x and the tensors
// returned by parameters()) and parameters(); vjp / jvp / param_vjp / linearize and their
// differentiable variants follow here:
//
//   Jᵀv       = conj(vjp_autograd(conj v))        plain transpose (autograd returns J^H g, the
//                                                 conjugate Wirtinger form, for holomorphic F)
//   Jv        = ∂/∂u ⟨J^H u, v⟩ = (J^H)^H v       the double-VJP trick: one backward of the
//                                                 (linear in u) autograd VJP graph
//   (∂F/∂θ)ᵀv = as Jᵀv for complex θ; for a real θ feeding a complex F, autograd returns
//               Re(conj(...)), so Re and Im come from two backward passes with g = conj v, i·conj v.
//
// Real fields pay nothing for the conjugations (they are skipped). Products at one z share a
// retained graph through linearize(z). Parameters with requires_grad=False get zero products.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "fields/vector_field.h"

namespace eqprop {

class AutogradField : public VectorField {
 public:
  at::Tensor vjp(const at::Tensor& z, const at::Tensor& v) override;
  at::Tensor jvp(const at::Tensor& z, const at::Tensor& v) override;
  std::vector<at::Tensor> param_vjp(const at::Tensor& z, const at::Tensor& v) override;
  std::shared_ptr<Linearization> linearize(const at::Tensor& z) override;
  at::Tensor vjp_differentiable(const at::Tensor& z, const at::Tensor& v) override;
  at::Tensor jvp_differentiable(const at::Tensor& z, const at::Tensor& v) override;
};

namespace detail {
// The plain-transpose VJP rule on one autograd graph: outputs F (built from inputs), cotangent v.
// create_graph keeps the result differentiable; retain keeps the graph for further products.
std::vector<at::Tensor> plain_vjp(const at::Tensor& out, const std::vector<at::Tensor>& inputs,
                                  const at::Tensor& v, bool retain, bool create_graph);
}  // namespace detail

}  // namespace eqprop
