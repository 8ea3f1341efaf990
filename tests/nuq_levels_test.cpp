// Learned non-uniform levels (nuq:...,levels=FILE; train_levels, kvslim/policy/nuq.h) on the
// shared recordings: trained on windows 0 and 1, judged on windows 2 and 3 only.
//   - stories260K (head_dim 8): learned 3-bit levels halve the attention error of the
//     Gaussian ones (measured 0.288 vs 0.539 with attention-mass weights, 0.277 unweighted);
//   - tinystories656K (head_dim 16): the two are within 2% (0.1308 vs 0.1301): its normalized
//     coordinates are already close to Gaussian, and this is asserted as "not worse by 5%".
// KIVI at 3 bits stays better on both (0.094 and 0.072): per-token scales cannot absorb the
// keys' per-channel offsets (docs/outliers.md). Also: the file round trip, the shape checks
// and the errors of a level file for another bit width or cache.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>

#include <unistd.h>
#include <string>
#include <vector>

#include "kvslim/kvslim.h"
#include "kvslim/policy/nuq.h"
#include "kvslim/testing/recordings.h"
#include "kvslim/testing/replay.h"
#include "test_support.h"

using namespace kvslim;

namespace {

std::vector<kvslim::testing::Recording> windows(const std::string& model, std::vector<int> ws) {
  std::vector<kvslim::testing::Recording> out;
  for (int w : ws)
    out.push_back(kvslim::testing::load_recording(test::shared_path("data/dumps/" + model + "/tsval_w" + std::to_string(w))));
  return out;
}

Codebooks train_on(const std::vector<kvslim::testing::Recording>& recs, int bits, const RotationSpec& rot = {}) {
  const auto& r0 = recs.front();
  const int L = r0.layers, H = r0.kv_heads, d = r0.head_dim;
  std::vector<std::vector<float>> k(static_cast<std::size_t>(L) * H), v(k.size());
  for (const auto& r : recs)
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < H; ++h) {
        const std::size_t hi = static_cast<std::size_t>(l) * H + h;
        k[hi].insert(k[hi].end(), r.k_head(l, h), r.k_head(l, h) + static_cast<std::size_t>(r.tokens) * d);
        v[hi].insert(v[hi].end(), r.v_head(l, h), r.v_head(l, h) + static_cast<std::size_t>(r.tokens) * d);
      }
  CalibrationKV cal(L, H, d);
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      const std::size_t hi = static_cast<std::size_t>(l) * H + h;
      cal.set(l, h, {k[hi].data(), v[hi].data(), static_cast<std::int64_t>(k[hi].size() / d), nullptr, nullptr});
    }
  return train_levels(cal, bits, bits, rot);
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("kvslim_" + std::to_string(::getpid()) + "_" + name)).string();
}

TEST(NuqLevels, LearnedLevelsOnHeldOutWindows) {
  KVSLIM_REQUIRE_SHARED("data/dumps");
  for (const char* model : {"stories260K", "tinystories656K"}) {
    const Codebooks lv = train_on(windows(model, {0, 1}), 3);
    EXPECT_EQ(lv.head_dim(), 1);
    EXPECT_EQ(lv.centroid_count(false), 8);
    const std::string path = temp_path(std::string(model) + ".kvlv");
    save_codebooks(lv, path);
    const auto held = windows(model, {2, 3});
    const double gauss = kvslim::testing::replay(held, "nuq:kbits=3,vbits=3,residual=0").rel_err_mean;
    const auto learned = kvslim::testing::replay(held, "nuq:kbits=3,vbits=3,residual=0,levels=" + path);
    std::printf("%s: nuq 3-bit held-out error, Gaussian levels %.4f, learned %.4f (bits/value %.2f)\n", model, gauss,
                learned.rel_err_mean, learned.bits_per_value);
    if (std::string(model) == "stories260K")
      EXPECT_LT(learned.rel_err_mean * 1.5, gauss);
    else
      EXPECT_LT(learned.rel_err_mean, gauss * 1.05);
    std::filesystem::remove(path);
  }
}

TEST(NuqLevels, FileShapeIsChecked) {
  // A small synthetic calibration set: 2 layers, 1 kv head, head_dim 8.
  std::vector<float> k(64 * 8), v(k.size());
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>((i * 37) % 17) - 8.0f;
    v[i] = static_cast<float>((i * 11) % 13) - 6.0f;
  }
  CalibrationKV cal(2, 1, 8);
  for (int l = 0; l < 2; ++l) cal.set(l, 0, {k.data(), v.data(), 64, nullptr, nullptr});
  const Codebooks lv = train_levels(cal, 2, 3, RotationSpec{true, 5, true, true});
  const std::string path = temp_path("shape.kvlv");
  save_codebooks(lv, path);
  // Right shape: builds, per head, and names the file.
  KVCache ok(CacheConfig{2, 2, 1, 8, 64, "nuq:kbits=2,vbits=3,rotate=hadamard,seed=5,levels=" + path});
  EXPECT_NE(ok.recipe_for(1, 0).find("levels=" + path), std::string::npos) << ok.recipe_for(1, 0);
  EXPECT_GT(ok.stats().codebook_bytes, 0);
  auto make = [](const std::string& r, int layers) { return [r, layers] { KVCache x(CacheConfig{layers, 2, 1, 8, 64, r}); }; };
  test::expect_error(make("nuq:kbits=3,vbits=3,levels=" + path, 2), ErrorCode::kInvalidArgument,
                     {"levels=" + path, "kbits=3", "not a level file"});
  test::expect_error(make("nuq:kbits=2,vbits=3,levels=" + path, 3), ErrorCode::kInvalidArgument,
                     {"levels=" + path, "layers"});
  test::expect_error(make("nuq:kbits=2,vbits=3,levels=/nonexistent/x.kvlv", 2), ErrorCode::kIo,
                     {"levels=/nonexistent/x.kvlv"});
  std::filesystem::remove(path);
  // 3-bit tables are only for scalar levels: cq keeps B in {1, 2, 4}.
  test::expect_error([] { KVCache x(CacheConfig{1, 1, 1, 8, 64, "cq:channels=1,bits=3"}); }, ErrorCode::kInvalidArgument,
                     {"bits B=3"});
}

}  // namespace
