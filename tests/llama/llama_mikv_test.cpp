// Mixed precision on the shared models (kvslim-llama's evaluate_perplexity, 4 windows of 512
// tokens): MiKV demotion against H2O dropping at the same memory, and ZipCache's
// normalized attention against plain accumulated attention.
//
// What the data shows, and what is pinned here (docs/mixed_precision.md has the full grid
// over 8 windows):
//   - the crossover, the `lo` width from which demoting beats dropping at equal memory (within
//     5%), 25% of the window in high precision (f16):
//       tinystories656K (head_dim 16): 3 bits. lo=2 loses, lo=3 wins;
//       stories260K (head_dim 8): none up to 4 bits. At head_dim 8, a 2-4-bit KIVI token
//       still costs half an f16 one (per-token value scales, per-page key scales), so
//       demotion buys few extra tokens, and these models need few (their attention is local);
//   - zipcache beats accumulated attention for MiKV 8/2 at 25% on stories260K, and loses on
//     tinystories656K (both printed; only the first is asserted, and the recipe is the
//     issue's, not one picked for the result).
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "eval.h"
#include "llama_test_util.h"

namespace kvslim::llama {
namespace {

using test::shared_model;

std::map<std::string, RecipeMetrics> ppl(const char* model_name, const std::vector<std::string>& recipes,
                                         std::size_t windows) {
  const Model& model = shared_model(model_name);
  const std::vector<int> stream = token_stream(*model.tokenizer, read_text(kvslim::test::shared_path(test::kText)));
  PerplexityOptions opt;
  opt.max_windows = windows;
  const PerplexityReport rep = evaluate_perplexity(model, stream, recipes, opt);
  std::map<std::string, RecipeMetrics> out;
  for (const RecipeMetrics& m : rep.recipes) {
    std::printf("%-80s KLD %.4e  top1 %.4f  vs seen %.2fx\n", m.recipe.c_str(), m.kld_mean, m.top1_agree, m.ratio_seen);
    out[m.recipe] = m;
  }
  return out;
}

std::string mikv(int lo, const char* hi) {
  return fmt::format("mikv:budget=128,lo=(kivi:kbits={},vbits={}) | {}", lo, lo, hi);
}

// H2O (dropping) holding the same bytes as each MiKV run: a budget from the measured ratio,
// then one proportional correction. Returns the H2O metrics, one per MiKV recipe.
std::vector<RecipeMetrics> h2o_at_equal_memory(const char* model_name, const std::vector<RecipeMetrics>& mikv_runs,
                                               const char* hi) {
  // An f16 H2O head at budget B holds about 512 / B * 1.53 times less than f32 of every token
  // (measured at B = 256-320 on both models: scores, masks and page slack cost the rest).
  std::vector<int> budgets;
  std::vector<std::string> recipes;
  for (const RecipeMetrics& m : mikv_runs) {
    budgets.push_back(std::min(480, static_cast<int>(std::lround(512.0 * 1.53 / m.ratio_seen))));
    recipes.push_back(fmt::format("h2o:budget={} | {}", budgets.back(), hi));
  }
  auto first = ppl(model_name, recipes, 4);
  std::vector<RecipeMetrics> out;
  std::vector<std::string> again;
  for (std::size_t i = 0; i < mikv_runs.size(); ++i) {
    const RecipeMetrics& h = first[recipes[i]];
    if (std::abs(h.ratio_seen / mikv_runs[i].ratio_seen - 1.0) <= 0.04) {
      out.push_back(h);
      continue;
    }
    const int b = static_cast<int>(std::lround(budgets[i] * h.ratio_seen / mikv_runs[i].ratio_seen));
    again.push_back(fmt::format("h2o:budget={} | {}", b, hi));
    out.push_back(ppl(model_name, {again.back()}, 4)[again.back()]);
  }
  return out;
}

TEST(MikvModels, CrossoverIsThreeBitsOnTinyStories) {
  KVSLIM_REQUIRE_SHARED(test::kTiny);
  KVSLIM_REQUIRE_SHARED(test::kText);
  auto m = ppl(test::kTiny, {mikv(2, "f16"), mikv(3, "f16")}, 4);
  const std::vector<RecipeMetrics> runs = {m[mikv(2, "f16")], m[mikv(3, "f16")]};
  const auto h2o = h2o_at_equal_memory(test::kTiny, runs, "f16");
  for (std::size_t i = 0; i < 2; ++i) {
    SCOPED_TRACE(runs[i].recipe + " vs " + h2o[i].recipe);
    EXPECT_NEAR(h2o[i].ratio_seen / runs[i].ratio_seen, 1.0, 0.05);  // equal memory
  }
  // Measured (8 windows): lo=2 KLD 0.0226 vs 0.0155 dropping; lo=3 0.0025 vs 0.011.
  EXPECT_GT(runs[0].kld_mean, h2o[0].kld_mean) << "2-bit demotion should lose to dropping here";
  EXPECT_LT(runs[1].kld_mean, 0.5 * h2o[1].kld_mean) << "3-bit demotion should beat dropping by 2x";
}

TEST(MikvModels, NoCrossoverUpToFourBitsOnStories260K) {
  KVSLIM_REQUIRE_SHARED(test::kStories);
  KVSLIM_REQUIRE_SHARED(test::kText);
  auto m = ppl(test::kStories, {mikv(4, "f16")}, 4);
  const std::vector<RecipeMetrics> runs = {m[mikv(4, "f16")]};
  const auto h2o = h2o_at_equal_memory(test::kStories, runs, "f16");
  EXPECT_NEAR(h2o[0].ratio_seen / runs[0].ratio_seen, 1.0, 0.05);
  // Measured (8 windows): 8.1e-5 vs 2.8e-5 dropping.
  EXPECT_GT(runs[0].kld_mean, h2o[0].kld_mean);
}

TEST(MikvModels, ZipCacheSaliencyBeatsAccumulatedAttentionOnStories260K) {
  KVSLIM_REQUIRE_SHARED(test::kStories);
  KVSLIM_REQUIRE_SHARED(test::kText);
  const std::string plain = mikv(2, "kivi:kbits=8,vbits=8,residual=0"), zip = "zipcache | " + plain;
  auto s = ppl(test::kStories, {plain, zip}, 8);
  // Measured: 0.01007 (zipcache) vs 0.01090. On tinystories656K zipcache loses (0.0271 vs
  // 0.0226, docs/mixed_precision.md), so nothing is asserted there.
  EXPECT_LT(s[zip].kld_mean, s[plain].kld_mean);
}

}  // namespace
}  // namespace kvslim::llama
