// Type-II Anderson mixing; the equations are in anderson.h.
#include "solvers/anderson.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "solvers/relaxation.h"

namespace eqprop::solvers::detail {

Anderson::Anderson(const at::Tensor& z0, int64_t m, double beta, double reg)
    : m_(m), beta_(beta), reg_(reg), batch_(z0.size(0)), n_(z0.numel() / z0.size(0)) {
  // Half / bfloat16 states mix in float32: the Gram matrix and its solve need the precision
  // (and linalg has no half kernels).
  const auto st = z0.scalar_type();
  const auto work = (st == at::kHalf || st == at::kBFloat16) ? at::kFloat : st;
  X_ = at::zeros({batch_, m, n_}, z0.options().dtype(work));
  F_ = at::zeros({batch_, m, n_}, z0.options().dtype(work));
}

at::Tensor Anderson::step(const at::Tensor& z, const at::Tensor& fz, const at::Tensor& picard, int64_t t) {
  const int64_t slot = t % m_, k = std::min<int64_t>(t + 1, m_);
  X_.select(1, slot).copy_(z.reshape({batch_, n_}));
  F_.select(1, slot).copy_(fz.reshape({batch_, n_}));
  if (k == 1) return picard;  // one point: Anderson is the damped step
  const at::Tensor X = X_.narrow(1, 0, k), F = F_.narrow(1, 0, k);
  const at::Tensor G = F - X;                   // [B, k, n]
  at::Tensor H = at::matmul(G.conj(), G.mT());  // [B, k, n] @ [B, n, k] -> [B, k, k]
  const at::Tensor diag_mean = at::real(H.diagonal(0, -2, -1)).mean(-1);  // [B]
  const at::Tensor lam = diag_mean * reg_ + kTiny;
  H = H + at::diag_embed(lam.unsqueeze(-1).expand({batch_, k}).to(H.scalar_type()));
  at::Tensor A = at::zeros({batch_, k + 1, k + 1}, H.options());
  A.narrow(1, 1, k).narrow(2, 1, k).copy_(H);
  A.select(1, 0).narrow(1, 1, k).fill_(1);
  A.select(2, 0).narrow(1, 1, k).fill_(1);
  at::Tensor rhs = at::zeros({batch_, k + 1, 1}, H.options());
  rhs.select(1, 0).fill_(1);
  auto [sol, info] = at::linalg_solve_ex(A, rhs);
  const at::Tensor alpha = sol.narrow(1, 1, k).squeeze(-1);  // [B, k]
  const at::Tensor a3 = alpha.unsqueeze(1);                  // [B, 1, k]
  // [B, 1, k] @ [B, k, n] -> [B, 1, n]
  const at::Tensor mixed = (at::matmul(a3, F) * beta_ + at::matmul(a3, X) * (1.0 - beta_)).squeeze(1);
  const at::Tensor ok = (info == 0).logical_and(at::isfinite(alpha).all(-1));  // [B]
  return at::where(per_sample(ok, picard), mixed.view(picard.sizes()).to(picard.scalar_type()), picard);
}

}  // namespace eqprop::solvers::detail
