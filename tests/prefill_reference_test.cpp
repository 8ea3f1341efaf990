// The judge of every codec and policy: attention through a KVCache against an independent
// double-precision causal reference, for every recipe in kCases x sinks {0, 1, 4} x chunk
// sizes {1, 2, 7, 64, whole sequence}, with GQA (4 query heads per kv head) and explicit,
// gapped positions.
//
// The reference is built from what the cache holds right before each attend():
// materialize() gives every kept token decoded (lossy codecs included), its position and its
// log weight; the reference then applies softmax attention in double precision with the
// causal mask taken from *positions* (query at position P sees ordinary tokens at positions
// <= P, and every special token), never from the store's segment or index arithmetic. So a
// masking bug in any segment (sinks, pages, window) shows as a gross error, whatever the
// codec. Lossless recipes are also compared with the original data, so materialize() is not
// trusted blindly. The attention mass (AttendOptions.mass) is checked against the reference
// probabilities summed over the group's query heads and the chunk's queries.
//
// New codecs and policies join by adding one line to kCases ("{s}" is replaced by the sinks
// count; `lossless` also compares with the original rows, which needs a chain that keeps
// every token). Tolerances: float formats differ from the double reference by float rounding over
// at most ~150 terms (2e-5 relative); KIVI computes q.k on the codes with the key scale
// folded into the query (and VNNI integer paths at head_dim 64), so 1e-3.
#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "kvslim/kvslim.h"
#include "test_support.h"

using namespace kvslim;

