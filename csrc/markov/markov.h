// The Markov-k in-context-learning benchmark (docs/design.md §8): sampler, exact Bayes NLL, oracle NLL,
// Dirichlet-multinomial log evidence, context counts and visits. CPU kernels here, CUDA in csrc/cuda/.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace eqprop::markov {

// tokens [B, L] int64 and tables [B, V^k, V] of `table_dtype`; seeded, same seed -> same output.
std::tuple<at::Tensor, at::Tensor> sample(int64_t batch, int64_t k, int64_t seq_len, int64_t vocab_size,
                                          double alpha, int64_t seed, at::Device device,
                                          at::ScalarType table_dtype);

// [B, L]: −ln P_Bayes(x_t | x_<t); ln V for t < k.
at::Tensor bayes_nll(const at::Tensor& tokens, int64_t k, int64_t vocab_size, double alpha,
                     at::ScalarType dtype);

// [B, L]: −ln P(x_t | context) under the true tables [B, V^k, V]; ln V for t < k.
at::Tensor oracle_nll(const at::Tensor& tokens, const at::Tensor& tables, int64_t k);

// [B] float64: −ln p(x_k..x_{L−1} | x_<k), the Dirichlet-multinomial evidence in closed form
// (lgamma); equals bayes_nll summed over t >= k.
at::Tensor log_evidence(const at::Tensor& tokens, int64_t k, int64_t vocab_size, double alpha);

// [B, V^k] int64: how often each context precedes a target t >= k.
at::Tensor context_counts(const at::Tensor& tokens, int64_t k, int64_t vocab_size);

// [B, L] int64: visits[b, t] = number of targets s in [k, t) whose context equals that of t
// (the N_<t(c_t) of the Bayes predictive); −1 for t < k.
at::Tensor context_visits(const at::Tensor& tokens, int64_t k, int64_t vocab_size);

}  // namespace eqprop::markov
