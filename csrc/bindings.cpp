// The Python module emu_fast._C: EmuDecoder. (The ops are reached through torch.ops.emu_fast.)
// The only file that includes pybind11.
#include <pybind11/functional.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include "ops/checks.h"
#include "decoder/decoder.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/quantized_gemv_table.h"
#include "ops/op_set.h"

namespace py = pybind11;
using emu_fast::EmuDecoder;

namespace {
std::vector<std::string> _cpu_isa_names() {
  return {std::begin(emu_fast::kernels::kIsaNames), std::end(emu_fast::kernels::kIsaNames)};
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "emu_fast C++ extension: EmuDecoder and the emu_fast::* custom ops";

  // c10 errors become the Python exceptions torch raises for them (TORCH_CHECK_VALUE ->
  // ValueError, ...), without the C++ backtrace.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::OutOfMemoryError& e) {
      PyErr_SetString(PyExc_MemoryError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });

  // The ops' argument checks (csrc/ops/<op>.cpp), for the fake kernels in emu_fast/ops.py: meta
  // and fake tensors are refused as the CPU and CUDA kernels refuse them (metadata only).
  // cuda: check as the CUDA kernels do (float16 taken, op_limits.h), else as the CPU's.
  using T = const at::Tensor&;
  m.def("check_splice_embeddings", [](T ids, T table, T values, bool cuda) {
    emu_fast::check_splice(ids, table, values, /*allow_half=*/true);
  });
  m.def("check_split_counters", [](T q, T kc, T counters, bool /*cuda: the same rule on every device*/) {
    emu_fast::check_split_counters(q, kc, counters);
  });
  m.def("check_decode_attention", [](T q, T k, T v, T kc, T vc, T lens, T pos, T cos, T sin, bool cuda) {
    emu_fast::check_decode_attention(q, k, v, kc, vc, lens, pos, cos, sin, cuda);
    if (cuda) emu_fast::check_cuda_attention_limits("emu_fast.decode_attention", q.size(2), q.size(1) / kc.size(1));
  });
  m.def("check_regression_head", [](T hidden, T norm_w, T head_w, const c10::optional<at::Tensor>& up, bool cuda) {
    emu_fast::check_regression_head(hidden, norm_w, head_w, up, cuda);
  });
  m.def("check_gemv", [](T x, T w, bool cuda) { emu_fast::check_gemv(x, w, cuda); });
  m.def("check_norm_gemv", [](T x, T nw, T w, bool cuda) { emu_fast::check_norm_gemv(x, nw, w, cuda); });
  m.def("check_norm_gemv_silu", [](T x, T nw, T w, bool cuda) { emu_fast::check_norm_gemv_silu(x, nw, w, cuda); });
  m.def("check_gemv_add", [](T x, T w, T r, bool cuda) { emu_fast::check_gemv_add(x, w, r, cuda); });
  m.def("check_rms_norm", [](T x, T w, bool cuda) { emu_fast::check_rms_norm("rms_norm", x, w, cuda); });
  m.def("check_add_rms_norm", [](T x, T r, T w, bool cuda) { emu_fast::check_add_rms_norm(x, r, w, cuda); });
  m.def("check_silu_mul", [](T gate_up, bool cuda) { emu_fast::check_silu_mul(gate_up, cuda); });
  m.def("check_gemv_int8", [](T x, T q, T s, bool cuda) { emu_fast::check_gemv_int8(x, q, s, cuda); });
  m.def("check_gemv_int4", [](T x, T q, T s, int64_t group, bool cuda) {
    emu_fast::check_gemv_int4(x, q, s, group, cuda);
  });

  // Test-only (tests/decoder/test_self_check.py): make one custom kernel wrong on purpose; "" clears.
  m.def("_set_test_fault", &emu_fast::set_test_fault, py::arg("op"));
  // Test-only (tests/ops, tests/quant): the instruction-set level every CPU kernel runs ("avx512",
  // "avx2", "portable"; "" = the best this processor has). Returns False for one it lacks.
  m.def("_set_cpu_isa", [](const std::string& name) {
    namespace k = emu_fast::kernels;
    if (name.empty()) return k::set_isa_limit(k::cpu_isa());
    for (int level = 0; level < k::kIsaLevels; ++level)
      if (name == k::kIsaNames[level]) return k::set_isa_limit(static_cast<k::Isa>(level));
    TORCH_CHECK_VALUE(false, "emu_fast: unknown instruction set '", name, "' (one of ", c10::Join(", ", _cpu_isa_names()),
                      ", or \"\")");
  }, py::arg("isa"));
  // Test-only: every level's name, lowest first.
  m.def("_cpu_isa_levels", &_cpu_isa_names);

