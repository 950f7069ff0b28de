// The equilibrium block F(·; x) as a native vector field for the engine (docs/design.md §4, §5): x bound,
// products from autograd (AutogradField), and a cache of the effective weights for the loop.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "block/block.h"
#include "fields/autograd_field.h"

namespace eqprop::block {

// F(·; x) of the block with x bound, for the engine (solvers, estimators, diagnostics): products
// come from autograd through eval() (AutogradField: double-VJP JVPs, plain-transpose rule for
// complex). parameters() are the raw parameters, so param_vjp includes the spectral / monotone
// reparameterizations. With autograd off (the relaxation loop), eval uses effective weights
// cached off the graph and recomputed when a parameter's or sn_u's version counter moves.
class BlockField : public eqprop::AutogradField {
 public:
  // Checks config, parameters and x ([B, T, C], finite) once, here.
  BlockField(BlockConfig cfg, std::vector<at::Tensor> params, std::vector<at::Tensor> sn_u, at::Tensor x);
  at::Tensor eval(const at::Tensor& z) override;
  std::vector<at::Tensor> parameters() override { return params_; }
  std::vector<std::string> parameter_names() override;
  // With autograd off, eval is ATen kernels on z, x and the cached weights (built by
  // prepare_capture, before any capture): no syncs, no host copies.
  bool cuda_graph_safe() const override { return true; }
  // Builds the weight cache and holds that snapshot: a captured eval reads its addresses.
  std::shared_ptr<void> prepare_capture() override;
  const at::Tensor& x() const { return x_; }
  const BlockConfig& config() const { return cfg_; }
  const std::vector<at::Tensor>& sn_u() const { return sn_u_; }

 private:
  // A snapshot of the effective weights, rebuilt when a parameter's version counter moves. Returned
  // by value (tensor handles) under a lock: engine calls release the GIL, so one field may be
  // evaluated from several threads.
  Weights cached_weights();
  std::vector<int64_t> versions() const;

  BlockConfig cfg_;
  std::vector<at::Tensor> params_, sn_u_;
  at::Tensor x_;
  std::mutex cache_mutex_;
  Weights cache_;
  std::vector<int64_t> cache_versions_;
};

}  // namespace eqprop::block
