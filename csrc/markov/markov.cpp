// Markov-k benchmark: input checks, device dispatch and the CPU kernels (docs/design.md §8).
#include "markov/markov.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <vector>

#include "markov/sampling.h"

#ifdef EQPROP_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/markov.cuh"
#define EQPROP_CUDA_CHECK(expr)                                                                \
  do {                                                                                         \
    const cudaError_t err_ = (expr);                                                           \
    TORCH_CHECK(err_ == cudaSuccess, "CUDA error in ", #expr, ": ", cudaGetErrorString(err_)); \
  } while (0)
#endif

namespace eqprop::markov {
namespace {

using detail::Rng;

// Count tensors are indexed in int32 and sized V^k·(V+1) per sequence in flight; this bounds one
// such block (1 GiB of int32) so that an unreasonable (V, k) fails with a message, not an OOM.
constexpr int64_t kMaxCountEntries = int64_t(1) << 28;

void check_order(int64_t k, int64_t vocab_size) {
  TORCH_CHECK_VALUE(k >= 1, "k (Markov order) must be >= 1, got ", k);
  TORCH_CHECK_VALUE(vocab_size >= 2, "vocab_size must be >= 2, got ", vocab_size);
}

void check_alpha(double alpha) {
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha > 0.0,
                    "alpha (Dirichlet concentration) must be finite and > 0, got ", alpha);
}

// V^k with an explicit bound: the number of contexts, whose count tables must fit in memory.
int64_t num_contexts(int64_t k, int64_t vocab_size) {
  check_order(k, vocab_size);
  int64_t n = 1;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK_VALUE(n <= kMaxCountEntries / vocab_size / (vocab_size + 1),
                      "vocab_size^k is too large for the count tables: vocab_size=", vocab_size, ", k=", k,
                      " gives more than ", kMaxCountEntries,
                      " count entries per sequence; reduce k or vocab_size");
    n *= vocab_size;
  }
  return n;
}

// Checks tokens and returns them contiguous: views (a prefix tokens[:, :n], a strided slice) are
// accepted and copied only when their layout needs it. The shape is checked before the layout.
at::Tensor checked_tokens(const at::Tensor& tokens, int64_t k, int64_t vocab_size) {
  TORCH_CHECK_VALUE(tokens.defined(), "tokens must be a tensor, got None");
  TORCH_CHECK_VALUE(tokens.scalar_type() == at::kLong, "tokens must be int64 (torch.long), got ",
                    tokens.scalar_type());
  TORCH_CHECK_VALUE(tokens.dim() == 2, "tokens must be [B, L], got shape ", tokens.sizes());
  TORCH_CHECK_VALUE(tokens.size(1) > k, "tokens must be longer than k: need L > k, got L=", tokens.size(1),
                    ", k=", k);
  TORCH_CHECK_VALUE(tokens.device().is_cpu() || tokens.device().is_cuda(),
                    "tokens must be on a CPU or CUDA device, got ", tokens.device());
  if (tokens.numel() > 0) {
    const auto [lo, hi] = at::aminmax(tokens);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < vocab_size, "tokens must lie in [0, vocab_size=", vocab_size,
                      "), got values in [", lo_v, ", ", hi_v, "]");
  }
  return tokens.contiguous();
}

// The CUDA kernels exist only in a CUDA build of eqprop, run only on a torch that has CUDA.
#ifndef EQPROP_WITH_CUDA
[[noreturn]] void no_cuda_kernels(const char* what) {
  TORCH_CHECK_VALUE(false, what, " on a CUDA device: this eqprop build has no CUDA kernels (it was ",
                    "built against a CPU-only torch); use device='cpu' or rebuild eqprop against a CUDA ",
                    "torch");
  std::abort();  // not reached: the check above throws
}
#endif

void check_cuda_usable(at::Device device, const char* what) {
  if (!device.is_cuda()) return;
#ifndef EQPROP_WITH_CUDA
  no_cuda_kernels(what);
#else
  TORCH_CHECK_VALUE(at::hasCUDA(), what, " on ", device,
                    ": CUDA is not available to this torch (torch.cuda.is_available() is False); use "
                    "device='cpu'");
#endif
}

void check_float_dtype(at::ScalarType dtype, const char* name) {
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble, name,
                    " must be torch.float32 or torch.float64, got ", dtype);
}

