// Python bindings of the engine: the VectorField interface, the ModuleField adapter for user
// nn.Modules, relaxation, adjoint solves, BPTT unrolls and the Jacobian diagnostics.
//
// Threading: every engine entry point releases the GIL; ModuleField::eval takes it back for the
// one Python call it makes, so native fields (the block) run with no Python in the loop.
#include <torch/extension.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings/binder.h"
#include "bindings/vector_field_binding.h"
#include "diagnostics/diagnostics.h"
#include "estimators/implicit.h"
#include "fields/autograd_field.h"
#include "solvers/relax.h"

namespace py = pybind11;

namespace eqprop {
namespace {

// A user nn.Module / callable f(z, x) as a VectorField; products through autograd (AutogradField).
class ModuleField : public AutogradField {
 public:
  ModuleField(py::object f, at::Tensor x, std::vector<std::string> names, std::vector<at::Tensor> params)
      : f_(std::move(f)), x_(std::move(x)), names_(std::move(names)), params_(std::move(params)) {
    TORCH_CHECK_VALUE(PyCallable_Check(f_.ptr()), "f must be callable as f(z, x), got ",
                      std::string(py::str(py::type::of(f_))));
    TORCH_CHECK_VALUE(names_.size() == params_.size(), "names and params must have the same length, got ",
                      names_.size(), " and ", params_.size());
    for (size_t i = 0; i < params_.size(); ++i)
      TORCH_CHECK_VALUE(params_[i].defined(), "parameter '", names_[i], "' is None");
  }
  ~ModuleField() override {
    // The Python reference may be dropped from a thread that does not hold the GIL.
    py::gil_scoped_acquire gil;
    f_ = py::object();
  }
  at::Tensor eval(const at::Tensor& z) override {
    py::gil_scoped_acquire gil;
    py::object out = f_(z, x_);
    TORCH_CHECK_TYPE(THPVariable_Check(out.ptr()), "f(z, x) must return a torch.Tensor, got ",
                     std::string(py::str(py::type::of(out))));
    return py::cast<at::Tensor>(out);
  }
  std::vector<at::Tensor> parameters() override { return params_; }
  std::vector<std::string> parameter_names() override { return names_; }
  const at::Tensor& x() const { return x_; }

