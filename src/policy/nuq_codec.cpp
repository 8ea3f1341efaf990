// NUQ: calibration-free non-uniform quantization with Gaussian Lloyd-Max levels (the scalar
// quantizer of TurboQuant, Zandieh et al., 2025, without its rotation, which the recipe's
// rotation option provides). Every key and value row is coded on its own: one f16 scale and
// one B-bit index per channel into the Lloyd-Max levels of N(0, 1) (kvslim/policy/nuq.h);
// the rule is in kernel_table.h ("NUQ page layout"). Page layout (docs/formats.md):
//   kscale[ntok] f16 | vscale[ntok] f16 | kcodes[ntok][row_bytes(d,kbits)] | vcodes[ntok][row_bytes(d,vbits)]
// Rows are independent, so a re-packed page (eviction) keeps every kept token's codes.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <numbers>
#include <cstdint>
#include <string>
#include <memory>
#include <vector>

#include "check.h"
#include "kvslim/cache/recipe.h"
#include "kvslim/policy/rotation.h"
#include "kvslim/kernels/kernel_table.h"
#include "kvslim/policy/nuq.h"
#include "kvslim/tensor/dtype.h"
#include "policy/codecs.h"

namespace kvslim {
namespace {

struct LevelTables {
  std::array<std::vector<double>, 5> levels;  // [bits]
  std::array<std::vector<float>, 5> levels_f32;
  std::array<double, 5> mse{};
};

// Gaussian density and the probability mass of [a, b], the latter from whichever tail keeps
// the difference of two erfc values accurate (both ends on the same side of 0 in a tail).
constexpr double kInf = std::numeric_limits<double>::infinity();
double phi(double x) {
  return std::isinf(x) ? 0.0 : std::exp(-0.5 * x * x) * (std::numbers::inv_sqrtpi / std::numbers::sqrt2);
}
double mass(double a, double b) {
  const double r = 1.0 / std::sqrt(2.0);
  if (a >= 0.0) return 0.5 * (std::erfc(a * r) - std::erfc(b * r));
  return 0.5 * (std::erfc(-b * r) - std::erfc(-a * r));
}

// Lloyd iteration: boundaries are the midpoints of neighbouring levels, each level the mean
// of N(0, 1) over its cell, (phi(a) - phi(b)) / (Phi(b) - Phi(a)). Started from levels spread
// evenly over +-2 sigma; the fixed point is unique for the log-concave Gaussian.
std::vector<double> lloyd_max(int n, double* mse) {
  std::vector<double> L(static_cast<std::size_t>(n)), t(static_cast<std::size_t>(n) + 1);
  for (int i = 0; i < n; ++i) L[i] = n == 1 ? 0.0 : -2.0 + 4.0 * (i + 0.5) / n;
  t[0] = -kInf;
  t[n] = kInf;
  for (int it = 0; it < 1000000; ++it) {
    for (int i = 1; i < n; ++i) t[i] = 0.5 * (L[i - 1] + L[i]);
    double change = 0.0;
    for (int i = 0; i < n; ++i) {
      const double c = (phi(t[i]) - phi(t[i + 1])) / mass(t[i], t[i + 1]);
      change = std::max(change, std::fabs(c - L[i]));
      L[i] = c;
    }
    if (change < 1e-12) break;
  }
  // Distortion E[(X - L_i)^2 | cell i] summed over cells, in closed form: over [a, b],
  // E[X^2] mass = m + a phi(a) - b phi(b) and E[X] mass = phi(a) - phi(b).
  for (int i = 1; i < n; ++i) t[i] = 0.5 * (L[i - 1] + L[i]);
  double e = 0.0;
  for (int i = 0; i < n; ++i) {
    const double a = t[i], b = t[i + 1], m = mass(a, b);
    const double aphi = a == -kInf ? 0.0 : a * phi(a), bphi = b == kInf ? 0.0 : b * phi(b);
    const double x2 = m + aphi - bphi, x1 = phi(a) - phi(b);
    e += x2 - 2.0 * L[i] * x1 + L[i] * L[i] * m;
  }
  *mse = e;
  return L;
}

const LevelTables& tables() {
  static const LevelTables t = [] {
    LevelTables r;
    for (int b = 1; b <= 4; ++b) {
      r.levels[b] = lloyd_max(1 << b, &r.mse[b]);
      // Exactly symmetric (the iteration is, up to rounding): the kernels' midpoint between the
      // two central levels is then exactly 0.
      const int n = 1 << b;
      for (int i = 0; i < n / 2; ++i) {
        const double v = 0.5 * (r.levels[b][n - 1 - i] - r.levels[b][i]);
        r.levels[b][i] = -v;
        r.levels[b][n - 1 - i] = v;
      }
      for (double v : r.levels[b]) r.levels_f32[b].push_back(static_cast<float>(v));
    }
    return r;
  }();
  return t;
}

void check_bits(int bits) {
  KVSLIM_CHECK(bits >= 1 && bits <= 4, ErrorCode::kInvalidArgument,
               "gaussian Lloyd-Max levels: bits={} is not supported (1, 2, 3 or 4)", bits);
}

}  // namespace

std::span<const double> gaussian_levels(int bits) {
  check_bits(bits);
  return tables().levels[bits];
}
std::span<const float> gaussian_levels_f32(int bits) {
  check_bits(bits);
  return tables().levels_f32[bits];
}
double gaussian_levels_mse(int bits) {
  check_bits(bits);
  return tables().mse[bits];
}

namespace detail {
namespace {

class NuqCodec final : public Codec {
 public:
  NuqCodec(int kbits, int vbits, PagingOptions o)
      : kbits_(kbits),
        vbits_(vbits),
        klevels_(gaussian_levels_f32(kbits).data()),
        vlevels_(gaussian_levels_f32(vbits).data()),
        o_(o) {}
  // Learned levels of one (layer, kv head), from a level file (sorted here: the encoder
  // compares against the midpoints of consecutive levels).
  NuqCodec(int kbits, int vbits, PagingOptions o, std::vector<float> klv, std::vector<float> vlv, std::string file)
      : kbits_(kbits), vbits_(vbits), o_(o), kown_(std::move(klv)), vown_(std::move(vlv)), file_(std::move(file)) {
    std::sort(kown_.begin(), kown_.end());
    std::sort(vown_.begin(), vown_.end());
    klevels_ = kown_.data();
    vlevels_ = vown_.data();
  }

