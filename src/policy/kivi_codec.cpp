// KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"):
// keys quantized per channel over a page of `group` tokens, values per token over groups of
// `vgroup` channels, asymmetric (f16 scale + zero point), newest `residual` tokens kept in
// full precision. kbits and vbits are each 1, 2, 3, 4 or 8 (1 bit: the uniform 1-bit baseline,
// codes 0/1 = group min/max). Page layout (docs/formats.md):
//   kscale[d] kzero[d] | kcodes[group][row_bytes(d,kbits)] | pad to 2 |
//   vscale[group][d/vgroup] vzero[group][d/vgroup] | vcodes[group][row_bytes(d,vbits)]
// qbits=8 (default 0: full precision) makes attend() compute q.k and p.v with 8-bit integer
// dot products (kernel_table.h, attend_kivi_q8); the page format is the same, and scores() /
// accumulate() (the non-fused path and tests) stay full precision.
#include <algorithm>

#include "check.h"
#include "kvslim/kernels/kernel_table.h"
#include "policy/codecs.h"

namespace kvslim::detail {
namespace {

class KiviCodec final : public Codec {
 public:
  KiviCodec(int kbits, int vbits, int vgroup, int qbits, PagingOptions o)
      : kbits_(kbits), vbits_(vbits), vgroup_(vgroup), qbits_(qbits), o_(o) {}

  // Offsets of a page of ntok tokens (docs/formats.md).
  struct Layout {
    std::size_t kcodes, vscale, vzero, vcodes, bytes;
  };
  Layout layout(int ntok, int d) const {
    const std::size_t g = static_cast<std::size_t>(ntok);
    Layout l;
    l.kcodes = 4u * static_cast<std::size_t>(d);
    l.vscale = l.kcodes + g * static_cast<std::size_t>(kernels::row_bytes(d, kbits_));
    l.vscale += l.vscale & 1u;  // f16 alignment
    const std::size_t ng = static_cast<std::size_t>(d / vgroup_);
    l.vzero = l.vscale + 2u * g * ng;
    l.vcodes = l.vzero + 2u * g * ng;
    l.bytes = l.vcodes + g * static_cast<std::size_t>(kernels::row_bytes(d, vbits_));
    return l;
  }

  std::string describe() const override {
    std::string s = fmt::format("kivi:kbits={},vbits={},group={},vgroup={},residual={},sinks={}", kbits_, vbits_,
                                o_.group, vgroup_, o_.residual, o_.sinks);
    if (qbits_) s += fmt::format(",qbits={}", qbits_);  // only when set: existing texts unchanged
    return s + rotation_text(o_.rotation);
  }
  int page_tokens() const override { return o_.group; }
  int residual() const override { return o_.residual; }
  int sinks() const override { return o_.sinks; }
  RotationSpec rotation() const override { return o_.rotation; }
  std::size_t page_bytes(int ntok, int d) const override { return layout(ntok, d).bytes; }
  void check_rows(const float* k, const float* v, int ntok, int d) const override {
    check_f16_range("kivi", k, ntok, d, "key");
    check_f16_range("kivi", v, ntok, d, "value");
  }
  void encode(const kernels::KernelTable& kt, const float* k, const float* v, int ntok, int d,
              std::byte* page) const override {
    const Layout l = layout(ntok, d);
    kt.kivi_quant_keys(k, ntok, d, kbits_, u16(page), u16(page) + d, u8(page + l.kcodes));
    kt.kivi_quant_values(v, ntok, d, vbits_, vgroup_, u16(page + l.vscale), u16(page + l.vzero), u8(page + l.vcodes));
  }
  void decode(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, float* k,
              float* v) const override {
    const Layout l = layout(ntok, d);
    kt.kivi_dequant_keys(u16(page), u16(page) + d, u8(page + l.kcodes), ntok, d, kbits_, k);
    kt.kivi_dequant_values(u16(page + l.vscale), u16(page + l.vzero), u8(page + l.vcodes), ntok, d, vbits_, vgroup_,
                           v);
  }
  void scores(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* q, int nq,
              float* s) const override {
    kt.kivi_scores(q, nq, u16(page), u16(page) + d, u8(page + layout(ntok, d).kcodes), ntok, d, kbits_, s);
  }
  void accumulate(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* p, int nq,
                  float* o) const override {
    const Layout l = layout(ntok, d);
    kt.kivi_accum(p, nq, u16(page + l.vscale), u16(page + l.vzero), u8(page + l.vcodes), ntok, d, vbits_, vgroup_, o);
  }
  void attend_page(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* q,
                   std::byte* /*prepared*/, int nq, const kernels::BlockMask& mask,
                   kernels::OnlineState& st) const override {
    const Layout l = layout(ntok, d);
    const kernels::KiviPage pg{u16(page), u16(page) + d,          u8(page + l.kcodes), u16(page + l.vscale),
                               u16(page + l.vzero), u8(page + l.vcodes), kbits_, vbits_, vgroup_};
    if (qbits_ == 8)
      kt.attend_kivi_q8(q, nq, pg, ntok, d, mask, st);
    else
      kt.attend_kivi(q, nq, pg, ntok, d, mask, st);
  }