 private:
  py::object f_;
  at::Tensor x_;
  std::vector<std::string> names_;
  std::vector<at::Tensor> params_;
};

using gil_release = py::call_guard<py::gil_scoped_release>;

void check_field(const std::shared_ptr<VectorField>& f) {
  TORCH_CHECK_VALUE(f != nullptr, "field must be an eqprop._C.VectorField, got None");
}

// x (the injection) at the boundary: a finite floating/complex tensor (docs/design.md §4).
void check_injection(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.defined(), "x must be a tensor, got None");
  TORCH_CHECK_VALUE(x.is_floating_point() || x.is_complex(),
                    "x must be a floating-point or complex tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(0) >= 1, "x must be [B, ...] with B >= 1, got shape ", x.sizes());
  TORCH_CHECK_VALUE(at::isfinite(x.detach()).all().item<bool>(), "x must be finite, got ",
                    at::isfinite(x.detach()).logical_not().sum().item<int64_t>(), " non-finite entries");
}

py::dict adjoint_dict(const solvers::AdjointResult& r) {
  py::dict d;
  d["lambda"] = r.lambda;
  d["steps"] = r.steps;
  d["residual"] = r.residual;
  d["status"] = r.status;
  d["n_vjps"] = r.n_vjps;
  return d;
}

py::dict probe_estimate_dict(const diagnostics::ProbeEstimate& e) {
  py::dict d;
  d["value"] = e.value;
  d["stderr"] = e.stderr_;
  d["probes"] = e.probes;
  return d;
}

}  // namespace

void bind_vector_field(py::module_& m) {
  if (py::hasattr(m, "VectorField")) return;
  py::class_<VectorField, std::shared_ptr<VectorField>>(
      m, "VectorField",
      "A vector field F(z; x) with x bound (docs/design.md §5): eval, vjp (plain transpose Jᵀv), jvp (Jv),\n"
      "param_vjp ((∂F/∂θ)ᵀv per parameter). z: [B, ...], the first dimension indexes samples.")
      .def("eval", &VectorField::eval, py::arg("z"), gil_release(), "F(z; x), same shape as z.")
      .def("vjp", &VectorField::vjp, py::arg("z"), py::arg("v"), gil_release(),
           "Jᵀv at z (plain transpose, also for complex fields).")
      .def("jvp", &VectorField::jvp, py::arg("z"), py::arg("v"), gil_release(), "Jv at z.")
      .def("param_vjp", &VectorField::param_vjp, py::arg("z"), py::arg("v"), gil_release(),
           "(∂F/∂θ)ᵀv at z: a list, one tensor per parameter (order of parameters()).")
      .def("vjp_differentiable", &VectorField::vjp_differentiable, py::arg("z"), py::arg("v"), gil_release(),
           "Jᵀv on the autograd graph (differentiable in the parameters).")
      .def("jvp_differentiable", &VectorField::jvp_differentiable, py::arg("z"), py::arg("v"), gil_release(),
           "Jv on the autograd graph (differentiable in the parameters).")
      .def("parameters", &VectorField::parameters, gil_release())
      .def("parameter_names", &VectorField::parameter_names, gil_release());
  py::class_<AutogradField, VectorField, std::shared_ptr<AutogradField>>(
      m, "AutogradField", "A VectorField whose products come from autograd through eval().");
}

static Binder bind_engine([](py::module_& m) {
  bind_vector_field(m);
  py::class_<ModuleField, AutogradField, std::shared_ptr<ModuleField>>(
      m, "ModuleField",
      "ModuleField(f, x, names, params): a user callable f(z, x) (e.g. an nn.Module) as a VectorField;\n"
      "params (with names) are the tensors param_vjp differentiates, usually module.parameters().")
      .def(py::init<py::object, at::Tensor, std::vector<std::string>, std::vector<at::Tensor>>(),
           py::arg("f"), py::arg("x"), py::arg("names"), py::arg("params"))
      .def_property_readonly("x", &ModuleField::x);

  m.def("check_injection", &check_injection, py::arg("x"), gil_release(),
        "Raise ValueError unless x is a finite floating/complex [B, ...] tensor.");

  m.def(
      "relax",
      [](std::shared_ptr<VectorField> field, const at::Tensor& z0, const solvers::RelaxOptions& options,
         py::object drive) {
        check_field(field);
        solvers::Drive d;
        if (!drive.is_none()) {
          TORCH_CHECK_VALUE(PyCallable_Check(drive.ptr()), "drive must be callable as drive(z), got ",
                            std::string(py::str(py::type::of(drive))));
          // Owned under the GIL, released under the GIL (the engine runs without it).
          std::shared_ptr<py::object> fn(new py::object(drive), [](py::object* p) {
            py::gil_scoped_acquire gil;
            delete p;
          });
          d = [fn](const at::Tensor& z) {
            py::gil_scoped_acquire gil;
            py::object out = (*fn)(z);
            TORCH_CHECK_TYPE(THPVariable_Check(out.ptr()), "drive(z) must return a torch.Tensor");
            return py::cast<at::Tensor>(out);
          };
        }
        solvers::RelaxResult r;
        {
          py::gil_scoped_release nogil;
          r = solvers::relax(*field, z0, options, d);
          d = nullptr;
        }
        py::dict out;
        out["z"] = r.z;
        out["steps"] = r.steps;
        out["abs_residual"] = r.abs_residual;
        out["rel_residual"] = r.rel_residual;
        out["trace_abs"] = r.trace_abs;
        out["trace_rel"] = r.trace_rel;
        out["status"] = r.status;
        out["n_evals"] = r.n_evals;
        out["cuda_graph"] = r.cuda_graph;
        return out;
      },
      py::arg("field"), py::arg("z0"), py::arg("options"), py::arg("drive") = py::none(),
      "Relax to z* = F(z*) (docs/design.md §4) with RelaxOptions; drive(z) adds to F (nudged phases). "
      "Returns a "
      "dict.");

  m.def(
      "adjoint_solve",
      [](std::shared_ptr<VectorField> field, const at::Tensor& z, const at::Tensor& g, int64_t max_steps,
         double tol, const std::string& solver, int64_t anderson_m, double eps) {
        check_field(field);
        const auto method = solvers::parse_method(solver);
        solvers::AdjointResult r;
        {
          py::gil_scoped_release nogil;
          auto lin = field->linearize(z.detach());
          r = solvers::adjoint_solve(*lin, g, max_steps, tol, method, anderson_m, /*divergence=*/1e6, eps);
        }
        return adjoint_dict(r);
      },
      py::arg("field"), py::arg("z"), py::arg("g"), py::arg("max_steps"), py::arg("tol"),
      py::arg("solver") = "picard", py::arg("anderson_m") = 5, py::arg("eps") = 1.0,
      "Solve (I − Jᵀ)λ = g at z by relaxing λ ↦ Jᵀλ + g (Picard: recurrent backprop; docs/design.md §5).");

  m.def(
      "implicit_grads",
      [](std::shared_ptr<VectorField> field, const at::Tensor& z, const at::Tensor& g, int64_t max_steps,
         double tol, const std::string& solver, int64_t anderson_m, double eps) {
        check_field(field);
        const auto method = solvers::parse_method(solver);
        estimators::ImplicitResult r;
        {
          py::gil_scoped_release nogil;
          r = estimators::implicit_grads(*field, z, g, max_steps, tol, method, anderson_m, eps);
        }
        py::dict d = adjoint_dict(r.adjoint);
        d["param_grads"] = r.param_grads;
        return d;
      },
      py::arg("field"), py::arg("z"), py::arg("g"), py::arg("max_steps"), py::arg("tol"),
      py::arg("solver") = "picard", py::arg("anderson_m") = 5, py::arg("eps") = 1.0,
      "(∂F/∂θ)ᵀλ with (I − Jᵀ)λ = g at z: the implicit (RBP) gradient of every parameter.");

  m.def(
      "unroll",
      [](std::shared_ptr<VectorField> field, const at::Tensor& z, int64_t steps, double eps) {
        check_field(field);
        return solvers::unroll(*field, z, steps, eps);
      },
      py::arg("field"), py::arg("z"), py::arg("steps"), py::arg("eps"), gil_release(),
      "`steps` damped Picard steps from z, on the autograd graph when grad mode is on (BPTT).");

  m.def(
      "damped_step",
      [](const at::Tensor& z, const at::Tensor& fz, double eps) { return solvers::damped_step(z, fz, eps); },
      py::arg("z"), py::arg("fz"), py::arg("eps"), gil_release());

  namespace dg = diagnostics;
  m.def(
      "residual",
      [](std::shared_ptr<VectorField> f, const at::Tensor& z) {
        check_field(f);
        return dg::residual(*f, z);
      },
      py::arg("field"), py::arg("z"), gil_release());
  m.def(
      "spectral_radius",
      [](std::shared_ptr<VectorField> f, const at::Tensor& z, int64_t iters, uint64_t seed) {
        check_field(f);
        return dg::spectral_radius(*f, z, iters, seed);
      },
      py::arg("field"), py::arg("z"), py::arg("iters"), py::arg("seed"), gil_release());
  m.def(
      "spectral_norm",
      [](std::shared_ptr<VectorField> f, const at::Tensor& z, int64_t iters, uint64_t seed) {
        check_field(f);
        return dg::spectral_norm(*f, z, iters, seed);
      },
      py::arg("field"), py::arg("z"), py::arg("iters"), py::arg("seed"), gil_release());
  using EstFn = dg::ProbeEstimate (*)(VectorField&, const at::Tensor&, int64_t, uint64_t, const std::string&);
  const std::pair<const char*, EstFn> estimators[] = {{"frobenius_sq", &dg::frobenius_sq},
                                                      {"nonnormality", &dg::nonnormality},
                                                      {"symmetric_fraction", &dg::symmetric_fraction}};
  for (const auto& [name, fn] : estimators) {
    m.def(
        name,
        [fn](std::shared_ptr<VectorField> f, const at::Tensor& z, int64_t probes, uint64_t seed,
             const std::string& dist) {
          check_field(f);
          dg::ProbeEstimate e;
          {
            py::gil_scoped_release nogil;
            e = fn(*f, z, probes, seed, dist);
          }
          return probe_estimate_dict(e);
        },
        py::arg("field"), py::arg("z"), py::arg("probes"), py::arg("seed"), py::arg("dist"));
  }
  m.def(
      "jacobian_penalty",
      [](std::shared_ptr<VectorField> f, const at::Tensor& z, int64_t probes, uint64_t seed, double weight,
         const std::string& dist) {
        check_field(f);
        return dg::jacobian_penalty(*f, z, probes, seed, weight, dist);
      },
      py::arg("field"), py::arg("z"), py::arg("probes"), py::arg("seed"), py::arg("weight"), py::arg("dist"),
      gil_release());
  m.def(
      "homeostatic_loss",
      [](std::shared_ptr<VectorField> f, const at::Tensor& z, int64_t probes, uint64_t seed, double weight,
         const std::string& dist) {
        check_field(f);
        return dg::homeostatic_loss(*f, z, probes, seed, weight, dist);
      },
      py::arg("field"), py::arg("z"), py::arg("probes"), py::arg("seed"), py::arg("weight"), py::arg("dist"),
      gil_release());
});

}  // namespace eqprop