namespace {

struct Case {
  const char* recipe;  // "{s}" = sinks
  int head_dim;
  double tol;
  bool lossless;
};

const Case kCases[] = {
    {"f32:sinks={s}", 16, 2e-5, true},
    {"f32:group=16,residual=8,sinks={s}", 16, 2e-5, true},
    {"f16:group=8,sinks={s}", 16, 2e-5, false},
    {"bf16:group=32,residual=5,sinks={s}", 16, 2e-5, false},
    {"kivi:kbits=8,vbits=8,residual=0,sinks={s}", 16, 1e-3, false},
    {"kivi:kbits=2,vbits=2,group=16,residual=0,sinks={s}", 16, 1e-3, false},
    {"kivi:kbits=4,vbits=2,group=8,residual=16,sinks={s}", 16, 1e-3, false},
    {"kivi:kbits=3,vbits=3,sinks={s}", 16, 1e-3, false},
    {"kivi:kbits=4,vbits=4,group=16,residual=0,sinks={s}", 64, 1e-3, false},
    {"kivi:kbits=2,vbits=2,group=16,residual=0,sinks={s}", 80, 1e-3, false},
    // Eviction chains: the reference is what the cache holds before each attend (eviction
    // runs after it), so dropped, masked and re-packed tokens are judged the same way.
    {"h2o:budget=40,recent=8 | f32:group=8,sinks={s}", 16, 2e-5, false},
    {"h2o:ratio=0.3,recent=8 | kivi:kbits=2,vbits=2,group=16,residual=0,sinks={s}", 16, 1e-3, false},
    {"random:budget=50,recent=10,seed=3 | kivi:kbits=4,vbits=4,group=8,residual=0,sinks={s}", 64, 1e-3, false},
    {"streaming:sinks=3,window=30 | f16:sinks={s}", 16, 2e-5, false},
    {"l2norm:budget=60,recent=16 | bf16:group=16,sinks={s}", 16, 2e-5, false},
    {"snapkv:budget=64,window=8,kernel=5 | kivi:kbits=8,vbits=8,residual=0,sinks={s}", 16, 1e-3, false},
    // CQ: codebooks trained on other rows of the same distribution (codebooks_for); the table
    // and weight sums are float sums over groups and pages.
    {"cq:channels=2,bits=2,group=16,residual=0,sinks={s}", 16, 1e-4, false},
    {"cq:kchannels=8,kbits=1,vchannels=4,vbits=1,group=8,residual=16,sinks={s}", 16, 1e-4, false},
    {"cq:channels=4,bits=1,group=16,residual=0,sinks={s}", 64, 1e-4, false},
    {"h2o:budget=40,recent=8 | cq:channels=4,bits=2,group=8,residual=0,sinks={s}", 16, 1e-4, false},
    {"mikv:budget=48,recent=8,lo=(cq:channels=2,bits=1,group=8) | f16:sinks={s}", 16, 1e-4, false},
    // Hadamard rotation (rotate=hadamard): the cache stores R k, R v, rotates the queries and
    // rotates the output back; materialize() rotates back too, so the reference is in the
    // original basis. 96 = 64 + 32 and 24 = 16 + 8 are block-diagonal rotations.
    {"f32:rotate=hadamard,sinks={s}", 16, 2e-5, true},
    {"f32:group=16,residual=8,rotate=hadamard,seed=7,sinks={s}", 96, 2e-5, true},
    {"f16:group=8,rotate=hadamard,sinks={s}", 24, 2e-5, false},
    {"kivi:kbits=4,vbits=2,group=8,residual=16,rotate=hadamard,sinks={s}", 64, 1e-3, false},
    {"h2o:budget=40,recent=8 | kivi:kbits=2,vbits=2,group=16,residual=0,rotate=hadamard,seed=3,sinks={s}", 16, 1e-3,
     false},
    {"mikv:budget=48,recent=8,lo=(kivi:kbits=2,vbits=2,group=8,rotate=hadamard) | f16:rotate=hadamard,sinks={s}", 16,
     1e-3, false},
    // Dense-and-sparse outliers (side lists per page; re-packed pages pick theirs again).
    {"kivi:kbits=2,vbits=2,group=16,residual=0,outliers=0.05,sinks={s}", 16, 1e-3, false},
    {"kivi:kbits=3,vbits=4,group=8,residual=16,outliers=0.01,sinks={s}", 64, 1e-3, false},
    {"h2o:budget=40,recent=8 | kivi:kbits=2,vbits=2,group=16,residual=0,outliers=0.1,rotate=hadamard,sinks={s}", 16,
     1e-3, false},
    {"mikv:budget=48,recent=8,lo=(kivi:kbits=2,vbits=2,group=8,outliers=0.02) | f16:sinks={s}", 16, 1e-3, false},
    // NUQ: per-token f16 scale times Gaussian Lloyd-Max levels; float sums on the codes.
    {"nuq:kbits=3,vbits=3,group=16,residual=0,sinks={s}", 16, 1e-4, false},
    {"nuq:kbits=4,vbits=2,group=8,residual=16,sinks={s}", 64, 1e-4, false},
    {"h2o:budget=40,recent=8 | nuq:kbits=2,vbits=2,group=8,residual=0,sinks={s}", 16, 1e-4, false},
};
const int kSinks[] = {0, 1, 4};

struct Param {
  Case c;
  int sinks;
};

std::string recipe_of(const Param& p) {
  std::string r = p.c.recipe;
  r.replace(r.find("{s}"), 3, std::to_string(p.sinks));
  return r;
}

void PrintTo(const Param& p, std::ostream* os) { *os << recipe_of(p) << " d=" << p.c.head_dim; }

std::string name_of(const ::testing::TestParamInfo<Param>& info) {
  std::string n = recipe_of(info.param) + "_d" + std::to_string(info.param.c.head_dim);
  for (char& ch : n)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return n;
}

std::vector<Param> all_params() {
  std::vector<Param> out;
  for (const Case& c : kCases)
    for (int s : kSinks) out.push_back({c, s});
  return out;
}

constexpr int kKvHeads = 2, kGroup = 4, kQHeads = kKvHeads * kGroup, kTokens = 150;

struct Sequence {
  int d;
  std::vector<float> k, v, q;  // k, v [kv][T][d]; q [qh][T][d]
  std::vector<std::int64_t> pos;
  explicit Sequence(int d_, unsigned seed) : d(d_) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> n(0.0f, 1.0f);
    k.resize(static_cast<std::size_t>(kKvHeads) * kTokens * d);
    v.resize(k.size());
    q.resize(static_cast<std::size_t>(kQHeads) * kTokens * d);
    for (auto& x : k) x = n(rng);
    for (auto& x : v) x = n(rng);
    for (auto& x : q) x = 1.5f * n(rng);
    // Gapped, strictly increasing positions: the mask must follow positions, not slots.
    std::int64_t p = 3;
    for (int t = 0; t < kTokens; ++t) {
      pos.push_back(p);
      p += 1 + (t % 5 == 0 ? 2 : 0);
    }
  }
  TensorView<const float> view(const std::vector<float>& buf, int heads, int t0, int n) const {
    Layout l;
    l.rank = 3;
    l.shape = {heads, n, d, 0};
    l.strides = {static_cast<std::int64_t>(kTokens) * d, d, 1, 0};
    return TensorView<const float>(buf.data() + static_cast<std::size_t>(t0) * d, l);
  }
};

