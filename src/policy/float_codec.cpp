// Full-precision and half-precision pages: f32, f16, bf16. Page layout: K [ntok][d] then
// V [ntok][d] in the codec's dtype (ntok = group for pages sealed from the window).
#include <cmath>
#include <cstring>

#include "check.h"
#include "kvslim/kernels/kernel_table.h"
#include "policy/codecs.h"

namespace kvslim::detail {

PagingOptions read_paging(StageParams& p, PagingOptions defaults) {
  PagingOptions o;
  o.group = p.get_int("group", defaults.group, 1, 4096);
  o.residual = p.get_int("residual", defaults.residual, 0, 1 << 20);
  o.sinks = p.get_int("sinks", defaults.sinks, 0, 4096);
  return o;
}

RotationSpec read_rotation(StageParams& p) {
  RotationSpec r;
  const std::string rotate = p.get_string("rotate", "none");
  KVSLIM_CHECK(rotate == "none" || rotate == "hadamard", ErrorCode::kInvalidArgument,
               "recipe stage '{}': rotate={} is not a known rotation (none or hadamard)", p.stage(), rotate);
  r.hadamard = rotate == "hadamard";
  KVSLIM_CHECK(r.hadamard || !p.has("seed"), ErrorCode::kInvalidArgument,
               "recipe stage '{}': seed= is the seed of rotate=hadamard, and this stage has no rotation", p.stage());
  r.seed = static_cast<std::uint64_t>(p.get_int("seed", 0, 0, 1 << 30));
  KVSLIM_CHECK(r.hadamard || !p.has("rotated"), ErrorCode::kInvalidArgument,
               "recipe stage '{}': rotated= says what rotate=hadamard rotates, and this stage has no rotation",
               p.stage());
  const std::string what = p.get_string("rotated", "kv");
  KVSLIM_CHECK(what == "kv" || what == "k" || what == "v", ErrorCode::kInvalidArgument,
               "recipe stage '{}': rotated={} must be kv, k or v", p.stage(), what);
  r.keys = what != "v";
  r.values = what != "k";
  return r;
}

std::string paging_text(const PagingOptions& o) {
  std::string s = fmt::format(",group={},residual={},sinks={}", o.group, o.residual, o.sinks);
  return s + rotation_text(o.rotation);
}

std::string rotation_text(const RotationSpec& r) {
  if (!r.hadamard) return {};
  return fmt::format(",rotate=hadamard,seed={}", r.seed) + (r.keys && r.values ? "" : r.keys ? ",rotated=k" : ",rotated=v");
}

void check_f16_range(const char* codec, const float* x, int ntok, int d, const char* what) {
  for (int j = 0; j < ntok; ++j)
    for (int c = 0; c < d; ++c) {
      const float v = x[static_cast<std::ptrdiff_t>(j) * d + c];
      KVSLIM_CHECK(!(std::fabs(v) > 65504.0f), ErrorCode::kInvalidArgument,
                   "codec '{}': {} value {} (page token {}, channel {}) exceeds the f16 range 65504", codec,
                   what, v, j, c);
    }
}

namespace {

class FloatCodec final : public Codec {
 public:
  FloatCodec(DType dtype, PagingOptions o) : dtype_(dtype), o_(o) {}

