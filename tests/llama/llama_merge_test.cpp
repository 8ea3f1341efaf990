// KVMerger on the real models, end to end (kvslim-llama's evaluate_perplexity, two windows of
// 512 tokens per model, f32 codec so that only the token policy differs): KLD against the f32
// cache at budgets of 35% and 50% of the window, with ceilings = the values measured when
// merging landed x 1.25 (docs/merging.md has the 8-window table with StreamingLLM).
//
// Asserted is only what these models show: at 35% KVMerger beats random eviction on both
// models (1.5x and 1.7x in KLD here) and H2O on TinyStories-656K; on stories260K H2O is ahead
// of it, and keeping the pivot without merging (keep=pivot) is ahead of both, which the table
// reports and no test claims otherwise. The kept fraction is exactly budget / window at each
// window's end: merging holds the budget exactly, like eviction.
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "eval.h"
#include "llama_test_util.h"

namespace kvslim::llama {
namespace {

using test::shared_model;

std::map<std::string, RecipeMetrics> run(const char* model_name, const std::vector<std::pair<const char*, double>>& rows) {
  const Model& model = shared_model(model_name);
  const std::vector<int> stream = token_stream(*model.tokenizer, read_text(kvslim::test::shared_path(test::kText)));
  std::vector<std::string> recipes;
  for (const auto& r : rows) recipes.push_back(r.first);
  PerplexityOptions opt;
  opt.max_windows = 2;
  const PerplexityReport rep = evaluate_perplexity(model, stream, recipes, opt);
  std::map<std::string, RecipeMetrics> out;
  for (const RecipeMetrics& m : rep.recipes) out[m.recipe] = m;
  for (const auto& [recipe, ceiling] : rows) {
    const RecipeMetrics& m = out.at(recipe);
    EXPECT_LE(m.kld_mean, ceiling) << model_name << " " << recipe;
    EXPECT_GT(m.kld_mean, 0.0) << recipe;
  }
  return out;
}

constexpr const char* kMerge35 = "kvmerger:budget=179,threshold=0.9";
constexpr const char* kMerge50 = "kvmerger:budget=256,threshold=0.9";
constexpr const char* kRandom35 = "random:budget=179";
constexpr const char* kH2O35 = "h2o:budget=179";

TEST(Merge, Stories260KDecode) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  KVSLIM_REQUIRE_SHARED(test::kText);
  auto r = run(test::kStories, {{kMerge35, 3.74e-3 * 1.25},
                                {kMerge50, 1.13e-3 * 1.25},
                                {kRandom35, 5.67e-3 * 1.25},
                                {kH2O35, 2.50e-3 * 1.25}});
  EXPECT_LT(1.3 * r[kMerge35].kld_mean, r[kRandom35].kld_mean);
  EXPECT_LT(r[kMerge50].kld_mean, r[kMerge35].kld_mean);
  EXPECT_NEAR(r[kMerge35].kept, 179.0 / 512.0, 1e-9);
  EXPECT_NEAR(r[kMerge50].kept, 0.5, 1e-9);
}

TEST(Merge, TinyStories656KDecode) {
  KVSLIM_REQUIRE_SHARED(test::kTinyWeights);
  KVSLIM_REQUIRE_SHARED(test::kText);
  auto r = run(test::kTiny, {{kMerge35, 5.83e-2 * 1.25},
                             {kMerge50, 2.63e-2 * 1.25},
                             {kRandom35, 9.84e-2 * 1.25},
                             {kH2O35, 6.47e-2 * 1.25}});
  EXPECT_LT(1.4 * r[kMerge35].kld_mean, r[kRandom35].kld_mean);
  EXPECT_LT(r[kMerge35].kld_mean, r[kH2O35].kld_mean);
  EXPECT_LT(r[kMerge50].kld_mean, r[kMerge35].kld_mean);
  EXPECT_NEAR(r[kMerge35].kept, 179.0 / 512.0, 1e-9);
}

}  // namespace
}  // namespace kvslim::llama
