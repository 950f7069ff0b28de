// Python registration of the VectorField interface (eqprop._C.VectorField, eqprop._C.AutogradField).
//
// Binder order across translation units is unspecified, so a binder that registers a subclass
// (e.g. the native block field) calls bind_vector_field(m) first; it registers the bases once:
//
//   static eqprop::Binder bind_block([](pybind11::module_& m) {
//     eqprop::bind_vector_field(m);
//     pybind11::class_<BlockField, eqprop::AutogradField, std::shared_ptr<BlockField>>(m, "BlockField") ...
//   });
#pragma once
#include <pybind11/pybind11.h>

namespace eqprop {

// Idempotent: registers VectorField (holder std::shared_ptr<VectorField>) and AutogradField.
void bind_vector_field(pybind11::module_& m);

}  // namespace eqprop
