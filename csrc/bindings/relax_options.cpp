// eqprop._C.RelaxOptions — the one definition of the relaxation options seen from Python — and the
// interrupt hook that lets Ctrl-C stop the engine's loops.
//
// Defaults come from solvers::RelaxOptions{} and range checks from solvers::check_options; this file
// adds only what Python needs: the field table below (name, doc, strict conversion from a Python
// value, conversion back), keyword construction that rejects unknown keys listing the valid ones,
// attribute access, equality, repr and pickling.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pythread.h>

#include <chrono>
#include <string>
#include <vector>

#include "bindings/binder.h"
#include "solvers/relax.h"

namespace py = pybind11;
using eqprop::solvers::RelaxOptions;
namespace sv = eqprop::solvers;

namespace {

std::string describe(py::handle v) {
  return std::string(py::str(py::type::of(v).attr("__name__"))) + " " + std::string(py::repr(v));
}

// Strict conversions: an int option refuses 2.5 (no truncation) and True; a float option refuses
// bools and strings; a bool option wants a bool.
int64_t to_int(const std::string& where, const char* name, py::handle v) {
  if (PyBool_Check(v.ptr()) || !PyIndex_Check(v.ptr()))
    throw py::type_error(where + name + " must be an int, got " + describe(v));
  return py::cast<int64_t>(py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr())));
}
double to_float(const std::string& where, const char* name, py::handle v) {
  if (PyBool_Check(v.ptr()) || PyUnicode_Check(v.ptr()) || PyComplex_Check(v.ptr()))
    throw py::type_error(where + name + " must be a real number, got " + describe(v));
  const double d = PyFloat_AsDouble(v.ptr());
  if (d == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::type_error(where + name + " must be a real number, got " + describe(v));
  }
  return d;
}
bool to_bool(const std::string& where, const char* name, py::handle v) {
  if (!PyBool_Check(v.ptr())) throw py::type_error(where + name + " must be a bool, got " + describe(v));
  return v.ptr() == Py_True;
}
std::string to_str(const std::string& where, const char* name, py::handle v) {
  if (!PyUnicode_Check(v.ptr())) throw py::type_error(where + name + " must be a str, got " + describe(v));
  return py::cast<std::string>(v);
}

struct Field {
  const char* name;
  const char* doc;
  void (*set)(RelaxOptions&, py::handle, const std::string& where);
  py::object (*get)(const RelaxOptions&);
};

