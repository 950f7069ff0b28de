// Markov-k sampler and exact Bayes NLL on the GPU (docs/design.md §8). One thread per (sequence, row)
// for the Dirichlet tables; one thread per sequence for the sequential parts (token draws, counts),
// whose per-step state is a handful of integers. The CPU twins are in csrc/markov/markov.cpp and
// draw the same random streams (csrc/markov/sampling.h).
#include "cuda/markov.cuh"
#include "markov/sampling.h"

namespace eqprop::cuda {
namespace {

using eqprop::markov::detail::Rng;

constexpr int kThreads = 128;

__global__ void tables_kernel(double* tables, int64_t batch, int64_t n_ctx, int64_t V, double alpha,
                              uint64_t seed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * n_ctx) return;
  const int64_t b = i / n_ctx, row = i % n_ctx;
  Rng rng(seed, static_cast<uint64_t>(b), static_cast<uint64_t>(row));
  eqprop::markov::detail::dirichlet_row(rng, alpha, V, tables + i * V);
}

template <typename T>
__global__ void tokens_kernel(int64_t* tokens, const T* tables, int64_t batch, int64_t L, int64_t k,
                              int64_t n_ctx, int64_t V, uint64_t seed) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  Rng rng(seed, static_cast<uint64_t>(b), eqprop::markov::detail::kTokenStream);
  int64_t* x = tokens + b * L;
  const T* table = tables + b * n_ctx * V;
  const int64_t top = n_ctx / V;  // V^(k−1): weight of the oldest symbol in the context index
  int64_t c = 0;
  for (int64_t t = 0; t < k; ++t) {
    x[t] = eqprop::markov::detail::uniform_symbol(rng, V);
    c = c * V + x[t];
  }
  for (int64_t t = k; t < L; ++t) {
    const int64_t a = eqprop::markov::detail::categorical(rng, table + c * V, V);
    x[t] = a;
    c = (c - x[t - k] * top) * V + a;
  }
}

// Sequential Dirichlet-multinomial predictive: pair[c·V + a] pair counts, total[c] context totals,
// both over targets in [k, t). Each thread's counts live in shared memory when they fit
// (kSharedCountBytes per thread; one warp per block), else in its slice of a global workspace.
// The per-step chain (context -> counts -> increment) is then a shared-memory round trip instead of
// an L2 one, which is what bounds this sequential kernel.
constexpr int kSharedThreads = 32;
constexpr int64_t kSharedCountBytes = 1536;

template <typename T>
__global__ void bayes_nll_kernel(T* nll, const int64_t* tokens, int32_t* counts, int64_t batch, int64_t L,
                                 int64_t k, int64_t n_ctx, int64_t V, double alpha) {
  extern __shared__ int32_t shared_counts[];
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const int64_t per_seq = n_ctx * (V + 1);
  int32_t* pair = counts ? counts + b * per_seq : shared_counts + threadIdx.x * per_seq;
  for (int64_t i = 0; i < per_seq; ++i) pair[i] = 0;
  int32_t* total = pair + n_ctx * V;
  const int64_t* x = tokens + b * L;
  T* out = nll + b * L;
  const double log_v = log(static_cast<double>(V)), v_alpha = static_cast<double>(V) * alpha;
  const int64_t top = n_ctx / V;
  int64_t c = 0;
  for (int64_t t = 0; t < k; ++t) {
    out[t] = static_cast<T>(log_v);
    c = c * V + x[t];
  }
  for (int64_t t = k; t < L; ++t) {
    const int64_t a = x[t];
    const int32_t n_ca = pair[c * V + a], n_c = total[c];
    out[t] = static_cast<T>(log(n_c + v_alpha) - log(n_ca + alpha));
    pair[c * V + a] = n_ca + 1;
    total[c] = n_c + 1;
    c = (c - x[t - k] * top) * V + a;
  }
}

template <typename T>
cudaError_t launch_bayes_nll(T* nll, const int64_t* tokens, int32_t* counts, int64_t batch, int64_t seq_len,
                             int64_t k, int64_t n_ctx, int64_t V, double alpha, cudaStream_t stream) {
  const int64_t per_seq_bytes = n_ctx * (V + 1) * static_cast<int64_t>(sizeof(int32_t));
  if (per_seq_bytes <= kSharedCountBytes) {
    const unsigned blocks = static_cast<unsigned>((batch + kSharedThreads - 1) / kSharedThreads);
    bayes_nll_kernel<T><<<blocks, kSharedThreads, kSharedThreads * per_seq_bytes, stream>>>(
        nll, tokens, nullptr, batch, seq_len, k, n_ctx, V, alpha);
  } else {
    const unsigned blocks = static_cast<unsigned>((batch + kThreads - 1) / kThreads);
    bayes_nll_kernel<T>
        <<<blocks, kThreads, 0, stream>>>(nll, tokens, counts, batch, seq_len, k, n_ctx, V, alpha);
  }
  return cudaGetLastError();
}

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t markov_sample_tables(double* tables, int64_t batch, int64_t n_ctx, int64_t V, double alpha,
                                 uint64_t seed, cudaStream_t stream) {
  tables_kernel<<<blocks_for(batch * n_ctx), kThreads, 0, stream>>>(tables, batch, n_ctx, V, alpha, seed);
  return cudaGetLastError();
}

cudaError_t markov_sample_tokens_f32(int64_t* tokens, const float* tables, int64_t batch, int64_t seq_len,
                                     int64_t k, int64_t n_ctx, int64_t V, uint64_t seed,
                                     cudaStream_t stream) {
  tokens_kernel<float>
      <<<blocks_for(batch), kThreads, 0, stream>>>(tokens, tables, batch, seq_len, k, n_ctx, V, seed);
  return cudaGetLastError();
}

cudaError_t markov_sample_tokens_f64(int64_t* tokens, const double* tables, int64_t batch, int64_t seq_len,
                                     int64_t k, int64_t n_ctx, int64_t V, uint64_t seed,
                                     cudaStream_t stream) {
  tokens_kernel<double>
      <<<blocks_for(batch), kThreads, 0, stream>>>(tokens, tables, batch, seq_len, k, n_ctx, V, seed);
  return cudaGetLastError();
}

int64_t markov_bayes_nll_workspace(int64_t n_ctx, int64_t V) {
  const int64_t per_seq = n_ctx * (V + 1);
  return per_seq * static_cast<int64_t>(sizeof(int32_t)) <= kSharedCountBytes ? 0 : per_seq;
}

cudaError_t markov_bayes_nll_f32(float* nll, const int64_t* tokens, int32_t* counts, int64_t batch,
                                 int64_t seq_len, int64_t k, int64_t n_ctx, int64_t V, double alpha,
                                 cudaStream_t stream) {
  return launch_bayes_nll<float>(nll, tokens, counts, batch, seq_len, k, n_ctx, V, alpha, stream);
}

cudaError_t markov_bayes_nll_f64(double* nll, const int64_t* tokens, int32_t* counts, int64_t batch,
                                 int64_t seq_len, int64_t k, int64_t n_ctx, int64_t V, double alpha,
                                 cudaStream_t stream) {
  return launch_bayes_nll<double>(nll, tokens, counts, batch, seq_len, k, n_ctx, V, alpha, stream);
}

}  // namespace eqprop::cuda
