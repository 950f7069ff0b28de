// Random streams and the Dirichlet / categorical draws of the Markov-k sampler (docs/design.md §8).
// Plain C++ shared by the CPU kernels (csrc/markov/markov.cpp) and the CUDA kernels
// (csrc/cuda/markov.cu): no ATen, no torch. Every draw is a pure function of (seed, stream), so a
// result does not depend on thread count, block size or scheduling.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EQPROP_HD __host__ __device__ __forceinline__
#else
#define EQPROP_HD inline
#endif

namespace eqprop::markov::detail {

// Stream ids: one per (sequence, table row) for the Dirichlet rows, one per sequence for the tokens.
constexpr uint64_t kTokenStream = 0xFFFFFFFFFFFFFFFFull;

EQPROP_HD uint64_t splitmix64(uint64_t& state) {
  state += 0x9E3779B97F4A7C15ull;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

EQPROP_HD uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// xoshiro256** (Blackman & Vigna), seeded through splitmix64 from (seed, sequence, row).
struct Rng {
  uint64_t s[4];

  EQPROP_HD Rng(uint64_t seed, uint64_t sequence, uint64_t row) {
    uint64_t sm = seed;
    uint64_t a = splitmix64(sm);
    sm = a ^ (sequence * 0xD1B54A32D192ED03ull);
    uint64_t b = splitmix64(sm);
    sm = b ^ (row * 0xAEF17502108EF2D9ull);
    for (int i = 0; i < 4; ++i) s[i] = splitmix64(sm);
  }

  EQPROP_HD uint64_t next() {
    const uint64_t result = rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
  }

  // Uniform on the open interval (0, 1): 53 random bits, offset by half a step.
  EQPROP_HD double uniform() { return (static_cast<double>(next() >> 11) + 0.5) * 0x1.0p-53; }

  EQPROP_HD double normal() {  // Box–Muller, one of the pair
    const double u1 = uniform(), u2 = uniform();
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586476925 * u2);
  }

  // ln G with G ~ Gamma(a, 1). Marsaglia & Tsang (2000) for a >= 1; for a < 1 the boost
  // G(a) = G(a + 1) U^(1/a), kept in logs so that tiny a cannot underflow a Dirichlet row to zeros.
  EQPROP_HD double log_gamma_variate(double a) {
    double log_boost = 0.0;
    if (a < 1.0) {
      log_boost = log(uniform()) / a;
      a += 1.0;
    }
    const double d = a - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
      const double x = normal();
      double v = 1.0 + c * x;
      if (v <= 0.0) continue;
      v = v * v * v;
      const double u = uniform();
      if (log(u) < 0.5 * x * x + d - d * v + d * log(v)) return log(d * v) + log_boost;
    }
  }
};

// One Dirichlet(alpha) row of length V written to p (normalized from log-gamma variates).
EQPROP_HD void dirichlet_row(Rng& rng, double alpha, int64_t V, double* p) {
  double m = -INFINITY;
  for (int64_t a = 0; a < V; ++a) {
    p[a] = rng.log_gamma_variate(alpha);
    m = p[a] > m ? p[a] : m;
  }
  double total = 0.0;
  for (int64_t a = 0; a < V; ++a) {
    p[a] = exp(p[a] - m);
    total += p[a];
  }
  for (int64_t a = 0; a < V; ++a) p[a] /= total;
}

// Inverse-CDF draw from a probability row p[0..V) (stored as float or double).
template <typename T>
EQPROP_HD int64_t categorical(Rng& rng, const T* p, int64_t V) {
  const double u = rng.uniform();
  double cum = 0.0;
  int64_t last_positive = 0;
  for (int64_t a = 0; a < V; ++a) {
    if (p[a] > T(0)) last_positive = a;
    cum += static_cast<double>(p[a]);
    if (u < cum) return a;
  }
  return last_positive;  // u beyond the rounded total: the last symbol with mass
}

EQPROP_HD int64_t uniform_symbol(Rng& rng, int64_t V) {
  const int64_t a = static_cast<int64_t>(rng.uniform() * static_cast<double>(V));
  return a < V ? a : V - 1;
}

}  // namespace eqprop::markov::detail
