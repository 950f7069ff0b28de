// Equilibrium Propagation: nudging points, the cross-entropy readout's loss gradient, stacked
// fields, the batched nudged phase and the estimate (docs/design.md §5; equations in ep.h).
#include "estimators/ep.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cmath>
#include <limits>

#include "block/block_field.h"

namespace eqprop::estimators {
namespace {

using at::Tensor;
constexpr double kTiny = 1e-30;  // smallest norm used as a denominator (as in relax)

bool is_real_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// [N] per-row values -> [N, 1, ..., 1] to scale whole rows of a [N, ...] tensor.
Tensor per_row(const Tensor& v, const Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[0] = like.size(0);
  return v.reshape(shape);
}

}  // namespace

// ---- options and points ----------------------------------------------------------------------------

Correction parse_correction(const std::string& s) {
  if (s == "none") return Correction::none;
  if (s == "frozen") return Correction::frozen;
  if (s == "tracking") return Correction::tracking;
  TORCH_CHECK_VALUE(false, "correction must be one of None, 'frozen', 'tracking', got '", s, "'");
}

std::string to_string(Correction c) {
  switch (c) {
    case Correction::none:
      return "none";
    case Correction::frozen:
      return "frozen";
    case Correction::tracking:
      return "tracking";
  }
  return "none";
}

bool EPPoints::is_complex() const {
  for (const auto& b : beta)
    if (b.imag() != 0.0) return true;
  return false;
}

EPPoints ep_points(int64_t n_points, double radius, bool conjugate_shortcut) {
  TORCH_CHECK_VALUE(n_points >= 1, "n_points must be >= 1, got ", n_points);
  TORCH_CHECK_VALUE(
      std::isfinite(radius) && radius > 0.0,
      "beta must be a finite number > 0 (the nudging strength, the radius r for n_points >= 3), got ",
      radius);
  EPPoints p;
  p.n_points = n_points;
  p.radius = radius;
  p.conjugate_shortcut = conjugate_shortcut && n_points >= 3;
  const int64_t last = p.conjugate_shortcut ? n_points / 2 : n_points - 1;
  for (int64_t k = 0; k <= last; ++k) {
    // Points on the axes exactly (k/N ∈ {0, ¼, ½, ¾}): a real β must give a real-valued state.
    c10::complex<double> b;
    if (k == 0)
      b = {radius, 0.0};
    else if (2 * k == n_points)
      b = {-radius, 0.0};
    else if (4 * k == n_points)
      b = {0.0, radius};
    else if (4 * k == 3 * n_points)
      b = {0.0, -radius};
    else {
      const double a = 2.0 * M_PI * static_cast<double>(k) / static_cast<double>(n_points);
      b = {radius * std::cos(a), radius * std::sin(a)};
    }
    p.beta.push_back(b);
    p.weight.push_back(p.conjugate_shortcut && k > 0 && 2 * k < n_points ? 2.0 : 1.0);
  }
  return p;
}

// ---- cross-entropy readout -------------------------------------------------------------------------

CrossEntropyReadout::CrossEntropyReadout(Tensor ln_weight_, Tensor ln_bias_, Tensor head_weight_,
                                         Tensor head_bias_, Tensor targets_, int64_t ignore_index_,
                                         double ln_eps_)
    : ln_weight(std::move(ln_weight_)),
      ln_bias(std::move(ln_bias_)),
      head_weight(std::move(head_weight_)),
      head_bias(std::move(head_bias_)),
      targets(std::move(targets_)),
      ignore_index(ignore_index_),
      ln_eps(ln_eps_) {
  TORCH_CHECK_VALUE(head_weight.defined() && head_weight.dim() == 2, "head_weight must be [V, C], got ",
                    head_weight.defined() ? c10::str(head_weight.sizes()) : "None");
  const int64_t V = head_weight.size(0), C = head_weight.size(1);
  TORCH_CHECK_VALUE(is_real_float(head_weight.scalar_type()),
                    "head_weight must be a real floating tensor, got ", head_weight.scalar_type());
  const auto check_vec = [&](const Tensor& t, const char* name, int64_t n, bool optional) {
    if (optional && !t.defined()) return;
    TORCH_CHECK_VALUE(t.defined() && t.dim() == 1 && t.size(0) == n, name, " must be [", n, "], got ",
                      t.defined() ? c10::str(t.sizes()) : "None");
    TORCH_CHECK_VALUE(t.scalar_type() == head_weight.scalar_type() && t.device() == head_weight.device(),
                      name, " must have head_weight's dtype and device (", head_weight.scalar_type(), ", ",
                      head_weight.device(), "), got ", t.scalar_type(), ", ", t.device());
  };
  check_vec(ln_weight, "ln_weight", C, false);
  check_vec(ln_bias, "ln_bias", C, true);
  check_vec(head_bias, "head_bias", V, true);
  TORCH_CHECK_VALUE(std::isfinite(ln_eps) && ln_eps > 0.0, "ln_eps must be a finite number > 0, got ",
                    ln_eps);
  TORCH_CHECK_VALUE(targets.defined() && targets.dim() == 2 && targets.scalar_type() == at::kLong,
                    "targets must be an int64 tensor [B, T], got ",
                    targets.defined() ? c10::str(targets.scalar_type(), " ", targets.sizes()) : "None");
  TORCH_CHECK_VALUE(targets.device() == head_weight.device(), "targets must be on head_weight's device (",
                    head_weight.device(), "), got ", targets.device());
  const Tensor valid = targets != ignore_index;
  const Tensor in_range = targets.ge(0).logical_and(targets.lt(V));
  TORCH_CHECK_VALUE(valid.logical_not().logical_or(in_range).all().item<bool>(),
                    "targets must lie in [0, V=", V, ") or equal ignore_index=", ignore_index);
  n_targets_ = valid.sum().item<int64_t>();
  TORCH_CHECK_VALUE(
      n_targets_ >= 1,
      "targets must hold at least one position with a target (all equal ignore_index=", ignore_index, ")");
}

void CrossEntropyReadout::check_state(const Tensor& z) const {
  const int64_t B = targets.size(0), T = targets.size(1), C = head_weight.size(1);
  TORCH_CHECK_VALUE(
      z.defined() && z.dim() == 3 && z.size(1) == T && z.size(2) == C && z.size(0) % B == 0 && z.size(0) > 0,
      "z must be [P·B, T, C] with B=", B, ", T=", T, ", C=", C, " (the targets' and head's shapes), got ",
      z.defined() ? c10::str(z.sizes()) : "None");
  const auto real = z.is_complex() ? c10::toRealValueType(z.scalar_type()) : z.scalar_type();
  TORCH_CHECK_VALUE(real == head_weight.scalar_type(), "z must have the readout's dtype ",
                    head_weight.scalar_type(), " (or its complex type), got ", z.scalar_type());
  TORCH_CHECK_VALUE(z.device() == head_weight.device(), "z must be on the readout's device (",
                    head_weight.device(), "), got ", z.device());
}

Tensor CrossEntropyReadout::logits(const Tensor& z, Tensor* xhat, Tensor* r) const {
  const auto cast = [&](const Tensor& t) { return t.defined() ? t.to(z.scalar_type()) : t; };
  const Tensor zc = z - z.mean(-1, /*keepdim=*/true);
  *r = at::rsqrt((zc * zc).mean(-1, true) + ln_eps);  // [N, T, 1], principal branch for complex z
  *xhat = zc * *r;
  Tensor h = *xhat * cast(ln_weight);
  if (ln_bias.defined()) h = h + cast(ln_bias);
  return at::linear(h, cast(head_weight), cast(head_bias));  // [N, T, C] -> [N, T, V]
}

namespace {
// exp(l − m) / Σ exp(l − m) with m = max Re l (detached constant): holomorphic for complex l.
Tensor softmax_last(const Tensor& l) {
  if (!l.is_complex()) return at::softmax(l, -1);
  const Tensor e = at::exp(l - at::real(l).amax(-1, true));
  return e / e.sum(-1, true);
}
}  // namespace

Tensor CrossEntropyReadout::loss(const Tensor& z) const {
  check_state(z);
  at::NoGradGuard no_grad;
  const int64_t P = z.size(0) / targets.size(0);
  Tensor xhat, r;
  const Tensor l = logits(z, &xhat, &r);  // [N, T, V]
  const Tensor m = at::real(l).amax(-1, true);
  const Tensor lse = (at::log(at::exp(l - m).sum(-1, true)) + m).squeeze(-1);  // [N, T]
  const Tensor y = targets.repeat({P, 1});
  const Tensor valid = y != ignore_index;
  const Tensor picked = l.gather(-1, at::where(valid, y, 0).unsqueeze(-1)).squeeze(-1);  // [N, T]
  const Tensor per = at::where(valid, lse - picked, at::zeros({}, l.options()));
  return per.reshape({P, -1}).sum(1) / static_cast<double>(n_targets_);
}

Tensor CrossEntropyReadout::grad(const Tensor& z) const {
  check_state(z);
  at::NoGradGuard no_grad;
  const int64_t P = z.size(0) / targets.size(0);
  Tensor xhat, r;
  const Tensor l = logits(z, &xhat, &r);
  const Tensor y = targets.repeat({P, 1});
  const Tensor valid = (y != ignore_index).unsqueeze(-1).to(l.scalar_type());  // [N, T, 1]
  // ∂ℓ/∂logits = (softmax − onehot(y)) / n at positions with a target
  Tensor d = softmax_last(l) * valid;
  d.scatter_add_(-1, at::where(y != ignore_index, y, 0).unsqueeze(-1), -valid);
  d = d / static_cast<double>(n_targets_);
  const Tensor dh = at::matmul(d, head_weight.to(l.scalar_type()));  // [N, T, V] @ [V, C] -> [N, T, C]
  const Tensor g = dh * ln_weight.to(l.scalar_type());
  // LN's Jacobian r(I − 11ᵀ/C − x̂x̂ᵀ/C) is symmetric: its transpose is itself.
  return r * (g - g.mean(-1, true) - xhat * (g * xhat).mean(-1, true));
}

// ---- stacked fields ----------------------------------------------------------------------------------

namespace {

// J and Jᵀ of a PointStackedField at one stacked point: one linearization of the base per block.
class PointStackedLinearization : public Linearization {
 public:
  PointStackedLinearization(VectorField& base, const Tensor& z, int64_t batch) : z_(z), batch_(batch) {
    for (const Tensor& zk : z.split(batch)) lins_.push_back(base.linearize(zk));
  }
  const Tensor& point() const override { return z_; }
  Tensor value() override {
    std::vector<Tensor> out;
    for (auto& l : lins_) out.push_back(l->value());
    return at::cat(out);
  }
  Tensor vjp(const Tensor& v) override {
    return per_block(v, [](Linearization& l, const Tensor& vk) { return l.vjp(vk); });
  }
  Tensor jvp(const Tensor& v) override {
    return per_block(v, [](Linearization& l, const Tensor& vk) { return l.jvp(vk); });
  }
  std::vector<Tensor> param_vjp(const Tensor& v) override {
    std::vector<Tensor> total;
    const auto vs = v.split(batch_);
    for (size_t k = 0; k < lins_.size(); ++k) {
      auto g = lins_[k]->param_vjp(vs[k]);
      if (total.empty())
        total = g;
      else
        for (size_t i = 0; i < g.size(); ++i) total[i] = total[i] + g[i];
    }
    return total;
  }

