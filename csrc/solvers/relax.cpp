// Relaxation (damped Picard, Anderson), the adjoint iteration, BPTT unrolls and the fused
// damped-update kernel's CPU twin (DESIGN.md §4, §5).
#include "solvers/relax.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#ifdef EQPROP_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/relax.cuh"
#endif

namespace eqprop::solvers {
namespace {

// Smallest norm used as a denominator: ‖F(z)‖ = 0 gives rel = abs/tiny (0 when abs = 0 too).
constexpr double kTiny = 1e-30;

at::ScalarType norm_dtype(at::ScalarType t) {
  if (t == at::kHalf || t == at::kBFloat16) return at::kFloat;
  return c10::toRealValueType(t);
}

// [B] mask → [B, 1, ..., 1] to select whole samples of a [B, ...] tensor.
at::Tensor per_sample(const at::Tensor& mask, const at::Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[0] = like.size(0);
  return mask.reshape(shape);
}

// The CPU twin of the fused kernel (csrc/cuda/relax.cu): one pass over each sample.
template <typename scalar_t>
void damped_step_cpu_kernel(scalar_t* z_new, double* res_sq, double* f_sq, const scalar_t* z,
                            const scalar_t* fz, int64_t batch, int64_t n, double eps) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t e = static_cast<opmath_t>(eps);
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double rs = 0.0, fs = 0.0;
      const int64_t off = b * n;
      for (int64_t i = 0; i < n; ++i) {
        const opmath_t zi = static_cast<opmath_t>(z[off + i]);
        const opmath_t fi = static_cast<opmath_t>(fz[off + i]);
        const opmath_t r = fi - zi;
        z_new[off + i] = static_cast<scalar_t>(zi + e * r);
        if constexpr (c10::is_complex<scalar_t>::value) {
          rs += static_cast<double>(r.real()) * r.real() + static_cast<double>(r.imag()) * r.imag();
          fs += static_cast<double>(fi.real()) * fi.real() + static_cast<double>(fi.imag()) * fi.imag();
        } else {
          rs += static_cast<double>(r) * static_cast<double>(r);
          fs += static_cast<double>(fi) * static_cast<double>(fi);
        }
      }
      res_sq[b] = rs;
      f_sq[b] = fs;
    }
  });
}

void check_pair(const at::Tensor& z, const at::Tensor& fz) {
  TORCH_CHECK_VALUE(z.defined() && fz.defined(), "z and fz must be tensors, got None");
  TORCH_CHECK_VALUE(z.dim() >= 1 && z.size(0) >= 1, "z must be [B, ...] with B >= 1, got shape ",
                    z.sizes());
  TORCH_CHECK_VALUE(fz.sizes() == z.sizes(), "F(z) must have the shape of z ", z.sizes(), ", got ",
                    fz.sizes());
  TORCH_CHECK_VALUE(fz.scalar_type() == z.scalar_type(), "F(z) must have the dtype of z (",
                    z.scalar_type(), "), got ", fz.scalar_type());
  TORCH_CHECK_VALUE(fz.device() == z.device(), "F(z) must be on the device of z (", z.device(),
                    "), got ", fz.device());
}

}  // namespace

