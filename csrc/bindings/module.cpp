// The Python extension module eqprop._C. Tensor ops live in torch.ops.eqprop (bindings/ops.cpp);
// this module carries build facts and, later, engine objects that are not plain tensor ops.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "eqprop C++/CUDA core";
#ifdef EQPROP_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
