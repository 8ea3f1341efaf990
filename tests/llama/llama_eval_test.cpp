// End-to-end behaviour of the llama engine with real models and kvslim caches:
//   - greedy generation from BOS on stories260K gives the text its README documents;
//   - full-cache perplexity on the shared text lies in the README's range (bounds and their
//     reasons at the INSTANTIATE below);
//   - recipe metrics: f32 through its own cache gives dPPL = 0 and KLD = 0 exactly (the
//     computation is deterministic and the cache is lossless); 8-bit KIVI stays below
//     1e-3 nats of KLD (8-bit rounding error is ~0.4% of a group's range, far below the
//     logit gaps); KLD grows as bits shrink (8 < 4 < 2) and memory shrinks with them.
// Two windows per model keep the test a few seconds even under ASan.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>

#include <ostream>
#include <string>
#include <vector>

#include "eval.h"
#include "llama_test_util.h"

namespace kvslim::llama {
namespace {

using test::shared_model;

constexpr std::size_t kWindows = 2;

TEST(Generate, Stories260KFromBos) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  const Model& model = shared_model(test::kStories);
  std::string streamed;
  const GenerateResult r =
      generate(model, "f32", "", 40, [&](std::string_view s) { streamed += s; });
  const std::string expected =
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
      "park.";
  EXPECT_EQ(r.text.substr(0, expected.size()), expected) << "got: " << r.text;
  EXPECT_EQ(streamed, r.text);
  EXPECT_EQ(r.tokens.front(), model.tokenizer->bos_id());
  EXPECT_EQ(r.generated, 40);
  EXPECT_GT(r.tokens_per_s, 0.0);
}

TEST(Generate, PromptIsKeptAndContinued) {
  KVSLIM_REQUIRE_SHARED(test::kTinyWeights);
  const Model& model = shared_model(test::kTiny);
  const GenerateResult r = generate(model, "f16", "Once upon a time", 20);
  EXPECT_EQ(r.text.rfind("Once upon a time", 0), 0u) << r.text;
  EXPECT_GT(r.text.size(), std::string("Once upon a time").size());
  EXPECT_GT(r.generated, 0);
}

struct PplCase {
  const char* model;
  const char* model_file;
  double lo, hi;  // bounds on the f32 perplexity over kWindows windows
};

// gtest prints a parameter without PrintTo as raw bytes (list output, failure messages).
void PrintTo(const PplCase& c, std::ostream* os) {
  *os << c.model << " f32 ppl in (" << c.lo << ", " << c.hi << ")";
}

class PerplexityTest : public ::testing::TestWithParam<PplCase> {
 protected:
  void SetUp() override {
    KVSLIM_REQUIRE_SHARED(GetParam().model_file);
    KVSLIM_REQUIRE_SHARED(test::kText);
  }
};

TEST_P(PerplexityTest, RecipesAgainstFullPrecision) {
  const Model& model = shared_model(GetParam().model);
  const std::string text = read_text(kvslim::test::shared_path(test::kText));
  const std::vector<int> stream = token_stream(*model.tokenizer, text);
  const std::vector<std::string> recipes = {"f32", "kivi:kbits=8,vbits=8",
                                            "kivi:kbits=4,vbits=4", "kivi:kbits=2,vbits=2"};
  PerplexityOptions opt;
  opt.max_windows = kWindows;
  const PerplexityReport rep = evaluate_perplexity(model, stream, recipes, opt);

  ASSERT_EQ(rep.windows, kWindows);
  EXPECT_EQ(rep.tokens, static_cast<std::int64_t>(kWindows) * (model.config.seq_len - 1));
  EXPECT_GT(rep.ppl_f32, GetParam().lo);
  EXPECT_LT(rep.ppl_f32, GetParam().hi);
  ASSERT_EQ(rep.recipes.size(), recipes.size());
  for (const RecipeMetrics& m : rep.recipes) {
    RecordProperty("ppl_" + m.recipe, fmt::format("{:.5f}", m.ppl));
    RecordProperty("kld_" + m.recipe, fmt::format("{:.3e}", m.kld_mean));
  }

  const RecipeMetrics& f32 = rep.recipes[0];
  EXPECT_EQ(f32.ppl, rep.ppl_f32);
  EXPECT_EQ(f32.dppl_rel, 0.0);
  EXPECT_EQ(f32.kld_mean, 0.0);
  EXPECT_EQ(f32.top1_agree, 1.0);
  EXPECT_GT(f32.tokens_per_s, 0.0);
  // An f32 cache of one full window: 2 (K, V) x 4 bytes x layers x kv_heads x tokens x dim,
  // plus whatever bookkeeping the cache reports.
  const double f32_payload = 8.0 * model.config.n_layers * model.config.n_kv_heads *
                             model.config.seq_len * model.config.head_dim;
  EXPECT_GE(f32.kv_bytes, f32_payload);
  EXPECT_LE(f32.ratio, 1.0);

  const RecipeMetrics& k8 = rep.recipes[1];
  const RecipeMetrics& k4 = rep.recipes[2];
  const RecipeMetrics& k2 = rep.recipes[3];
  EXPECT_LT(k8.kld_mean, 1e-3);
  EXPECT_GT(k8.kld_mean, 0.0);  // it is lossy: exactly 0 would mean the codec did nothing
  EXPECT_LT(k8.kld_mean, k4.kld_mean);
  EXPECT_LT(k4.kld_mean, k2.kld_mean);
  EXPECT_GE(k8.top1_agree, k4.top1_agree);
  EXPECT_GE(k4.top1_agree, k2.top1_agree);
  EXPECT_LT(std::abs(k8.dppl_rel), 0.01);
  EXPECT_GT(k2.dppl_rel, k8.dppl_rel);
  EXPECT_LT(k8.kv_bytes, f32.kv_bytes);
  EXPECT_LT(k4.kv_bytes, k8.kv_bytes);
  EXPECT_LT(k2.kv_bytes, k4.kv_bytes);
  EXPECT_GT(k2.ratio, k4.ratio);
  EXPECT_GT(k4.ratio, k8.ratio);
  EXPECT_GT(k8.ratio, 1.0);
}

// Bounds: the README's figures (stories260K about 3.7, 656K about 30-40 per token) widened
// for window-to-window spread: the shared recordings' windows, which start at story starts,
// already range over 3.3-3.9 and 28-38, and the windows here are cut from the stream
// regardless of story boundaries (the first one starts mid-story), which adds early tokens
// without context. A broken engine lands far outside (wrong RoPE pairing: ~440 for 656K).
INSTANTIATE_TEST_SUITE_P(SharedModels, PerplexityTest,
                         ::testing::Values(PplCase{test::kStories, test::kStoriesBin, 3.0, 4.5},
                                           PplCase{test::kTiny, test::kTinyWeights, 25.0, 50.0}),
                         [](const auto& p) { return std::string(p.param.model).substr(7); });

// Pre-RoPE key caching on a real model (docs/outliers.md): f32 pages reproduce the f32
// reference (dPPL 0 within float noise), and 2-bit KIVI keys quantized before RoPE are
// closer to the reference than after it on stories260K (measured 5.3x lower KLD over 8
// windows; asserted 2x over 2).
TEST(PreRope, Stories260KPerplexity) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  KVSLIM_REQUIRE_SHARED(test::kText);
  const Model& model = shared_model(test::kStories);
  const std::vector<int> stream = token_stream(*model.tokenizer, read_text(kvslim::test::shared_path(test::kText)));
  PerplexityOptions opt;
  opt.max_windows = 2;
  const std::vector<std::string> recipes = {"f32", "kivi:kbits=2,vbits=2,residual=0"};
  const PerplexityReport post = evaluate_perplexity(model, stream, recipes, opt);
  opt.pre_rope = true;
  const PerplexityReport pre = evaluate_perplexity(model, stream, recipes, opt);
  EXPECT_LT(std::fabs(pre.recipes[0].ppl / pre.ppl_f32 - 1.0), 1e-6);
  EXPECT_LT(pre.recipes[0].kld_mean, 1e-6);
  EXPECT_LT(pre.recipes[1].kld_mean * 2.0, post.recipes[1].kld_mean)
      << "pre-RoPE " << pre.recipes[1].kld_mean << " post-RoPE " << post.recipes[1].kld_mean;
}

