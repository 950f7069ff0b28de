// Self-registration of pybind11 bindings: each bindings/*.cpp that exposes engine objects defines
//   static eqprop::Binder bind_block([](pybind11::module_& m) { ... });
// and module.cpp runs every registered binder when eqprop._C is imported, so concerns never edit
// a shared file to add bindings.
#pragma once
#include <pybind11/pybind11.h>

#include <functional>
#include <vector>

namespace eqprop {

using BindFn = std::function<void(pybind11::module_&)>;

inline std::vector<BindFn>& binders() {
  static std::vector<BindFn> fns;  // function-local: safe against static-init order across TUs
  return fns;
}

struct Binder {
  explicit Binder(BindFn fn) { binders().push_back(std::move(fn)); }
};

}  // namespace eqprop
