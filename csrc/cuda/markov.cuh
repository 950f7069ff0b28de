// Launchers of the Markov-k CUDA kernels. Plain pointers and sizes, no torch: the checks, the
// allocation and the stream come from csrc/markov/markov.cpp.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace eqprop::cuda {

// tables [B, n_ctx, V] (double): one Dirichlet(alpha) row per (sequence, context).
cudaError_t markov_sample_tables(double* tables, int64_t batch, int64_t n_ctx, int64_t V, double alpha,
                                 uint64_t seed, cudaStream_t stream);

// tokens [B, L] drawn from tables [B, n_ctx, V] (float or double); the first k tokens uniform.
cudaError_t markov_sample_tokens_f32(int64_t* tokens, const float* tables, int64_t batch, int64_t seq_len,
                                     int64_t k, int64_t n_ctx, int64_t V, uint64_t seed, cudaStream_t stream);
cudaError_t markov_sample_tokens_f64(int64_t* tokens, const double* tables, int64_t batch, int64_t seq_len,
                                     int64_t k, int64_t n_ctx, int64_t V, uint64_t seed, cudaStream_t stream);

// int32 count entries per sequence the Bayes kernel needs in global memory: 0 when a sequence's
// counts fit in shared memory (then `counts` may be null), else n_ctx·(V+1).
int64_t markov_bayes_nll_workspace(int64_t n_ctx, int64_t V);

// nll [B, L] = −ln P_Bayes(x_t | x_<t); counts: workspace of batch·markov_bayes_nll_workspace(...)
// int32 entries (the kernel zeroes what it uses).
cudaError_t markov_bayes_nll_f32(float* nll, const int64_t* tokens, int32_t* counts, int64_t batch,
                                 int64_t seq_len, int64_t k, int64_t n_ctx, int64_t V, double alpha,
                                 cudaStream_t stream);
cudaError_t markov_bayes_nll_f64(double* nll, const int64_t* tokens, int32_t* counts, int64_t batch,
                                 int64_t seq_len, int64_t k, int64_t n_ctx, int64_t V, double alpha,
                                 cudaStream_t stream);

}  // namespace eqprop::cuda
