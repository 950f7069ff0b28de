// torch.ops.eqprop.ttt_linear / ttt_mlp (csrc/ttt). Registered under CompositeImplicitAutograd: the ops
// are compositions of ATen ops, so autograd, autocast and torch.compile see through them.
#include "ttt/ttt.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(eqprop, m) {
  m.def(
      "ttt_linear(Tensor q, Tensor k, Tensor v, Tensor eta, Tensor W, Tensor b, Tensor ln_weight, "
      "Tensor ln_bias, int mini_batch, float eps) -> Tensor");
  m.def(
      "ttt_mlp(Tensor q, Tensor k, Tensor v, Tensor eta, Tensor W1, Tensor b1, Tensor W2, Tensor b2, "
      "Tensor ln_weight, Tensor ln_bias, int mini_batch, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(eqprop, CompositeImplicitAutograd, m) {
  m.impl("ttt_linear", &eqprop::ttt::ttt_linear);
  m.impl("ttt_mlp", &eqprop::ttt::ttt_mlp);
}
