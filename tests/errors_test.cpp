// Every error class of the API boundary: each test triggers one and checks the error code
// and that the message names the bad value. A failed append must leave the cache unchanged.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>

#include "kvslim/kvslim.h"
#include "test_support.h"

using namespace kvslim;
using kvslim::test::expect_error;

namespace {

struct Fixture {
  CacheConfig cfg{2, 4, 2, 8, 10, "f32"};
  KVCache cache{cfg};
  std::vector<float> buf = std::vector<float>(4 * 16 * 8, 0.5f);
  TensorView<const float> kv(int heads, int n, int d = 8) const { return TensorView<const float>(buf.data(), {heads, n, d}); }
  TensorView<float> out(int heads, int n) { return TensorView<float>(buf.data(), {heads, n, 8}); }
};
}  // namespace

TEST(Errors, ConfigValues) {
  expect_error([] { KVCache c(CacheConfig{0, 4, 2, 8, 10, "f32"}); }, ErrorCode::kInvalidArgument, {"layers = 0"});
  expect_error([] { KVCache c(CacheConfig{1, 6, 4, 8, 10, "f32"}); }, ErrorCode::kInvalidArgument,
               {"q_heads = 6", "kv_heads = 4"});
  expect_error([] { KVCache c(CacheConfig{1, 4, 2, 0, 10, "f32"}); }, ErrorCode::kInvalidArgument, {"head_dim = 0"});
  expect_error([] { KVCache c(CacheConfig{1, 4, 2, 8, 0, "f32"}); }, ErrorCode::kCapacity, {"max_tokens = 0"});
}

TEST(Errors, ShapeAndStrideMismatch) {
  Fixture f;
  expect_error([&] { f.cache.append(0, f.kv(3, 1), f.kv(3, 1)); }, ErrorCode::kShapeMismatch,
               {"k has shape [3, 1, 8]", "kv_heads=2"});
  expect_error([&] { f.cache.append(0, f.kv(2, 1, 4), f.kv(2, 1, 4)); }, ErrorCode::kShapeMismatch, {"head_dim=8"});
  expect_error([&] { f.cache.append(0, f.kv(2, 2), f.kv(2, 1)); }, ErrorCode::kShapeMismatch, {"v has shape [2, 1, 8]"});
  expect_error([&] { f.cache.append(0, TensorView<const float>(f.buf.data(), {2, 8}), f.kv(2, 1)); },
               ErrorCode::kShapeMismatch, {"rank 3", "got rank 2"});
  Layout l = Layout::contiguous({2, 1, 8});
  l.strides[2] = 2;
  expect_error([&] { f.cache.append(0, TensorView<const float>(f.buf.data(), l), f.kv(2, 1)); },
               ErrorCode::kShapeMismatch, {"head_dim stride 2, expected 1"});
  const std::int64_t pos[1] = {0};
  expect_error([&] { f.cache.append(0, f.kv(2, 2), f.kv(2, 2), pos); }, ErrorCode::kShapeMismatch,
               {"1 positions for 2 tokens"});
  f.cache.append(0, f.kv(2, 1), f.kv(2, 1));
  expect_error([&] { f.cache.attend(0, f.kv(2, 1), f.out(4, 1)); }, ErrorCode::kShapeMismatch,
               {"q has shape [2, 1, 8]", "q_heads=4"});
  expect_error([&] { f.cache.attend(0, f.kv(4, 2), f.out(4, 2)); }, ErrorCode::kShapeMismatch,
               {"2 queries", "latest append brought 1 tokens"});
  std::vector<float> mass(1);
  AttendOptions ao;
  ao.mass = mass.data();
  ao.mass_stride = 0;
  expect_error([&] { f.cache.attend(0, f.kv(4, 1), f.out(4, 1), ao); }, ErrorCode::kShapeMismatch,
               {"mass_stride 0 is smaller than the 1 tokens"});
  expect_error([&] { f.cache.observe(0, 0, std::vector<float>(3)); }, ErrorCode::kShapeMismatch,
               {"3 mass values for 1 tokens"});
}