 private:
  static std::uint16_t* u16(std::byte* p) { return reinterpret_cast<std::uint16_t*>(p); }
  static const std::uint16_t* u16(const std::byte* p) { return reinterpret_cast<const std::uint16_t*>(p); }
  static std::uint8_t* u8(std::byte* p) { return reinterpret_cast<std::uint8_t*>(p); }
  static const std::uint8_t* u8(const std::byte* p) { return reinterpret_cast<const std::uint8_t*>(p); }

  int kbits_, vbits_, vgroup_, qbits_;
  PagingOptions o_;
};

int read_bits(StageParams& p, const char* key) {
  const int b = p.get_int(key, 2, -1000000, 1000000);
  KVSLIM_CHECK(b == 1 || b == 2 || b == 3 || b == 4 || b == 8, ErrorCode::kInvalidArgument,
               "recipe stage 'kivi': {}={} is not a supported bit width (1, 2, 3, 4 or 8)", key, b);
  return b;
}

}  // namespace

BuiltStage make_kivi_codec(StageParams& p, int head_dim) {
  const int kbits = read_bits(p, "kbits");
  const int vbits = read_bits(p, "vbits");
  // Default: the largest divisor of head_dim that is at most 32 (32 for 64/96/128/256, 20
  // for 80, 25 for 100, 28 for 112), so every real head size works without a key.
  int def_vgroup = std::min(32, head_dim);
  while (head_dim % def_vgroup != 0) --def_vgroup;
  const int vgroup = p.get_int("vgroup", def_vgroup, 1, 1 << 16);
  KVSLIM_CHECK(head_dim % vgroup == 0, ErrorCode::kInvalidArgument,
               "recipe stage 'kivi': vgroup={} does not divide head_dim {}", vgroup, head_dim);
  // qbits: precision of the query and the value weights in attention (0: f32; 8: int8 dot
  // products). A non-integer is Error(kRecipe) from get_int; any other integer names itself.
  const int qbits = p.get_int("qbits", 0, -1000000, 1000000);
  KVSLIM_CHECK(qbits == 0 || qbits == 8, ErrorCode::kInvalidArgument,
               "recipe stage 'kivi': qbits={} is not supported (0: full-precision attention, 8: 8-bit integer dot "
               "products)",
               qbits);
  PagingOptions o = read_paging(p, PagingOptions{32, 128, 0});
  o.rotation = read_rotation(p);
  p.check_all_used({"kbits", "vbits", "group", "vgroup", "residual", "sinks", "qbits", "rotate", "seed"});
  BuiltStage b{StageKind::kCodec, nullptr, nullptr, nullptr, nullptr};
  b.codec = std::make_shared<KiviCodec>(kbits, vbits, vgroup, qbits, o);
  return b;
}

}  // namespace kvslim::detail