  std::string describe() const override {
    return fmt::format("{}:{}", dtype_name(dtype_), paging_text(o_).substr(1));
  }
  int page_tokens() const override { return o_.group; }
  int residual() const override { return o_.residual; }
  int sinks() const override { return o_.sinks; }
  RotationSpec rotation() const override { return o_.rotation; }
  std::size_t page_bytes(int ntok, int d) const override {
    return 2u * static_cast<std::size_t>(ntok) * d * dtype_size(dtype_);
  }
  void check_rows(const float* k, const float* v, int ntok, int d) const override {
    if (dtype_ != DType::kF16) return;
    check_f16_range("f16", k, ntok, d, "key");
    check_f16_range("f16", v, ntok, d, "value");
  }
  void encode(const kernels::KernelTable& kt, const float* k, const float* v, int ntok, int d,
              std::byte* page) const override {
    const std::size_t n = static_cast<std::size_t>(ntok) * d, vo = n;
    switch (dtype_) {
      case DType::kF32:
        std::memcpy(page, k, n * 4);
        std::memcpy(page + vo * 4, v, n * 4);
        break;
      case DType::kF16:
        kt.f32_to_f16(k, u16(page), n);
        kt.f32_to_f16(v, u16(page) + vo, n);
        break;
      case DType::kBF16:
        kt.f32_to_bf16(k, u16(page), n);
        kt.f32_to_bf16(v, u16(page) + vo, n);
        break;
    }
  }
  void decode(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, float* k,
              float* v) const override {
    const std::size_t n = static_cast<std::size_t>(ntok) * d, vo = n;
    switch (dtype_) {
      case DType::kF32:
        std::memcpy(k, page, n * 4);
        std::memcpy(v, page + vo * 4, n * 4);
        break;
      case DType::kF16:
        kt.f16_to_f32(u16(page), k, n);
        kt.f16_to_f32(u16(page) + vo, v, n);
        break;
      case DType::kBF16:
        kt.bf16_to_f32(u16(page), k, n);
        kt.bf16_to_f32(u16(page) + vo, v, n);
        break;
    }
  }
  void scores(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* q, int nq,
              float* s) const override {
    switch (dtype_) {
      case DType::kF32: kt.scores_f32(q, nq, f32(page), ntok, d, s); break;
      case DType::kF16: kt.scores_f16(q, nq, u16(page), ntok, d, s); break;
      case DType::kBF16: kt.scores_bf16(q, nq, u16(page), ntok, d, s); break;
    }
  }
  void accumulate(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* p, int nq,
                  float* o) const override {
    const std::size_t n = static_cast<std::size_t>(ntok) * d;  // V follows the page's K
    switch (dtype_) {
      case DType::kF32: kt.accum_f32(p, nq, f32(page) + n, ntok, d, o); break;
      case DType::kF16: kt.accum_f16(p, nq, u16(page) + n, ntok, d, o); break;
      case DType::kBF16: kt.accum_bf16(p, nq, u16(page) + n, ntok, d, o); break;
    }
  }
  void attend_page(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* q,
                   std::byte* /*prepared*/, int nq, const kernels::BlockMask& mask,
                   kernels::OnlineState& st) const override {
    const std::size_t n = static_cast<std::size_t>(ntok) * d;  // V follows the page's K
    switch (dtype_) {
      case DType::kF32: kt.attend_f32(q, nq, f32(page), f32(page) + n, ntok, d, mask, st); break;
      case DType::kF16: kt.attend_f16(q, nq, u16(page), u16(page) + n, ntok, d, mask, st); break;
      case DType::kBF16: kt.attend_bf16(q, nq, u16(page), u16(page) + n, ntok, d, mask, st); break;
    }
  }

 private:
  static std::uint16_t* u16(std::byte* p) { return reinterpret_cast<std::uint16_t*>(p); }
  static const std::uint16_t* u16(const std::byte* p) { return reinterpret_cast<const std::uint16_t*>(p); }
  static const float* f32(const std::byte* p) { return reinterpret_cast<const float*>(p); }

  DType dtype_;
  PagingOptions o_;
};

}  // namespace

BuiltStage make_float_codec(DType dtype, StageParams& p, int /*head_dim*/) {
  PagingOptions o = read_paging(p, PagingOptions{32, 0, 0});
  o.rotation = read_rotation(p);
  p.check_all_used({"group", "residual", "sinks", "rotate", "seed", "rotated"});
  BuiltStage b{StageKind::kCodec, nullptr, nullptr, nullptr, nullptr};
  b.codec = std::make_shared<FloatCodec>(dtype, o);
  return b;
}

}  // namespace kvslim::detail
