// The Python extension module eqprop._C. Tensor ops live in torch.ops.eqprop (bindings/ops.cpp);
// engine objects that are not plain tensor ops register themselves through bindings/binder.h.
#include "bindings/binder.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "eqprop C++/CUDA core";
#ifdef EQPROP_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  for (auto& bind : eqprop::binders()) bind(m);
}