  // Offsets of a page of ntok tokens (docs/formats.md). f16 scales first: every part stays
  // 2-byte aligned and the codes need no alignment.
  struct Layout {
    std::size_t vscale, kcodes, vcodes, bytes;
  };
  Layout layout(int ntok, int d) const {
    const std::size_t g = static_cast<std::size_t>(ntok);
    Layout l;
    l.vscale = 2u * g;
    l.kcodes = 4u * g;
    l.vcodes = l.kcodes + g * static_cast<std::size_t>(kernels::row_bytes(d, kbits_));
    l.bytes = l.vcodes + g * static_cast<std::size_t>(kernels::row_bytes(d, vbits_));
    return l;
  }

  std::string describe() const override {
    return fmt::format("nuq:kbits={},vbits={},levels={},group={},residual={},sinks={}", kbits_, vbits_,
                       file_.empty() ? std::string("gaussian") : file_, o_.group, o_.residual, o_.sinks) +
           rotation_text(o_.rotation);
  }
  int page_tokens() const override { return o_.group; }
  int residual() const override { return o_.residual; }
  int sinks() const override { return o_.sinks; }
  RotationSpec rotation() const override { return o_.rotation; }
  std::size_t page_bytes(int ntok, int d) const override { return layout(ntok, d).bytes; }

  // Values beyond f16 are rejected as for kivi; then each row's scale must be representable:
  // it is about RMS(x) / (typical |level|), so a row of values near 65504 can overflow it.
  void check_rows(const float* k, const float* v, int ntok, int d) const override {
    check_f16_range("nuq", k, ntok, d, "key");
    check_f16_range("nuq", v, ntok, d, "value");
    check_scales(k, ntok, d, kbits_, klevels_, "key");
    check_scales(v, ntok, d, vbits_, vlevels_, "value");
  }
  void encode(const kernels::KernelTable& kt, const float* k, const float* v, int ntok, int d,
              std::byte* page) const override {
    const Layout l = layout(ntok, d);
    kt.nuq_quant(k, ntok, d, kbits_, klevels_, u16(page), u8(page + l.kcodes));
    kt.nuq_quant(v, ntok, d, vbits_, vlevels_, u16(page + l.vscale), u8(page + l.vcodes));
  }
  void decode(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, float* k,
              float* v) const override {
    const Layout l = layout(ntok, d);
    kt.nuq_dequant(u16(page), u8(page + l.kcodes), ntok, d, kbits_, klevels_, k);
    kt.nuq_dequant(u16(page + l.vscale), u8(page + l.vcodes), ntok, d, vbits_, vlevels_, v);
  }
  void scores(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* q, int nq,
              float* s) const override {
    kt.nuq_scores(q, nq, u16(page), u8(page + layout(ntok, d).kcodes), ntok, d, kbits_, klevels_, s);
  }
  void accumulate(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* p, int nq,
                  float* o) const override {
    const Layout l = layout(ntok, d);
    kt.nuq_accum(p, nq, u16(page + l.vscale), u8(page + l.vcodes), ntok, d, vbits_, vlevels_, o);
  }
  void attend_page(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* q,
                   std::byte* /*prepared*/, int nq, const kernels::BlockMask& mask,
                   kernels::OnlineState& st) const override {
    const Layout l = layout(ntok, d);
    const kernels::NuqPage pg{u16(page),           u16(page + l.vscale), u8(page + l.kcodes), u8(page + l.vcodes),
                              klevels_,            vlevels_,             kbits_,              vbits_};
    kt.attend_nuq(q, nq, pg, ntok, d, mask, st);
  }