  // Test-only (tests/quant/test_quantized_gemv.py): the level whose kernel a CPU quantized GEMV of
  // `bits` with `input` ("float32", "int16", "int8") inputs and int4 group `group` runs.
  m.def("_quantized_gemv_level", [](int64_t bits, const std::string& input, int64_t group) -> std::string {
    namespace k = emu_fast::kernels;
    TORCH_CHECK_VALUE(bits == 8 || bits == 4, "emu_fast: bits must be 8 or 4, got ", bits);
    TORCH_CHECK_VALUE(input == "float32" || input == "int16" || input == "int8", "emu_fast: unknown input '", input, "'");
    const k::Isa level = k::quantized_gemv_level(
        bits == 8 ? k::QuantizedWeight::kInt8 : k::QuantizedWeight::kInt4,
        input == "int16" ? k::QuantizedInput::kInt16 : input == "int8" ? k::QuantizedInput::kInt8 : k::QuantizedInput::kFloat32,
        group);
    return k::kIsaNames[static_cast<int>(level)];
  }, py::arg("bits"), py::arg("input"), py::arg("group"));

  // Test-only (tests/quant/test_quantized_prefill.py): rows [first, first + out.size(0)) of a
  // quantized weight written into out, as prefill multiplies by them.
  // bf16_values: rounded to bfloat16, stored in a float32 out.
  m.def("_dequantize_weight_rows", [](T q, T s, int64_t bits, int64_t group, int64_t first, T out, bool bf16_values) {
    TORCH_CHECK_VALUE(bits == 8 || bits == 4, "emu_fast: bits must be 8 or 4, got ", bits);
    TORCH_CHECK_VALUE(first >= 0 && first + out.size(0) <= q.size(0), "emu_fast: rows out of range");
    emu_fast::dequantize_weight_rows(q, s, bits, group, first, out,
                                     bf16_values ? std::optional<at::ScalarType>(at::kBFloat16) : std::nullopt);
  }, py::arg("qweight"), py::arg("scales"), py::arg("bits"), py::arg("group"), py::arg("first"), py::arg("out"),
     py::arg("bf16_values") = false);

  // Test-only: the scratch a quantized prefill dequantizes each chunk of rows into (0: default).
  m.def("_set_prefill_chunk_bytes", &emu_fast::set_prefill_chunk_bytes, py::arg("bytes"));

  // How every CPU quantized GEMV takes its inputs, process-wide (emu_fast.set_quantized_activations;
  // the tests force "int16" on float32 inputs): "float32", "int16", "int8"; "" = as each caller
  // asks (int16 for bfloat16 / float16 activations, float32 for float32 ones).
  m.def("_set_quantized_input", [](const std::string& name) {
    using emu_fast::kernels::QuantizedInput;
    TORCH_CHECK_VALUE(name.empty() || name == "int16" || name == "float32" || name == "int8",
                      "emu_fast: unknown input mode '", name, "' (float32, int16, int8 or \"\")");
    emu_fast::kernels::set_quantized_input_override(
        name.empty() ? std::nullopt
                     : std::optional<QuantizedInput>(name == "int16"  ? QuantizedInput::kInt16
                                                     : name == "int8" ? QuantizedInput::kInt8
                                                                      : QuantizedInput::kFloat32));
  }, py::arg("mode"));
  m.def("_quantized_input", []() -> std::string {
    using emu_fast::kernels::QuantizedInput;
    const auto forced = emu_fast::kernels::quantized_input_override();
    if (!forced) return "";
    return *forced == QuantizedInput::kInt16 ? "int16" : *forced == QuantizedInput::kInt8 ? "int8" : "float32";
  });