// Reference attention of one query row over a dense snapshot, causal by position.
// Returns the output; adds the probabilities to mass.
std::vector<double> reference(const float* q, const DenseKV& kv, std::int64_t specials, std::int64_t qpos,
                              const float* orig_k, const float* orig_v, std::vector<double>& mass) {
  const std::int64_t n = static_cast<std::int64_t>(kv.positions.size());
  const int d = static_cast<int>(kv.k.dim(1));
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> s(static_cast<std::size_t>(n), -INFINITY);
  double mx = -INFINITY;
  for (std::int64_t j = 0; j < n; ++j) {
    const bool special = j >= n - specials;
    if (!special && kv.positions[j] > qpos) continue;
    const float* kr = orig_k ? orig_k + j * d : kv.k.data() + j * d;
    double acc = 0.0;
    for (int c = 0; c < d; ++c) acc += static_cast<double>(q[c]) * kr[c];
    s[j] = acc * scale + kv.log_weights[j];
    mx = std::max(mx, s[j]);
  }
  double sum = 0.0;
  for (auto& x : s) sum += (x = std::isinf(x) ? 0.0 : std::exp(x - mx));
  std::vector<double> out(static_cast<std::size_t>(d), 0.0);
  for (std::int64_t j = 0; j < n; ++j) {
    if (s[j] == 0.0) continue;
    const double p = s[j] / sum;
    mass[j] += p;
    const float* vr = orig_v ? orig_v + j * d : kv.v.data() + j * d;
    for (int c = 0; c < d; ++c) out[c] += p * vr[c];
  }
  return out;
}

// Codebooks for a recipe's cq stages (also the one nested in mikv's lo=(...)), trained on
// 512 rows per head drawn like the sequence's but from another seed; null for other recipes.
std::shared_ptr<const Codebooks> codebooks_for(const std::string& recipe, int d) {
  const auto at = recipe.find("cq:");
  if (at == std::string::npos) return nullptr;
  const auto end = recipe.find_first_of(")|", at);
  const auto [ks, vs] = cq_recipe_shapes(recipe.substr(at, end == std::string::npos ? end : end - at));
  constexpr int kRows = 512;
  static std::vector<float> rows;  // kept alive while training reads it
  rows.assign(static_cast<std::size_t>(2 * kKvHeads) * kRows * d, 0.0f);
  std::mt19937 rng(99);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (auto& x : rows) x = n(rng);
  CalibrationKV cal(1, kKvHeads, d);
  for (int h = 0; h < kKvHeads; ++h)
    cal.set(0, h, {rows.data() + static_cast<std::size_t>(2 * h) * kRows * d,
                   rows.data() + static_cast<std::size_t>(2 * h + 1) * kRows * d, kRows, nullptr, nullptr});
  return std::make_shared<const Codebooks>(train_codebooks(cal, ks, vs));
}

class PrefillReference : public ::testing::TestWithParam<Param> {};