 private:
  // The scale the encoder would store, for every row (the scalar encoder: the same on every
  // table), must be finite in f16. |s| <= ||x|| / sqrt(sum_c L[code_c]^2) <= sigma / min |L|
  // (Cauchy-Schwarz), so only rows with a large RMS are encoded here to find out.
  static void check_scales(const float* x, int ntok, int d, int bits, const float* levels, const char* what) {
    double lmin = std::numeric_limits<double>::infinity();  // the smallest |level|
    for (int i = 0; i < (1 << bits); ++i) lmin = std::min(lmin, std::fabs(static_cast<double>(levels[i])));
    if (!(lmin > 0.0)) lmin = std::numeric_limits<double>::min();  // a level at 0 bounds nothing
    std::array<std::uint8_t, kernels::row_bytes(4096, 4)> codes;
    for (int j = 0; j < ntok; ++j) {
      const float* row = x + static_cast<std::ptrdiff_t>(j) * d;
      double ss = 0.0;
      for (int c = 0; c < d; ++c) ss += static_cast<double>(row[c]) * row[c];
      if (std::sqrt(ss / d) / lmin < 65000.0) continue;
      std::uint16_t s = 0;
      kernels::scalar::kTable.nuq_quant(row, 1, d, bits, levels, &s, codes.data());
      if ((s & 0x7c00u) != 0x7c00u) continue;
      KVSLIM_FAIL(ErrorCode::kInvalidArgument,
                  "codec 'nuq': {} row {} (RMS {:.6g}) needs a scale beyond the f16 range 65504 at {} bits", what, j,
                  std::sqrt(ss / d), bits);
    }
  }
  static std::uint16_t* u16(std::byte* p) { return reinterpret_cast<std::uint16_t*>(p); }
  static const std::uint16_t* u16(const std::byte* p) { return reinterpret_cast<const std::uint16_t*>(p); }
  static std::uint8_t* u8(std::byte* p) { return reinterpret_cast<std::uint8_t*>(p); }
  static const std::uint8_t* u8(const std::byte* p) { return reinterpret_cast<const std::uint8_t*>(p); }

