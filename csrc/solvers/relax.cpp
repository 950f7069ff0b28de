// The relaxation loop (damped Picard or Anderson) to z* = F(z*; x), the adjoint iteration and
// BPTT unrolls (docs/design.md §4, §5; docs/engine.md "Relaxation"). Anderson is in anderson.cpp, the
// fused damped step in damped_step.cpp, the CUDA-graph path in cuda_graph.cpp.
#include "solvers/relax.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "solvers/relaxation.h"

namespace eqprop::solvers {

// ---- the interrupt hook -------------------------------------------------------------------------

namespace {
// Set by the bindings, read at every host check from any thread.
struct InterruptHook {
  std::mutex mutex;
  std::shared_ptr<const std::function<void()>> fn;
};
InterruptHook& interrupt_hook() {
  static InterruptHook hook;
  return hook;
}
}  // namespace

void set_interrupt_check(std::function<void()> fn) {
  std::shared_ptr<const std::function<void()>> p;
  if (fn) p = std::make_shared<const std::function<void()>>(std::move(fn));
  auto& hook = interrupt_hook();
  const std::lock_guard<std::mutex> lock(hook.mutex);
  hook.fn = std::move(p);
}

void check_interrupt() {
  std::shared_ptr<const std::function<void()>> fn;
  {
    auto& hook = interrupt_hook();
    const std::lock_guard<std::mutex> lock(hook.mutex);
    fn = hook.fn;
  }
  if (fn) (*fn)();  // outside the lock: the hook may take the GIL and throw
}

// ---- options ------------------------------------------------------------------------------------

Stop parse_stop(const std::string& s) {
  if (s == "rel") return Stop::rel;
  if (s == "abs") return Stop::abs;
  TORCH_CHECK_VALUE(false, "stop must be one of 'rel', 'abs', got '", s, "'");
}

CudaGraph parse_cuda_graph(const std::string& s) {
  if (s == "auto") return CudaGraph::automatic;
  if (s == "on") return CudaGraph::on;
  if (s == "off") return CudaGraph::off;
  TORCH_CHECK_VALUE(false, "cuda_graph must be one of 'auto', 'on', 'off', got '", s, "'");
}

OnNonconvergence parse_on_nonconvergence(const std::string& s) {
  if (s == "warn") return OnNonconvergence::warn;
  if (s == "raise") return OnNonconvergence::raise;
  if (s == "ignore") return OnNonconvergence::ignore;
  TORCH_CHECK_VALUE(false, "on_nonconvergence must be one of 'warn', 'raise', 'ignore', got '", s, "'");
}

std::string to_string(Stop s) { return s == Stop::rel ? "rel" : "abs"; }
std::string to_string(Method m) { return m == Method::picard ? "picard" : "anderson"; }
std::string to_string(OnNonconvergence o) {
  return o == OnNonconvergence::warn ? "warn" : o == OnNonconvergence::raise ? "raise" : "ignore";
}

Method parse_method(const std::string& s) {
  if (s == "picard") return Method::picard;
  if (s == "anderson") return Method::anderson;
  TORCH_CHECK_VALUE(false, "solver must be one of 'picard', 'anderson', got '", s, "'");
}

void check_options(const RelaxOptions& o) {
  TORCH_CHECK_VALUE(o.max_steps >= 1, "max_steps must be >= 1, got ", o.max_steps);
  TORCH_CHECK_VALUE(std::isfinite(o.eps) && o.eps > 0.0, "eps (damping) must be finite and > 0, got ", o.eps);
  TORCH_CHECK_VALUE(std::isfinite(o.tol) && o.tol >= 0.0, "tol must be finite and >= 0, got ", o.tol);
  TORCH_CHECK_VALUE(o.anderson_m >= 1, "anderson_m must be >= 1, got ", o.anderson_m);
  TORCH_CHECK_VALUE(std::isfinite(o.anderson_reg) && o.anderson_reg >= 0.0,
                    "anderson_reg must be finite and >= 0, got ", o.anderson_reg);
  TORCH_CHECK_VALUE(o.divergence > 1.0, "divergence must be > 1, got ", o.divergence);
  TORCH_CHECK_VALUE(o.check_every >= 1, "check_every must be >= 1, got ", o.check_every);
}

// ---- the loop -----------------------------------------------------------------------------------

namespace detail {

at::Tensor per_sample(const at::Tensor& mask, const at::Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[0] = like.size(0);
  return mask.reshape(shape);
}

Relaxation::Relaxation(VectorField& field, const at::Tensor& z0, const RelaxOptions& opt, const Drive& drive)
    : field_(field), opt_(opt), drive_(drive) {
  const int64_t B = z0.size(0);
  const auto ropts = z0.options().dtype(norm_dtype(z0.scalar_type()));
  z = z0.detach().clone(at::MemoryFormat::Contiguous);
  best_z = z.clone();
  best_metric = at::full({B}, std::numeric_limits<double>::infinity(), ropts);
  best_abs = at::full({B}, std::numeric_limits<double>::quiet_NaN(), ropts);
  best_rel = best_abs.clone();
  first_abs = at::zeros({B}, ropts);
  active = at::ones({B}, z0.options().dtype(at::kBool));
  steps = at::full({B}, opt.max_steps, z0.options().dtype(at::kLong));
  status = at::full({B}, static_cast<int8_t>(Status::max_steps), z0.options().dtype(at::kChar));
  t_ = at::zeros({1}, z0.options().dtype(at::kLong));
  t_group_ = at::zeros({1}, z0.options().dtype(at::kLong));
  group_abs_ = at::zeros({opt.trace ? std::min(opt.check_every, opt.max_steps) : 0, B}, ropts);
  group_rel_ = at::zeros_like(group_abs_);
  if (opt.method == Method::anderson)
    anderson_ = std::make_unique<Anderson>(z, opt.anderson_m, opt.eps, opt.anderson_reg);
}

void Relaxation::step(int64_t t) {
  at::Tensor fz = field_.eval(z);
  check_pair(z, fz);
  if (drive_) {
    const at::Tensor d = drive_(z);
    TORCH_CHECK_VALUE(d.defined() && d.sizes() == z.sizes(),
                      "drive(z) must return a tensor of the shape of z ", z.sizes(), ", got ",
                      d.defined() ? d.sizes() : at::IntArrayRef{});
    fz = fz + d;
  }
  auto [z_picard, res_sq, f_sq] = damped_step(z, fz, opt_.eps);
  const at::Tensor abs_res = res_sq.sqrt();                           // [B]
  const at::Tensor rel_res = abs_res / f_sq.sqrt().clamp_min(kTiny);  // [B]
  if (opt_.trace) {
    const at::Tensor row = t_ - t_group_;
    group_abs_.index_copy_(0, row, abs_res.unsqueeze(0));
    group_rel_.index_copy_(0, row, rel_res.unsqueeze(0));
  }
  if (t == 0) first_abs.copy_(abs_res.clamp_min(kTiny));
  const at::Tensor& metric = opt_.stop == Stop::rel ? rel_res : abs_res;

  // Keep the lowest-residual iterate per sample (NaN never improves).
  const at::Tensor improved = active.logical_and(metric < best_metric);
  best_z.copy_(at::where(per_sample(improved, z), z, best_z));
  best_metric.copy_(at::where(improved, metric, best_metric));
  best_abs.copy_(at::where(improved, abs_res, best_abs));
  best_rel.copy_(at::where(improved, rel_res, best_rel));

  const at::Tensor converged = active.logical_and(metric <= opt_.tol);
  const at::Tensor diverged =
      active.logical_and(converged.logical_not())
          .logical_and(at::isfinite(abs_res).logical_not().logical_or(abs_res > first_abs * opt_.divergence));
  steps.copy_(at::where(converged.logical_or(diverged), t_ + 1, steps));
  status.masked_fill_(converged, static_cast<int8_t>(Status::converged));
  status.masked_fill_(diverged, static_cast<int8_t>(Status::diverged));
  active.logical_and_(converged.logical_not()).logical_and_(diverged.logical_not());
  const at::Tensor z_next = anderson_ ? anderson_->step(z, fz, z_picard, t) : z_picard;
  // Stopped samples stay at their best iterate: finite, and independent of the rest of the batch.
  z.copy_(at::where(per_sample(active, z), z_next, best_z));
  t_.add_(1);
}

void Relaxation::begin_group(int64_t t) { t_group_.fill_(t); }

void Relaxation::end_group(int64_t n) {
  if (!opt_.trace) return;
  trace_abs_.push_back(group_abs_.narrow(0, 0, n).clone());
  trace_rel_.push_back(group_rel_.narrow(0, 0, n).clone());
}

bool Relaxation::host_check() const {
  check_interrupt();
  return active.any().item<bool>();
}

int64_t Relaxation::run_eager(int64_t t) {
  while (t < opt_.max_steps) {
    const int64_t n = std::min(opt_.check_every, opt_.max_steps - t);
    begin_group(t);
    for (int64_t i = 0; i < n; ++i) step(t + i);
    end_group(n);
    t += n;
    if (!host_check()) break;
  }
  return t;
}

RelaxResult Relaxation::result(int64_t n_evals, bool replayed_graph) const {
  RelaxResult r;
  r.z = best_z;
  r.steps = steps;
  r.abs_residual = best_abs;
  r.rel_residual = best_rel;
  // Rows up to the step at which the last sample stopped; later ones (check_every > 1) only
  // re-evaluate frozen samples.
  if (opt_.trace) {
    const int64_t rows = steps.max().item<int64_t>();
    r.trace_abs = at::cat(trace_abs_).narrow(0, 0, rows);
    r.trace_rel = at::cat(trace_rel_).narrow(0, 0, rows);
  } else {
    r.trace_abs = at::empty({0, z.size(0)}, best_abs.options());
    r.trace_rel = r.trace_abs;
  }
  r.status = status;
  r.n_evals = n_evals;
  r.cuda_graph = replayed_graph;
  return r;
}

}  // namespace detail

namespace {

using detail::check_pair;
using detail::Relaxation;

void check_state(const at::Tensor& z0) {
  TORCH_CHECK_VALUE(z0.defined(), "z0 must be a tensor, got None");
  TORCH_CHECK_VALUE(z0.is_floating_point() || z0.is_complex(),
                    "z0 must be a floating-point or complex tensor, got ", z0.scalar_type());
  TORCH_CHECK_VALUE(z0.dim() >= 1 && z0.size(0) >= 1 && z0.numel() > 0,
                    "z0 must be [B, ...] with B >= 1 and no empty dimension, got shape ", z0.sizes());
  TORCH_CHECK_VALUE(at::isfinite(z0).all().item<bool>(), "z0 must be finite, got non-finite entries");
}

// Whether to replay steps as a CUDA graph; with cuda_graph = on, says why not when it cannot.
bool use_cuda_graph(const VectorField& field, const at::Tensor& z0, const RelaxOptions& opt, bool driven) {
  if (opt.cuda_graph == CudaGraph::off) return false;
  const bool demanded = opt.cuda_graph == CudaGraph::on;
  const auto refuse = [&](bool ok, const char* why) {
    TORCH_CHECK_VALUE(ok || !demanded, "cuda_graph=True cannot be honoured: ", why);
    return ok;
  };
  return refuse(opt.method == Method::picard, "it needs solver='picard' (Anderson's solve runs eagerly)") &&
         refuse(!driven, "a drive(z) callback runs Python and may synchronize; relax without cuda_graph") &&
         refuse(field.cuda_graph_safe(),
                "this vector field does not declare itself capturable (only the native block fields do)") &&
         refuse(z0.is_cuda(), "the state is not on a CUDA device");
}

}  // namespace

RelaxResult relax(VectorField& field, const at::Tensor& z0, const RelaxOptions& opt, const Drive& drive) {
  check_options(opt);
  check_state(z0);
  const bool graphed = use_cuda_graph(field, z0, opt, static_cast<bool>(drive));
  c10::NoGradGuard no_grad;  // the free phase is never differentiated through (implicit / BPTT tails)
  Relaxation r(field, z0, opt, drive);
#ifdef EQPROP_WITH_CUDA
  if (graphed) {
    const std::shared_ptr<void> pinned = field.prepare_capture();
    const auto [steps, replayed] = detail::relax_graphed(r, opt, z0.device());
    return r.result(steps, replayed);
  }
#endif
  TORCH_CHECK(!graphed, "eqprop was built without CUDA: cannot replay CUDA graphs");
  return r.result(r.run_eager(0), false);
}

namespace {

// λ ↦ Jᵀλ + g as a vector field, so the adjoint system is relaxed by the forward solvers.
class AdjointField : public VectorField {
 public:
  AdjointField(Linearization& lin, at::Tensor g) : lin_(lin), g_(std::move(g)) {}
  at::Tensor eval(const at::Tensor& lam) override { return lin_.vjp(lam) + g_; }
  at::Tensor vjp(const at::Tensor&, const at::Tensor&) override { return unsupported(); }
  at::Tensor jvp(const at::Tensor&, const at::Tensor&) override { return unsupported(); }
  std::vector<at::Tensor> param_vjp(const at::Tensor&, const at::Tensor&) override { return {unsupported()}; }
  std::vector<at::Tensor> parameters() override { return {}; }

