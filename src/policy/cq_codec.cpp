// CQ (coupled quantization; Zhang et al., 2024, "KV Cache is 1 Bit Per Channel"): every group
// of C adjacent channels of a key or value row is stored as the index of its nearest learned
// centroid (kvslim/policy/codebook.h), C·B bits per group, B per channel. Page layout
// (docs/formats.md, "cq page"): kcodes[ntok][row_bytes(d/Ck, Ck·Bk)] | vcodes[ntok][row_bytes(d/Cv,
// Cv·Bv)]; no per-page metadata, the codebooks are per (layer, kv head) and shared.
//
// Attention stays on the codes (kernel_table.h, "CQ"): prepare() builds the table of
// q·centroid for every (key group, code) once per attend call, a token's logit is a sum of
// table entries, the softmax weights are summed per (value group, code) across pages, and
// finish() multiplies those sums by the centroids once.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "check.h"
#include "kvslim/cache/recipe.h"
#include "kvslim/kernels/kernel_table.h"
#include "kvslim/policy/codebook.h"
#include "policy/codecs.h"

namespace kvslim {
namespace detail {
namespace {

struct CqShapes {
  CodebookShape key, value;
};

// channels/bits set both; kchannels/kbits/vchannels/vbits override one side.
CqShapes read_shapes(StageParams& p) {
  const int channels = p.get_int("channels", 4, -1000000, 1000000);
  const int bits = p.get_int("bits", 2, -1000000, 1000000);
  CqShapes s;
  s.key = {p.get_int("kchannels", channels, -1000000, 1000000), p.get_int("kbits", bits, -1000000, 1000000)};
  s.value = {p.get_int("vchannels", channels, -1000000, 1000000), p.get_int("vbits", bits, -1000000, 1000000)};
  try {
    s.key.validate("key");
    s.value.validate("value");
  } catch (const Error& e) {
    KVSLIM_FAIL(e.code(), "recipe stage 'cq': {}", e.what());
  }
  for (const CodebookShape* sh : {&s.key, &s.value})
    KVSLIM_CHECK(sh->bits != 3, ErrorCode::kInvalidArgument,
                 "recipe stage 'cq': bits B=3 must be 1, 2 or 4 (3-bit tables are the nuq codec's levels)");
  return s;
}

const std::vector<std::string> kKeys = {"channels", "bits",   "kchannels", "kbits", "vchannels", "vbits",
                                        "group",    "residual", "sinks",   "codebooks"};

class CqCodec final : public Codec {
 public:
  CqCodec(CqShapes s, PagingOptions o, int d, std::shared_ptr<const Codebooks> cb, int layer, int head,
          std::string file)
      : s_(s),
        o_(o),
        kgroups_(d / s.key.channels),
        vgroups_(d / s.value.channels),
        kcbits_(s.key.channels * s.key.bits),
        vcbits_(s.value.channels * s.value.bits),
        krow_(kernels::row_bytes(kgroups_, kcbits_)),
        vrow_(kernels::row_bytes(vgroups_, vcbits_)),
        cb_(std::move(cb)),
        layer_(layer),
        head_(head),
        file_(std::move(file)) {
    if (cb_ && layer_ >= 0) {
      kcen_ = cb_->centroids(layer_, head_, false, 0);
      vcen_ = cb_->centroids(layer_, head_, true, 0);
    }
  }

