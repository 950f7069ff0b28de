// Jacobian diagnostics and contraction penalties (see diagnostics.h; docs/design.md §6, §7).
#include "diagnostics/diagnostics.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "solvers/relax.h"

namespace eqprop::diagnostics {
namespace {

using solvers::sq_norm_per_sample;
constexpr double kTiny = 1e-30;

void check_point(VectorField& f, const at::Tensor& z) {
  TORCH_CHECK_VALUE(z.defined(), "z must be a tensor, got None");
  TORCH_CHECK_VALUE(z.is_floating_point() || z.is_complex(),
                    "z must be a floating-point or complex tensor, got ", z.scalar_type());
  TORCH_CHECK_VALUE(z.dim() >= 1 && z.size(0) >= 1 && z.numel() > 0,
                    "z must be [B, ...] with B >= 1 and no empty dimension, got shape ", z.sizes());
}

void check_count(const char* name, int64_t n) { TORCH_CHECK_VALUE(n >= 1, name, " must be >= 1, got ", n); }

// Probes with E[v vᵀ] = I, drawn on the CPU (reproducible across devices), then moved to z.
class Probes {
 public:
  Probes(const at::Tensor& z, uint64_t seed, const std::string& dist)
      : z_(z), gen_(at::make_generator<at::CPUGeneratorImpl>(seed)) {
    TORCH_CHECK_VALUE(dist == "rademacher" || dist == "gaussian",
                      "probe distribution must be 'rademacher' or 'gaussian', got '", dist, "'");
    rademacher_ = dist == "rademacher";
  }
  at::Tensor next() {
    const auto real = c10::toRealValueType(z_.scalar_type());
    const auto cpu = at::TensorOptions().dtype(real == at::kDouble ? at::kDouble : at::kFloat);
    at::Tensor v =
        rademacher_ ? at::randint(2, z_.sizes(), gen_, cpu) * 2 - 1 : at::randn(z_.sizes(), gen_, cpu);
    return v.to(z_.options());
  }

