// The fused damped update and per-sample residual norms (see relax.cuh). Grid (chunks, batch):
// each block walks a chunk of one sample, reduces ‖fz − z‖² and ‖fz‖² in shared memory, and adds
// its partial sums to the sample's outputs with one atomicAdd each (outputs zeroed first).
#include <cuda_bf16.h>

#include <atomic>

#include "cuda/relax.cuh"

namespace eqprop::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 4;
constexpr int kMaxDevices = 64;

// Multiprocessor count of the current device, read once per device: the attribute query is cheap
// but not free, and this runs once per relaxation step. It is a device query, not a stream
// operation, so it may run during a CUDA-graph capture. Threads racing on the first call store the
// same value. 0 when it cannot be read: the caller then does not cap the number of chunks.
int sm_count() {
  static std::atomic<int> cached[kMaxDevices] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  const bool slot = dev >= 0 && dev < kMaxDevices;
  if (slot) {
    const int n = cached[dev].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();  // clear it: the launch below reports its own errors
    return 0;
  }
  if (slot) cached[dev].store(n, std::memory_order_relaxed);
  return n;
}

template <typename T>
struct Acc;  // arithmetic type per storage type
template <>
struct Acc<float> {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <>
struct Acc<__nv_bfloat16> {
  using type = float;
};

template <typename T>
__device__ __forceinline__ typename Acc<T>::type load(const T* p, int64_t i) {
  return p[i];
}
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <typename T>
__device__ __forceinline__ void store(T* p, int64_t i, typename Acc<T>::type v) {
  p[i] = v;
}
template <>
__device__ __forceinline__ void store<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16(v);
}

template <typename T, typename Out>
__global__ void damped_step_kernel(T* __restrict__ z_new, Out* __restrict__ res_sq, Out* __restrict__ f_sq,
                                   const T* __restrict__ z, const T* __restrict__ fz, int64_t n,
                                   int64_t chunk, typename Acc<T>::type eps) {
  using A = typename Acc<T>::type;
  const int64_t b = blockIdx.y;
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  const int64_t off = b * n;
  A rs = 0, fs = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const A zi = load(z, off + i), fi = load(fz, off + i);
    const A r = fi - zi;
    store(z_new, off + i, zi + eps * r);
    rs += r * r;
    fs += fi * fi;
  }
  __shared__ A s_rs[kThreads], s_fs[kThreads];
  s_rs[threadIdx.x] = rs;
  s_fs[threadIdx.x] = fs;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      s_rs[threadIdx.x] += s_rs[threadIdx.x + s];
      s_fs[threadIdx.x] += s_fs[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    atomicAdd(res_sq + b, static_cast<Out>(s_rs[0]));
    atomicAdd(f_sq + b, static_cast<Out>(s_fs[0]));
  }
}

template <typename T, typename Out>
cudaError_t launch(T* z_new, Out* res_sq, Out* f_sq, const T* z, const T* fz, int64_t batch, int64_t n,
                   double eps, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(res_sq, 0, sizeof(Out) * batch, stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(f_sq, 0, sizeof(Out) * batch, stream);
  if (err != cudaSuccess) return err;
  if (batch == 0 || n == 0) return cudaSuccess;
  if (batch > 65535) return cudaErrorInvalidValue;  // grid.y limit; the C++ side checks first
  // Enough blocks to fill the GPU (kBlocksPerSm per multiprocessor over the whole batch) with ≥ 8
  // elements per thread; more chunks than that only add atomics.
  const int64_t min_chunk = int64_t(kThreads) * 8;
  int64_t chunks = (n + min_chunk - 1) / min_chunk;
  const int sms = sm_count();
  if (sms > 0) {
    const int64_t target = (int64_t(kBlocksPerSm) * sms + batch - 1) / batch;
    if (chunks > target) chunks = target;
  }
  if (chunks < 1) chunks = 1;
  const int64_t chunk = (n + chunks - 1) / chunks;
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(batch));
  damped_step_kernel<T, Out><<<grid, kThreads, 0, stream>>>(z_new, res_sq, f_sq, z, fz, n, chunk,
                                                            static_cast<typename Acc<T>::type>(eps));
  return cudaGetLastError();
}

}  // namespace

cudaError_t relax_damped_step_f32(float* z_new, float* res_sq, float* f_sq, const float* z, const float* fz,
                                  int64_t batch, int64_t n, double eps, cudaStream_t stream) {
  return launch<float, float>(z_new, res_sq, f_sq, z, fz, batch, n, eps, stream);
}

cudaError_t relax_damped_step_f64(double* z_new, double* res_sq, double* f_sq, const double* z,
                                  const double* fz, int64_t batch, int64_t n, double eps,
                                  cudaStream_t stream) {
  return launch<double, double>(z_new, res_sq, f_sq, z, fz, batch, n, eps, stream);
}

cudaError_t relax_damped_step_bf16(void* z_new, float* res_sq, float* f_sq, const void* z, const void* fz,
                                   int64_t batch, int64_t n, double eps, cudaStream_t stream) {
  return launch<__nv_bfloat16, float>(static_cast<__nv_bfloat16*>(z_new), res_sq, f_sq,
                                      static_cast<const __nv_bfloat16*>(z),
                                      static_cast<const __nv_bfloat16*>(fz), batch, n, eps, stream);
}

}  // namespace eqprop::cuda
