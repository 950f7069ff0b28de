// TORCH_LIBRARY registrations of eqprop's tensor ops (torch.ops.eqprop.*). The ops dispatch on the
// device themselves, so they register once under CompositeExplicitAutograd.
#include <torch/library.h>

#include "markov/markov.h"

TORCH_LIBRARY(eqprop, m) {
  m.def("markov_sample(int batch, int k, int seq_len, int vocab_size, float alpha, int seed, "
        "Device device, ScalarType table_dtype) -> (Tensor, Tensor)");
  m.def("markov_bayes_nll(Tensor tokens, int k, int vocab_size, float alpha, ScalarType dtype) -> Tensor");
  m.def("markov_oracle_nll(Tensor tokens, Tensor tables, int k) -> Tensor");
  m.def("markov_log_evidence(Tensor tokens, int k, int vocab_size, float alpha) -> Tensor");
  m.def("markov_context_counts(Tensor tokens, int k, int vocab_size) -> Tensor");
  m.def("markov_context_visits(Tensor tokens, int k, int vocab_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(eqprop, CompositeExplicitAutograd, m) {
  m.impl("markov_sample", &eqprop::markov::sample);
  m.impl("markov_bayes_nll", &eqprop::markov::bayes_nll);
  m.impl("markov_oracle_nll", &eqprop::markov::oracle_nll);
  m.impl("markov_log_evidence", &eqprop::markov::log_evidence);
  m.impl("markov_context_counts", &eqprop::markov::context_counts);
  m.impl("markov_context_visits", &eqprop::markov::context_visits);
}