TEST(Errors, LayerAndHeadOutOfRange) {
  Fixture f;
  expect_error([&] { f.cache.append(2, f.kv(2, 1), f.kv(2, 1)); }, ErrorCode::kOutOfRange, {"layer 2 is out of range [0, 2)"});
  expect_error([&] { f.cache.append(-1, f.kv(2, 1), f.kv(2, 1)); }, ErrorCode::kOutOfRange, {"layer -1"});
  expect_error([&] { (void)f.cache.materialize(0, 2); }, ErrorCode::kOutOfRange, {"kv head 2 is out of range [0, 2)"});
  expect_error([&] { (void)f.cache.tokens(5, 0); }, ErrorCode::kOutOfRange, {"layer 5"});
}

TEST(Errors, NonFiniteInputsAreRejectedByDefault) {
  Fixture f;
  f.buf[8 * 3 + 5] = std::numeric_limits<float>::quiet_NaN();  // head 0? buf is [2][n][8]: token 3, ch 5
  expect_error([&] { f.cache.append(0, f.kv(2, 4), f.kv(2, 4)); }, ErrorCode::kNonFinite,
               {"key of kv head 0, token 3, channel 5 is nan"});
  EXPECT_EQ(f.cache.tokens(0, 0), 0);  // nothing was stored
  f.buf[8 * 3 + 5] = 0.0f;
  f.buf[8 * 4 + 1] = std::numeric_limits<float>::infinity();  // head 1 (n=4: head stride 32), token 0
  expect_error([&] { f.cache.append(0, f.kv(2, 4), TensorView<const float>(f.buf.data(), {2, 4, 8})); },
               ErrorCode::kNonFinite, {"kv head 1, token 0, channel 1 is inf"});
  EXPECT_EQ(f.cache.tokens(0, 1), 0);
  CacheConfig allow = f.cfg;
  allow.non_finite = NonFinitePolicy::kAllow;
  KVCache c(allow);
  c.append(0, f.kv(2, 4), f.kv(2, 4));  // stored as given when the engine opts in
  EXPECT_EQ(c.tokens(0, 1), 4);
}

TEST(Errors, ValuesOutsideTheCodecRange) {
  KVCache c(CacheConfig{1, 1, 1, 4, 10, "kivi:kbits=4,vbits=4"});
  std::vector<float> k{1.0f, 2.0f, 1e6f, 0.0f};
  expect_error([&] { c.append(0, TensorView<const float>(k.data(), {1, 1, 4}), TensorView<const float>(k.data(), {1, 1, 4})); },
               ErrorCode::kInvalidArgument, {"kivi", "1000000", "channel 2", "65504"});
  KVCache h(CacheConfig{1, 1, 1, 4, 10, "f16"});
  expect_error([&] { h.append(0, TensorView<const float>(k.data(), {1, 1, 4}), TensorView<const float>(k.data(), {1, 1, 4})); },
               ErrorCode::kInvalidArgument, {"f16", "exceeds the f16 range"});
}

TEST(Errors, PositionsMustIncrease) {
  Fixture f;
  const std::int64_t p1[2] = {5, 5};
  expect_error([&] { f.cache.append(0, f.kv(2, 2), f.kv(2, 2), p1); }, ErrorCode::kPosition,
               {"position 5 (token 1 of 2) does not follow position 5"});
  const std::int64_t p2[1] = {7};
  f.cache.append(0, f.kv(2, 1), f.kv(2, 1), p2);
  const std::int64_t p3[1] = {3};
  expect_error([&] { f.cache.append(0, f.kv(2, 1), f.kv(2, 1), p3); }, ErrorCode::kPosition,
               {"position 3", "does not follow position 7"});
}

TEST(Errors, CapacityAndBudget) {
  Fixture f;  // max_tokens 10
  f.cache.append(0, f.kv(2, 8), f.kv(2, 8));
  expect_error([&] { f.cache.append(0, f.kv(2, 3), f.kv(2, 3)); }, ErrorCode::kCapacity,
               {"append of 3 tokens", "would hold 11 tokens, more than max_tokens 10"});
  EXPECT_EQ(f.cache.tokens(0, 0), 8);
}

namespace {
// A minimal eviction policy, registered only to exercise budget validation.
class FixedBudget final : public EvictionPolicy {
 public:
  explicit FixedBudget(std::int64_t b) : b_(b) {}
  std::string describe() const override { return "fixed:budget=" + std::to_string(b_); }
  EvictAction action() const override { return EvictAction::kDrop; }
  std::int64_t budget(std::int64_t) const override { return b_; }
  std::int64_t fixed_budget() const override { return b_; }
  void select(const TokenStore&, std::vector<std::int64_t>&) const override {}