// ctx[b, j] = context index of target t = k + j: Σ_i x[b, t−k+i]·V^(k−1−i), oldest symbol most
// significant. [B, L] -> [B, L−k], on the tokens' device.
at::Tensor context_index(const at::Tensor& tokens, int64_t k, int64_t vocab_size) {
  const int64_t L = tokens.size(1);
  at::Tensor ctx = at::zeros({tokens.size(0), L - k}, tokens.options());
  for (int64_t i = 0; i < k; ++i) ctx.mul_(vocab_size).add_(tokens.slice(1, i, L - k + i));
  return ctx;
}

// Each row of tables [B, V^k, V] must be a probability vector: finite entries >= 0 summing to 1.
// A row rounded to float32 from an exact one has |Σ − 1| <= V·eps32/2 (each entry carries a
// relative error <= eps32/2; the sum is taken in float64). The bound 8·V·eps32 leaves 16x room and
// holds for both dtypes, so float32 tables cast to float64 (sample's default dtype, then .double())
// pass; a float64 table is not held to its own, 2^29 times finer, rounding.
void check_probability_rows(const at::Tensor& tables) {
  if (tables.numel() == 0) return;
  const int64_t n_ctx = tables.size(1), V = tables.size(2);
  const double eps = std::numeric_limits<float>::epsilon();
  const double tol = 8.0 * static_cast<double>(V) * eps;
  const at::Tensor sums = tables.sum(-1, /*keepdim=*/false, at::kDouble);  // [B, V^k]
  const at::Tensor bad = tables.isfinite()
                             .logical_not()
                             .logical_or_(tables.lt(0))
                             .any(-1)
                             .logical_or_(sums.sub(1.0).abs_().gt(tol));
  const int64_t n_bad = bad.sum().item<int64_t>();
  if (n_bad == 0) return;
  const int64_t i = bad.reshape(-1).nonzero()[0][0].item<int64_t>();
  const int64_t b = i / n_ctx, c = i % n_ctx;
  const at::Tensor row = tables[b][c].to(at::kCPU, at::kDouble).contiguous();
  std::ostringstream values;
  const double* p = row.data_ptr<double>();
  for (int64_t a = 0; a < std::min<int64_t>(V, 8); ++a) values << (a ? ", " : "") << p[a];
  if (V > 8) values << ", ...";
  TORCH_CHECK_VALUE(false, "tables must hold a probability vector in every row (entries finite and >= 0, ",
                    "summing to 1 within ", tol, " = 8·V·eps(float32)), but ", n_bad, " of ", sums.numel(),
                    " rows are not; the first is tables[", b, ", ", c, "] = [", values.str(), "] with sum ",
                    sums[b][c].item<double>());
}

// ---- CPU kernels ------------------------------------------------------------------------------

template <typename T>
void sample_tokens_cpu(int64_t* tokens, const T* tables, int64_t batch, int64_t L, int64_t k, int64_t n_ctx,
                       int64_t V, uint64_t seed) {
  const int64_t top = n_ctx / V;  // V^(k−1): weight of the oldest symbol in the context index
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      Rng rng(seed, static_cast<uint64_t>(b), detail::kTokenStream);
      int64_t* x = tokens + b * L;
      const T* table = tables + b * n_ctx * V;
      int64_t c = 0;
      for (int64_t t = 0; t < k; ++t) {
        x[t] = detail::uniform_symbol(rng, V);
        c = c * V + x[t];
      }
      for (int64_t t = k; t < L; ++t) {
        const int64_t a = detail::categorical(rng, table + c * V, V);
        x[t] = a;
        c = (c - x[t - k] * top) * V + a;
      }
    }
  });
}

