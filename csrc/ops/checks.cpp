// The argument checks every op's own checks are made of (ops/<op>.cpp has the op's).
#include "ops/checks.h"

#include <c10/util/Exception.h>

#include <utility>

namespace emu_fast {

std::string py_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(s);
  }
}

void check_float_dtype(const char* op, const char* name, const at::Tensor& t, bool allow_half) {
  const auto s = t.scalar_type();
  const bool ok = s == at::kFloat || s == at::kBFloat16 || (allow_half && s == at::kHalf);
  TORCH_CHECK_TYPE(ok, "emu_fast.", op, ": ", name, " must be float32 or bfloat16",
                   allow_half ? " or float16" : " on this device", ", got ", py_dtype(s));
}

void check_same_device(const char* op, const at::Tensor& ref, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "emu_fast.", op, ": ", name, " is on ", t.device(),
                    " but the other inputs are on ", ref.device());
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, "emu_fast.", op, ": ", name, " must be ", dim,
                    "-D, got shape ", t.sizes());
}

void check_same_dtype(const char* op, const at::Tensor& ref, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "emu_fast.", op, ": ", name, " is ",
                   py_dtype(t.scalar_type()), " but must match the other inputs' ", py_dtype(ref.scalar_type()));
}

namespace {
// The bytes [lo, hi) a tensor's elements span within its storage; empty for no elements.
std::pair<int64_t, int64_t> byte_span(const at::Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  int64_t lo = t.storage_offset(), hi = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t reach = (t.size(d) - 1) * t.stride(d);
    (reach < 0 ? lo : hi) += reach;
  }
  const int64_t item = static_cast<int64_t>(t.element_size());
  return {lo * item, (hi + 1) * item};
}
}  // namespace

void check_no_overlap(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                      const at::Tensor& b) {
  if (!a.has_storage() || !b.has_storage() || a.numel() == 0 || b.numel() == 0) return;
  // Same storage (meta and fake tensors too), or two storages over the same memory.
  const bool same = a.storage().is_alias_of(b.storage());
  const char *base_a = nullptr, *base_b = nullptr;
  if (!same && a.device() == b.device() && !a.is_meta()) {
    try {  // some storages (fake tensors') refuse data-pointer access; then only aliasing counts
      base_a = static_cast<const char*>(a.storage().data());
      base_b = static_cast<const char*>(b.storage().data());
    } catch (const c10::Error&) {
      base_a = base_b = nullptr;
    }
  }
  if (!same && (base_a == nullptr || base_b == nullptr)) return;
  const auto [lo_a, hi_a] = byte_span(a);
  const auto [lo_b, hi_b] = byte_span(b);
  // Offsets relative to one base: a's storage start, b's shifted by the distance between them.
  const int64_t shift = same ? 0 : static_cast<int64_t>(base_b - base_a);
  const bool disjoint = hi_a <= lo_b + shift || hi_b + shift <= lo_a;
  TORCH_CHECK_VALUE(disjoint, "emu_fast.", op, ": ", name_a, " and ", name_b, " overlap in memory; the op writes ",
                    name_b, ", so they must be separate tensors");
}

void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "emu_fast.", op, ": ", name, " must be contiguous");
}

}  // namespace emu_fast
