// The fused damped update and its per-sample norms (docs/engine.md "Relaxation"; docs/design.md §4):
//   z_new = z + ε(F(z) − z),  ‖F(z) − z‖²,  ‖F(z)‖²  per sample, in one pass.
// The CUDA kernel is csrc/cuda/relax.cu; this file holds its C++ twin and the dispatch. The op
// torch.ops.eqprop.relax_damped_step is registered in csrc/bindings/ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/complex.h>

#include <cmath>

#include "solvers/relax.h"
#include "solvers/relaxation.h"

#ifdef EQPROP_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/relax.cuh"
#endif

namespace eqprop::solvers {

namespace detail {

at::ScalarType norm_dtype(at::ScalarType t) {
  if (t == at::kHalf || t == at::kBFloat16) return at::kFloat;
  return c10::toRealValueType(t);
}

void check_pair(const at::Tensor& z, const at::Tensor& fz) {
  TORCH_CHECK_VALUE(z.defined() && fz.defined(), "z and fz must be tensors, got None");
  TORCH_CHECK_VALUE(z.dim() >= 1 && z.size(0) >= 1, "z must be [B, ...] with B >= 1, got shape ", z.sizes());
  TORCH_CHECK_VALUE(fz.sizes() == z.sizes(), "F(z) must have the shape of z ", z.sizes(), ", got ",
                    fz.sizes());
  TORCH_CHECK_VALUE(fz.scalar_type() == z.scalar_type(), "F(z) must have the dtype of z (", z.scalar_type(),
                    "), got ", fz.scalar_type());
  TORCH_CHECK_VALUE(fz.device() == z.device(), "F(z) must be on the device of z (", z.device(), "), got ",
                    fz.device());
}

}  // namespace detail

namespace {

// The CPU twin of the fused kernel (csrc/cuda/relax.cu): one pass over each sample.
template <typename scalar_t>
void damped_step_cpu_kernel(scalar_t* z_new, double* res_sq, double* f_sq, const scalar_t* z,
                            const scalar_t* fz, int64_t batch, int64_t n, double eps) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t e = static_cast<opmath_t>(eps);
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double rs = 0.0, fs = 0.0;
      const int64_t off = b * n;
      for (int64_t i = 0; i < n; ++i) {
        const opmath_t zi = static_cast<opmath_t>(z[off + i]);
        const opmath_t fi = static_cast<opmath_t>(fz[off + i]);
        const opmath_t r = fi - zi;
        z_new[off + i] = static_cast<scalar_t>(zi + e * r);
        if constexpr (c10::is_complex<scalar_t>::value) {
          rs += static_cast<double>(r.real()) * r.real() + static_cast<double>(r.imag()) * r.imag();
          fs += static_cast<double>(fi.real()) * fi.real() + static_cast<double>(fi.imag()) * fi.imag();
        } else {
          rs += static_cast<double>(r) * static_cast<double>(r);
          fs += static_cast<double>(fi) * static_cast<double>(fi);
        }
      }
      res_sq[b] = rs;
      f_sq[b] = fs;
    }
  });
}

}  // namespace

using detail::check_pair;
using detail::norm_dtype;

at::Tensor sq_norm_per_sample(const at::Tensor& t) {
  at::Tensor flat = t.reshape({t.size(0), -1});
  // half / bfloat16 squares overflow past 65504 (‖F‖ > 256) and round badly: accumulate in float32
  if (flat.scalar_type() == at::kHalf || flat.scalar_type() == at::kBFloat16) flat = flat.to(at::kFloat);
  if (t.is_complex()) return at::real(flat * flat.conj()).sum(1);
  return flat.pow(2).sum(1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_step(const at::Tensor& z, const at::Tensor& fz,
                                                           double eps) {
  check_pair(z, fz);
  TORCH_CHECK_VALUE(std::isfinite(eps), "eps must be finite, got ", eps);
  const int64_t batch = z.size(0);
  const int64_t n = batch > 0 ? z.numel() / batch : 0;
  const at::Tensor zc = z.contiguous(), fc = fz.contiguous();
  at::Tensor z_new = at::empty_like(zc);
#ifdef EQPROP_WITH_CUDA
  if (z.is_cuda()) {
    const auto st = z.scalar_type();
    if (st == at::kFloat || st == at::kDouble || st == at::kBFloat16) {
      TORCH_CHECK_VALUE(batch <= 65535, "the CUDA damped step takes at most 65535 samples, got B=", batch);
      const c10::cuda::CUDAGuard guard(z.device());
      auto opts = z.options().dtype(st == at::kDouble ? at::kDouble : at::kFloat);
      at::Tensor res_sq = at::empty({batch}, opts), f_sq = at::empty({batch}, opts);
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      cudaError_t err;
      if (st == at::kFloat) {
        err = eqprop::cuda::relax_damped_step_f32(z_new.data_ptr<float>(), res_sq.data_ptr<float>(),
                                                  f_sq.data_ptr<float>(), zc.data_ptr<float>(),
                                                  fc.data_ptr<float>(), batch, n, eps, stream);
      } else if (st == at::kDouble) {
        err = eqprop::cuda::relax_damped_step_f64(z_new.data_ptr<double>(), res_sq.data_ptr<double>(),
                                                  f_sq.data_ptr<double>(), zc.data_ptr<double>(),
                                                  fc.data_ptr<double>(), batch, n, eps, stream);
      } else {
        err = eqprop::cuda::relax_damped_step_bf16(z_new.data_ptr(), res_sq.data_ptr<float>(),
                                                   f_sq.data_ptr<float>(), zc.data_ptr(), fc.data_ptr(),
                                                   batch, n, eps, stream);
      }
      TORCH_CHECK(err == cudaSuccess, "relax_damped_step CUDA kernel failed: ", cudaGetErrorString(err));
      return {z_new.view(z.sizes()), res_sq, f_sq};
    }
    // Other dtypes (half, complex) on CUDA: plain ATen ops, the same math.
    const at::Tensor r = fz - z;
    return {z + eps * r, sq_norm_per_sample(r).to(norm_dtype(st)), sq_norm_per_sample(fz).to(norm_dtype(st))};
  }
#endif
  TORCH_CHECK_VALUE(z.device().is_cpu() || z.device().is_cuda(), "z must be on a CPU or CUDA device, got ",
                    z.device());
  TORCH_CHECK(z.device().is_cpu(), "z is on ", z.device(), " but eqprop was built without CUDA kernels");
  at::Tensor res_sq = at::empty({batch}, z.options().dtype(at::kDouble));
  at::Tensor f_sq = at::empty({batch}, z.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "damped_step", [&] {
    damped_step_cpu_kernel<scalar_t>(z_new.data_ptr<scalar_t>(), res_sq.data_ptr<double>(),
                                     f_sq.data_ptr<double>(), zc.data_ptr<scalar_t>(),
                                     fc.data_ptr<scalar_t>(), batch, n, eps);
  });
  const auto nd = norm_dtype(z.scalar_type());
  return {z_new.view(z.sizes()), res_sq.to(nd), f_sq.to(nd)};
}

}  // namespace eqprop::solvers