  std::string describe() const override {
    std::string s = s_.key == s_.value
                        ? fmt::format("cq:channels={},bits={}", s_.key.channels, s_.key.bits)
                        : fmt::format("cq:kchannels={},kbits={},vchannels={},vbits={}", s_.key.channels, s_.key.bits,
                                      s_.value.channels, s_.value.bits);
    s += fmt::format(",group={},residual={},sinks={}", o_.group, o_.residual, o_.sinks);
    if (!file_.empty()) s += ",codebooks=" + file_;
    return s;
  }
  int page_tokens() const override { return o_.group; }
  int residual() const override { return o_.residual; }
  int sinks() const override { return o_.sinks; }
  bool takes_pre_rope_keys() const override { return false; }  // codebooks of post-RoPE keys
  std::size_t page_bytes(int ntok, int /*d*/) const override {
    return static_cast<std::size_t>(ntok) * static_cast<std::size_t>(krow_ + vrow_);
  }
  void check_rows(const float* /*k*/, const float* /*v*/, int /*ntok*/, int /*d*/) const override { need(); }

  void encode(const kernels::KernelTable& kt, const float* k, const float* v, int ntok, int d,
              std::byte* page) const override {
    need();
    auto* kc = reinterpret_cast<std::uint8_t*>(page);
    auto* vc = kc + static_cast<std::size_t>(ntok) * krow_;
    std::memset(page, 0, page_bytes(ntok, d));
    for (int j = 0; j < ntok; ++j) {
      kt.cq_encode(k + static_cast<std::ptrdiff_t>(j) * d, kcen_, kgroups_, s_.key.centroids(), s_.key.channels,
                   kc + static_cast<std::size_t>(j) * krow_);
      kt.cq_encode(v + static_cast<std::ptrdiff_t>(j) * d, vcen_, vgroups_, s_.value.centroids(), s_.value.channels,
                   vc + static_cast<std::size_t>(j) * vrow_);
    }
  }
  void decode(const kernels::KernelTable& /*kt*/, const std::byte* page, int ntok, int d, float* k,
              float* v) const override {
    need();
    const auto* kc = reinterpret_cast<const std::uint8_t*>(page);
    const auto* vc = kc + static_cast<std::size_t>(ntok) * krow_;
    for (int j = 0; j < ntok; ++j) {
      decode_row(kc + static_cast<std::size_t>(j) * krow_, kcen_, s_.key, kgroups_, k + static_cast<std::ptrdiff_t>(j) * d);
      decode_row(vc + static_cast<std::size_t>(j) * vrow_, vcen_, s_.value, vgroups_, v + static_cast<std::ptrdiff_t>(j) * d);
    }
  }
  void scores(const kernels::KernelTable& kt, const std::byte* page, int ntok, int /*d*/, const float* q, int nq,
              float* s) const override {
    need();
    std::vector<float> table(static_cast<std::size_t>(kgroups_) * s_.key.centroids() * nq);
    kt.cq_tables(q, nq, kcen_, kgroups_, s_.key.centroids(), s_.key.channels, table.data());
    const kernels::CqTables t{table.data(), nullptr, nullptr};
    kt.cq_scores(nq, cq_page(page, ntok), t, ntok, s);
  }
  void accumulate(const kernels::KernelTable& /*kt*/, const std::byte* page, int ntok, int d, const float* p, int nq,
                  float* o) const override {
    need();
    // The non-fused path (tests, custom pipelines): centroids added token by token.
    const auto* vc = reinterpret_cast<const std::uint8_t*>(page) + static_cast<std::size_t>(ntok) * krow_;
    const int C = s_.value.channels, count = s_.value.centroids();
    for (int j = 0; j < ntok; ++j) {
      const std::uint8_t* row = vc + static_cast<std::size_t>(j) * vrow_;
      for (int g = 0; g < vgroups_; ++g) {
        const float* cen = vcen_ + (static_cast<std::ptrdiff_t>(g) * count + get(row, g, vcbits_)) * C;
        for (int r = 0; r < nq; ++r) {
          const float w = p[static_cast<std::ptrdiff_t>(r) * ntok + j];
          for (int c = 0; c < C; ++c) o[static_cast<std::ptrdiff_t>(r) * d + g * C + c] += w * cen[c];
        }
      }
    }
  }

