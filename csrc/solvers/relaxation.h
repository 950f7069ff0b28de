// Internals shared by the relaxation loop (relax.cpp), Anderson (anderson.cpp), the fused step
// (damped_step.cpp) and the CUDA-graph path (cuda_graph.cpp). Not part of the engine's API: use
// solvers/relax.h.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <utility>
#include <vector>

#include "solvers/anderson.h"
#include "solvers/relax.h"

namespace eqprop::solvers::detail {

// Smallest norm used as a denominator: ‖F(z)‖ = 0 gives rel = abs/tiny (0 when abs = 0 too).
constexpr double kTiny = 1e-30;

// The dtype of residual norms: float32 for half / bfloat16 states, else the real dtype.
at::ScalarType norm_dtype(at::ScalarType t);
// [B] mask → [B, 1, ..., 1] to select whole samples of a [B, ...] tensor.
at::Tensor per_sample(const at::Tensor& mask, const at::Tensor& like);
// F(z) must match z in shape, dtype and device.
void check_pair(const at::Tensor& z, const at::Tensor& fz);

// The state of one relaxation, updated in place: every tensor a step reads or writes lives at a
// fixed address, so the step can be captured once as a CUDA graph and replayed. The step index is
// a device tensor for the same reason; a step never synchronizes with the host. Steps run in groups
// of at most check_every (one graph replay, or eager steps) between begin_group / end_group: a
// step writes its residuals into row t − t_group of a [check_every, B] buffer, and end_group keeps
// the group's rows, so the trace grows with the steps run, not with max_steps.
class Relaxation {
 public:
  Relaxation(VectorField& field, const at::Tensor& z0, const RelaxOptions& opt, const Drive& drive);

  // Evaluate step t. The host's count t is read only where the step runs eagerly: by Anderson's
  // ring buffer (Anderson is never captured) and to record the first residual at t = 0 (the first
  // step always runs eagerly); inside a captured graph the device counter t_ is what advances.
  void step(int64_t t);
  // Around each group of n steps starting at step t (n ≤ check_every).
  void begin_group(int64_t t);
  void end_group(int64_t n);
  // The host check after each group: the interrupt hook (check_interrupt), then "is any sample
  // still running?" (one device sync).
  bool host_check() const;
  // Eager groups of check_every steps from step t until no sample runs or max_steps; returns the
  // number of steps evaluated.
  int64_t run_eager(int64_t t);
  RelaxResult result(int64_t n_evals, bool replayed_graph) const;

  at::Tensor z, best_z, best_metric, best_abs, best_rel, first_abs, active, steps, status;

 private:
  VectorField& field_;
  const RelaxOptions& opt_;
  const Drive& drive_;
  at::Tensor t_;                                   // [1] int64: the index of the step being evaluated
  at::Tensor t_group_;                             // [1] int64: the index of the group's first step
  at::Tensor group_abs_, group_rel_;               // [check_every, B] this group's residuals
  std::vector<at::Tensor> trace_abs_, trace_rel_;  // the rows of finished groups
  std::unique_ptr<Anderson> anderson_;
};

#ifdef EQPROP_WITH_CUDA
// The relaxation with its Picard steps captured as a CUDA graph and replayed (cuda_graph.cpp).
// Returns the number of batched steps evaluated and whether a graph was replayed.
std::pair<int64_t, bool> relax_graphed(Relaxation& r, const RelaxOptions& opt, const at::Device& device);
#endif

}  // namespace eqprop::solvers::detail
