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
#include "solvers/autograd_field.h"

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
    TORCH_CHECK(THPVariable_Check(out.ptr()), "f(z, x) must return a torch.Tensor, got ",
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

}  // namespace

void bind_vector_field(py::module_& m) {
  if (py::hasattr(m, "VectorField")) return;
  py::class_<VectorField, std::shared_ptr<VectorField>>(
      m, "VectorField",
      "A vector field F(z; x) with x bound (DESIGN.md §5): eval, vjp (plain transpose Jᵀv), jvp (Jv),\n"
      "param_vjp ((∂F/∂θ)ᵀv per parameter). z: [B, ...], the first dimension indexes samples.")
      .def("eval", &VectorField::eval, py::arg("z"), gil_release(), "F(z; x), same shape as z.")
      .def("vjp", &VectorField::vjp, py::arg("z"), py::arg("v"), gil_release(),
           "Jᵀv at z (plain transpose, also for complex fields).")
      .def("jvp", &VectorField::jvp, py::arg("z"), py::arg("v"), gil_release(), "Jv at z.")
      .def("param_vjp", &VectorField::param_vjp, py::arg("z"), py::arg("v"), gil_release(),
           "(∂F/∂θ)ᵀv at z: a list, one tensor per parameter (order of parameters()).")
      .def("vjp_differentiable", &VectorField::vjp_differentiable, py::arg("z"), py::arg("v"),
           gil_release(), "Jᵀv on the autograd graph (differentiable in the parameters).")
      .def("jvp_differentiable", &VectorField::jvp_differentiable, py::arg("z"), py::arg("v"),
           gil_release(), "Jv on the autograd graph (differentiable in the parameters).")
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
});

}  // namespace eqprop
