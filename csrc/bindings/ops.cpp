// TORCH_LIBRARY registrations of eqprop's tensor ops (torch.ops.eqprop.*). The ops dispatch on the
// device themselves, so they register once under CompositeExplicitAutograd.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "markov/markov.h"
#include "solvers/relax.h"

namespace {
// Shapes and dtypes of relax_damped_step's outputs without computing them (torch.compile, opcheck).
std::tuple<at::Tensor, at::Tensor, at::Tensor> relax_damped_step_meta(const at::Tensor& z,
                                                                      const at::Tensor& fz, double eps) {
  const auto nd = (z.scalar_type() == at::kHalf || z.scalar_type() == at::kBFloat16)
                      ? at::kFloat
                      : c10::toRealValueType(z.scalar_type());
  return {at::empty_like(z), at::empty({z.size(0)}, z.options().dtype(nd)),
          at::empty({z.size(0)}, z.options().dtype(nd))};
}
}  // namespace

TORCH_LIBRARY(eqprop, m) {
  m.def(
      "markov_sample(int batch, int k, int seq_len, int vocab_size, float alpha, int seed, "
      "Device device, ScalarType table_dtype) -> (Tensor, Tensor)");
  m.def("markov_bayes_nll(Tensor tokens, int k, int vocab_size, float alpha, ScalarType dtype) -> Tensor");
  m.def("markov_oracle_nll(Tensor tokens, Tensor tables, int k) -> Tensor");
  m.def("markov_log_evidence(Tensor tokens, int k, int vocab_size, float alpha) -> Tensor");
  m.def("markov_context_counts(Tensor tokens, int k, int vocab_size) -> Tensor");
  m.def("markov_context_visits(Tensor tokens, int k, int vocab_size) -> Tensor");
  // The fused damped update of the relaxation and its per-sample norms (solvers/damped_step.cpp).
  m.def("relax_damped_step(Tensor z, Tensor fz, float eps) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(eqprop, CompositeExplicitAutograd, m) {
  m.impl("markov_sample", &eqprop::markov::sample);
  m.impl("markov_bayes_nll", &eqprop::markov::bayes_nll);
  m.impl("markov_oracle_nll", &eqprop::markov::oracle_nll);
  m.impl("markov_log_evidence", &eqprop::markov::log_evidence);
  m.impl("markov_context_counts", &eqprop::markov::context_counts);
  m.impl("markov_context_visits", &eqprop::markov::context_visits);
  m.impl("relax_damped_step", &eqprop::solvers::damped_step);
}

TORCH_LIBRARY_IMPL(eqprop, Meta, m) { m.impl("relax_damped_step", &relax_damped_step_meta); }