// Every option, in the order of solvers::RelaxOptions. Python names: `solver` is Method,
// `cuda_graph` is None (auto) / True (on) / False (off).
const std::vector<Field>& fields() {
  static const std::vector<Field> table = {
      {"max_steps", "F evaluations at most (int >= 1)",
       [](RelaxOptions& o, py::handle v, const std::string& w) { o.max_steps = to_int(w, "max_steps", v); },
       [](const RelaxOptions& o) -> py::object { return py::int_(o.max_steps); }},
      {"eps", "damping of z <- z + eps (F(z) - z) and Anderson's mixing beta (> 0)",
       [](RelaxOptions& o, py::handle v, const std::string& w) { o.eps = to_float(w, "eps", v); },
       [](const RelaxOptions& o) -> py::object { return py::float_(o.eps); }},
      {"tol", "a sample stops once its residual (per stop) <= tol (>= 0)",
       [](RelaxOptions& o, py::handle v, const std::string& w) { o.tol = to_float(w, "tol", v); },
       [](const RelaxOptions& o) -> py::object { return py::float_(o.tol); }},
      {"stop", "'rel': ||F(z) - z|| / ||F(z)||, 'abs': ||F(z) - z||",
       [](RelaxOptions& o, py::handle v, const std::string& w) {
         o.stop = sv::parse_stop(to_str(w, "stop", v));
       },
       [](const RelaxOptions& o) -> py::object { return py::str(sv::to_string(o.stop)); }},
      {"solver", "'picard' (damped) or 'anderson' (type II)",
       [](RelaxOptions& o, py::handle v, const std::string& w) {
         o.method = sv::parse_method(to_str(w, "solver", v));
       },
       [](const RelaxOptions& o) -> py::object { return py::str(sv::to_string(o.method)); }},
      {"anderson_m", "Anderson history length (int >= 1)",
       [](RelaxOptions& o, py::handle v, const std::string& w) { o.anderson_m = to_int(w, "anderson_m", v); },
       [](const RelaxOptions& o) -> py::object { return py::int_(o.anderson_m); }},
      {"anderson_reg", "Anderson's Tikhonov lambda relative to the Gram matrix's mean diagonal (>= 0)",
       [](RelaxOptions& o, py::handle v, const std::string& w) {
         o.anderson_reg = to_float(w, "anderson_reg", v);
       },
       [](const RelaxOptions& o) -> py::object { return py::float_(o.anderson_reg); }},
      {"divergence", "a sample diverged when its residual is non-finite or > divergence x its first (> 1)",
       [](RelaxOptions& o, py::handle v, const std::string& w) {
         o.divergence = to_float(w, "divergence", v);
       },
       [](const RelaxOptions& o) -> py::object { return py::float_(o.divergence); }},
      {"trace", "keep the residual trace [T, B]",
       [](RelaxOptions& o, py::handle v, const std::string& w) { o.trace = to_bool(w, "trace", v); },
       [](const RelaxOptions& o) -> py::object { return py::bool_(o.trace); }},
      {"check_every", "steps between host checks (one device sync each; int >= 1)",
       [](RelaxOptions& o, py::handle v, const std::string& w) {
         o.check_every = to_int(w, "check_every", v);
       },
       [](const RelaxOptions& o) -> py::object { return py::int_(o.check_every); }},
      {"cuda_graph", "None: replay the step as a CUDA graph when it can; True: demand it; False: never",
       [](RelaxOptions& o, py::handle v, const std::string& w) {
         if (v.is_none()) {
           o.cuda_graph = sv::CudaGraph::automatic;
         } else if (PyBool_Check(v.ptr())) {
           o.cuda_graph = v.ptr() == Py_True ? sv::CudaGraph::on : sv::CudaGraph::off;
         } else {
           throw py::type_error(w + "cuda_graph must be None (auto), True or False, got " +
                                std::string(py::repr(v)));
         }
       },
       [](const RelaxOptions& o) -> py::object {
         if (o.cuda_graph == sv::CudaGraph::automatic) return py::none();
         return py::bool_(o.cuda_graph == sv::CudaGraph::on);
       }},
      {"on_nonconvergence", "'warn', 'raise' or 'ignore' when a sample ends above tolerance",
       [](RelaxOptions& o, py::handle v, const std::string& w) {
         o.on_nonconvergence = sv::parse_on_nonconvergence(to_str(w, "on_nonconvergence", v));
       },
       [](const RelaxOptions& o) -> py::object { return py::str(sv::to_string(o.on_nonconvergence)); }},
  };
  return table;
}

py::list field_names() {
  py::list names;
  for (const auto& f : fields()) names.append(f.name);
  return names;
}

// Options from keyword arguments over the defaults; `where` prefixes the errors (e.g. "fixed_point").
RelaxOptions from_kwargs(const std::string& where, const py::dict& kwargs) {
  const std::string prefix = where.empty() ? "" : where + ": ";
  py::list unknown;
  for (const auto& kv : kwargs) {
    bool known = false;
    for (const auto& f : fields()) known = known || py::str(kv.first).equal(py::str(f.name));
    if (!known) unknown.append(kv.first);
  }
  if (py::len(unknown)) {
    unknown.attr("sort")();
    throw py::type_error(prefix + "unknown relaxation option(s) " + std::string(py::repr(unknown)) +
                         "; valid options are " + std::string(py::repr(field_names())));
  }
  RelaxOptions o;
  for (const auto& f : fields()) {
    if (kwargs.contains(f.name)) f.set(o, kwargs[f.name], prefix);
  }
  sv::check_options(o);
  return o;
}