TEST(TokenStream, WindowsCoverTheStream) {
  const auto w = windows_of(1030, 512, 0);
  ASSERT_EQ(w.size(), 3u);
  EXPECT_EQ(w[0], (std::pair<std::size_t, std::size_t>{0, 512}));
  EXPECT_EQ(w[2], (std::pair<std::size_t, std::size_t>{1024, 1030}));
  EXPECT_EQ(windows_of(1025, 512, 0).size(), 2u);  // a 1-token tail predicts nothing
  EXPECT_EQ(windows_of(5000, 512, 3).size(), 3u);
}

TEST(TokenStream, SplitsAtMarkersAndStrips) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  const Tokenizer& tok = *shared_model(test::kStories).tokenizer;
  const std::vector<int> got =
      token_stream(tok, "  Hi there. \n<|endoftext|>\n\n<|endoftext|>\nThe end.\n");
  std::vector<int> want = {tok.bos_id()};
  for (const char* piece : {"Hi there.", "The end."}) {
    const std::vector<int> e = tok.encode(piece);
    want.insert(want.end(), e.begin(), e.end());
    if (std::string(piece) == "Hi there.") want.push_back(tok.bos_id());
  }
  EXPECT_EQ(got, want);
  EXPECT_EQ(token_stream(tok, "  Hi there. \n<|endoftext|>The end.", 3).size(), 3u);
}

}  // namespace
}  // namespace kvslim::llama
