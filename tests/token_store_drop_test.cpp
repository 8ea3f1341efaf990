// TokenStore::drop against a plain model of the sequence, under random operations: appends
// of random chunk sizes (so tokens land in sinks, sealed pages, the window), attends (which
// seal), special tokens, and random drops anywhere (sinks, masked page slots, re-packed
// pages, window rows, specials). After every step the store must hold exactly the model's
// tokens: positions, keys and values bit for bit (f32 and f16 codecs: decode then encode is
// exact), importance scores that followed their tokens (a scorer writes each token's
// position into its score), size and bytes consistent; attention must equal a double-precision
// reference over the model (2e-5 relative, float rounding over ~100 terms).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kvslim/kernels/kernel_table.h"
#include "kvslim/kvslim.h"
#include "test_support.h"

using namespace kvslim;

namespace {

// importance = the token's position (specials: -1), so a test can see scores follow tokens.
class PositionScore final : public Scorer {
 public:
  std::string describe() const override { return "posscore"; }
  bool needs_attention() const override { return false; }
  void on_append(TokenStore& s, std::int64_t first, std::int64_t count, const float*) const override {
    const auto pos = s.positions();
    for (std::int64_t i = first; i < first + count; ++i) s.importance()[i] = static_cast<float>(pos[i]);
  }
  void on_attention(TokenStore&, std::span<const float>) const override {}
};

struct Token {
  std::int64_t pos;
  std::vector<float> k, v;
  float log_w;  // 0 for ordinary tokens
  bool special;
};

void run_random(const char* codec, unsigned seed) {
  register_stage("posscore", StageKind::kScorer, [](StageParams& p, int) {
    p.check_all_used({});
    return BuiltStage{StageKind::kScorer, std::make_shared<PositionScore>(), nullptr, nullptr, nullptr};
  });
  const int d = 8;
  KVCache cache(CacheConfig{1, 2, 1, d, 4096, std::string("posscore | ") + codec});
  TokenStore& s = cache.store(0, 0);
  const kernels::KernelTable& kt = kernels::active();
  std::mt19937 rng(seed);
  // f16-exact values (multiples of 1/8 in [-4, 4]) so both codecs are lossless.
  auto val = [&] { return static_cast<float>(static_cast<int>(rng() % 65) - 32) / 8.0f; };
  std::vector<Token> model;
  std::int64_t next_pos = 0;
  for (int step = 0; step < 300; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const auto op = rng() % 10;
    if (op < 5) {  // append a chunk, then attend its last token (which seals)
      const int n = 1 + static_cast<int>(rng() % (rng() % 4 == 0 ? 20 : 3));
      std::vector<float> k(static_cast<std::size_t>(n) * d), v(k.size());
      std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
      for (auto& x : k) x = val();
      for (auto& x : v) x = val();
      for (int i = 0; i < n; ++i) pos[i] = next_pos += 1 + static_cast<std::int64_t>(rng() % 3);
      cache.append(0, TensorView<const float>(k.data(), {1, n, d}), TensorView<const float>(v.data(), {1, n, d}), pos);
      // New ordinary tokens go before the specials.
      auto at = model.begin();
      while (at != model.end() && !at->special) ++at;
      std::vector<Token> fresh;
      for (int i = 0; i < n; ++i)
        fresh.push_back({pos[i], std::vector<float>(k.begin() + i * d, k.begin() + (i + 1) * d),
                         std::vector<float>(v.begin() + i * d, v.begin() + (i + 1) * d), 0.0f, false});
      model.insert(at, fresh.begin(), fresh.end());
      if (rng() % 2) {
        std::vector<float> q(2 * d), out(2 * d);
        for (auto& x : q) x = val();
        cache.attend(0, TensorView<const float>(q.data(), {2, 1, d}), TensorView<float>(out.data(), {2, 1, d}));
        // Reference over the model (the query is the newest ordinary token: it sees all).
        for (int h = 0; h < 2; ++h) {
          std::vector<float> kk, vv, lw, ref(d);
          for (const Token& t : model) {
            kk.insert(kk.end(), t.k.begin(), t.k.end());
            vv.insert(vv.end(), t.v.begin(), t.v.end());
            lw.push_back(t.log_w);
          }
          test::ref_attention(q.data() + h * d, kk.data(), vv.data(), static_cast<long>(model.size()), d, d,
                              1.0 / std::sqrt(d), ref.data(), nullptr, lw.data());
          ASSERT_LT(test::rel_l2(out.data() + h * d, ref.data(), d), 2e-5);
        }
      }
    } else if (op < 6 && !model.empty()) {  // a special token
      std::vector<float> k(d), v(d);
      for (auto& x : k) x = val();
      for (auto& x : v) x = val();
      const float w = 1.0f + static_cast<float>(rng() % 4);
      s.add_special(k.data(), v.data(), w, next_pos);
      s.importance().back() = -1.0f;
      model.push_back({next_pos, k, v, std::log(w), true});
    } else if (!model.empty()) {  // drop a random set, sometimes a lot
      std::vector<std::int64_t> victims;
      const int count = 1 + static_cast<int>(rng() % (rng() % 5 == 0 ? model.size() : 3));
      for (int i = 0; i < count; ++i) victims.push_back(static_cast<std::int64_t>(rng() % model.size()));
      victims.push_back(victims.front());  // duplicates are ignored
      s.drop(kt, victims);
      std::sort(victims.begin(), victims.end());
      victims.erase(std::unique(victims.begin(), victims.end()), victims.end());
      for (auto it = victims.rbegin(); it != victims.rend(); ++it) model.erase(model.begin() + *it);
    }
    // The store equals the model.
    ASSERT_EQ(s.size(), static_cast<std::int64_t>(model.size()));
    const DenseKV kv = cache.materialize(0, 0);
    const auto imp = s.importance();
    ASSERT_EQ(imp.size(), model.size());
    for (std::size_t j = 0; j < model.size(); ++j) {
      ASSERT_EQ(kv.positions[j], model[j].pos) << "token " << j;
      ASSERT_EQ(imp[j], model[j].special ? -1.0f : static_cast<float>(model[j].pos)) << "token " << j;
      ASSERT_NEAR(kv.log_weights[j], model[j].log_w, 1e-6) << "token " << j;
      for (int c = 0; c < d; ++c) {
        ASSERT_EQ(kv.k[static_cast<std::int64_t>(j) * d + c], model[j].k[c]) << "token " << j;
        ASSERT_EQ(kv.v[static_cast<std::int64_t>(j) * d + c], model[j].v[c]) << "token " << j;
      }
    }
    // Page slots never exceed 4/3 of the live sealed tokens plus one page after a re-pack
    // round (a page re-packs once a quarter of its slots are dead).
    ASSERT_LE(3 * s.page_slots(), 4 * s.sealed_tokens() + 3 * s.codec().page_tokens());
    ASSERT_EQ(s.sink_count() + s.sealed_tokens() + s.window_count() + s.specials(), s.size());
  }
  EXPECT_GT(s.repacked_pages(), 0) << "the run must have re-packed pages to mean anything";
}

}  // namespace

TEST(TokenStoreDrop, RandomOperationsMatchAPlainModelF32) {
  for (unsigned seed : {1u, 2u, 3u}) run_random("f32:group=8,residual=5,sinks=3", seed);
}

TEST(TokenStoreDrop, RandomOperationsMatchAPlainModelF16) {
  for (unsigned seed : {4u, 5u}) run_random("f16:group=4,residual=0,sinks=1", seed);
}

TEST(TokenStoreDrop, BadIndexIsAnErrorAndChangesNothing) {
  KVCache cache(CacheConfig{1, 1, 1, 4, 64, "f32:group=4"});
  std::vector<float> kv(10 * 4, 0.5f);
  cache.append(0, TensorView<const float>(kv.data(), {1, 10, 4}), TensorView<const float>(kv.data(), {1, 10, 4}));
  const std::vector<std::int64_t> bad{3, 10};
  try {
    cache.store(0, 0).drop(kernels::active(), bad);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kOutOfRange);
    EXPECT_NE(std::string(e.what()).find("token index 10 is out of range [0, 10)"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cache.tokens(0, 0), 10);
}