// Sequential Dirichlet-multinomial predictive (docs/design.md §8): with N over targets in [k, t),
// −ln P(x_t = a) = ln(N_c + Vα) − ln(N_ca + α). Counts never exceed L, so both logs come from
// tables of length L+1 built once per call. Each worker owns one count buffer and, after a
// sequence, clears only the entries that sequence touched (O(L), not O(V^k)).
template <typename T>
void bayes_nll_cpu(T* nll, const int64_t* tokens, int64_t batch, int64_t L, int64_t k, int64_t n_ctx,
                   int64_t V, double alpha) {
  std::vector<double> log_total(L + 1), log_pair(L + 1);
  for (int64_t n = 0; n <= L; ++n) {
    log_total[n] = std::log(static_cast<double>(n) + static_cast<double>(V) * alpha);
    log_pair[n] = std::log(static_cast<double>(n) + alpha);
  }
  const T log_v = static_cast<T>(std::log(static_cast<double>(V)));
  const int64_t top = n_ctx / V;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> pair(n_ctx * V, 0), total(n_ctx, 0);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* x = tokens + b * L;
      T* out = nll + b * L;
      int64_t c = 0;
      for (int64_t t = 0; t < k; ++t) {
        out[t] = log_v;
        c = c * V + x[t];
      }
      const int64_t c_first = c;
      for (int64_t t = k; t < L; ++t) {
        const int64_t a = x[t];
        int32_t& n_ca = pair[c * V + a];
        int32_t& n_c = total[c];
        out[t] = static_cast<T>(log_total[n_c] - log_pair[n_ca]);
        ++n_ca;
        ++n_c;
        c = (c - x[t - k] * top) * V + a;
      }
      c = c_first;  // replay the contexts to clear what this sequence touched
      for (int64_t t = k; t < L; ++t) {
        pair[c * V + x[t]] = 0;
        total[c] = 0;
        c = (c - x[t - k] * top) * V + x[t];
      }
    }
  });
}

// visits[b, j] = #{i < j : ctx[b, i] == ctx[b, j]} for ctx [B, n] with entries in [0, n_ctx): how
// often a target's context preceded it (N_<t(c_t), docs/design.md §8). One count buffer per worker,
// cleared after each sequence over the entries it touched (O(n), not O(n_ctx)).
void visits_cpu(int64_t* visits, const int64_t* ctx, int64_t B, int64_t n, int64_t n_ctx) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> seen(n_ctx, 0);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* c = ctx + b * n;
      int64_t* v = visits + b * n;
      for (int64_t j = 0; j < n; ++j) v[j] = seen[c[j]]++;
      for (int64_t j = 0; j < n; ++j) seen[c[j]] = 0;
    }
  });
}

}  // namespace

// ---- ops ----------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> sample(int64_t batch, int64_t k, int64_t seq_len, int64_t vocab_size,
                                          double alpha, int64_t seed, at::Device device,
                                          at::ScalarType table_dtype) {
  TORCH_CHECK_VALUE(batch >= 0, "batch must be >= 0, got ", batch);
  const int64_t n_ctx = num_contexts(k, vocab_size);
  check_alpha(alpha);
  check_float_dtype(table_dtype, "table dtype");
  TORCH_CHECK_VALUE(seq_len > k, "seq_len must be > k, got seq_len=", seq_len, ", k=", k);
  TORCH_CHECK_VALUE(seed >= 0, "seed must be >= 0, got ", seed);
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(), "device must be cpu or cuda, got ", device);
  check_cuda_usable(device, "sample");
  const auto useed = static_cast<uint64_t>(seed);
  auto opts = at::TensorOptions().device(device);
  at::Tensor tables64 = at::empty({batch, n_ctx, vocab_size}, opts.dtype(at::kDouble));
  at::Tensor tokens = at::empty({batch, seq_len}, opts.dtype(at::kLong));
  if (batch == 0) return {tokens, tables64.to(table_dtype)};

  if (device.is_cpu()) {
    double* tab = tables64.data_ptr<double>();
    at::parallel_for(0, batch * n_ctx, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        Rng rng(useed, static_cast<uint64_t>(i / n_ctx), static_cast<uint64_t>(i % n_ctx));
        detail::dirichlet_row(rng, alpha, vocab_size, tab + i * vocab_size);
      }
    });
  } else {
#ifdef EQPROP_WITH_CUDA
    c10::cuda::CUDAGuard guard(device);
    EQPROP_CUDA_CHECK(eqprop::cuda::markov_sample_tables(tables64.data_ptr<double>(), batch, n_ctx,
                                                         vocab_size, alpha, useed,
                                                         c10::cuda::getCurrentCUDAStream()));
#else
    no_cuda_kernels("sample");
#endif
  }
  // Tokens are drawn from the tables as returned (after the cast), so the two always agree.
  at::Tensor tables = tables64.to(table_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES(tables.scalar_type(), "markov_sample", [&] {
    if (device.is_cpu()) {
      sample_tokens_cpu<scalar_t>(tokens.data_ptr<int64_t>(), tables.data_ptr<scalar_t>(), batch, seq_len, k,
                                  n_ctx, vocab_size, useed);
    } else {
#ifdef EQPROP_WITH_CUDA
      c10::cuda::CUDAGuard guard(device);
      auto stream = c10::cuda::getCurrentCUDAStream();
      if constexpr (std::is_same_v<scalar_t, float>) {
        EQPROP_CUDA_CHECK(eqprop::cuda::markov_sample_tokens_f32(tokens.data_ptr<int64_t>(),
                                                                 tables.data_ptr<float>(), batch, seq_len, k,
                                                                 n_ctx, vocab_size, useed, stream));
      } else {
        EQPROP_CUDA_CHECK(eqprop::cuda::markov_sample_tokens_f64(tokens.data_ptr<int64_t>(),
                                                                 tables.data_ptr<double>(), batch, seq_len, k,
                                                                 n_ctx, vocab_size, useed, stream));
      }
#endif
    }
  });
  return {tokens, tables};
}

