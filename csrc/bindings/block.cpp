// pybind11 bindings of the equilibrium transformer block (csrc/block): its config, the parameter
// layout, F(z; x) and its branches, and the native vector field the engine's solvers run.
#include "block/block.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "bindings/binder.h"
#include "bindings/vector_field_binding.h"
#include "block/block_field.h"

namespace py = pybind11;
using eqprop::block::BlockConfig;

namespace {

eqprop::block::Weights weights_for(const BlockConfig& cfg, const std::vector<at::Tensor>& params,
                                   const std::vector<at::Tensor>& sn_u, const at::Tensor& like) {
  eqprop::block::check_params(cfg, params, sn_u);
  auto w = eqprop::block::effective_weights(cfg, params, sn_u);
  TORCH_CHECK_VALUE(like.defined() && like.dim() == 3 && like.size(2) == cfg.d_model,
                    "u must be [B, T, C] with C = d_model = ", cfg.d_model, ", got ",
                    like.defined() ? c10::str(like.sizes()) : std::string("None"));
  return like.is_complex() ? w.to(like.scalar_type()) : w;
}

// The constructor's keyword arguments (pickling: copy.deepcopy, torch.save, spawn).
py::dict config_state(const BlockConfig& c) {
  py::dict d;
  d["d_model"] = c.d_model;
  d["n_heads"] = c.n_heads;
  d["d_ff"] = c.d_ff;
  d["coupling"] = to_string(c.coupling);
  d["attention"] = to_string(c.attention);
  d["ffn"] = to_string(c.ffn);
  d["qk_norm"] = c.qk_norm;
  d["bias"] = c.bias;
  d["rope"] = c.rope;
  d["rope_base"] = c.rope_base;
  d["spectral_rho"] = c.spectral_rho;
  d["monotone_m"] = c.monotone_m;
  d["ln_eps"] = c.ln_eps;
  d["qk_eps"] = c.qk_eps;
  d["attn_kernel"] = to_string(c.attn_kernel);
  return d;
}

BlockConfig config_from_state(const py::dict& d) {
  return eqprop::block::make_config(
      d["d_model"].cast<int64_t>(), d["n_heads"].cast<int64_t>(), d["d_ff"].cast<int64_t>(),
      d["coupling"].cast<std::string>(), d["attention"].cast<std::string>(), d["ffn"].cast<std::string>(),
      d["qk_norm"].cast<bool>(), d["bias"].cast<bool>(), d["rope"].cast<bool>(),
      d["rope_base"].cast<double>(), d["spectral_rho"].cast<std::optional<double>>(),
      d["monotone_m"].cast<double>(), d["ln_eps"].cast<double>(), d["qk_eps"].cast<double>(),
      d["attn_kernel"].cast<std::string>());
}

}  // namespace

