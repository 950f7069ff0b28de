// One engine, many fields (docs/design.md §5): solvers, estimators and diagnostics are written once
// against this interface, implemented natively by the equilibrium transformer block and by an
// adapter for any user nn.Module f(z, x). The injection x is bound when a field is made.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <memory>
#include <string>
#include <vector>

namespace eqprop {

class VectorField;

// The linear maps of F at one fixed point z: loops that apply J or Jᵀ many times at the same z
// (adjoint iteration, power iteration, Hutchinson probes) take one of these, so a field may keep
// what it needs (an autograd graph, saved activations) instead of recomputing F(z) per product.
class Linearization {
 public:
  virtual ~Linearization() = default;
  virtual const at::Tensor& point() const = 0;      // z
  virtual at::Tensor value() = 0;                   // F(z)
  virtual at::Tensor vjp(const at::Tensor& v) = 0;  // Jᵀv (plain transpose)
  virtual at::Tensor jvp(const at::Tensor& v) = 0;  // Jv
  virtual std::vector<at::Tensor> param_vjp(const at::Tensor& v) = 0;
};

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

  // --- optional, with defaults (added by the engine; subclasses need not override) --------------
  // Whether eval() (with autograd off) may be captured in a CUDA graph and replayed: no host
  // synchronization, no host-to-device copies, and it reads only tensors at fixed addresses (z,
  // its bound x, weights that stay put for the call). False unless a field promises it.
  virtual bool cuda_graph_safe() const { return false; }
  // Called once before relaxation steps are captured, on the caller's stream: build what eval()
  // makes lazily (so it is not made inside a capture or on a side stream) and return a handle
  // that keeps alive, for the whole call, every tensor a captured eval() reads.
  virtual std::shared_ptr<void> prepare_capture() { return nullptr; }
  // Names of parameters(), same order; default "param0", "param1", ...
  virtual std::vector<std::string> parameter_names() {
    std::vector<std::string> names;
    const auto n = parameters().size();
    for (size_t i = 0; i < n; ++i) names.push_back("param" + std::to_string(i));
    return names;
  }
  // J and Jᵀ at one z; the default forwards every product to vjp/jvp/param_vjp above.
  virtual std::shared_ptr<Linearization> linearize(const at::Tensor& z);
  // Jᵀv and Jv kept on the autograd graph (create_graph), so penalties built from them
  // (docs/design.md §6) are differentiable in the parameters. Fields without double backward refuse.
  virtual at::Tensor vjp_differentiable(const at::Tensor& z, const at::Tensor& v) {
    TORCH_CHECK(false,
                "this vector field does not provide differentiable VJPs (vjp_differentiable); "
                "use a field built on eqprop::AutogradField");
  }
  virtual at::Tensor jvp_differentiable(const at::Tensor& z, const at::Tensor& v) {
    TORCH_CHECK(false,
                "this vector field does not provide differentiable JVPs (jvp_differentiable); "
                "use a field built on eqprop::AutogradField");
  }
};

// The default linearization: every product recomputes through the field at the stored point.
class ForwardingLinearization : public Linearization {
 public:
  ForwardingLinearization(VectorField* field, at::Tensor z) : field_(field), z_(std::move(z)) {}
  const at::Tensor& point() const override { return z_; }
  at::Tensor value() override { return field_->eval(z_); }
  at::Tensor vjp(const at::Tensor& v) override { return field_->vjp(z_, v); }
  at::Tensor jvp(const at::Tensor& v) override { return field_->jvp(z_, v); }
  std::vector<at::Tensor> param_vjp(const at::Tensor& v) override { return field_->param_vjp(z_, v); }

 private:
  VectorField* field_;  // not owned: a linearization never outlives the call that made it
  at::Tensor z_;
};

inline std::shared_ptr<Linearization> VectorField::linearize(const at::Tensor& z) {
  return std::make_shared<ForwardingLinearization>(this, z);
}

}  // namespace eqprop