at::Tensor sq_norm_per_sample(const at::Tensor& t) {
  at::Tensor flat = t.reshape({t.size(0), -1});
  // half / bfloat16 squares overflow past 65504 (‖F‖ > 256) and round badly: accumulate in float32
  if (flat.scalar_type() == at::kHalf || flat.scalar_type() == at::kBFloat16) flat = flat.to(at::kFloat);
  if (t.is_complex()) return at::real(flat * flat.conj()).sum(1);
  return flat.pow(2).sum(1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_step(const at::Tensor& z, const at::Tensor& fz,
                                                           double eps) {
  check_pair(z, fz);
  TORCH_CHECK_VALUE(std::isfinite(eps), "eps must be finite, got ", eps);
  const int64_t batch = z.size(0);
  const int64_t n = batch > 0 ? z.numel() / batch : 0;
  const at::Tensor zc = z.contiguous(), fc = fz.contiguous();
  at::Tensor z_new = at::empty_like(zc);
#ifdef EQPROP_WITH_CUDA
  if (z.is_cuda()) {
    const auto st = z.scalar_type();
    if (st == at::kFloat || st == at::kDouble || st == at::kBFloat16) {
      TORCH_CHECK_VALUE(batch <= 65535, "the CUDA damped step takes at most 65535 samples, got B=", batch);
      const c10::cuda::CUDAGuard guard(z.device());
      auto opts = z.options().dtype(st == at::kDouble ? at::kDouble : at::kFloat);
      at::Tensor res_sq = at::empty({batch}, opts), f_sq = at::empty({batch}, opts);
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      cudaError_t err;
      if (st == at::kFloat) {
        err = eqprop::cuda::relax_damped_step_f32(z_new.data_ptr<float>(), res_sq.data_ptr<float>(),
                                                  f_sq.data_ptr<float>(), zc.data_ptr<float>(),
                                                  fc.data_ptr<float>(), batch, n, eps, stream);
      } else if (st == at::kDouble) {
        err = eqprop::cuda::relax_damped_step_f64(z_new.data_ptr<double>(), res_sq.data_ptr<double>(),
                                                  f_sq.data_ptr<double>(), zc.data_ptr<double>(),
                                                  fc.data_ptr<double>(), batch, n, eps, stream);
      } else {
        err = eqprop::cuda::relax_damped_step_bf16(z_new.data_ptr(), res_sq.data_ptr<float>(),
                                                   f_sq.data_ptr<float>(), zc.data_ptr(), fc.data_ptr(),
                                                   batch, n, eps, stream);
      }
      TORCH_CHECK(err == cudaSuccess, "relax_damped_step CUDA kernel failed: ", cudaGetErrorString(err));
      return {z_new.view(z.sizes()), res_sq, f_sq};
    }
    // Other dtypes (half, complex) on CUDA: plain ATen ops, the same math.
    const at::Tensor r = fz - z;
    return {z + eps * r, sq_norm_per_sample(r).to(norm_dtype(st)), sq_norm_per_sample(fz).to(norm_dtype(st))};
  }
#endif
  TORCH_CHECK_VALUE(z.device().is_cpu() || z.device().is_cuda(), "z must be on a CPU or CUDA device, got ",
                    z.device());
  TORCH_CHECK(z.device().is_cpu(), "z is on ", z.device(), " but eqprop was built without CUDA kernels");
  at::Tensor res_sq = at::empty({batch}, z.options().dtype(at::kDouble));
  at::Tensor f_sq = at::empty({batch}, z.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "damped_step", [&] {
    damped_step_cpu_kernel<scalar_t>(z_new.data_ptr<scalar_t>(), res_sq.data_ptr<double>(),
                                     f_sq.data_ptr<double>(), zc.data_ptr<scalar_t>(),
                                     fc.data_ptr<scalar_t>(), batch, n, eps);
  });
  const auto nd = norm_dtype(z.scalar_type());
  return {z_new.view(z.sizes()), res_sq.to(nd), f_sq.to(nd)};
}

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

namespace {

void check_state(const at::Tensor& z0) {
  TORCH_CHECK_VALUE(z0.defined(), "z0 must be a tensor, got None");
  TORCH_CHECK_VALUE(z0.is_floating_point() || z0.is_complex(),
                    "z0 must be a floating-point or complex tensor, got ", z0.scalar_type());
  TORCH_CHECK_VALUE(z0.dim() >= 1 && z0.size(0) >= 1 && z0.numel() > 0,
                    "z0 must be [B, ...] with B >= 1 and no empty dimension, got shape ", z0.sizes());
  TORCH_CHECK_VALUE(at::isfinite(z0).all().item<bool>(), "z0 must be finite, got non-finite entries");
}

// Type-II Anderson mixing (per sample): α = argmin ‖Σ αᵢ Gᵢ‖ s.t. Σ αᵢ = 1, Gᵢ = F(zᵢ) − zᵢ,
// from the bordered system [[0, 1ᵀ], [1, GᴴG + λI]] [ν; α] = [1; 0]; then
// z ← β Σ αᵢ F(zᵢ) + (1 − β) Σ αᵢ zᵢ. Samples whose system fails fall back to the Picard step.
class Anderson {
 public:
  Anderson(const at::Tensor& z0, int64_t m, double beta, double reg)
      : m_(m), beta_(beta), reg_(reg), batch_(z0.size(0)), n_(z0.numel() / z0.size(0)) {
    // Half / bfloat16 states mix in float32: the Gram matrix and its solve need the precision
    // (and linalg has no half kernels).
    const auto st = z0.scalar_type();
    const auto work = (st == at::kHalf || st == at::kBFloat16) ? at::kFloat : st;
    X_ = at::zeros({batch_, m, n_}, z0.options().dtype(work));
    F_ = at::zeros({batch_, m, n_}, z0.options().dtype(work));
  }
  at::Tensor step(const at::Tensor& z, const at::Tensor& fz, const at::Tensor& picard, int64_t t) {
    const int64_t slot = t % m_, k = std::min<int64_t>(t + 1, m_);
    X_.select(1, slot).copy_(z.reshape({batch_, n_}));
    F_.select(1, slot).copy_(fz.reshape({batch_, n_}));
    if (k == 1) return picard;  // one point: Anderson is the damped step
    const at::Tensor X = X_.narrow(1, 0, k), F = F_.narrow(1, 0, k);
    const at::Tensor G = F - X;                              // [B, k, n]
    at::Tensor H = at::matmul(G.conj(), G.mT());             // [B, k, n] @ [B, n, k] -> [B, k, k]
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

 private:
  int64_t m_;
  double beta_, reg_;
  int64_t batch_, n_;
  at::Tensor X_, F_;  // ring buffers [B, m, n] of iterates and their F values
};

// The state of one relaxation, updated in place: every tensor a step reads or writes lives at a
// fixed address, so the step can be captured once as a CUDA graph and replayed. The step index is
// a device tensor for the same reason; a step never synchronizes with the host. Steps run in groups
// of at most check_every (one graph replay, or eager steps) between begin_group / end_group: a
// step writes its residuals into row t − t_group of a [check_every, B] buffer, and end_group keeps
// the group's rows, so the trace grows with the steps run, not with max_steps.
class Relaxation {
 public:
  Relaxation(VectorField& field, const at::Tensor& z0, const RelaxOptions& opt, const Drive& drive)
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
    if (opt.method == Method::anderson) anderson_ = std::make_unique<Anderson>(z, opt.anderson_m, opt.eps, opt.anderson_reg);
  }

  // Step t (t is the host's count, used only by Anderson's ring buffer, which never runs in a graph).
  void step(int64_t t) {
    at::Tensor fz = field_.eval(z);
    check_pair(z, fz);
    if (drive_) {
      const at::Tensor d = drive_(z);
      TORCH_CHECK_VALUE(d.defined() && d.sizes() == z.sizes(), "drive(z) must return a tensor of the shape of z ",
                        z.sizes(), ", got ", d.defined() ? d.sizes() : at::IntArrayRef{});
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
    const at::Tensor diverged = active.logical_and(converged.logical_not())
                                    .logical_and(at::isfinite(abs_res).logical_not().logical_or(
                                        abs_res > first_abs * opt_.divergence));
    steps.copy_(at::where(converged.logical_or(diverged), t_ + 1, steps));
    status.masked_fill_(converged, static_cast<int8_t>(Status::converged));
    status.masked_fill_(diverged, static_cast<int8_t>(Status::diverged));
    active.logical_and_(converged.logical_not()).logical_and_(diverged.logical_not());
    const at::Tensor z_next = anderson_ ? anderson_->step(z, fz, z_picard, t) : z_picard;
    // Stopped samples stay at their best iterate: finite, and independent of the rest of the batch.
    z.copy_(at::where(per_sample(active, z), z_next, best_z));
    t_.add_(1);
  }

  // Around each group of n steps starting at step t (n ≤ check_every).
  void begin_group(int64_t t) { t_group_.fill_(t); }
  void end_group(int64_t n) {
    if (!opt_.trace) return;
    trace_abs_.push_back(group_abs_.narrow(0, 0, n).clone());
    trace_rel_.push_back(group_rel_.narrow(0, 0, n).clone());
  }

  // The host check after each group: "is any sample still running?" (one device sync).
  bool host_check() const { return active.any().item<bool>(); }

  // Eager groups of check_every steps from step t until no sample runs or max_steps; returns the
  // number of steps evaluated.
  int64_t run_eager(int64_t t) {
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

  RelaxResult result(int64_t n_evals, bool replayed_graph) const {
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

  at::Tensor z, best_z, best_metric, best_abs, best_rel, first_abs, active, steps, status;

 private:
  VectorField& field_;
  const RelaxOptions& opt_;
  const Drive& drive_;
  at::Tensor t_;        // [1] int64: the index of the step being evaluated
  at::Tensor t_group_;  // [1] int64: the index of the group's first step
  at::Tensor group_abs_, group_rel_;  // [check_every, B] this group's residuals
  std::vector<at::Tensor> trace_abs_, trace_rel_;  // the rows of finished groups
  std::unique_ptr<Anderson> anderson_;
};

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

#ifdef EQPROP_WITH_CUDA
// Make `waiter` wait for the work queued so far on `done`.
void stream_wait(const c10::cuda::CUDAStream& waiter, const c10::cuda::CUDAStream& done) {
  cudaEvent_t ev;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(ev, done.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(waiter.stream(), ev, 0));
  C10_CUDA_CHECK(cudaEventDestroy(ev));
}

using MempoolId = decltype(at::cuda::graph_pool_handle());  // its namespace moved between torch versions

// Destroy a graph, releasing its hold on its memory pools. reset() may throw (an allocator
// assertion); the destructor calls reset() again and must not throw, so a graph whose reset
// failed is leaked rather than destroyed.
void drop_graph(std::unique_ptr<at::cuda::CUDAGraph>& g) {
  if (!g) return;
  try {
    g->reset();
    g.reset();
  } catch (...) {
    (void)g.release();
  }
}

// Per thread and device: a dedicated side stream, one graph memory pool, and the last graph
// captured into that pool.
//
// The stream is created here, not taken from torch's stream pool (getStreamFromPool hands the same
// few streams round-robin to every caller in the process, so other work could be queued on it
// during a capture); it is non-blocking, so it never synchronizes implicitly with the legacy
// default stream, and cuBLAS keeps one workspace for it.
//
// The pool is shared by the thread's successive captures, so repeated calls reuse its blocks
// instead of growing the allocator's reserve. A CUDAGraph counts references to its pool: its
// capture_begin increments the count of every allocator that routes captures to pools (the device
// caching allocator, and since torch 2.11 also the pinned-host allocator, under the same pool id),
// its destruction decrements them, and a capture_begin into a pool whose count fell to zero fails
// an internal assertion. Rather than holding the counts by hand (the host allocator's calls exist
// only in some torch versions), the previous graph is kept alive until the next capture into the
// pool has begun: the counts never reach zero between captures, in whatever allocators this torch
// version counts. The previous graph is never replayed again, so the new capture may reuse the
// blocks the previous one freed (the pool-sharing rule of CUDA graphs: replay in capture order).
//
// Invariant: `pool` is set exactly when `previous` holds a graph captured into it. A failed
// capture retires the pool (a fresh one is made by the next capture), because how far a failed
// capture_begin / capture_end got through their allocator calls depends on the torch version.
struct CaptureResources {
  cudaStream_t raw_stream = nullptr;
  std::optional<c10::cuda::CUDAStream> stream;
  std::optional<MempoolId> pool;
  std::unique_ptr<at::cuda::CUDAGraph> previous;

  CaptureResources() = default;
  CaptureResources(const CaptureResources&) = delete;
  CaptureResources& operator=(const CaptureResources&) = delete;
  ~CaptureResources() {  // at thread exit
    drop_graph(previous);
    if (raw_stream) (void)cudaStreamDestroy(raw_stream);  // pending work still completes
  }
  void retire_pool() {
    drop_graph(previous);
    pool.reset();
  }
};

// The calling thread's resources for the current device (the caller holds a CUDAGuard).
CaptureResources& capture_resources(c10::DeviceIndex device) {
  thread_local std::map<c10::DeviceIndex, std::unique_ptr<CaptureResources>> per_device;
  auto& res = per_device[device];
  if (!res) {
    auto r = std::make_unique<CaptureResources>();
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&r->raw_stream, cudaStreamNonBlocking));
    r->stream = c10::cuda::getStreamFromExternal(r->raw_stream, device);
    res = std::move(r);
  }
  return *res;
}

// The caller's stream waits for the side stream however the relaxation ends.
struct JoinStream {
  c10::cuda::CUDAStream caller, side;
  ~JoinStream() {
    try {
      stream_wait(caller, side);
    } catch (...) {  // an error already propagating says more
    }
  }
};

// Steps per graph at most: capture and instantiation grow with the nodes; past a few dozen steps
// launches are amortized anyway.
constexpr int64_t kMaxGraphSteps = 32;

// Undo what a failed capture left behind, whatever point it failed at: take the stream out of
// capture mode, remove the device allocator's routing to the pool (capture_end removes it only on
// success in some torch versions), clear the (non-sticky) CUDA error, and retire the pool.
void abandon_capture(CaptureResources& res, std::unique_ptr<at::cuda::CUDAGraph>& graph,
                     c10::DeviceIndex device, const MempoolId& pool) {
  try {
    graph->capture_end();
  } catch (...) {
  }
  try {
    c10::cuda::CUDACachingAllocator::endAllocateToPool(device, pool);
  } catch (...) {  // not routing any more: capture_end removed it, or capture_begin never added it
  }
  (void)cudaGetLastError();
  drop_graph(graph);
  res.retire_pool();
}

// The first step runs eagerly on the side stream (lazy initialization — cuBLAS workspaces — must
// not happen inside a capture); then min(check_every, 32) steps are captured once and the graph is
// replayed, the host checking for running samples between replays; a tail shorter than a graph
// runs eagerly. A capture that fails (an operation of the field is not capturable) executes
// nothing, so no state changed: the capture is abandoned; with cuda_graph = auto the relaxation
// goes on eagerly with a warning, with on the error is raised.
// Returns the number of batched steps evaluated and whether a graph was replayed.
std::pair<int64_t, bool> relax_graphed(Relaxation& r, const RelaxOptions& opt, const at::Device& device) {
  const c10::cuda::CUDAGuard device_guard(device);
  CaptureResources& res = capture_resources(device.index());
  const JoinStream join{c10::cuda::getCurrentCUDAStream(), *res.stream};
  stream_wait(join.side, join.caller);
  const c10::cuda::CUDAStreamGuard stream_guard(*res.stream);
  bool replayed = false;
  int64_t t = 0;
  r.begin_group(0);
  r.step(t++);
  r.end_group(1);
  bool running = r.host_check();
  const int64_t k = std::min({opt.check_every, kMaxGraphSteps, opt.max_steps - t});
  if (running && k > 0) {
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    bool captured = false;
    // The thread's pool, or a fresh one (its first capture, or after a failure).
    const MempoolId pool = res.pool ? *res.pool : at::cuda::graph_pool_handle();
    try {
      // Thread-local mode: other threads' CUDA calls (the GIL is released) cannot break this
      // capture.
      graph->capture_begin(pool, cudaStreamCaptureModeThreadLocal);
      drop_graph(res.previous);  // the new graph holds the pool's counts now
      res.pool = pool;
      for (int64_t i = 0; i < k; ++i) r.step(t + i);
      graph->capture_end();
      res.previous = std::move(graph);  // held before anything else can throw
      captured = true;
    } catch (const std::exception& err) {
      abandon_capture(res, graph, device.index(), pool);
      if (opt.cuda_graph == CudaGraph::on) throw;
      TORCH_WARN("relax: capturing the step as a CUDA graph failed, relaxing eagerly instead: ", err.what());
    }
    for (; captured && running && opt.max_steps - t >= k; t += k) {
      r.begin_group(t);
      res.previous->replay();
      r.end_group(k);
      replayed = true;
      running = r.host_check();
    }
  }
  if (running) t = r.run_eager(t);  // the tail (everything, if the capture failed)
  return {t, replayed};
}
#endif

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
    const auto [steps, replayed] = relax_graphed(r, opt, z0.device());
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
  static at::Tensor unsupported() {
    TORCH_CHECK(false, "the adjoint field only evaluates λ ↦ Jᵀλ + g");
  }
  Linearization& lin_;
  at::Tensor g_;
};

}  // namespace

AdjointResult adjoint_solve(Linearization& lin, const at::Tensor& g, int64_t max_steps, double tol,
                            Method method, int64_t anderson_m, double divergence, double eps) {
  TORCH_CHECK_VALUE(max_steps >= 1, "backward_max_steps must be >= 1, got ", max_steps);
  TORCH_CHECK_VALUE(std::isfinite(tol) && tol >= 0.0, "backward_tol must be finite and >= 0, got ", tol);
  TORCH_CHECK_VALUE(anderson_m >= 1, "backward_anderson_m must be >= 1, got ", anderson_m);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, "eps (adjoint damping) must be finite and > 0, got ", eps);
  const at::Tensor& z = lin.point();
  TORCH_CHECK_VALUE(g.defined() && g.sizes() == z.sizes(), "g (∂ℓ/∂z*) must have the shape of z* ",
                    z.sizes(), ", got ", g.sizes());
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
    zt = zt + (fz - zt) * eps;  // DESIGN.md §4, differentiable
  }
  return zt;
}

}  // namespace eqprop::solvers

// torch.ops.eqprop.relax_damped_step: the fused kernel as a tensor op (tests, benchmarks).
namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor> relax_damped_step_op(const at::Tensor& z, const at::Tensor& fz,
                                                                    double eps) {
  return eqprop::solvers::damped_step(z, fz, eps);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> relax_damped_step_meta(const at::Tensor& z, const at::Tensor& fz,
                                                                      double eps) {
  const auto nd = (z.scalar_type() == at::kHalf || z.scalar_type() == at::kBFloat16)
                      ? at::kFloat
                      : c10::toRealValueType(z.scalar_type());
  return {at::empty_like(z), at::empty({z.size(0)}, z.options().dtype(nd)),
          at::empty({z.size(0)}, z.options().dtype(nd))};
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(eqprop, m) {
  m.def("relax_damped_step(Tensor z, Tensor fz, float eps) -> (Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(eqprop, CompositeExplicitAutograd, m) {
  m.impl("relax_damped_step", &relax_damped_step_op);
}
TORCH_LIBRARY_IMPL(eqprop, Meta, m) {
  m.impl("relax_damped_step", &relax_damped_step_meta);
}