py::dict to_dict(const RelaxOptions& o) {
  py::dict d;
  for (const auto& f : fields()) d[f.name] = f.get(o);
  return d;
}

std::string class_doc() {
  const RelaxOptions defaults;
  std::string doc =
      "RelaxOptions(**options): the options of eqprop.relax (the free phase), fixed_point and the\n"
      "estimators, checked on construction (TypeError for a wrong type or an unknown key, listing\n"
      "the valid ones; ValueError for a value out of range). Defaults and checks are those of the\n"
      "C++ engine (csrc/solvers/relax.h).\n\n";
  for (const auto& f : fields())
    doc += std::string("  ") + f.name + " = " + std::string(py::repr(f.get(defaults))) + ": " + f.doc + "\n";
  doc += "\nExample: ``RelaxOptions(max_steps=50, tol=1e-6).replace(solver='anderson')``";
  return doc;
}

// Raise KeyboardInterrupt (or whatever a Python signal handler raises) from the engine's loops.
// Signal handlers run only on Python's main thread, so other threads return at once and never
// touch the GIL; on the main thread the check takes the GIL at most every 20 ms.
void install_interrupt_hook() {
  const unsigned long main_ident =
      py::cast<unsigned long>(py::module_::import("threading").attr("main_thread")().attr("ident"));
  sv::set_interrupt_check([main_ident]() {
    if (PyThread_get_thread_ident() != main_ident) return;
    using clock = std::chrono::steady_clock;
    thread_local clock::time_point last{};
    const auto now = clock::now();
    if (now - last < std::chrono::milliseconds(20)) return;
    last = now;
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  });
}

}  // namespace

static eqprop::Binder bind_relax_options([](py::module_& m) {
  py::class_<RelaxOptions> cls(m, "RelaxOptions", class_doc().c_str());
  cls.def(py::init([](const py::kwargs& kw) { return from_kwargs("RelaxOptions", kw); }))
      .def_static(
          "from_kwargs", [](const std::string& where, const py::dict& kw) { return from_kwargs(where, kw); },
          py::arg("where"), py::arg("kwargs"),
          "Options from a dict of keyword arguments; errors start with `where` (the caller's name).")
      .def_static("fields", &field_names, "The option names, in order.")
      .def("to_dict", &to_dict, "{name: value} of every option.")
      .def(
          "replace",
          [](const RelaxOptions& o, const py::kwargs& kw) {
            py::dict d = to_dict(o);
            for (const auto& kv : kw) d[kv.first] = kv.second;
            return from_kwargs("RelaxOptions.replace", d);
          },
          "A copy with the given options changed (checked as on construction).")
      .def("__eq__",
           [](const RelaxOptions& a, py::object b) {
             return py::isinstance<RelaxOptions>(b) && to_dict(a).equal(to_dict(py::cast<RelaxOptions>(b)));
           })
      .def("__repr__",
           [](const RelaxOptions& o) {
             std::string s = "RelaxOptions(";
             bool first = true;
             for (const auto& f : fields()) {
               s += std::string(first ? "" : ", ") + f.name + "=" + std::string(py::repr(f.get(o)));
               first = false;
             }
             return s + ")";
           })
      .def(py::pickle([](const RelaxOptions& o) { return to_dict(o); },
                      [](const py::dict& d) { return from_kwargs("RelaxOptions (unpickling)", d); }));
  // Attributes read and write through the same table; an assignment is checked like construction.
  for (const auto& f : fields()) {
    const Field* fp = &f;
    cls.def_property(f.name, py::cpp_function([fp](const RelaxOptions& o) { return fp->get(o); }),
                     py::cpp_function([fp](RelaxOptions& o, py::handle v) {
                       RelaxOptions c = o;
                       fp->set(c, v, "");
                       sv::check_options(c);
                       o = c;
                     }),
                     f.doc);
  }
  install_interrupt_hook();
});