TEST_P(PrefillReference, EveryChunkingMatchesExactCausalAttention) {
  const Param& p = GetParam();
  const int d = p.c.head_dim;
  const Sequence x(d, 7);
  std::vector<std::vector<int>> chunkings;
  for (int n : {1, 2, 7, 64, kTokens}) {
    std::vector<int> c;
    for (int t = 0; t < kTokens; t += n) c.push_back(std::min(n, kTokens - t));
    chunkings.push_back(c);
  }
  const std::string recipe = recipe_of(p);
  const auto codebooks = codebooks_for(recipe, d);
  for (const auto& chunks : chunkings) {
    SCOPED_TRACE(recipe + ", chunk " + std::to_string(chunks[0]));
    CacheConfig cfg{1, kQHeads, kKvHeads, d, kTokens, recipe};
    cfg.codebooks = codebooks;
    KVCache cache(cfg);
    double worst = 0.0, worst_mass = 0.0;
    int t0 = 0;
    for (int n : chunks) {
      cache.append(0, x.view(x.k, kKvHeads, t0, n), x.view(x.v, kKvHeads, t0, n),
                   std::span<const std::int64_t>(x.pos.data() + t0, static_cast<std::size_t>(n)));
      // Snapshot of what attend() will read.
      std::vector<DenseKV> snap;
      for (int h = 0; h < kKvHeads; ++h) snap.push_back(cache.materialize(0, h));
      std::vector<float> out(static_cast<std::size_t>(kQHeads) * n * d);
      const std::int64_t stride = cache.tokens(0, 0) + 1;
      std::vector<float> mass(static_cast<std::size_t>(kKvHeads * stride), -1.0f);
      AttendOptions ao;
      ao.mass = mass.data();
      ao.mass_stride = stride;
      Layout ql;
      ql.rank = 3;
      ql.shape = {kQHeads, n, d, 0};
      ql.strides = {static_cast<std::int64_t>(kTokens) * d, d, 1, 0};
      cache.attend(0, TensorView<const float>(x.q.data() + static_cast<std::size_t>(t0) * d, ql),
                   TensorView<float>(out.data(), {kQHeads, n, d}), ao);
      for (int h = 0; h < kKvHeads; ++h) {
        const DenseKV& kv = snap[h];
        const std::int64_t held = static_cast<std::int64_t>(kv.positions.size());
        const std::int64_t specials = cache.store(0, h).specials();
        // Lossless codecs: judge against the original rows too (tokens 0..held-1 are the
        // first held tokens of the sequence when nothing is evicted).
        const float* ok = p.c.lossless ? x.k.data() + static_cast<std::size_t>(h) * kTokens * d : nullptr;
        const float* ov = p.c.lossless ? x.v.data() + static_cast<std::size_t>(h) * kTokens * d : nullptr;
        std::vector<double> ref_mass(static_cast<std::size_t>(held), 0.0);
        for (int g = 0; g < kGroup; ++g)
          for (int i = 0; i < n; ++i) {
            const int qh = h * kGroup + g;
            const float* qr = x.q.data() + (static_cast<std::size_t>(qh) * kTokens + t0 + i) * d;
            const auto ref = reference(qr, kv, specials, x.pos[t0 + i], ok, ov, ref_mass);
            const float* got = out.data() + (static_cast<std::size_t>(qh) * n + i) * d;
            double e2 = 0.0, r2 = 0.0;
            for (int c = 0; c < d; ++c) {
              e2 += (got[c] - ref[c]) * (got[c] - ref[c]);
              r2 += ref[c] * ref[c];
            }
            worst = std::max(worst, std::sqrt(e2 / std::max(r2, 1e-30)));
          }
        for (std::int64_t j = 0; j < held; ++j)
          worst_mass = std::max(worst_mass, std::abs(mass[h * stride + j] - ref_mass[j]) / (kGroup * n));
      }
      t0 += n;
    }
    EXPECT_LT(worst, p.c.tol) << "worst relative error of attention output";
    EXPECT_LT(worst_mass, p.c.tol) << "worst attention-mass error per query";
  }
}

INSTANTIATE_TEST_SUITE_P(Recipes, PrefillReference, ::testing::ValuesIn(all_params()), name_of);

// The issue-7 repro, exactly: 1 layer, 1 head, head_dim 4, 8 tokens in one append, zero
// keys, v[t] = t: row t must be the mean of 0..t = t/2, with and without sinks.
TEST(PrefillReference, SinksKeepTheCausalMaskOfTheFirstChunk) {
  for (const char* recipe : {"f32", "f32:sinks=1", "f32:sinks=4", "kivi:kbits=8,vbits=8,residual=0,sinks=1"}) {
    KVCache cache(CacheConfig{1, 1, 1, 4, 16, recipe});
    std::vector<float> k(8 * 4, 0.0f), v(8 * 4), q(8 * 4, 0.0f), out(8 * 4);
    for (int t = 0; t < 8; ++t)
      for (int c = 0; c < 4; ++c) v[t * 4 + c] = static_cast<float>(t);
    cache.append(0, TensorView<const float>(k.data(), {1, 8, 4}), TensorView<const float>(v.data(), {1, 8, 4}));
    cache.attend(0, TensorView<const float>(q.data(), {1, 8, 4}), TensorView<float>(out.data(), {1, 8, 4}));
    for (int t = 0; t < 8; ++t) EXPECT_NEAR(out[t * 4], t / 2.0, 2e-2) << recipe << " row " << t;
  }
}

}  // namespace