 private:
  std::int64_t b_;
};
}  // namespace

TEST(Errors, BudgetLargerThanCapacity) {
  register_stage("fixed", StageKind::kEviction, [](StageParams& p, int) {
    const int b = p.get_int("budget", 16, 0, 1 << 30);
    p.check_all_used({"budget"});
    return BuiltStage{StageKind::kEviction, nullptr, std::make_shared<FixedBudget>(b), nullptr, nullptr};
  });
  expect_error([] { KVCache c(CacheConfig{1, 1, 1, 8, 512, "fixed:budget=600 | kivi"}); }, ErrorCode::kCapacity,
               {"eviction budget 600", "larger than the cache capacity max_tokens 512"});
  expect_error([] { KVCache c(CacheConfig{1, 1, 1, 8, 512, "kivi:sinks=513"}); }, ErrorCode::kCapacity,
               {"sinks=513 is larger than the cache capacity max_tokens 512"});
  // Within capacity an engine-defined policy builds and runs.
  KVCache ok(CacheConfig{1, 1, 1, 8, 512, "fixed:budget=100 | kivi"});
  EXPECT_EQ(ok.recipe_for(0, 0).substr(0, 18), "fixed:budget=100 |");
}

TEST(Errors, RecipeErrorsReachTheConstructor) {
  expect_error([] { KVCache c(CacheConfig{1, 1, 1, 8, 10, "kivi:kbits=9"}); }, ErrorCode::kInvalidArgument,
               {"kbits=9 is not a supported bit width"});
  // Bit widths 0, 5 and 16 are rejected for keys and values alike, 1 (the 1-bit baseline) is not.
  for (const char* key : {"kbits", "vbits"}) {
    for (const char* b : {"0", "5", "16"}) {
      const std::string kv = std::string(key) + "=" + b;
      expect_error([&] { KVCache c(CacheConfig{1, 1, 1, 8, 10, "kivi:" + kv}); }, ErrorCode::kInvalidArgument,
                   {kv + " is not a supported bit width (1, 2, 3, 4 or 8)"});
    }
  }
  EXPECT_NO_THROW({ KVCache c(CacheConfig{1, 1, 1, 8, 10, "kivi:kbits=1,vbits=1"}); });
  EXPECT_NO_THROW({ KVCache c(CacheConfig{1, 1, 1, 8, 10, "kivi:kbits=1,vbits=4"}); });
  expect_error([] { KVCache c(CacheConfig{1, 1, 1, 8, 10, "ems:bits=2 | f16"}); }, ErrorCode::kRecipe,
               {"recipe stage 'ems' is reserved but not implemented yet"});
  expect_error([] { KVCache c(CacheConfig{1, 1, 1, 8, 10, "minicache:bits=2 | f16"}); }, ErrorCode::kRecipe,
               {"recipe stage 'minicache': unknown key 'bits'"});
  expect_error([] { KVCache c(CacheConfig{1, 1, 1, 8, 10, "cq:bits=2"}); }, ErrorCode::kInvalidArgument,
               {"recipe stage 'cq' needs codebooks", "CacheConfig::codebooks"});
  expect_error([] { KVCache c(CacheConfig{1, 1, 1, 8, 10, "cq:channels=4,bits=4"}); }, ErrorCode::kInvalidArgument,
               {"recipe stage 'cq'", "4"});
  expect_error([] { KVCache c(CacheConfig{1, 1, 1, 12, 10, "cq:channels=8,bits=1"}); }, ErrorCode::kInvalidArgument,
               {"kchannels=8", "head_dim 12"});
  expect_error([] { KVCache c(CacheConfig{1, 1, 1, 8, 10, "kivi:vgroup=3"}); }, ErrorCode::kInvalidArgument,
               {"vgroup=3 does not divide head_dim 8"});
  expect_error([] { KVCache c(CacheConfig{1, 1, 1, 8, 10, "f32:bits=3"}); }, ErrorCode::kRecipe,
               {"unknown key 'bits'", "known keys: group, residual, sinks"});
}

TEST(Errors, IsaSelection) {
  expect_error([] { (void)parse_isa("neon"); }, ErrorCode::kInvalidArgument, {"unknown ISA 'neon'"});
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
    if (cpu_supports(isa) && isa_built(isa)) continue;
    expect_error([&] { set_active_isa(isa); }, ErrorCode::kUnsupportedIsa, {isa_name(isa)});
  }
  set_active_isa(Isa::kScalar);
  EXPECT_EQ(active_isa(), Isa::kScalar);
}