  // prepared: score [kgroups][kcount][nq] | weight [vgroups][vcount][nq] | wmax [nq], f32.
  std::size_t prepared_bytes(int nq, int /*d*/) const override {
    return 4u * (score_floats(nq) + weight_floats(nq) + static_cast<std::size_t>(nq));
  }
  void prepare(const kernels::KernelTable& kt, const float* q, int nq, int /*d*/, std::byte* prepared) const override {
    need();
    kernels::CqTables t = tables(prepared, nq);
    kt.cq_tables(q, nq, kcen_, kgroups_, s_.key.centroids(), s_.key.channels, const_cast<float*>(t.score));
    std::fill_n(t.weight, weight_floats(nq), 0.0f);
    std::fill_n(t.wmax, nq, -std::numeric_limits<float>::infinity());
  }
  void attend_page(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* /*q*/,
                   std::byte* prepared, int nq, const kernels::BlockMask& mask,
                   kernels::OnlineState& st) const override {
    kt.attend_cq(nq, cq_page(page, ntok), tables(prepared, nq), ntok, d, mask, st);
  }
  void finish(const kernels::KernelTable& kt, std::byte* prepared, int nq, int d,
              kernels::OnlineState& st) const override {
    const kernels::CqTables t = tables(prepared, nq);
    kt.cq_finish(t.weight, t.wmax, st.m, nq, vcen_, vgroups_, s_.value.centroids(), s_.value.channels, st.o, d);
  }

 private:
  void need() const {
    KVSLIM_CHECK(kcen_ != nullptr, ErrorCode::kInvalidState,
                 "codec '{}' was built without a cache head (build_pipeline(chain, head_dim)); it has no codebooks "
                 "to code with",
                 describe());
  }
  std::size_t score_floats(int nq) const {
    return static_cast<std::size_t>(kgroups_) * s_.key.centroids() * static_cast<std::size_t>(nq);
  }
  std::size_t weight_floats(int nq) const {
    return static_cast<std::size_t>(vgroups_) * s_.value.centroids() * static_cast<std::size_t>(nq);
  }
  kernels::CqTables tables(std::byte* prepared, int nq) const {
    auto* f = reinterpret_cast<float*>(prepared);
    return {f, f + score_floats(nq), f + score_floats(nq) + weight_floats(nq), vcen_, s_.value.channels};
  }
  kernels::CqPage cq_page(const std::byte* page, int ntok) const {
    const auto* kc = reinterpret_cast<const std::uint8_t*>(page);
    return {kc, kc + static_cast<std::size_t>(ntok) * krow_, kgroups_, kcbits_, vgroups_, vcbits_};
  }
  static unsigned get(const std::uint8_t* row, int g, int cbits) {
    const int bit = g * cbits;
    return (static_cast<unsigned>(row[bit >> 3]) >> (bit & 7)) & ((1u << cbits) - 1u);
  }

  static void decode_row(const std::uint8_t* row, const float* cen, CodebookShape s, int groups, float* x) {
    const int C = s.channels, count = s.centroids(), cbits = C * s.bits;
    for (int g = 0; g < groups; ++g)
      std::memcpy(x + g * C, cen + (static_cast<std::ptrdiff_t>(g) * count + get(row, g, cbits)) * C,
                  sizeof(float) * static_cast<std::size_t>(C));
  }