static eqprop::Binder bind_block([](py::module_& m) {
  eqprop::bind_vector_field(m);  // the bases first: binder order across files is unspecified
  using eqprop::block::BlockField;
  py::class_<BlockField, eqprop::AutogradField, std::shared_ptr<BlockField>>(
      m, "BlockField",
      "The equilibrium block F(·; x) as a native VectorField (x bound); make it with block_field.")
      .def_property_readonly("x", &BlockField::x)
      .def_property_readonly("config", &BlockField::config);
  m.def(
      "block_field",
      [](const BlockConfig& cfg, std::vector<at::Tensor> params, std::vector<at::Tensor> sn_u,
         std::optional<at::Tensor> x) {
        // relax(block, None) arrives here: say what x must be rather than a signature mismatch.
        TORCH_CHECK_VALUE(x.has_value() && x->defined(),
                          "x (the injection) must be a tensor [B, T, C] with C = ", cfg.d_model,
                          " for the block's vector field, got None");
        return std::make_shared<BlockField>(cfg, std::move(params), std::move(sn_u), std::move(*x));
      },
      py::arg("config"), py::arg("params"), py::arg("sn_u"), py::arg("x"),
      "The block with injection x [B, T, C] bound, as a VectorField for the engine (no Python in its loop).");
  py::class_<BlockConfig>(m, "BlockConfig",
                          "Options of the equilibrium transformer block (docs/design.md §4), validated on "
                          "construction.")
      .def(py::init([](int64_t d_model, int64_t n_heads, int64_t d_ff, const std::string& coupling,
                       const std::string& attention, const std::string& ffn, bool qk_norm, bool bias,
                       bool rope, double rope_base, std::optional<double> spectral_rho, double monotone_m,
                       double ln_eps, double qk_eps, const std::string& attn_kernel) {
             return eqprop::block::make_config(d_model, n_heads, d_ff, coupling, attention, ffn, qk_norm,
                                               bias, rope, rope_base, spectral_rho, monotone_m, ln_eps,
                                               qk_eps, attn_kernel);
           }),
           py::kw_only(), py::arg("d_model"), py::arg("n_heads"), py::arg("d_ff") = 0,
           py::arg("coupling") = "coupled", py::arg("attention") = "softmax", py::arg("ffn") = "mlp",
           py::arg("qk_norm") = true, py::arg("bias") = false, py::arg("rope") = false,
           py::arg("rope_base") = 10000.0, py::arg("spectral_rho") = py::none(), py::arg("monotone_m") = 0.1,
           py::arg("ln_eps") = 1e-5, py::arg("qk_eps") = 1e-6, py::arg("attn_kernel") = "auto")
      .def_readonly("d_model", &BlockConfig::d_model)
      .def_readonly("n_heads", &BlockConfig::n_heads)
      .def_readonly("d_ff", &BlockConfig::d_ff)
      .def_property_readonly("coupling", [](const BlockConfig& c) { return to_string(c.coupling); })
      .def_property_readonly("attention", [](const BlockConfig& c) { return to_string(c.attention); })
      .def_property_readonly("ffn", [](const BlockConfig& c) { return to_string(c.ffn); })
      .def_property_readonly("attn_kernel", [](const BlockConfig& c) { return to_string(c.attn_kernel); })
      .def_readonly("qk_norm", &BlockConfig::qk_norm)
      .def_readonly("bias", &BlockConfig::bias)
      .def_readonly("rope", &BlockConfig::rope)
      .def_readonly("rope_base", &BlockConfig::rope_base)
      .def_readonly("spectral_rho", &BlockConfig::spectral_rho)
      .def_readonly("monotone_m", &BlockConfig::monotone_m)
      .def_readonly("ln_eps", &BlockConfig::ln_eps)
      .def_readonly("qk_eps", &BlockConfig::qk_eps)
      .def(py::pickle(&config_state, &config_from_state))
      .def("__eq__",
           [](const BlockConfig& a, py::object b) {
             return py::isinstance<BlockConfig>(b) &&
                    config_state(a).equal(config_state(py::cast<BlockConfig>(b)));
           })
      .def("__repr__", [](const BlockConfig& c) {
        return c10::str("BlockConfig(d_model=", c.d_model, ", n_heads=", c.n_heads, ", d_ff=", c.d_ff,
                        ", coupling='", to_string(c.coupling), "', attention='", to_string(c.attention),
                        "', ffn='", to_string(c.ffn), "', qk_norm=", c.qk_norm ? "True" : "False",
                        ", bias=", c.bias ? "True" : "False", ", rope=", c.rope ? "True" : "False",
                        ", spectral_rho=", c.spectral_rho ? c10::str(*c.spectral_rho) : "None",
                        ", monotone_m=", c.monotone_m, ", attn_kernel='", to_string(c.attn_kernel), "')");
      });

  m.def(
      "block_param_specs",
      [](const BlockConfig& cfg) {
        py::list out;
        for (const auto& s : eqprop::block::param_specs(cfg))
          out.append(py::make_tuple(s.name, py::tuple(py::cast(s.shape)), s.spectral));
        return out;
      },
      py::arg("config"),
      "[(name, shape, spectral)] of the raw parameters, in the order every block_* function takes them.");
  m.def(
      "block_param_table",
      [] {
        py::list out;
        for (const auto& p : eqprop::block::param_table()) {
          py::dict row;
          row["name"] = p.name;
          row["spectral"] = p.spectral;
          row["init"] = to_string(p.init);
          out.append(row);
        }
        return out;
      },
      "Every parameter a block may have: [{'name', 'spectral' (normalized when spectral_rho is set),\n"
      "'init' ('one', 'zero', 'fan_in', 'fan_in_resinit', 'resinit', 'monotone')}], in order.");
  m.def("block_forward", &eqprop::block::forward, py::arg("config"), py::arg("params"), py::arg("sn_u"),
        py::arg("z"), py::arg("x"),
        "F(z; x) of the equilibrium block: z, x [B, T, C] real or complex -> [B, T, C] (autograd-capable).");
  m.def("block_power_iteration_", &eqprop::block::power_iteration_, py::arg("config"), py::arg("params"),
        py::arg("sn_u"), py::arg("n_iter") = 1,
        "Update the spectral-norm vectors sn_u in place (off the autograd graph).");
  m.def(
      "block_effective_weights",
      [](const BlockConfig& cfg, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& sn_u) {
        eqprop::block::check_params(cfg, params, sn_u);
        py::dict out;
        for (const auto& [name, t] : eqprop::block::effective_weights(cfg, params, sn_u).named())
          out[py::str(name)] = t;
        return out;
      },
      py::arg("config"), py::arg("params"), py::arg("sn_u"),
      "The weights F uses (spectrally normalized; monotone W̃ as 'mono_W'), by name, on the graph.");
  m.def(
      "block_attention",
      [](const BlockConfig& cfg, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& sn_u,
         const at::Tensor& u) { return eqprop::block::attention(cfg, weights_for(cfg, params, sn_u, u), u); },
      py::arg("config"), py::arg("params"), py::arg("sn_u"), py::arg("u"),
      "The attention branch Attn(u) at u = LN1(z), [B, T, C] -> [B, T, C].");
  m.def(
      "block_ffn",
      [](const BlockConfig& cfg, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& sn_u,
         const at::Tensor& u) { return eqprop::block::ffn(cfg, weights_for(cfg, params, sn_u, u), u); },
      py::arg("config"), py::arg("params"), py::arg("sn_u"), py::arg("u"),
      "The FFN branch FFN(u), [B, T, C] -> [B, T, C].");
  m.def(
      "block_energy",
      [](const BlockConfig& cfg, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& sn_u,
         const at::Tensor& u) { return eqprop::block::energy(cfg, weights_for(cfg, params, sn_u, u), u); },
      py::arg("config"), py::arg("params"), py::arg("sn_u"), py::arg("u"),
      "The attention energy E(u) of attention='energy', [B, T, C] -> [B].");
});