at::Tensor bayes_nll(const at::Tensor& tokens_in, int64_t k, int64_t vocab_size, double alpha,
                     at::ScalarType dtype) {
  const int64_t n_ctx = num_contexts(k, vocab_size);
  check_alpha(alpha);
  check_float_dtype(dtype, "dtype");
  const at::Tensor tokens = checked_tokens(tokens_in, k, vocab_size);
  const int64_t B = tokens.size(0), L = tokens.size(1);
  TORCH_CHECK_VALUE(L < (int64_t(1) << 31), "tokens: L must be < 2^31 (int32 counts), got ", L);
  at::Tensor nll = at::empty({B, L}, tokens.options().dtype(dtype));
  if (B == 0) return nll;
  if (tokens.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "bayes_nll_cpu", [&] {
      bayes_nll_cpu<scalar_t>(nll.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(), B, L, k, n_ctx,
                              vocab_size, alpha);
    });
    return nll;
  }
#ifdef EQPROP_WITH_CUDA
  c10::cuda::CUDAGuard guard(tokens.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Sequences run in chunks so that a global count workspace (when counts do not fit in shared
  // memory) stays bounded.
  const int64_t per_seq = eqprop::cuda::markov_bayes_nll_workspace(n_ctx, vocab_size);
  const int64_t chunk =
      per_seq == 0 ? B : std::max<int64_t>(1, std::min<int64_t>(B, kMaxCountEntries / per_seq));
  at::Tensor counts = at::empty({chunk * per_seq}, tokens.options().dtype(at::kInt));
  int32_t* workspace = per_seq == 0 ? nullptr : counts.data_ptr<int32_t>();
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nb = std::min(chunk, B - b0);
    const int64_t* x = tokens.data_ptr<int64_t>() + b0 * L;
    if (dtype == at::kFloat) {
      EQPROP_CUDA_CHECK(eqprop::cuda::markov_bayes_nll_f32(nll.data_ptr<float>() + b0 * L, x, workspace, nb,
                                                           L, k, n_ctx, vocab_size, alpha, stream));
    } else {
      EQPROP_CUDA_CHECK(eqprop::cuda::markov_bayes_nll_f64(nll.data_ptr<double>() + b0 * L, x, workspace, nb,
                                                           L, k, n_ctx, vocab_size, alpha, stream));
    }
  }
  return nll;
#else
  no_cuda_kernels("bayes_nll");
#endif
}

at::Tensor oracle_nll(const at::Tensor& tokens_in, const at::Tensor& tables_in, int64_t k) {
  TORCH_CHECK_VALUE(tables_in.defined(), "tables must be a tensor, got None");
  TORCH_CHECK_VALUE(tables_in.dim() == 3, "tables must be [B, V^k, V], got shape ", tables_in.sizes());
  const int64_t V = tables_in.size(2);
  const int64_t n_ctx = num_contexts(k, V);
  const at::Tensor tokens = checked_tokens(tokens_in, k, V);
  check_float_dtype(tables_in.scalar_type(), "tables dtype");
  TORCH_CHECK_VALUE(tables_in.size(0) == tokens.size(0) && tables_in.size(1) == n_ctx,
                    "tables must be [B, V^k, V] = [", tokens.size(0), ", ", n_ctx, ", ", V,
                    "] for tokens of shape ", tokens.sizes(), " and k=", k, ", got ", tables_in.sizes());
  TORCH_CHECK_VALUE(tables_in.device() == tokens.device(), "tables and tokens must be on one device, got ",
                    tables_in.device(), " and ", tokens.device());
  const at::Tensor tables = tables_in.contiguous();
  check_probability_rows(tables);
  const int64_t B = tokens.size(0), L = tokens.size(1);
  at::Tensor nll = at::full({B, L}, std::log(static_cast<double>(V)), tables.options());
  if (B == 0) return nll;
  at::Tensor flat = context_index(tokens, k, V).mul_(V).add_(tokens.slice(1, k, L));  // [B, L−k]
  nll.slice(1, k, L).copy_(tables.reshape({B, n_ctx * V}).gather(1, flat).log().neg());
  return nll;
}