  py::class_<EmuDecoder>(m, "EmuDecoder", R"doc(
A LLaMA decoder with a KV cache sized to the requests for Emu's causal image-embedding loop.

EmuDecoder(layers, final_norm, head_weight, up_weight=None, *, num_heads, num_kv_heads,
           rms_eps, rope_cos, rope_sin, max_batch=None, max_seq_len=None, rope_fn=None,
           kernels="auto", segment_starts=None)

layers: per layer [input_norm, qkv, o, post_norm, gate_up, down] (qkv = q,k,v projections
stacked on dim 0, gate_up = gate,up stacked). The weights are used in place, not copied.
rope_cos/rope_sin: float32 [positions, head_dim / 2], the model's own RoPE tables
(emu_fast.rope.model_rope_tables); rope_fn(P) -> (cos, sin) for P positions extends them as
requests need. max_batch / max_seq_len: upper limits (None: no limit besides memory); the
KV cache grows to the largest request. kernels: "custom" (ours), "aten" (the portable step:
any torch device) or "auto" (ours where we have them, checked against ATen at first use per
batch size; ATen elsewhere or after a failed check). segment_starts: the first layer of each
run of layers on one device (a model split over devices); each segment keeps its own cache.
weight_bits: 0 (the projections in the model's dtype), 8 or 4 (weight-only int8 / int4, the
schemes of emu_fast.quant.schemes; group_size: int4's group): each layer's list is then followed by
[qkv_scales, o_scales, gate_up_scales, down_scales] and qkv/o/gate_up/down are the qweights.
tp_size / tp_group: one rank of a tensor-parallel torch.distributed group (its size and
ProcessGroup.group_name): num_heads / num_kv_heads are the model's, the layers this rank's shards
(emu_fast.parallel.shard_layer); o's and down's partial outputs are all-reduced over the group.
)doc")
      .def(py::init<const std::vector<std::vector<at::Tensor>>&, at::Tensor, at::Tensor,
                    c10::optional<at::Tensor>, int64_t, int64_t, double, at::Tensor, at::Tensor,
                    c10::optional<int64_t>, c10::optional<int64_t>, EmuDecoder::RopeFn, const std::string&,
                    std::vector<int64_t>, int64_t, int64_t, int64_t, const std::string&>(),
           py::arg("layers"), py::arg("final_norm"), py::arg("head_weight"), py::arg("up_weight") = py::none(),
           py::kw_only(), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("rms_eps"),
           py::arg("rope_cos"), py::arg("rope_sin"), py::arg("max_batch") = py::none(),
           py::arg("max_seq_len") = py::none(), py::arg("rope_fn") = py::none(), py::arg("kernels") = "auto",
           py::arg("segment_starts") = std::vector<int64_t>{}, py::arg("weight_bits") = 0,
           py::arg("group_size") = 0, py::arg("tp_size") = 1, py::arg("tp_group") = "")
      .def("prefill", &EmuDecoder::prefill, py::arg("inputs_embeds"), py::arg("attention_mask"),
           py::call_guard<py::gil_scoped_release>(),
           "Prompts [B,T,H] with a [B,T] 0/1 mask (left or right padding) -> output 0 [B, out].")
      .def("step", &EmuDecoder::step, py::arg("prev_output"), py::call_guard<py::gil_scoped_release>(),
           "Previous output [B, out] -> next output [B, out]: one whole decoder step.")
      .def("decode", &EmuDecoder::decode, py::arg("prev_output"), py::arg("steps"),
           py::call_guard<py::gil_scoped_release>(),
           "`steps` decode steps from the previous output [B, out] -> [B, steps, out]; on CUDA, "
           "replays a CUDA graph of the step.")
      .def("generate", &EmuDecoder::generate, py::arg("inputs_embeds"), py::arg("attention_mask"), py::arg("n"),
           py::call_guard<py::gil_scoped_release>(),
           "prefill + n - 1 decode steps under one lock -> [B, n, out], written into one tensor.")
      .def_property("use_cuda_graphs", &EmuDecoder::use_cuda_graphs, &EmuDecoder::set_use_cuda_graphs,
                    "Whether decode() replays a captured CUDA graph on the GPU (default True).")
      .def_property("fused_cpu_step", &EmuDecoder::fused_cpu_step, &EmuDecoder::set_fused_cpu_step,
                    "On the CPU, run each step in one parallel region (default True) or op by op "
                    "through the dispatcher, as on CUDA.")
      .def("admit", &EmuDecoder::admit, py::arg("inputs_embeds"), py::arg("attention_mask"), py::arg("steps"),
           py::call_guard<py::gil_scoped_release>(),
           "New prompts into rows after the active ones (those untouched) -> their output 0 [A, out].")
      .def("retire", &EmuDecoder::retire, py::arg("rows"), py::call_guard<py::gil_scoped_release>(),
           "Remove these active rows; the rows after them move down in order.")
      .def("reset", &EmuDecoder::reset, "Forget the active batch; keeps the KV cache allocation.")
      .def("reserve", &EmuDecoder::reserve, py::arg("batch"), py::arg("seq_len"),
           py::call_guard<py::gil_scoped_release>(),
           "Grow the KV cache to at least batch x seq_len now (within the limits); never shrinks it.")
      .def_property_readonly("capacity", [](const EmuDecoder& d) {
        return std::make_tuple(d.capacity_batch(), d.capacity_seq_len());
      }, "(batch, seq_len) the KV cache holds now.")
      .def_property_readonly("rope_positions", &EmuDecoder::rope_positions)
      .def_property_readonly("weight_bytes", &EmuDecoder::weight_bytes)
      .def_property_readonly("scratch_bytes", &EmuDecoder::scratch_bytes)
      .def_property_readonly("batch_size", &EmuDecoder::batch_size)
      .def_property_readonly("lengths", &EmuDecoder::lengths, "Tokens cached per active sequence.")
      .def_property_readonly("max_batch", &EmuDecoder::max_batch, "The batch limit, or None.")
      .def_property_readonly("max_seq_len", &EmuDecoder::max_seq_len, "The length limit, or None.")
      .def_property_readonly("num_layers", &EmuDecoder::num_layers)
      .def_property_readonly("weight_bits", &EmuDecoder::weight_bits, "0 (unquantized), 8 (int8) or 4 (int4).")
      .def_property_readonly("group_size", &EmuDecoder::group_size, "int4's group size (0 otherwise).")
      .def_property_readonly("hidden_size", &EmuDecoder::hidden_size)
      .def_property_readonly("output_size", &EmuDecoder::output_size)
      .def_property_readonly("num_heads", &EmuDecoder::num_heads, "The heads this decoder holds (a rank's share).")
      .def_property_readonly("num_kv_heads", &EmuDecoder::num_kv_heads)
      .def_property_readonly("head_dim", &EmuDecoder::head_dim)
      .def_property_readonly("tp_size", &EmuDecoder::tp_size, "Tensor-parallel ranks (1: none).")
      .def_property_readonly("tp_group", &EmuDecoder::tp_group, "The tensor-parallel group's name ('' without one).")
      .def_property_readonly("kv_cache", &EmuDecoder::kv_cache,
                             "The KV cache [layers, 2, capacity batch, kv_heads, capacity seq_len, head_dim] "
                             "(one segment; see kv_caches).")
      .def_property_readonly("kv_caches", &EmuDecoder::kv_caches,
                             "Per segment, its KV cache [its layers, 2, batch, kv_heads, seq_len, head_dim].")
      .def_property_readonly("kv_cache_bytes", &EmuDecoder::kv_cache_bytes)
      .def_property_readonly("segments", &EmuDecoder::segments,
                             "Per segment: (first layer, end layer, device as a string).")
      .def_property_readonly("input_device", [](const EmuDecoder& d) { return d.input_device().str(); },
                             "Where prompts go in: the first layer's device.")
      .def_property_readonly("output_device", [](const EmuDecoder& d) { return d.output_device().str(); },
                             "Where outputs come out: the regression head's device.")
      .def_property_readonly("kernel_mode", &EmuDecoder::kernel_mode, "The kernels asked for: auto, custom or aten.")
      .def_property_readonly("kernels", &EmuDecoder::kernels, "The kernels in use now: custom or aten.")
      .def_property_readonly("fallback_reason", &EmuDecoder::fallback_reason,
                             "Why the self-check moved this decoder to the ATen step ('' if it did not).");
}
