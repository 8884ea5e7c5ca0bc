#include "decoder/cpu_fused_step.h"

#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>

#include <cmath>

#include "decoder/cpu_decode_step.h"
#include "decoder/decoder.h"
#include "kernels/cpu/scalar.h"

namespace emu_fast::cpu {
namespace {

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename T>
class FusedStepT final : public FusedStep {
 public:
  explicit FusedStepT(StepModel<T> model) : model_(std::move(model)) {}

  void run(const at::Tensor& x, const int64_t* lengths, const int64_t* positions, const at::Tensor& out,
           const at::Tensor& next) const override {
    const at::Tensor xc = x.contiguous();
    StepIO<T> io;
    io.batch = x.size(0);
    io.lengths = lengths;
    io.positions = positions;
    io.x = ptr<T>(xc);
    io.out = ptr<T>(out);
    io.next = model_.head != nullptr && model_.up != nullptr ? ptr<T>(next) : nullptr;
    io.threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    decode_step(model_, io);
  }

 private:
  StepModel<T> model_;
};

template <typename T>
std::shared_ptr<const FusedStep> make(const FusedStepSpec& s) {
  StepModel<T> m;
  m.hidden = s.final_norm.size(0);
  m.heads = s.num_heads;
  m.kv_heads = s.num_kv_heads;
  m.head_dim = s.head_dim;
  m.intermediate = s.layers[0].gate_up.size(0) / 2;  // (down's width is in bytes for int4)
  m.bits = s.bits;
  m.group_size = s.group_size;
  m.capacity = s.k_cache[0].size(2);
  m.out_dim = s.head.defined() ? s.head.size(0) : m.hidden;
  m.eps = static_cast<float>(s.eps);
  m.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(m.head_dim)));
  for (size_t l = 0; l < s.layers.size(); ++l) {
    const auto& w = s.layers[l];
    auto p = [](const at::Tensor& weight, const at::Tensor& scales) {
      return StepProj{weight.data_ptr(), scales.defined() ? scales.data_ptr<float>() : nullptr};
    };
    m.layers.push_back({ptr<T>(w.input_norm), ptr<T>(w.post_norm), p(w.qkv, w.qkv_scales), p(w.o, w.o_scales),
                        p(w.gate_up, w.gate_up_scales), p(w.down, w.down_scales), ptr<T>(s.k_cache[l]),
                        ptr<T>(s.v_cache[l])});
  }
  m.final_norm = ptr<T>(s.final_norm);
  m.head = s.head.defined() ? ptr<T>(s.head) : nullptr;
  m.up = s.head.defined() && s.up.has_value() ? ptr<T>(*s.up) : nullptr;
  m.rope_cos = s.rope_cos.data_ptr<float>();
  m.rope_sin = s.rope_sin.data_ptr<float>();
  if (s.all_reduce) {
    const at::TensorOptions options = s.final_norm.options();
    m.all_reduce = [reduce = s.all_reduce, options](T* data, int64_t n) {
      reduce(at::from_blob(data, {n}, options));
    };
  }
  return std::make_shared<FusedStepT<T>>(std::move(m));
}

}  // namespace

std::shared_ptr<const FusedStep> make_fused_step(const FusedStepSpec& spec) {
  if (!spec.final_norm.device().is_cpu()) return nullptr;
  switch (spec.final_norm.scalar_type()) {
    case at::kFloat:
      return make<float>(spec);
    case at::kBFloat16:
      return make<kernels::bf16>(spec);
    default:
      return nullptr;
  }
}

}  // namespace emu_fast::cpu