at::Tensor log_evidence(const at::Tensor& tokens_in, int64_t k, int64_t vocab_size, double alpha) {
  const int64_t n_ctx = num_contexts(k, vocab_size);
  check_alpha(alpha);
  const at::Tensor tokens = checked_tokens(tokens_in, k, vocab_size);
  const int64_t B = tokens.size(0), L = tokens.size(1);
  TORCH_CHECK_VALUE(B <= std::numeric_limits<int64_t>::max() / (n_ctx * vocab_size),
                    "tokens: batch too large for int64 keys");
  // Counts of the visited (sequence, context, symbol) triples by sorting keys: memory O(B·L),
  // independent of V^k. Unvisited contexts contribute zero to the evidence.
  at::Tensor ctx = context_index(tokens, k, vocab_size);  // [B, L−k]
  at::Tensor seq = at::arange(B, tokens.options()).unsqueeze(1).mul(n_ctx);
  at::Tensor ctx_key = (ctx + seq).reshape(-1);  // b·n_ctx + c
  at::Tensor pair_key = ctx_key.mul(vocab_size).add(tokens.slice(1, k, L).reshape(-1));
  auto evidence_terms = [&](const at::Tensor& keys, int64_t per_seq, double prior) {
    // Σ over distinct keys of lnΓ(N + prior) − lnΓ(prior), summed per sequence.
    auto [uniq, inverse, counts] = at::_unique2(keys, /*sorted=*/true, /*return_inverse=*/false,
                                                /*return_counts=*/true);
    at::Tensor terms = (counts.to(at::kDouble) + prior).lgamma_().sub_(std::lgamma(prior));
    return at::zeros({B}, terms.options()).index_add_(0, uniq.div(per_seq, "floor"), terms);
  };
  const double v_alpha = static_cast<double>(vocab_size) * alpha;
  return evidence_terms(ctx_key, n_ctx, v_alpha) - evidence_terms(pair_key, n_ctx * vocab_size, alpha);
}

at::Tensor context_counts(const at::Tensor& tokens_in, int64_t k, int64_t vocab_size) {
  const int64_t n_ctx = num_contexts(k, vocab_size);
  const at::Tensor tokens = checked_tokens(tokens_in, k, vocab_size);
  const int64_t B = tokens.size(0);
  at::Tensor counts = at::zeros({B, n_ctx}, tokens.options());
  if (B == 0) return counts;
  at::Tensor ctx = context_index(tokens, k, vocab_size);
  return counts.scatter_add_(1, ctx, at::ones_like(ctx));
}

at::Tensor context_visits(const at::Tensor& tokens_in, int64_t k, int64_t vocab_size) {
  const int64_t n_ctx = num_contexts(k, vocab_size);
  const at::Tensor tokens = checked_tokens(tokens_in, k, vocab_size);
  const int64_t B = tokens.size(0), L = tokens.size(1);
  TORCH_CHECK_VALUE(L < (int64_t(1) << 31), "tokens: L must be < 2^31 (int32 counts), got ", L);
  at::Tensor visits = at::full({B, L}, -1, tokens.options());
  if (B == 0) return visits;
  // No CUDA kernel: the context indices are formed on the tokens' device and counted on the CPU
  // (one copy each way); the count is sequential in t within a sequence.
  const at::Tensor ctx = context_index(tokens, k, vocab_size).cpu();  // [B, L−k]
  at::Tensor out = at::empty({B, L - k}, ctx.options());
  visits_cpu(out.data_ptr<int64_t>(), ctx.data_ptr<int64_t>(), B, L - k, n_ctx);
  visits.slice(1, k, L).copy_(out);
  return visits;
}

}  // namespace eqprop::markov
