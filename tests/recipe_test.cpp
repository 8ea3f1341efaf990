// Recipe grammar: chains, parameters, per-layer/per-head overrides (last match wins), the
// stage order rule, custom stages through register_stage, and the errors for unknown stages
// and keys, malformed text and out-of-range values.
#include <gtest/gtest.h>

#include "kvslim/kvslim.h"

using namespace kvslim;

namespace {
std::string error_of(const std::function<void()>& f, ErrorCode want) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), want) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no error thrown";
  return "";
}
}  // namespace

TEST(Recipe, ParsesChainsAndOverrides) {
  const RecipeSpec r = parse_recipe(
      " h2o:budget=256,recent=64 | kivi:kbits=2, vbits=2 ; [layers=0-1] f16 ; [layers=4 heads=0,2] f32:group=16");
  ASSERT_EQ(r.base.stages.size(), 2u);
  EXPECT_EQ(r.base.stages[0].name, "h2o");
  EXPECT_EQ(r.base.stages[0].params[1], (std::pair<std::string, std::string>{"recent", "64"}));
  EXPECT_EQ(r.base.text(), "h2o:budget=256,recent=64 | kivi:kbits=2,vbits=2");
  ASSERT_EQ(r.overrides.size(), 2u);
  EXPECT_EQ(r.chain_for(0, 3).text(), "f16");
  EXPECT_EQ(r.chain_for(1, 0).text(), "f16");
  EXPECT_EQ(r.chain_for(2, 0).text(), r.base.text());
  EXPECT_EQ(r.chain_for(4, 2).text(), "f32:group=16");
  EXPECT_EQ(r.chain_for(4, 1).text(), r.base.text());
}

TEST(Recipe, LaterOverrideWins) {
  const RecipeSpec r = parse_recipe("f32 ; [layers=0-3] f16 ; [layers=2] bf16");
  EXPECT_EQ(r.chain_for(1, 0).text(), "f16");
  EXPECT_EQ(r.chain_for(2, 0).text(), "bf16");
}

TEST(Recipe, BuildsCodecsWithDefaults) {
  const Pipeline p = build_pipeline(parse_recipe("kivi:kbits=4").base, 8);
  EXPECT_EQ(p.text, "kivi:kbits=4,vbits=2,group=32,vgroup=8,residual=128,sinks=0");
  EXPECT_EQ(build_pipeline(parse_recipe("kivi").base, 128).codec->describe(),
            "kivi:kbits=2,vbits=2,group=32,vgroup=32,residual=128,sinks=0");
  EXPECT_EQ(build_pipeline(parse_recipe("bf16:residual=4").base, 64).text, "bf16:group=32,residual=4,sinks=0");
}

TEST(Recipe, PerHeadOverridesReachTheCache) {
  CacheConfig cfg{3, 4, 2, 16, 64, "kivi:kbits=2,vbits=2 ; [layers=0] f16 ; [layers=2 heads=1] f32"};
  KVCache cache(cfg);
  EXPECT_EQ(cache.recipe_for(0, 1), "f16:group=32,residual=0,sinks=0");
  EXPECT_EQ(cache.recipe_for(1, 0).substr(0, 4), "kivi");
  EXPECT_EQ(cache.recipe_for(2, 0).substr(0, 4), "kivi");
  EXPECT_EQ(cache.recipe_for(2, 1), "f32:group=32,residual=0,sinks=0");
}

