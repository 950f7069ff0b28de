// AutogradField: VJP / JVP / parameter-VJP of any differentiable eval() (see autograd_field.h).
#include "fields/autograd_field.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>

namespace eqprop {
namespace detail {
namespace {

at::Tensor conj_if_complex(const at::Tensor& t) { return t.is_complex() ? at::conj_physical(t) : t; }

void check_cotangent(const at::Tensor& out, const at::Tensor& v) {
  TORCH_CHECK_VALUE(v.defined(), "v (cotangent/tangent) must be a tensor, got None");
  TORCH_CHECK_VALUE(v.sizes() == out.sizes(), "v must have the shape of F(z) ", out.sizes(), ", got ",
                    v.sizes());
  TORCH_CHECK_VALUE(v.device() == out.device(), "v must be on the device of F(z) (", out.device(), "), got ",
                    v.device());
}

// z as the differentiation input: a fresh leaf unless it already carries a graph (then the
// products stay differentiable in whatever z came from).
at::Tensor as_input(const at::Tensor& z) {
  TORCH_CHECK_VALUE(z.defined(), "z must be a tensor, got None");
  TORCH_CHECK_VALUE(z.is_floating_point() || z.is_complex(),
                    "z must be a floating-point or complex tensor, got ", z.scalar_type());
  if (z.requires_grad()) return z;
  return z.detach().requires_grad_(true);
}

}  // namespace

std::vector<at::Tensor> plain_vjp(const at::Tensor& out, const std::vector<at::Tensor>& inputs,
                                  const at::Tensor& v, bool retain, bool create_graph) {
  check_cotangent(out, v);
  const at::Tensor vv = v.to(out.scalar_type());
  std::vector<at::Tensor> result(inputs.size());
  // Inputs autograd can differentiate: the rest (frozen parameters) get zeros.
  std::vector<size_t> live;
  std::vector<at::Tensor> live_inputs;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].requires_grad() && out.requires_grad()) {
      live.push_back(i);
      live_inputs.push_back(inputs[i]);
    }
  }
  if (!live.empty()) {
    const at::Tensor g = conj_if_complex(vv);
    const bool real_into_complex =
        out.is_complex() && std::any_of(live_inputs.begin(), live_inputs.end(),
                                        [](const at::Tensor& t) { return !t.is_complex(); });
    auto grads = torch::autograd::grad({out}, live_inputs, {g}, /*retain_graph=*/retain || real_into_complex,
                                       create_graph, /*allow_unused=*/true);
    std::vector<at::Tensor> imag_grads;
    if (real_into_complex) {
      // Re-part from g = conj v, Im-part from g = i·conj v (autograd keeps only Re for real inputs).
      imag_grads = torch::autograd::grad({out}, live_inputs, {g * c10::complex<double>(0.0, 1.0)}, retain,
                                         create_graph, /*allow_unused=*/true);
    }
    for (size_t k = 0; k < live.size(); ++k) {
      const at::Tensor& in = live_inputs[k];
      at::Tensor gk = grads[k];
      if (!gk.defined()) {
        result[live[k]] =
            out.is_complex() ? at::zeros_like(in, in.options().dtype(out.scalar_type())) : at::zeros_like(in);
        continue;
      }
      if (out.is_complex() && !in.is_complex()) {
        at::Tensor im = imag_grads[k].defined() ? imag_grads[k] : at::zeros_like(gk);
        result[live[k]] = at::complex(gk, im);
      } else {
        result[live[k]] = conj_if_complex(gk);
      }
    }
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!result[i].defined()) {
      const auto& in = inputs[i];
      result[i] = (out.is_complex() && !in.is_complex())
                      ? at::zeros_like(in, in.options().dtype(out.scalar_type()))
                      : at::zeros_like(in);
    }
  }
  return result;
}

}  // namespace detail

