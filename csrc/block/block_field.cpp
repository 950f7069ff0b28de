// BlockField: the block as a native VectorField (block_field.h).
#include "block/block_field.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

namespace eqprop::block {

BlockField::BlockField(BlockConfig cfg, std::vector<at::Tensor> params, std::vector<at::Tensor> sn_u,
                       at::Tensor x)
    : cfg_(std::move(cfg)), params_(std::move(params)), sn_u_(std::move(sn_u)), x_(std::move(x)) {
  check_params(cfg_, params_, sn_u_);
  TORCH_CHECK_VALUE(x_.defined(), "x must be a tensor, got None");
  TORCH_CHECK_VALUE(x_.dim() == 3 && x_.size(2) == cfg_.d_model,
                    "x must be [B, T, C] with C = d_model = ", cfg_.d_model, ", got shape ", x_.sizes());
  check_inputs(cfg_, params_, x_, x_, /*check_x_finite=*/true);
}

std::vector<std::string> BlockField::parameter_names() {
  std::vector<std::string> names;
  for (const auto& s : param_specs(cfg_)) names.push_back(s.name);
  return names;
}

std::vector<int64_t> BlockField::versions() const {
  std::vector<int64_t> v;
  for (const auto& t : params_) v.push_back(t._version());
  for (const auto& t : sn_u_) v.push_back(t._version());
  return v;
}

Weights BlockField::cached_weights() {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  auto now = versions();
  if (!cache_.ln1_w.defined() || now != cache_versions_) {
    at::NoGradGuard no_grad;
    cache_ = effective_weights(cfg_, params_, sn_u_);
    if (x_.is_complex()) cache_ = cache_.to(x_.scalar_type());
    cache_.fuse_qkv();
    cache_versions_ = std::move(now);
  }
  return cache_;
}

std::shared_ptr<void> BlockField::prepare_capture() {
  const at::NoGradGuard no_grad;
  return std::make_shared<Weights>(cached_weights());
}

at::Tensor BlockField::eval(const at::Tensor& z) {
  TORCH_CHECK_VALUE(z.defined(), "z must be a tensor, got None");
  TORCH_CHECK_VALUE(z.sizes() == x_.sizes(), "z must have the shape of the bound x ", x_.sizes(), ", got ",
                    z.sizes());
  TORCH_CHECK_VALUE(z.scalar_type() == x_.scalar_type(), "z must have the dtype of the bound x (",
                    x_.scalar_type(), "), got ", z.scalar_type());
  TORCH_CHECK_VALUE(z.device() == x_.device(), "z must be on the device of the bound x (", x_.device(),
                    "), got ", z.device());
  if (!at::GradMode::is_enabled()) return apply(cfg_, cached_weights(), z, x_);
  Weights w = effective_weights(cfg_, params_, sn_u_);
  if (z.is_complex()) w = w.to(z.scalar_type());
  return apply(cfg_, w, z, x_);
}

}  // namespace eqprop::block