TEST(Errors, AttendScale) {
  Fixture f;
  f.cache.append(0, f.kv(2, 1), f.kv(2, 1));
  AttendOptions ao;
  ao.scale = std::numeric_limits<float>::infinity();
  expect_error([&] { f.cache.attend(0, f.kv(4, 1), f.out(4, 1), ao); }, ErrorCode::kInvalidArgument, {"scale inf"});
}

TEST(Errors, NonFiniteQueries) {
  // Default: a NaN/Inf query is rejected, naming q head, token and channel.
  Fixture f;
  f.cache.append(0, f.kv(2, 2), f.kv(2, 2));
  std::vector<float> q(4 * 2 * 8, 0.25f), out(4 * 2 * 8);
  q[(2 * 2 + 1) * 8 + 6] = std::numeric_limits<float>::quiet_NaN();  // q head 2, token 1, channel 6
  expect_error([&] { f.cache.attend(0, TensorView<const float>(q.data(), {4, 2, 8}), TensorView<float>(out.data(), {4, 2, 8})); },
               ErrorCode::kNonFinite, {"query of q head 2, token 1, channel 6 is nan"});
  // kAllow: NaN in, NaN out — on every ISA, and only for that row; no mass from it.
  for (Isa isa : available_isas()) {
    set_active_isa(isa);
    for (const char* recipe : {"f32", "kivi:kbits=4,vbits=4,group=8,residual=0"}) {
      CacheConfig allow{1, 4, 2, 8, 64, recipe};
      allow.non_finite = NonFinitePolicy::kAllow;
      KVCache c(allow);
      std::vector<float> kv(2 * 20 * 8);
      for (std::size_t i = 0; i < kv.size(); ++i) kv[i] = std::sin(0.37f * static_cast<float>(i));
      c.append(0, TensorView<const float>(kv.data(), {2, 18, 8}), TensorView<const float>(kv.data(), {2, 18, 8}));
      c.attend(0, TensorView<const float>(kv.data(), {4, 1, 8}), TensorView<float>(out.data(), {4, 1, 8}));
      c.append(0, TensorView<const float>(kv.data(), {2, 2, 8}), TensorView<const float>(kv.data(), {2, 2, 8}));
      for (float inf : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
        std::fill(q.begin(), q.end(), 0.25f);
        q[(2 * 2 + 1) * 8 + 6] = inf;
        std::vector<float> mass(2 * 32, -1.0f);
        AttendOptions ao;
        ao.mass = mass.data();
        ao.mass_stride = 32;
        c.attend(0, TensorView<const float>(q.data(), {4, 2, 8}), TensorView<float>(out.data(), {4, 2, 8}), ao);
        for (int h = 0; h < 4; ++h)
          for (int t = 0; t < 2; ++t)
            for (int ch = 0; ch < 8; ++ch) {
              const float o = out[(h * 2 + t) * 8 + ch];
              if (h == 2 && t == 1) EXPECT_TRUE(std::isnan(o)) << isa_name(isa) << " " << recipe;
              else EXPECT_TRUE(std::isfinite(o)) << isa_name(isa) << " " << recipe << " head " << h;
            }
        // kv head 1 (q heads 2, 3) gets mass from 3 finite rows only; kv head 0 from 4.
        double m0 = 0.0, m1 = 0.0;
        for (int j = 0; j < 20; ++j) {
          m0 += mass[j];
          m1 += mass[32 + j];
        }
        EXPECT_NEAR(m0, 4.0, 1e-4) << isa_name(isa);
        EXPECT_NEAR(m1, 3.0, 1e-4) << isa_name(isa);
      }
    }
  }
  set_active_isa(available_isas().back());
}