namespace {

// J and Jᵀ at one z through one retained autograd graph of F(z): each product is one backward
// pass, no re-evaluation of F. The JVP graph (J^H u, linear in u) is built on first use.
class AutogradLinearization : public Linearization {
 public:
  AutogradLinearization(AutogradField* field, const at::Tensor& z) : field_(field) {
    at::AutoGradMode enable(true);
    z_ = z.detach().requires_grad_(true);
    fz_ = field_->eval(z_);
    TORCH_CHECK_VALUE(fz_.sizes() == z_.sizes(), "the vector field must return F(z) with the shape of z ",
                      z_.sizes(), ", got ", fz_.sizes());
    params_ = field_->parameters();
  }
  const at::Tensor& point() const override { return z_; }
  at::Tensor value() override { return fz_.detach(); }
  at::Tensor vjp(const at::Tensor& v) override {
    at::AutoGradMode enable(true);
    return detail::plain_vjp(fz_, {z_}, v, /*retain=*/true, /*create_graph=*/false)[0];
  }
  at::Tensor jvp(const at::Tensor& v) override {
    at::AutoGradMode enable(true);
    TORCH_CHECK_VALUE(v.sizes() == z_.sizes(), "v must have the shape of z ", z_.sizes(), ", got ",
                      v.sizes());
    if (!fz_.requires_grad()) return at::zeros_like(fz_);  // F does not depend on z
    if (!ju_.defined()) {
      // ju_ = J^H u (autograd's VJP), linear in the dummy u; its VJP in u is (J^H)^H v = Jv.
      u_ = at::zeros_like(fz_).requires_grad_(true);
      auto g = torch::autograd::grad({fz_}, {z_}, {u_}, /*retain_graph=*/true, /*create_graph=*/true,
                                     /*allow_unused=*/true);
      ju_ = g[0];
      if (!ju_.defined() || !ju_.requires_grad()) {
        // J^H u does not depend on u only when J = 0 (F constant in z).
        ju_ = at::Tensor();
        return at::zeros_like(fz_);
      }
    }
    auto out = torch::autograd::grad({ju_}, {u_}, {v.to(ju_.scalar_type())}, /*retain_graph=*/true,
                                     /*create_graph=*/false, /*allow_unused=*/true);
    return out[0].defined() ? out[0] : at::zeros_like(fz_);
  }
  std::vector<at::Tensor> param_vjp(const at::Tensor& v) override {
    at::AutoGradMode enable(true);
    return detail::plain_vjp(fz_, params_, v, /*retain=*/true, /*create_graph=*/false);
  }

 private:
  AutogradField* field_;
  at::Tensor z_, fz_, u_, ju_;
  std::vector<at::Tensor> params_;
};

}  // namespace

std::shared_ptr<Linearization> AutogradField::linearize(const at::Tensor& z) {
  TORCH_CHECK_VALUE(z.defined(), "z must be a tensor, got None");
  return std::make_shared<AutogradLinearization>(this, z);
}

at::Tensor AutogradField::vjp(const at::Tensor& z, const at::Tensor& v) {
  at::AutoGradMode enable(true);
  const at::Tensor zz = z.detach().requires_grad_(true);
  const at::Tensor fz = eval(zz);
  return detail::plain_vjp(fz, {zz}, v, /*retain=*/false, /*create_graph=*/false)[0];
}

at::Tensor AutogradField::jvp(const at::Tensor& z, const at::Tensor& v) {
  return AutogradLinearization(this, z).jvp(v);
}

std::vector<at::Tensor> AutogradField::param_vjp(const at::Tensor& z, const at::Tensor& v) {
  at::AutoGradMode enable(true);
  const at::Tensor fz = eval(z.detach());
  return detail::plain_vjp(fz, parameters(), v, /*retain=*/false, /*create_graph=*/false);
}

at::Tensor AutogradField::vjp_differentiable(const at::Tensor& z, const at::Tensor& v) {
  at::AutoGradMode enable(true);
  const at::Tensor zz = detail::as_input(z);
  const at::Tensor fz = eval(zz);
  return detail::plain_vjp(fz, {zz}, v, /*retain=*/true, /*create_graph=*/true)[0];
}

at::Tensor AutogradField::jvp_differentiable(const at::Tensor& z, const at::Tensor& v) {
  at::AutoGradMode enable(true);
  const at::Tensor zz = detail::as_input(z);
  const at::Tensor fz = eval(zz);
  TORCH_CHECK_VALUE(v.sizes() == fz.sizes(), "v must have the shape of z ", fz.sizes(), ", got ", v.sizes());
  if (!fz.requires_grad()) return at::zeros_like(fz);
  const at::Tensor u = at::zeros_like(fz).requires_grad_(true);
  auto g = torch::autograd::grad({fz}, {zz}, {u}, /*retain_graph=*/true, /*create_graph=*/true,
                                 /*allow_unused=*/true);
  if (!g[0].defined() || !g[0].requires_grad()) return at::zeros_like(fz);
  auto out = torch::autograd::grad({g[0]}, {u}, {v.to(fz.scalar_type())}, /*retain_graph=*/true,
                                   /*create_graph=*/true, /*allow_unused=*/true);
  return out[0].defined() ? out[0] : at::zeros_like(fz);
}

}  // namespace eqprop