  int kbits_, vbits_;
  const float* klevels_ = nullptr;
  const float* vlevels_ = nullptr;
  PagingOptions o_;
  std::vector<float> kown_, vown_;  // learned levels (else klevels_ point at the Gaussian ones)
  std::string file_;                // the level file, or empty for levels=gaussian
};

int read_bits(StageParams& p, const char* key) {
  const int b = p.get_int(key, 3, -1000000, 1000000);
  KVSLIM_CHECK(b >= 1 && b <= 4, ErrorCode::kInvalidArgument,
               "recipe stage 'nuq': {}={} is not a supported bit width (1, 2, 3 or 4)", key, b);
  return b;
}

}  // namespace

BuiltStage make_nuq_codec(StageParams& p, const StageContext& ctx) {
  const int kbits = read_bits(p, "kbits");
  const int vbits = read_bits(p, "vbits");
  const std::string levels = p.get_string("levels", "gaussian");
  PagingOptions o = read_paging(p, PagingOptions{32, 128, 0});
  // Gaussian levels fit rotated rows best: a Hadamard rotation makes a row's coordinates
  // close to Gaussian (TurboQuant), `rotate=hadamard` (docs/outliers.md).
  o.rotation = read_rotation(p);
  p.check_all_used({"kbits", "vbits", "levels", "group", "residual", "sinks", "rotate", "seed", "rotated"});
  BuiltStage b{StageKind::kCodec, nullptr, nullptr, nullptr, nullptr};
  if (levels == "gaussian") {
    b.codec = std::make_shared<NuqCodec>(kbits, vbits, o);
    return b;
  }
  // levels=FILE: a level file of train_levels (the codebook file format, head_dim 1), read
  // once per cache (StageContext::loaded) and checked against the cache's shape and bits.
  const std::shared_ptr<const Codebooks> cb =
      codebook_file(levels, ctx, "recipe stage 'nuq': levels=", " (levels are gaussian or a level file)");
  try {
    check_codebooks_match(*cb, ctx.layers > 0 ? ctx.layers : cb->layers(), ctx.kv_heads > 0 ? ctx.kv_heads : cb->kv_heads(),
                          1, CodebookShape{1, kbits}, CodebookShape{1, vbits});
  } catch (const Error& e) {
    KVSLIM_FAIL(e.code(), "recipe stage 'nuq': levels={} is not a level file for kbits={}, vbits={} and this cache: {}",
                levels, kbits, vbits, e.what());
  }
  const int l = std::max(ctx.layer, 0), h = std::max(ctx.kv_head, 0);
  const float* kc = cb->centroids(l, h, false, 0);
  const float* vc = cb->centroids(l, h, true, 0);
  b.codec = std::make_shared<NuqCodec>(kbits, vbits, o, std::vector<float>(kc, kc + (1 << kbits)),
                                       std::vector<float>(vc, vc + (1 << vbits)), levels);
  b.per_head = ctx.layer >= 0;
  return b;
}

}  // namespace detail

Codebooks train_levels(const CalibrationKV& data, int kbits, int vbits, const RotationSpec& rotation,
                       const TrainOptions& opt) {
  for (int b : {kbits, vbits})
    KVSLIM_CHECK(b >= 1 && b <= 4, ErrorCode::kInvalidArgument, "train_levels: bits {} must be 1, 2, 3 or 4", b);
  const int L = data.layers(), H = data.kv_heads(), d = data.head_dim();
  const kernels::KernelTable& kt = kernels::active();
  std::unique_ptr<HadamardRotation> rot;
  if (rotation.hadamard) rot = std::make_unique<HadamardRotation>(d, rotation.seed);
  // Per head: every coordinate over its row's sigma, and the row's weight repeated.
  std::vector<std::vector<float>> k(static_cast<std::size_t>(L) * H), v(k.size()), kw(k.size()), vw(k.size());
  CalibrationKV scalars(L, H, 1);
  std::vector<float> row(static_cast<std::size_t>(d));
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      const CalibrationHead& c = data.head(l, h);
      const std::size_t hi = static_cast<std::size_t>(l) * H + h;
      for (int side = 0; side < 2; ++side) {
        const float* x = side ? c.v : c.k;
        const float* w = side ? c.v_weight : c.k_weight;
        std::vector<float>& out = side ? v[hi] : k[hi];
        std::vector<float>& wout = side ? vw[hi] : kw[hi];
        out.resize(static_cast<std::size_t>(c.rows) * d);
        if (w) wout.resize(out.size());
        for (std::int64_t j = 0; j < c.rows; ++j) {
          std::copy(x + j * d, x + (j + 1) * d, row.begin());
          if (rot && (side ? rotation.values : rotation.keys)) rot->forward(kt, row.data(), 1);
          double ss = 0.0;
          for (float f : row) ss += static_cast<double>(f) * f;
          const double sigma = std::sqrt(ss / d);
          for (int ch = 0; ch < d; ++ch) {
            out[static_cast<std::size_t>(j) * d + ch] = sigma > 0.0 ? static_cast<float>(row[ch] / sigma) : 0.0f;
            if (w) wout[static_cast<std::size_t>(j) * d + ch] = w[j];
          }
        }
      }
      scalars.set(l, h, {k[hi].data(), v[hi].data(), c.rows * d, kw[hi].empty() ? nullptr : kw[hi].data(),
                         vw[hi].empty() ? nullptr : vw[hi].data()});
    }
  return train_codebooks(scalars, CodebookShape{1, kbits}, CodebookShape{1, vbits}, opt);
}

NuqRecipeShape nuq_recipe_shape(std::string_view recipe) {
  const RecipeSpec spec = parse_recipe(recipe);
  bool found = false;
  NuqRecipeShape shape;
  for (const StageSpec* st : spec.stages_named("nuq")) {
    StageParams params(st->name, st->params);
    NuqRecipeShape s;  // read as the codec reads them, so bad values get its messages
    s.kbits = detail::read_bits(params, "kbits");
    s.vbits = detail::read_bits(params, "vbits");
    s.rotation = detail::read_rotation(params);
    KVSLIM_CHECK(!found || (s.kbits == shape.kbits && s.vbits == shape.vbits && s.rotation == shape.rotation),
                 ErrorCode::kInvalidArgument,
                 "recipe '{}': its nuq stages use different bits or rotations; one level file holds one shape", recipe);
    shape = s;
    found = true;
  }
  KVSLIM_CHECK(found, ErrorCode::kInvalidArgument, "recipe '{}' has no nuq stage: there are no levels to train",
               recipe);
  return shape;
}

}  // namespace kvslim