TEST(Recipe, Errors) {
  auto build = [](const char* text, int d = 64) {
    return [=] {
      const RecipeSpec r = parse_recipe(text);
      build_pipeline(r.base, d);
    };
  };
  auto m = error_of(build("h2o:budget=256 | kivi:kbits=2"), ErrorCode::kRecipe);
  EXPECT_NE(m.find("unknown recipe stage 'h2o'"), std::string::npos) << m;
  EXPECT_NE(m.find("known stages: bf16, f16, f32, kivi"), std::string::npos) << m;
  m = error_of(build("kivi:kbitz=2"), ErrorCode::kRecipe);
  EXPECT_NE(m.find("unknown key 'kbitz'"), std::string::npos) << m;
  EXPECT_NE(m.find("kbits, vbits, group"), std::string::npos) << m;
  m = error_of(build("kivi:kbits=5"), ErrorCode::kInvalidArgument);
  EXPECT_NE(m.find("kbits=5 is not a supported bit width (2, 3, 4 or 8)"), std::string::npos) << m;
  m = error_of(build("kivi:vbits=1"), ErrorCode::kInvalidArgument);
  EXPECT_NE(m.find("vbits=1"), std::string::npos) << m;
  m = error_of(build("kivi:kbits=two"), ErrorCode::kRecipe);
  EXPECT_NE(m.find("kbits='two' is not an integer"), std::string::npos) << m;
  m = error_of(build("kivi:vgroup=12"), ErrorCode::kInvalidArgument);
  EXPECT_NE(m.find("vgroup=12 does not divide head_dim 64"), std::string::npos) << m;
  m = error_of(build("kivi:group=0"), ErrorCode::kInvalidArgument);
  EXPECT_NE(m.find("group=0 is out of range"), std::string::npos) << m;
  m = error_of(build("kivi:kbits=2,kbits=4"), ErrorCode::kRecipe);
  EXPECT_NE(m.find("'kbits' is given twice"), std::string::npos) << m;
  m = error_of(build("f16 | kivi"), ErrorCode::kRecipe);
  EXPECT_NE(m.find("cannot follow 'f16'"), std::string::npos) << m;
  m = error_of(build(""), ErrorCode::kRecipe);
  EXPECT_NE(m.find("recipe is empty"), std::string::npos) << m;
  m = error_of(build("kivi:kbits"), ErrorCode::kRecipe);
  EXPECT_NE(m.find("parameter 'kbits' is not key=value"), std::string::npos) << m;
  m = error_of(build("f32 ; layers=0 f16"), ErrorCode::kRecipe);
  EXPECT_NE(m.find("must start with [layers"), std::string::npos) << m;
  m = error_of(build("f32 ; [rows=0] f16"), ErrorCode::kRecipe);
  EXPECT_NE(m.find("unknown selector 'rows'"), std::string::npos) << m;
  m = error_of(build("f32 ; [layers=3-1] f16"), ErrorCode::kRecipe);
  EXPECT_NE(m.find("range '3-1' is empty"), std::string::npos) << m;
  m = error_of([] { KVCache c(CacheConfig{2, 2, 2, 8, 16, "f32 ; [layers=5] f16"}); }, ErrorCode::kRecipe);
  EXPECT_NE(m.find("layer 5 is out of range [0, 2)"), std::string::npos) << m;
}

namespace {
// A custom scorer plugged in through the registry: counts appended tokens and attention.
class CountingScorer final : public Scorer {
 public:
  std::string describe() const override { return "count"; }
  bool needs_attention() const override { return true; }
  void on_append(TokenStore& s, std::int64_t first, std::int64_t count, const float*) const override {
    for (std::int64_t i = first; i < first + count; ++i) s.importance()[i] = 1.0f;
  }
  void on_attention(TokenStore& s, std::span<const float> mass) const override {
    for (std::size_t i = 0; i < mass.size(); ++i) s.importance()[i] += mass[i];
  }
};
}  // namespace

TEST(Recipe, CustomStagesPlugIn) {
  register_stage("count", StageKind::kScorer, [](StageParams& p, int) {
    p.check_all_used({});
    return BuiltStage{StageKind::kScorer, std::make_shared<CountingScorer>(), nullptr, nullptr, nullptr};
  });
  KVCache cache(CacheConfig{1, 2, 1, 4, 16, "count | f16"});
  EXPECT_EQ(cache.recipe_for(0, 0), "count | f16:group=32,residual=0,sinks=0");
  std::vector<float> kv(3 * 4, 0.5f), q(2 * 1 * 4, 1.0f), out(2 * 4), mass(16);
  cache.append(0, TensorView<const float>(kv.data(), {1, 3, 4}), TensorView<const float>(kv.data(), {1, 3, 4}));
  AttendOptions ao;
  ao.mass = mass.data();
  ao.mass_stride = 16;
  cache.attend(0, TensorView<const float>(q.data(), {2, 1, 4}), TensorView<float>(out.data(), {2, 1, 4}), ao);
  // Equal keys: each of 3 tokens gets 1/3 from each of the 2 query heads.
  const auto imp = cache.store(0, 0).importance();
  ASSERT_EQ(imp.size(), 3u);
  for (float x : imp) EXPECT_NEAR(x, 1.0f + 2.0f / 3.0f, 1e-6);
  // A scorer that needs attention without a mass buffer is an error, not silence.
  std::vector<float> kv1(4, 0.1f);
  cache.append(0, TensorView<const float>(kv1.data(), {1, 1, 4}), TensorView<const float>(kv1.data(), {1, 1, 4}));
  EXPECT_THROW(cache.attend(0, TensorView<const float>(q.data(), {2, 1, 4}), TensorView<float>(out.data(), {2, 1, 4})),
               Error);
}