 private:
  template <typename Fn>
  Tensor per_block(const Tensor& v, Fn fn) {
    TORCH_CHECK_VALUE(v.sizes() == z_.sizes(), "v must have the shape of z ", z_.sizes(), ", got ",
                      v.sizes());
    std::vector<Tensor> out;
    const auto vs = v.split(batch_);
    for (size_t k = 0; k < lins_.size(); ++k) out.push_back(fn(*lins_[k], vs[k]));
    return at::cat(out);
  }
  Tensor z_;
  int64_t batch_;
  std::vector<std::shared_ptr<Linearization>> lins_;
};

// Any field, P copies of its samples on the batch axis, evaluated one block of B rows at a time.
class PointStackedField : public VectorField {
 public:
  PointStackedField(std::shared_ptr<VectorField> base, int64_t points, int64_t batch)
      : base_(std::move(base)), points_(points), batch_(batch) {}
  Tensor eval(const Tensor& z) override {
    check(z);
    std::vector<Tensor> out;
    for (const Tensor& zk : z.split(batch_)) out.push_back(base_->eval(zk));
    return at::cat(out);
  }
  Tensor vjp(const Tensor& z, const Tensor& v) override {
    return PointStackedLinearization(*base_, checked(z), batch_).vjp(v);
  }
  Tensor jvp(const Tensor& z, const Tensor& v) override {
    return PointStackedLinearization(*base_, checked(z), batch_).jvp(v);
  }
  std::vector<Tensor> param_vjp(const Tensor& z, const Tensor& v) override {
    return PointStackedLinearization(*base_, checked(z), batch_).param_vjp(v);
  }
  std::shared_ptr<Linearization> linearize(const Tensor& z) override {
    return std::make_shared<PointStackedLinearization>(*base_, checked(z), batch_);
  }
  std::vector<Tensor> parameters() override { return base_->parameters(); }
  std::vector<std::string> parameter_names() override { return base_->parameter_names(); }

