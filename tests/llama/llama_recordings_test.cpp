// The llama engine against the shared recordings (data/dumps), for both real models:
//   - the token stream rule reproduces the recordings' token ids exactly (tokenizers:
//     llama2.c score-greedy merges, Hugging Face BPE by rank with its normalizer);
//   - `dump` of the same text windows reproduces q, k, k_pre, v, attn_out and nll.
//     Tolerance 1e-4 relative L2 per tensor: the recordings come from an independent f32
//     implementation, so only float rounding differs (summation order in the matrix
//     products and softmax, RoPE tables); that stays around 1e-6..1e-5 through 5 layers,
//     while any real mistake (wrong RoPE pairing, wrong head mapping, missing norm weight)
//     produces errors of order 1;
//   - decoding token by token, in mixed chunks and in one prefill chunk give the same logits
//     (1e-5 relative: the same arithmetic, only the cache's summation grouping may differ);
//   - tokenizer round trips and byte fallback.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <ostream>
#include <string>
#include <vector>

#include "engine.h"
#include "eval.h"
#include "kvslim/testing/recordings.h"
#include "llama_test_util.h"

namespace kvslim::llama {
namespace {

using test::rel_l2;
using test::shared_model;

constexpr double kTensorTol = 1e-4;

struct RecordingCase {
  const char* model;       // shared path of the model directory
  const char* model_file;  // a file the test needs
  const char* dump;        // shared path of the recording directory
};

// gtest prints a parameter without PrintTo as raw bytes (list output, failure messages).
void PrintTo(const RecordingCase& c, std::ostream* os) {
  *os << c.model << (*c.dump ? " " : "") << c.dump;
}

std::string case_name(const ::testing::TestParamInfo<RecordingCase>& p) {
  std::string s = p.param.dump;
  s = s.substr(s.find("dumps/") + 6);
  for (char& c : s)
    if (c == '/') c = '_';
  return s;
}

class RecordingTest : public ::testing::TestWithParam<RecordingCase> {
 protected:
  void SetUp() override {
    KVSLIM_REQUIRE_SHARED(GetParam().model_file);
    KVSLIM_REQUIRE_SHARED(GetParam().dump);
    KVSLIM_REQUIRE_SHARED(test::kText);
  }
};

TEST_P(RecordingTest, TokenStreamMatchesRecordedIds) {
  const Model& model = shared_model(GetParam().model);
  const auto rec = testing::load_recording(kvslim::test::shared_path(GetParam().dump));
  const std::string text = read_text(kvslim::test::shared_path(test::kText));
  const std::vector<int> ids =
      token_stream(*model.tokenizer, std::string_view(text).substr(rec.text_byte_offset),
                   static_cast<std::size_t>(model.config.seq_len));
  ASSERT_EQ(ids.size(), rec.token_ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i)
    ASSERT_EQ(ids[i], rec.token_ids[i]) << "first mismatch at token " << i;
}

TEST_P(RecordingTest, DumpReproducesRecording) {
  const Model& model = shared_model(GetParam().model);
  const auto ref = testing::load_recording(kvslim::test::shared_path(GetParam().dump));
  const std::string text = read_text(kvslim::test::shared_path(test::kText));
  test::ScratchDir dir("dump");
  write_dump(model, text, ref.text_byte_offset, dir.str(), "tinystories_valid_part1_marked.txt");

  // Read back with the library's own recording loader: this also checks the format.
  const auto got = testing::load_recording(dir.str());
  ASSERT_EQ(got.layers, ref.layers);
  ASSERT_EQ(got.q_heads, ref.q_heads);
  ASSERT_EQ(got.kv_heads, ref.kv_heads);
  ASSERT_EQ(got.head_dim, ref.head_dim);
  ASSERT_EQ(got.tokens, ref.tokens);
  EXPECT_EQ(got.rope, ref.rope);
  EXPECT_DOUBLE_EQ(got.rope_theta, ref.rope_theta);
  EXPECT_NEAR(got.rms_eps, ref.rms_eps, 1e-12);
  EXPECT_EQ(got.text_byte_offset, ref.text_byte_offset);
  EXPECT_EQ(got.token_ids, ref.token_ids);

  const struct {
    const char* name;
    const std::vector<float>& a;
    const std::vector<float>& b;
  } tensors[] = {{"q", got.q, ref.q},
                 {"k_pre", got.k_pre, ref.k_pre},
                 {"k", got.k, ref.k},
                 {"v", got.v, ref.v},
                 {"attn_out", got.attn_out, ref.attn_out}};
  for (const auto& t : tensors) {
    ASSERT_EQ(t.a.size(), t.b.size()) << t.name;
    const double err = rel_l2(t.a.data(), t.b.data(), t.a.size());
    RecordProperty(std::string("rel_l2_") + t.name, fmt::format("{:.3e}", err));
    EXPECT_LT(err, kTensorTol) << t.name << " relative L2 error " << err;
  }
  // Per layer too: an error confined to the last layer would hide in the global norm.
  const std::size_t per_layer = ref.attn_out.size() / static_cast<std::size_t>(ref.layers);
  for (int l = 0; l < ref.layers; ++l) {
    const std::size_t o = static_cast<std::size_t>(l) * per_layer;
    EXPECT_LT(rel_l2(got.attn_out.data() + o, ref.attn_out.data() + o, per_layer), kTensorTol)
        << "attn_out layer " << l;
  }
  const std::size_t n = ref.nll.size() - 1;  // last entry is NaN by definition
  EXPECT_TRUE(std::isnan(got.nll.back()));
  const double nll_err = rel_l2(got.nll.data(), ref.nll.data(), n);
  RecordProperty("rel_l2_nll", fmt::format("{:.3e}", nll_err));
  EXPECT_LT(nll_err, kTensorTol) << "nll relative L2 error " << nll_err;
}

INSTANTIATE_TEST_SUITE_P(
    SharedDumps, RecordingTest,
    ::testing::Values(
        RecordingCase{test::kStories, test::kStoriesBin, "data/dumps/stories260K/tsval_w0"},
        RecordingCase{test::kStories, test::kStoriesBin, "data/dumps/stories260K/tsval_w1"},
        RecordingCase{test::kStories, test::kStoriesBin, "data/dumps/stories260K/tsval_w2"},
        RecordingCase{test::kStories, test::kStoriesBin, "data/dumps/stories260K/tsval_w3"},
        RecordingCase{test::kTiny, test::kTinyWeights, "data/dumps/tinystories656K/tsval_w0"},
        RecordingCase{test::kTiny, test::kTinyWeights, "data/dumps/tinystories656K/tsval_w1"},
        RecordingCase{test::kTiny, test::kTinyWeights, "data/dumps/tinystories656K/tsval_w2"},
        RecordingCase{test::kTiny, test::kTinyWeights, "data/dumps/tinystories656K/tsval_w3"}),
    case_name);

class ModelTest : public ::testing::TestWithParam<RecordingCase> {
 protected:
  void SetUp() override {
    KVSLIM_REQUIRE_SHARED(GetParam().model_file);
    KVSLIM_REQUIRE_SHARED(test::kText);
  }
};

TEST_P(ModelTest, DecodeChunksAndPrefillAgree) {
  const Model& model = shared_model(GetParam().model);
  const std::string text = read_text(kvslim::test::shared_path(test::kText));
  const std::vector<int> ids = token_stream(*model.tokenizer, text, 96);
  const int V = model.config.vocab_size;

  Engine prefill(model, "f32");
  const std::span<const float> all = prefill.forward(ids, Logits::kAll);
  const std::vector<float> ref(all.begin(), all.end());

  Engine decode(model, "f32");
  std::vector<float> got;
  for (int id : ids) {
    const auto l = decode.forward(std::span<const int>(&id, 1), Logits::kLast);
    got.insert(got.end(), l.begin(), l.end());
  }
  ASSERT_EQ(got.size(), ref.size());
  EXPECT_LT(rel_l2(got.data(), ref.data(), ref.size()), 1e-5);

  // Uneven chunks, and the kLast row equals the last kAll row.
  Engine mixed(model, "f32");
  std::vector<float> last_rows;
  std::size_t pos = 0;
  for (std::size_t chunk : {1u, 40u, 1u, 30u, 24u}) {
    const auto l = mixed.forward(std::span<const int>(ids).subspan(pos, chunk), Logits::kLast);
    pos += chunk;
    EXPECT_LT(rel_l2(l.data(), ref.data() + (pos - 1) * V, static_cast<std::size_t>(V)), 1e-5)
        << "after " << pos << " tokens";
  }
  EXPECT_EQ(mixed.position(), 96);
  mixed.reset();
  EXPECT_EQ(mixed.position(), 0);
  const auto again = mixed.forward(std::span<const int>(ids).subspan(0, 1), Logits::kLast);
  EXPECT_LT(rel_l2(again.data(), ref.data(), static_cast<std::size_t>(V)), 1e-5);
}

// Pre-RoPE key caching (--pre-rope): the cache applies the model's RoPE to the keys itself.
// With f32 pages the logits are the post-RoPE engine's up to float rounding, in prefill and
// decode, so the perplexity does not move (kvslim-llama ppl --pre-rope prints dPPL ~1e-8).
TEST_P(ModelTest, PreRopeF32ReproducesTheModel) {
  const Model& model = shared_model(GetParam().model);
  const std::string text = read_text(kvslim::test::shared_path(test::kText));
  const std::vector<int> ids = token_stream(*model.tokenizer, text, 96);
  Engine ref(model, "f32");
  const std::span<const float> all = ref.forward(ids, Logits::kAll);
  const std::vector<float> want(all.begin(), all.end());
  Engine pre(model, "f32:group=8,residual=4", model.config.seq_len, true);
  EXPECT_TRUE(pre.cache().config().pre_rope_keys);
  std::vector<float> got;
  const auto first = pre.forward(std::span<const int>(ids).subspan(0, 40), Logits::kAll);
  got.insert(got.end(), first.begin(), first.end());
  for (std::size_t i = 40; i < ids.size(); ++i) {
    const auto l = pre.forward(std::span<const int>(ids).subspan(i, 1), Logits::kAll);
    got.insert(got.end(), l.begin(), l.end());
  }
  ASSERT_EQ(got.size(), want.size());
  EXPECT_LT(rel_l2(got.data(), want.data(), want.size()), 1e-5);
}

TEST_P(ModelTest, TokenizerRoundTrip) {
  const Model& model = shared_model(GetParam().model);
  const Tokenizer& tok = *model.tokenizer;
  const std::string s =
      "Once upon a time, there was a little dog named Max. He liked to run!\n\n\"Hello,\" "
      "said Max.";
  std::vector<int> ids = {tok.bos_id()};
  const std::vector<int> enc = tok.encode(s);
  ids.insert(ids.end(), enc.begin(), enc.end());
  EXPECT_EQ(tok.decode(ids), s);
  EXPECT_LT(enc.size(), s.size()) << "merges were not applied";
  EXPECT_TRUE(tok.encode("").empty());
}

INSTANTIATE_TEST_SUITE_P(SharedModels, ModelTest,
                         ::testing::Values(RecordingCase{test::kStories, test::kStoriesBin, ""},
                                           RecordingCase{test::kTiny, test::kTinyWeights, ""}),
                         [](const auto& p) {
                           return std::string(p.param.model).substr(7);
                         });

TEST(Llama2cTokenizer, ByteFallbackForUnknownCodePoints) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  const Tokenizer& tok = *shared_model(test::kStories).tokenizer;
  // U+00FC is not in the 512-token vocabulary (U+00E9 is): its two UTF-8 bytes become
  // <0xC3> <0xBC>, ids 3 + byte.
  const std::vector<int> ids = tok.encode("\xC3\xBC");
  ASSERT_GE(ids.size(), 2u);
  EXPECT_EQ(ids[ids.size() - 2], 3 + 0xC3);
  EXPECT_EQ(ids.back(), 3 + 0xBC);
  std::vector<int> with_bos = {tok.bos_id()};
  with_bos.insert(with_bos.end(), ids.begin(), ids.end());
  EXPECT_EQ(tok.decode(with_bos), "\xC3\xBC");
}

TEST(BpeTokenizer, NormalizerAndUnknownCharacters) {
  KVSLIM_REQUIRE_SHARED(test::kTinyWeights);
  const Tokenizer& tok = *shared_model(test::kTiny).tokenizer;
  // The normalizer prepends U+2581 and turns spaces into it: "a" encodes as "▁a".
  const std::vector<int> a = tok.encode("a");
  ASSERT_EQ(a.size(), 1u);
  EXPECT_EQ(tok.piece(a[0]), " a");
  // This vocabulary has no <0xXX> tokens: a run of unknown characters fuses into one <unk>.
  const std::vector<int> u = tok.encode("\xE2\x82\xAC\xE2\x84\xA2");  // U+20AC U+2122
  ASSERT_FALSE(u.empty());
  EXPECT_EQ(std::count(u.begin(), u.end(), 0), 1);
}

}  // namespace
}  // namespace kvslim::llama
