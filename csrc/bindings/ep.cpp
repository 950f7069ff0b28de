// Python bindings of the Equilibrium Propagation core (csrc/estimators/ep.h): nudging points, the
// native cross-entropy readout, stacked fields and the estimate. eqprop.ep wraps these.
//
// Threading as in the engine bindings: entry points release the GIL; a Python loss gradient takes
// it back for its one call per nudged step, the native readout runs with no Python in the loop.
#include "estimators/ep.h"

#include <torch/extension.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bindings/binder.h"
#include "bindings/vector_field_binding.h"

namespace py = pybind11;

namespace eqprop {
namespace {

namespace est = estimators;

// The one place Python's options become the nudged phase's (relaxation options of eqprop.ep.EP).
est::NudgeOptions nudge_options(double eps, double tol, double divergence, bool trace, int64_t check_every,
                                std::vector<int64_t> t2, const std::string& correction) {
  est::NudgeOptions o;
  o.eps = eps;
  o.tol = tol;
  o.divergence = divergence;
  o.trace = trace;
  o.check_every = check_every;
  o.t2 = std::move(t2);
  o.correction = est::parse_correction(correction);
  return o;
}

// The native readout, or a Python callable g(z) -> ∂ℓ/∂z (plain transpose) called under the GIL.
est::LossGrad loss_grad_from(const py::object& obj) {
  if (py::isinstance<est::CrossEntropyReadout>(obj)) {
    auto ro = py::cast<std::shared_ptr<est::CrossEntropyReadout>>(obj);
    return [ro](const at::Tensor& z) { return ro->grad(z); };
  }
  TORCH_CHECK_VALUE(PyCallable_Check(obj.ptr()),
                    "loss_grad must be an eqprop._C.CrossEntropyReadout or callable "
                    "as loss_grad(z), got ",
                    std::string(py::str(py::type::of(obj))));
  // Owned under the GIL, released under the GIL (the engine runs without it).
  std::shared_ptr<py::object> fn(new py::object(obj), [](py::object* p) {
    py::gil_scoped_acquire gil;
    delete p;
  });
  return [fn](const at::Tensor& z) {
    py::gil_scoped_acquire gil;
    py::object out = (*fn)(z);
    TORCH_CHECK(THPVariable_Check(out.ptr()), "loss_grad(z) must return a torch.Tensor");
    return py::cast<at::Tensor>(out);
  };
}

py::dict points_dict(const est::EPPoints& p) {
  py::list beta;
  for (const auto& b : p.beta)
    beta.append(py::reinterpret_steal<py::object>(PyComplex_FromDoubles(b.real(), b.imag())));
  py::dict d;
  d["n_points"] = p.n_points;
  d["radius"] = p.radius;
  d["conjugate_shortcut"] = p.conjugate_shortcut;
  d["beta"] = beta;
  d["weight"] = p.weight;
  d["complex"] = p.is_complex();
  return d;
}

}  // namespace

static Binder bind_ep([](py::module_& m) {
  bind_vector_field(m);
  py::class_<est::CrossEntropyReadout, std::shared_ptr<est::CrossEntropyReadout>>(
      m, "CrossEntropyReadout",
      "The standard readout ℓ(z) = CE(head(LayerNorm(z)), targets) with its closed-form, holomorphic ∂ℓ/∂z\n"
      "(docs/design.md §5). z: [P·B, T, C] (P blocks of the B target rows), real or complex.")
      .def(py::init([](at::Tensor ln_weight, std::optional<at::Tensor> ln_bias, at::Tensor head_weight,
                       std::optional<at::Tensor> head_bias, at::Tensor targets, int64_t ignore_index,
                       double ln_eps) {
             return std::make_shared<est::CrossEntropyReadout>(
                 std::move(ln_weight), ln_bias.value_or(at::Tensor()), std::move(head_weight),
                 head_bias.value_or(at::Tensor()), std::move(targets), ignore_index, ln_eps);
           }),
           py::arg("ln_weight"), py::arg("ln_bias"), py::arg("head_weight"), py::arg("head_bias"),
           py::arg("targets"), py::arg("ignore_index") = -100, py::arg("ln_eps") = 1e-5)
      .def("loss", &est::CrossEntropyReadout::loss, py::arg("z"), py::call_guard<py::gil_scoped_release>(),
           "ℓ of each block of B rows: [P·B, T, C] -> [P].")
      .def("grad", &est::CrossEntropyReadout::grad, py::arg("z"), py::call_guard<py::gil_scoped_release>(),
           "∂ℓ/∂z (plain transpose; holomorphic for complex z): [P·B, T, C] -> [P·B, T, C].");

  m.def(
      "ep_points",
      [](int64_t n_points, double radius, bool conjugate_shortcut) {
        return points_dict(est::ep_points(n_points, radius, conjugate_shortcut));
      },
      py::arg("n_points"), py::arg("beta"), py::arg("conjugate_shortcut") = true,
      "The nudging points β_k = r e^{2πik/N} that relax (only Im β ≥ 0 with the shortcut) and their weights "
      "m_k.");

  m.def("ep_stack_points", &est::stack_points, py::arg("field"), py::arg("points"), py::arg("batch"),
        py::arg("complex"), py::call_guard<py::gil_scoped_release>(),
        "The field for `points` copies of its B samples stacked on the batch axis (complex arithmetic if "
        "asked).");

  m.def(
      "ep_grads",
      [](std::shared_ptr<VectorField> field, std::shared_ptr<VectorField> stacked, const at::Tensor& z_star,
         int64_t n_points, double beta, bool conjugate_shortcut, py::object loss_grad, double eps, double tol,
         double divergence, bool trace, int64_t check_every, std::vector<int64_t> t2,
         const std::string& correction) {
        TORCH_CHECK_VALUE(field != nullptr && stacked != nullptr,
                          "field and stacked must be VectorFields, got None");
        const est::EPPoints pts = est::ep_points(n_points, beta, conjugate_shortcut);
        const est::NudgeOptions opt =
            nudge_options(eps, tol, divergence, trace, check_every, std::move(t2), correction);
        est::LossGrad lg = loss_grad_from(loss_grad);
        est::EPResult r;
        {
          py::gil_scoped_release nogil;
          r = est::ep_grads(*field, *stacked, z_star, pts, lg, opt);
          lg = nullptr;  // drop a Python callable while its deleter can take the GIL
        }
        py::dict d;
        d["param_grads"] = r.param_grads;
        d["v"] = r.v;
        d["z_points"] = r.nudge.z;
        d["chosen"] = r.nudge.chosen;
        d["t2"] = r.nudge.t2;
        d["snapshot_residual"] = r.nudge.snapshot_residual;
        d["steps"] = r.nudge.steps;
        d["abs_residual"] = r.nudge.abs_residual;
        d["rel_residual"] = r.nudge.rel_residual;
        d["drop"] = r.nudge.drop;
        d["status"] = r.nudge.status;
        d["trace_abs"] = r.nudge.trace_abs;
        d["trace_rel"] = r.nudge.trace_rel;
        d["n_evals"] = r.nudge.n_evals;
        d["points"] = points_dict(pts);
        return d;
      },
      py::arg("field"), py::arg("stacked"), py::arg("z_star"), py::arg("n_points"), py::arg("beta"),
      py::arg("conjugate_shortcut"), py::arg("loss_grad"), py::arg("eps"), py::arg("tol"),
      py::arg("divergence"), py::arg("trace"), py::arg("check_every"), py::arg("t2"), py::arg("correction"),
      "The EP estimate (docs/design.md §5): the nudged phase of `stacked` from z*, then (∂F/∂θ)ᵀv once at "
      "z*.");
});

}  // namespace eqprop