TEST(Errors, MovedFromCacheThrowsOnEveryCall) {
  Fixture f;
  f.cache.append(0, f.kv(2, 1), f.kv(2, 1));
  KVCache moved = std::move(f.cache);
  EXPECT_EQ(moved.tokens(0, 0), 1);
  const std::vector<std::string> msg{"moved from"};
  KVCache& gone = f.cache;
  expect_error([&] { gone.append(0, f.kv(2, 1), f.kv(2, 1)); }, ErrorCode::kInvalidState, msg);
  expect_error([&] { gone.attend(0, f.kv(4, 1), f.out(4, 1)); }, ErrorCode::kInvalidState, msg);
  expect_error([&] { (void)gone.stats(); }, ErrorCode::kInvalidState, msg);
  expect_error([&] { (void)gone.config(); }, ErrorCode::kInvalidState, msg);
  expect_error([&] { (void)gone.tokens(0, 0); }, ErrorCode::kInvalidState, msg);
  expect_error([&] { (void)gone.positions(0, 0); }, ErrorCode::kInvalidState, msg);
  expect_error([&] { (void)gone.materialize(0, 0); }, ErrorCode::kInvalidState, msg);
  expect_error([&] { (void)gone.recipe_for(0, 0); }, ErrorCode::kInvalidState, msg);
  expect_error([&] { (void)gone.store(0, 0); }, ErrorCode::kInvalidState, msg);
  const std::vector<float> mass(1, 0.0f);
  expect_error([&] { gone.observe(0, 0, mass); }, ErrorCode::kInvalidState, msg);
  expect_error([&] { gone.reset(); }, ErrorCode::kInvalidState, msg);
  expect_error([&] { gone.flush(); }, ErrorCode::kInvalidState, msg);
  // Assigning a cache makes it usable again.
  gone = KVCache(f.cfg);
  EXPECT_EQ(gone.tokens(0, 0), 0);
  EXPECT_STREQ(error_code_name(ErrorCode::kInvalidState), "invalid_state");
}

TEST(Errors, NullDataWithAValidShape) {
  Fixture f;
  const TensorView<const float> null_kv(nullptr, {2, 1, 8});
  expect_error([&] { f.cache.append(0, null_kv, f.kv(2, 1)); }, ErrorCode::kInvalidArgument,
               {"k has shape [2, 1, 8]", "null data pointer"});
  expect_error([&] { f.cache.append(0, f.kv(2, 1), null_kv); }, ErrorCode::kInvalidArgument, {"v has shape"});
  EXPECT_EQ(f.cache.tokens(0, 0), 0);
  f.cache.append(0, f.kv(2, 1), f.kv(2, 1));
  expect_error([&] { f.cache.attend(0, TensorView<const float>(nullptr, {4, 1, 8}), f.out(4, 1)); },
               ErrorCode::kInvalidArgument, {"q has shape [4, 1, 8]", "null data pointer"});
  expect_error([&] { f.cache.attend(0, f.kv(4, 1), TensorView<float>(nullptr, {4, 1, 8})); },
               ErrorCode::kInvalidArgument, {"out has shape"});
}

TEST(Errors, StatsHeadOutOfRange) {
  Fixture f;
  const CacheStats st = f.cache.stats();
  EXPECT_EQ(st.head(1, 1).tokens, 0);
  expect_error([&] { (void)st.head(2, 0); }, ErrorCode::kOutOfRange, {"CacheStats::head(2, 0)", "2 layers x 2 kv heads"});
  expect_error([&] { (void)st.head(0, 2); }, ErrorCode::kOutOfRange, {"head(0, 2)"});
  expect_error([&] { (void)st.head(-1, 0); }, ErrorCode::kOutOfRange, {"head(-1, 0)"});
  expect_error([&] { (void)CacheStats{}.head(0, 0); }, ErrorCode::kOutOfRange, {"0 layers"});
}

TEST(Errors, PositionOverflow) {
  Fixture f;
  const std::int64_t last[1] = {std::numeric_limits<std::int64_t>::max()};
  f.cache.append(0, f.kv(2, 1), f.kv(2, 1), last);
  expect_error([&] { f.cache.append(0, f.kv(2, 1), f.kv(2, 1)); }, ErrorCode::kPosition,
               {"without positions", "9223372036854775807"});
  const std::int64_t near[2] = {std::numeric_limits<std::int64_t>::max() - 3, std::numeric_limits<std::int64_t>::max() - 2};
  f.cache.append(1, f.kv(2, 2), f.kv(2, 2), near);
  expect_error([&] { f.cache.append(1, f.kv(2, 3), f.kv(2, 3)); }, ErrorCode::kPosition, {"3 tokens without positions"});
  f.cache.append(1, f.kv(2, 2), f.kv(2, 2));  // ... max - 1, max: still representable
  EXPECT_EQ(f.cache.positions(1, 0).back(), std::numeric_limits<std::int64_t>::max());
  EXPECT_EQ(f.cache.tokens(0, 0), 1);
}