 private:
  void check(const Tensor& z) const {
    TORCH_CHECK_VALUE(z.defined() && z.dim() >= 1 && z.size(0) == points_ * batch_, "z must have ", points_,
                      " × ", batch_, " rows (points × samples), got shape ",
                      z.defined() ? c10::str(z.sizes()) : "None");
  }
  const Tensor& checked(const Tensor& z) const {
    check(z);
    return z;
  }
  std::shared_ptr<VectorField> base_;
  int64_t points_, batch_;
};

}  // namespace

std::shared_ptr<VectorField> stack_points(const std::shared_ptr<VectorField>& field, int64_t points,
                                          int64_t batch, bool complex) {
  TORCH_CHECK_VALUE(field != nullptr, "field must be an eqprop._C.VectorField, got None");
  TORCH_CHECK_VALUE(points >= 1, "points must be >= 1, got ", points);
  TORCH_CHECK_VALUE(batch >= 1, "batch must be >= 1, got ", batch);
  if (auto blk = std::dynamic_pointer_cast<block::BlockField>(field)) {
    const Tensor& x = blk->x();
    TORCH_CHECK_VALUE(x.size(0) == batch, "batch must equal the block's bound x batch ", x.size(0), ", got ",
                      batch);
    Tensor xs = x.repeat({points, 1, 1});  // [P·B, T, C], point-major
    if (complex && !xs.is_complex()) xs = xs.to(c10::toComplexType(xs.scalar_type()));
    return std::make_shared<block::BlockField>(blk->config(), blk->parameters(), blk->sn_u(), xs);
  }
  return std::make_shared<PointStackedField>(field, points, batch);
}

// ---- nudged phase ------------------------------------------------------------------------------------

namespace {

void check_nudge_options(const NudgeOptions& o) {
  TORCH_CHECK_VALUE(!o.t2.empty(), "t2 must be an int >= 1 or a non-empty list of them, got an empty list");
  for (size_t i = 0; i < o.t2.size(); ++i) {
    TORCH_CHECK_VALUE(o.t2[i] >= 1, "t2 must hold step counts >= 1, got ", o.t2[i]);
    TORCH_CHECK_VALUE(i == 0 || o.t2[i] > o.t2[i - 1], "t2 must be strictly increasing, got ", o.t2[i - 1],
                      " then ", o.t2[i]);
  }
  TORCH_CHECK_VALUE(std::isfinite(o.eps) && o.eps > 0.0, "eps (damping) must be finite and > 0, got ", o.eps);
  TORCH_CHECK_VALUE(std::isfinite(o.tol) && o.tol >= 0.0, "tol must be finite and >= 0, got ", o.tol);
  TORCH_CHECK_VALUE(o.divergence > 1.0, "divergence must be > 1, got ", o.divergence);
  TORCH_CHECK_VALUE(o.check_every >= 1, "check_every must be >= 1, got ", o.check_every);
}

// z̄ = Re[(1/N) Σ_k m_k z_k] (the real part only with the conjugate shortcut, where the omitted
// points are the conjugates), repeated for every point: [P·B, ...].
Tensor common_mode(const Tensor& z, const EPPoints& pts) {
  const int64_t P = pts.size(), B = z.size(0) / P;
  std::vector<int64_t> shape = z.sizes().vec();
  shape[0] = B;
  shape.insert(shape.begin(), P);
  const Tensor zs = z.reshape(shape);  // [P, B, ...]
  Tensor mean = zs.select(0, 0) * (pts.weight[0] / pts.n_points);
  for (int64_t k = 1; k < P; ++k) mean = mean + zs.select(0, k) * (pts.weight[k] / pts.n_points);
  if (pts.conjugate_shortcut && mean.is_complex()) mean = at::real(mean).to(z.scalar_type());
  std::vector<int64_t> rep(z.dim(), 1);
  rep[0] = P;
  return mean.repeat(rep);
}

}  // namespace

NudgeResult nudged_phase(VectorField& stacked, const Tensor& z_start, const Tensor& beta, const EPPoints& pts,
                         const LossGrad& loss_grad, const NudgeOptions& opt) {
  check_nudge_options(opt);
  TORCH_CHECK_VALUE(loss_grad != nullptr, "loss_grad must be given");
  const int64_t P = pts.size();
  TORCH_CHECK_VALUE(P >= 1, "the nudging points are empty");
  TORCH_CHECK_VALUE(
      z_start.defined() && z_start.dim() >= 1 && z_start.size(0) % P == 0 && z_start.numel() > 0,
      "z_start must be [P·B, ...] with P=", P, " points, got ",
      z_start.defined() ? c10::str(z_start.sizes()) : "None");
  TORCH_CHECK_VALUE(beta.defined() && beta.dim() == 1 && beta.size(0) == z_start.size(0) &&
                        beta.scalar_type() == z_start.scalar_type(),
                    "beta must be [P·B] with the dtype of z_start (", z_start.scalar_type(), ")");
  TORCH_CHECK_VALUE(
      opt.correction != Correction::tracking || pts.n_points >= 2,
      "correction='tracking' needs n_points >= 2 (the common mode of one nudged state is the state "
      "itself); use correction='frozen' for one-sided EP");
  c10::NoGradGuard no_grad;
  const Tensor beta_rows = per_row(beta, z_start);

  std::shared_ptr<Linearization> frozen;
  if (opt.correction == Correction::frozen) frozen = stacked.linearize(z_start);

  // d(z) = −β ∂ℓ/∂z + c(z),  c(z) = −(J(z̄)δ − J(z̄)ᵀδ),  δ = z − z̄
  const auto drive = [&](const Tensor& z) {
    const Tensor g = loss_grad(z);
    TORCH_CHECK_VALUE(g.defined() && g.sizes() == z.sizes(), "the loss gradient must have the shape of z ",
                      z.sizes(), ", got ", g.defined() ? c10::str(g.sizes()) : "None");
    TORCH_CHECK_VALUE(g.scalar_type() == z.scalar_type(), "the loss gradient must have the dtype of z (",
                      z.scalar_type(), "), got ", g.scalar_type());
    Tensor d = -(beta_rows * g);
    if (opt.correction != Correction::none) {
      std::shared_ptr<Linearization> lin = frozen;
      if (!lin) lin = stacked.linearize(common_mode(z, pts));
      const Tensor delta = z - lin->point().detach();
      d = d - (lin->jvp(delta) - lin->vjp(delta));
    }
    return d;
  };

  const int64_t n_rows = z_start.size(0);
  const int64_t t_max = opt.t2.back();
  const auto ropts = z_start.options().dtype(c10::toRealValueType(z_start.scalar_type()));
  Tensor z = z_start.detach().clone(at::MemoryFormat::Contiguous);
  Tensor first_abs, ever_diverged = at::zeros({n_rows}, z.options().dtype(at::kBool));
  Tensor first_conv = at::full({n_rows}, -1, z.options().dtype(at::kLong));  // step a row first met tol
  std::vector<Tensor> trace_abs, trace_rel;

  struct Snap {
    Tensor z, abs, rel, drop, conv_step, diverged, converged;
    int64_t t;
  };
  std::vector<Snap> snaps;
  NudgeResult out;
  out.t2 = opt.t2;
  size_t next = 0;  // the next snapshot to take
  for (int64_t t = 0;; ++t) {
    const Tensor fz = stacked.eval(z) + drive(z);
    TORCH_CHECK_VALUE(fz.sizes() == z.sizes() && fz.scalar_type() == z.scalar_type(),
                      "F(z) + d(z) must have the shape and dtype of z ", z.sizes(), " ", z.scalar_type(),
                      ", got ", fz.sizes(), " ", fz.scalar_type());
    auto [z_next, res_sq, f_sq] = solvers::damped_step(z, fz, opt.eps);
    ++out.n_evals;
    const Tensor abs_res = res_sq.sqrt().to(ropts.dtype());
    const Tensor rel_res = (res_sq.sqrt() / f_sq.sqrt().clamp_min(kTiny)).to(ropts.dtype());
    if (opt.trace) {
      trace_abs.push_back(abs_res.unsqueeze(0));
      trace_rel.push_back(rel_res.unsqueeze(0));
    }
    if (t == 0) first_abs = abs_res.clamp_min(kTiny);
    const Tensor metric = abs_res / first_abs;
    const Tensor converged = metric <= opt.tol;
    first_conv = at::where(converged.logical_and(first_conv < 0), t, first_conv);
    ever_diverged.logical_or_(
        at::isfinite(abs_res).logical_not().logical_or(abs_res > first_abs * opt.divergence));
    const bool at_snapshot = t == opt.t2[next];
    // Every row converged: the remaining snapshots are this state (checked every check_every steps).
    const bool done = (t % opt.check_every == 0 || at_snapshot) && converged.all().item<bool>();
    if (t % opt.check_every == 0) solvers::check_interrupt();  // Ctrl-C, as in relax
    while (next < opt.t2.size() && (t == opt.t2[next] || done)) {
      snaps.push_back({z, abs_res, rel_res, metric, first_conv.clone(), ever_diverged.clone(), converged, t});
      ++next;
    }
    if (next == opt.t2.size() || t >= t_max) break;
    z = z_next;
  }

  // The snapshot with the lowest residual drop (max over rows; non-finite counts as +inf; first on ties).
  double best = std::numeric_limits<double>::infinity();
  size_t chosen = 0;
  for (size_t s = 0; s < snaps.size(); ++s) {
    const Tensor& m = snaps[s].drop;
    double worst = m.max().item<double>();
    if (!std::isfinite(worst) || !at::isfinite(m).all().item<bool>())
      worst = std::numeric_limits<double>::infinity();
    out.snapshot_residual.push_back(worst);
    if (worst < best) {
      best = worst;
      chosen = s;
    }
  }
  const Snap& c = snaps[chosen];
  out.chosen = static_cast<int64_t>(chosen);
  out.z = c.z;
  out.abs_residual = c.abs;
  out.rel_residual = c.rel;
  out.drop = c.drop;
  out.steps = at::where(c.conv_step >= 0, c.conv_step, c.t);
  out.status =
      at::full({n_rows}, static_cast<int8_t>(solvers::Status::max_steps), z.options().dtype(at::kChar));
  out.status.masked_fill_(c.converged, static_cast<int8_t>(solvers::Status::converged));
  out.status.masked_fill_(c.diverged.logical_and(c.converged.logical_not()),
                          static_cast<int8_t>(solvers::Status::diverged));
  if (opt.trace) {
    out.trace_abs = at::cat(trace_abs);
    out.trace_rel = at::cat(trace_rel);
  } else {
    out.trace_abs = at::empty({0, n_rows}, ropts);
    out.trace_rel = out.trace_abs;
  }
  return out;
}

EPResult ep_grads(VectorField& field, VectorField& stacked, const Tensor& z_star, const EPPoints& pts,
                  const LossGrad& loss_grad, const NudgeOptions& opt) {
  TORCH_CHECK_VALUE(z_star.defined() && z_star.dim() >= 1 && z_star.size(0) >= 1 && z_star.numel() > 0,
                    "z_star must be [B, ...] with B >= 1, got ",
                    z_star.defined() ? c10::str(z_star.sizes()) : "None");
  TORCH_CHECK_VALUE(is_real_float(z_star.scalar_type()),
                    "EP needs a real field: z_star must be a real floating tensor (complex arithmetic is the "
                    "holomorphic extension EP runs itself), got ",
                    z_star.scalar_type());
  const int64_t P = pts.size(), B = z_star.size(0);
  const Tensor zr = z_star.detach();
  const auto dtype = pts.is_complex() ? c10::toComplexType(zr.scalar_type()) : zr.scalar_type();
  std::vector<int64_t> rep(zr.dim(), 1);
  rep[0] = P;
  const Tensor z_start = zr.repeat(rep).to(dtype);  // [P·B, ...]
  std::vector<Tensor> betas;
  for (const auto& b : pts.beta) {
    betas.push_back(pts.is_complex() ? at::full({B}, c10::complex<double>(b), zr.options().dtype(dtype))
                                     : at::full({B}, b.real(), zr.options()));
  }
  EPResult r;
  r.nudge = nudged_phase(stacked, z_start, at::cat(betas), pts, loss_grad, opt);

  // v = −Re[(1/N) Σ_k m_k (z_k − z*) / β_k]
  c10::NoGradGuard no_grad;
  const auto points = r.nudge.z.split(B);
  Tensor acc;
  for (int64_t k = 0; k < P; ++k) {
    const c10::complex<double> coeff = pts.weight[k] / (static_cast<double>(pts.n_points) * pts.beta[k]);
    const Tensor dz = points[k] - zr;
    const Tensor term = pts.is_complex() ? dz * at::Scalar(coeff) : dz * coeff.real();
    acc = acc.defined() ? acc + term : term;
  }
  r.v = -(acc.is_complex() ? at::real(acc) : acc).to(zr.scalar_type()).contiguous();
  r.param_grads = field.param_vjp(zr, r.v);
  return r;
}

}  // namespace eqprop::estimators
