// Launchers of the Markov-k CUDA kernels. Plain pointers and sizes, no torch: the checks, the
// allocation and the stream come from csrc/markov/markov.cpp.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace eqprop::cuda {

// tables [B, n_ctx, V] (double): one Dirichlet(alpha) row per (sequence, context).
cudaError_t markov_sample_tables(double* tables, int64_t batch, int64_t n_ctx, int64_t V,
                                 double alpha, uint64_t seed, cudaStream_t stream);

// tokens [B, L] drawn from tables [B, n_ctx, V] (float or double); the first k tokens uniform.
cudaError_t markov_sample_tokens_f32(int64_t* tokens, const float* tables, int64_t batch,
                                     int64_t seq_len, int64_t k, int64_t n_ctx, int64_t V,
                                     uint64_t seed, cudaStream_t stream);
cudaError_t markov_sample_tokens_f64(int64_t* tokens, const double* tables, int64_t batch,
                                     int64_t seq_len, int64_t k, int64_t n_ctx, int64_t V,
                                     uint64_t seed, cudaStream_t stream);

// nll [B, L] = −ln P_Bayes(x_t | x_<t); counts: zeroed workspace of batch·n_ctx·(V+1) int32.
cudaError_t markov_bayes_nll_f32(float* nll, const int64_t* tokens, int32_t* counts, int64_t batch,
                                 int64_t seq_len, int64_t k, int64_t n_ctx, int64_t V, double alpha,
                                 cudaStream_t stream);
cudaError_t markov_bayes_nll_f64(double* nll, const int64_t* tokens, int32_t* counts, int64_t batch,
                                 int64_t seq_len, int64_t k, int64_t n_ctx, int64_t V, double alpha,
                                 cudaStream_t stream);

}  // namespace eqprop::cuda