  CqShapes s_;
  PagingOptions o_;
  int kgroups_, vgroups_, kcbits_, vcbits_, krow_, vrow_;
  std::shared_ptr<const Codebooks> cb_;
  int layer_, head_;
  std::string file_;
  const float* kcen_ = nullptr;
  const float* vcen_ = nullptr;
};

}  // namespace

std::shared_ptr<const Codebooks> codebook_file(const std::string& path, const StageContext& ctx, std::string_view what,
                                               std::string_view hint) {
  if (ctx.loaded)
    for (const auto& [p, cb] : *ctx.loaded)
      if (!p.empty() && p == path) return cb;
  std::shared_ptr<const Codebooks> cb;
  try {
    cb = std::make_shared<const Codebooks>(load_codebooks(path));
  } catch (const Error& e) {
    KVSLIM_FAIL(e.code(), "{}{}: {}{}", what, path, e.what(), hint);
  }
  if (ctx.loaded) ctx.loaded->emplace_back(path, cb);
  return cb;
}

BuiltStage make_cq_codec(StageParams& p, const StageContext& ctx) {
  const int d = ctx.head_dim;
  const CqShapes s = read_shapes(p);
  KVSLIM_CHECK(d % s.key.channels == 0 && d % s.value.channels == 0, ErrorCode::kInvalidArgument,
               "recipe stage 'cq': kchannels={} and vchannels={} must divide head_dim {}", s.key.channels,
               s.value.channels, d);
  const PagingOptions o = read_paging(p, PagingOptions{32, 128, 0});
  // No rotate= key: codebooks are trained on unrotated keys and values, and rotated rows
  // would be coded against centroids of another basis.
  const std::string file = p.get_string("codebooks", "");
  p.check_all_used(kKeys);
  std::shared_ptr<const Codebooks> cb = file.empty() ? ctx.codebooks : codebook_file(file, ctx, "recipe stage 'cq': codebooks=", "");
  if (cb && file.empty() && ctx.loaded &&
      std::none_of(ctx.loaded->begin(), ctx.loaded->end(), [&](const auto& e) { return e.second == cb; }))
    ctx.loaded->emplace_back("", cb);  // recorded so the cache can report its bytes
  const bool for_head = ctx.layer >= 0;
  KVSLIM_CHECK(cb || !for_head, ErrorCode::kInvalidArgument,
               "recipe stage 'cq' needs codebooks: name a file (cq:...,codebooks=FILE) or pass "
               "CacheConfig::codebooks; train them with `kvslim-eval --train-codebooks` or `kvslim-llama "
               "calibrate-codebooks`");
  if (cb) {
    try {
      check_codebooks_match(*cb, ctx.layers > 0 ? ctx.layers : cb->layers(),
                            ctx.kv_heads > 0 ? ctx.kv_heads : cb->kv_heads(), d, s.key, s.value);
    } catch (const Error& e) {
      KVSLIM_FAIL(e.code(), "recipe stage 'cq': {}{}", file.empty() ? "CacheConfig::codebooks: " : "codebooks=" + file + ": ",
                  e.what());
    }
  }
  BuiltStage b{StageKind::kCodec, nullptr, nullptr, nullptr, nullptr};
  b.codec = std::make_shared<CqCodec>(s, o, d, for_head ? cb : nullptr, ctx.layer, ctx.kv_head, file);
  b.per_head = for_head;
  return b;
}

}  // namespace detail

std::pair<CodebookShape, CodebookShape> cq_recipe_shapes(std::string_view recipe) {
  const RecipeSpec spec = parse_recipe(recipe);
  bool found = false;
  detail::CqShapes shapes;
  for (const StageSpec* st : spec.stages_named("cq")) {
    StageParams params(st->name, st->params);
    const detail::CqShapes s = detail::read_shapes(params);
    KVSLIM_CHECK(!found || (s.key == shapes.key && s.value == shapes.value), ErrorCode::kInvalidArgument,
                 "recipe '{}': its cq stages use different codebook shapes (K C={} B={}, V C={} B={} vs K C={} "
                 "B={}, V C={} B={}); one codebook file holds one shape",
                 recipe, shapes.key.channels, shapes.key.bits, shapes.value.channels, shapes.value.bits,
                 s.key.channels, s.key.bits, s.value.channels, s.value.bits);
    shapes = s;
    found = true;
  }
  KVSLIM_CHECK(found, ErrorCode::kInvalidArgument, "recipe '{}' has no cq stage: there are no codebooks to train",
               recipe);
  return {shapes.key, shapes.value};
}

}  // namespace kvslim