 private:
  at::Tensor z_;
  at::Generator gen_;
  bool rademacher_ = true;
};

double sum_sq(const at::Tensor& t) { return sq_norm_per_sample(t).sum().item<double>(); }

// Jᴴw from the plain-transpose VJP: Jᴴw = conj(Jᵀ conj(w)).
at::Tensor adjoint_apply(Linearization& lin, const at::Tensor& w) {
  if (!w.is_complex()) return lin.vjp(w);
  return at::conj_physical(lin.vjp(at::conj_physical(w)));
}

at::Tensor normalize(const at::Tensor& v) {
  std::vector<int64_t> shape(v.dim(), 1);
  shape[0] = v.size(0);
  return v / sq_norm_per_sample(v).sqrt().clamp_min(kTiny).to(v.scalar_type()).reshape(shape);
}

struct Moments {
  double mean_a = 0, mean_b = 0, var_a = 0, var_b = 0, cov = 0;
  int64_t n = 0;
};

Moments moments(const std::vector<double>& a, const std::vector<double>& b) {
  Moments m;
  m.n = static_cast<int64_t>(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    m.mean_a += a[i];
    m.mean_b += b[i];
  }
  m.mean_a /= m.n;
  m.mean_b /= m.n;
  if (m.n < 2) {
    m.var_a = m.var_b = m.cov = std::numeric_limits<double>::quiet_NaN();
    return m;
  }
  for (size_t i = 0; i < a.size(); ++i) {
    m.var_a += (a[i] - m.mean_a) * (a[i] - m.mean_a);
    m.var_b += (b[i] - m.mean_b) * (b[i] - m.mean_b);
    m.cov += (a[i] - m.mean_a) * (b[i] - m.mean_b);
  }
  m.var_a /= (m.n - 1);
  m.var_b /= (m.n - 1);
  m.cov /= (m.n - 1);
  return m;
}

}  // namespace

std::pair<at::Tensor, at::Tensor> residual(VectorField& f, const at::Tensor& z) {
  check_point(f, z);
  c10::NoGradGuard no_grad;
  const at::Tensor fz = f.eval(z);
  TORCH_CHECK_VALUE(fz.sizes() == z.sizes(), "the vector field must return F(z) with the shape of z ",
                    z.sizes(), ", got ", fz.sizes());
  const at::Tensor abs_res = sq_norm_per_sample(fz - z).sqrt();
  return {abs_res, abs_res / sq_norm_per_sample(fz).sqrt().clamp_min(kTiny)};
}

std::pair<at::Tensor, at::Tensor> spectral_radius(VectorField& f, const at::Tensor& z, int64_t iters,
                                                  uint64_t seed) {
  check_point(f, z);
  check_count("iters", iters);
  auto lin = f.linearize(z.detach());
  c10::NoGradGuard no_grad;
  at::Tensor v = normalize(Probes(z, seed, "gaussian").next());
  std::vector<at::Tensor> growth;
  for (int64_t t = 0; t < iters; ++t) {
    solvers::check_interrupt();  // Ctrl-C, as in relax
    const at::Tensor w = lin->jvp(v);
    const at::Tensor nrm = sq_norm_per_sample(w).sqrt();  // [B]
    growth.push_back(nrm);
    v = normalize(w);
  }
  const at::Tensor g = at::stack(growth);  // [iters, B]
  const int64_t half = iters / 2;
  const at::Tensor rho = at::log(g.narrow(0, half, iters - half)).mean(0).exp();
  return {rho, g};
}

std::pair<at::Tensor, at::Tensor> spectral_norm(VectorField& f, const at::Tensor& z, int64_t iters,
                                                uint64_t seed) {
  check_point(f, z);
  check_count("iters", iters);
  auto lin = f.linearize(z.detach());
  c10::NoGradGuard no_grad;
  at::Tensor v = normalize(Probes(z, seed, "gaussian").next());
  std::vector<at::Tensor> sigma;
  for (int64_t t = 0; t < iters; ++t) {
    solvers::check_interrupt();
    const at::Tensor w = lin->jvp(v);  // ‖Jv‖ with ‖v‖ = 1: a lower bound that rises to ‖J‖₂
    sigma.push_back(sq_norm_per_sample(w).sqrt());
    v = normalize(adjoint_apply(*lin, w));  // v ← JᴴJv / ‖JᴴJv‖
  }
  const at::Tensor s = at::stack(sigma);  // [iters, B]
  return {s[iters - 1], s};
}

ProbeEstimate frobenius_sq(VectorField& f, const at::Tensor& z, int64_t probes, uint64_t seed,
                           const std::string& dist) {
  check_point(f, z);
  check_count("probes", probes);
  auto lin = f.linearize(z.detach());
  c10::NoGradGuard no_grad;
  Probes gen(z, seed, dist);
  std::vector<double> s;
  const double numel = static_cast<double>(z.numel());
  for (int64_t k = 0; k < probes; ++k) {
    solvers::check_interrupt();
    s.push_back(sum_sq(lin->vjp(gen.next())) / numel);
  }
  const Moments m = moments(s, s);
  return {m.mean_a, std::sqrt(m.var_a / m.n), probes};
}

// Moments of two per-probe statistics of (Jv, Jᵀv) at one linearization: the Monte-Carlo pairs
// behind the non-normality and symmetric-fraction ratios.
template <typename PairFn>
Moments probe_pairs(VectorField& f, const at::Tensor& z, int64_t probes, uint64_t seed,
                    const std::string& dist, PairFn pair) {
  check_point(f, z);
  check_count("probes", probes);
  auto lin = f.linearize(z.detach());
  c10::NoGradGuard no_grad;
  Probes gen(z, seed, dist);
  std::vector<double> a, b;
  for (int64_t k = 0; k < probes; ++k) {
    solvers::check_interrupt();
    const at::Tensor v = gen.next();
    const auto [stat_a, stat_b] = pair(lin->jvp(v), lin->vjp(v));
    a.push_back(stat_a);
    b.push_back(stat_b);
  }
  return moments(a, b);
}

ProbeEstimate nonnormality(VectorField& f, const at::Tensor& z, int64_t probes, uint64_t seed,
                           const std::string& dist) {
  const Moments m = probe_pairs(f, z, probes, seed, dist, [](const at::Tensor& jv, const at::Tensor& jtv) {
    return std::pair<double, double>{sum_sq(jv - jtv), sum_sq(jv)};
  });
  const double q = m.mean_a / std::max(m.mean_b, kTiny), r = std::sqrt(q);
  // Delta method for the ratio of means q = ā/b̄, then d√q = dq / (2√q).
  const double var_q = (m.var_a / (m.mean_b * m.mean_b) - 2 * m.mean_a * m.cov / std::pow(m.mean_b, 3) +
                        m.mean_a * m.mean_a * m.var_b / std::pow(m.mean_b, 4)) /
                       m.n;
  const double se = r > 0 ? std::sqrt(std::max(var_q, 0.0)) / (2 * r) : 0.0;
  return {r, se, probes};
}

ProbeEstimate symmetric_fraction(VectorField& f, const at::Tensor& z, int64_t probes, uint64_t seed,
                                 const std::string& dist) {
  const Moments m = probe_pairs(f, z, probes, seed, dist, [](const at::Tensor& jv, const at::Tensor& jtv) {
    return std::pair<double, double>{0.25 * sum_sq(jv + jtv),   // ‖J_s v‖²
                                     0.25 * sum_sq(jv - jtv)};  // ‖J_a v‖²
  });
  const double S = std::sqrt(m.mean_a), A = std::sqrt(m.mean_b);
  if (S + A == 0) return {std::numeric_limits<double>::quiet_NaN(), 0.0, probes};
  const double frac = S / (S + A);
  if (S == 0 || A == 0) return {frac, 0.0, probes};  // every probe gave 0 in one part: exact
  // Delta method: ∂f/∂s̄ = A/(S+A)² · 1/(2S), ∂f/∂ā = −S/(S+A)² · 1/(2A).
  const double g1 = A / ((S + A) * (S + A)) / (2 * S), g2 = -S / ((S + A) * (S + A)) / (2 * A);
  const double var = (g1 * g1 * m.var_a + 2 * g1 * g2 * m.cov + g2 * g2 * m.var_b) / m.n;
  return {frac, std::sqrt(std::max(var, 0.0)), probes};
}

at::Tensor jacobian_penalty(VectorField& f, const at::Tensor& z, int64_t probes, uint64_t seed, double weight,
                            const std::string& dist) {
  check_point(f, z);
  check_count("probes", probes);
  Probes gen(z, seed, dist);
  at::Tensor total;
  for (int64_t k = 0; k < probes; ++k) {
    const at::Tensor vj = f.vjp_differentiable(z, gen.next());  // vᵀJ, on the graph
    const at::Tensor term = sq_norm_per_sample(vj).sum();
    total = total.defined() ? total + term : term;
  }
  return total * (weight / (static_cast<double>(probes) * static_cast<double>(z.numel())));
}

at::Tensor homeostatic_loss(VectorField& f, const at::Tensor& z, int64_t probes, uint64_t seed, double weight,
                            const std::string& dist) {
  check_point(f, z);
  check_count("probes", probes);
  Probes gen(z, seed, dist);
  at::Tensor total;
  for (int64_t k = 0; k < probes; ++k) {
    const at::Tensor eps = gen.next();
    const at::Tensor je = f.jvp_differentiable(z, eps), jte = f.vjp_differentiable(z, eps);
    // ‖Jε‖² − Re⟨Jᵀε, Jε⟩: E = ‖J‖²_F − tr(J²) = ½‖J − Jᵀ‖²_F for real J.
    const at::Tensor cross = je.is_complex() ? at::real(jte.conj() * je).sum() : (jte * je).sum();
    const at::Tensor term = sq_norm_per_sample(je).sum() - cross;
    total = total.defined() ? total + term : term;
  }
  return total * (weight / (static_cast<double>(probes) * static_cast<double>(z.numel())));
}

}  // namespace eqprop::diagnostics
