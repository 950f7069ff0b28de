// Launchers of the fused relaxation kernel (docs/design.md §4). Plain pointers and sizes, no torch: the
// checks, the allocation and the stream come from csrc/solvers/relax.cpp.
//
//   z_new = z + eps (fz − z),  res_sq[b] = ‖fz_b − z_b‖²,  f_sq[b] = ‖fz_b‖²      z, fz: [batch, n]
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace eqprop::cuda {

cudaError_t relax_damped_step_f32(float* z_new, float* res_sq, float* f_sq, const float* z, const float* fz,
                                  int64_t batch, int64_t n, double eps, cudaStream_t stream);
cudaError_t relax_damped_step_f64(double* z_new, double* res_sq, double* f_sq, const double* z,
                                  const double* fz, int64_t batch, int64_t n, double eps,
                                  cudaStream_t stream);
// bfloat16 storage (__nv_bfloat16 passed as void*), float32 arithmetic and norms.
cudaError_t relax_damped_step_bf16(void* z_new, float* res_sq, float* f_sq, const void* z, const void* fz,
                                   int64_t batch, int64_t n, double eps, cudaStream_t stream);

}  // namespace eqprop::cuda