 private:
  static at::Tensor unsupported() { TORCH_CHECK(false, "the adjoint field only evaluates λ ↦ Jᵀλ + g"); }
  Linearization& lin_;
  at::Tensor g_;
};

}  // namespace

AdjointResult adjoint_solve(Linearization& lin, const at::Tensor& g, int64_t max_steps, double tol,
                            Method method, int64_t anderson_m, double divergence, double eps) {
  TORCH_CHECK_VALUE(max_steps >= 1, "backward_max_steps must be >= 1, got ", max_steps);
  TORCH_CHECK_VALUE(std::isfinite(tol) && tol >= 0.0, "backward_tol must be finite and >= 0, got ", tol);
  TORCH_CHECK_VALUE(anderson_m >= 1, "backward_anderson_m must be >= 1, got ", anderson_m);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, "eps (adjoint damping) must be finite and > 0, got ",
                    eps);
  const at::Tensor& z = lin.point();
  TORCH_CHECK_VALUE(g.defined() && g.sizes() == z.sizes(), "g (∂ℓ/∂z*) must have the shape of z* ", z.sizes(),
                    ", got ", g.sizes());
  TORCH_CHECK_VALUE(g.device() == z.device(), "g must be on the device of z* (", z.device(), "), got ",
                    g.device());
  const at::Tensor gg = g.detach().to(z.scalar_type());
  TORCH_CHECK_VALUE(at::isfinite(gg).all().item<bool>(), "g (∂ℓ/∂z*) must be finite, got non-finite entries");
  AdjointField adjoint(lin, gg);
  RelaxOptions o;
  o.max_steps = max_steps;
  o.eps = eps;
  o.tol = tol;
  o.stop = Stop::rel;
  o.method = method;
  o.anderson_m = anderson_m;
  o.divergence = divergence;
  o.trace = false;
  const RelaxResult r = relax(adjoint, gg, o);
  AdjointResult out;
  out.lambda = r.z;
  out.steps = r.steps;
  out.residual = r.rel_residual;
  out.status = r.status;
  out.n_vjps = r.n_evals;
  return out;
}

at::Tensor unroll(VectorField& field, const at::Tensor& z, int64_t steps, double eps) {
  TORCH_CHECK_VALUE(steps >= 0, "bptt_horizon must be >= 0, got ", steps);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, "eps (damping) must be finite and > 0, got ", eps);
  at::Tensor zt = z;
  for (int64_t t = 0; t < steps; ++t) {
    const at::Tensor fz = field.eval(zt);
    check_pair(zt, fz);
    zt = zt + (fz - zt) * eps;  // docs/design.md §4, differentiable
  }
  return zt;
}

}  // namespace eqprop::solvers
