// MiniCache (include/kvslim/policy/merge/minicache.h), layer 1 merged with layer 0:
//   - retained tokens are reproduced exactly, merged tokens' magnitudes exactly (f32 and KIVI
//     directions), and their directions are the SLERP of the two layers' (brute-force oracle);
//   - the retained tokens are the least similar pairs;
//   - bytes fall by what the format predicts (one direction page for two layers, plus per
//     layer f32 magnitudes and the retained rows);
//   - attention on the merged pages equals exact double-precision attention over the restored
//     rows, through prefill and decode steps, with GQA;
//   - layer 0 reads its own full-precision tokens until layer 1 has appended them; a pair
//     given different positions is dissolved;
//   - bad input: t, retain, threshold out of range; layer 0; a lower layer with another codec,
//     its own merge stage or eviction; pre-RoPE keys.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "kvslim/kvslim.h"
#include "test_support.h"

using namespace kvslim;
using kvslim::test::expect_error;

namespace {

constexpr int kD = 16, kG = 16, kT = 64;

struct Layers {
  std::vector<float> k0, v0, k1, v1;  // [kT][kD]
  std::vector<int> planted;           // tokens whose two layers point apart
};

// Layer 1 = layer 0 turned slightly and rescaled, except two tokens per page that point
// the other way (these must be the retained ones at retain = 2 / 16).
Layers make_layers(unsigned seed, int d = kD) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> sc(0.5f, 2.0f);
  Layers L;
  for (auto* x : {&L.k0, &L.v0, &L.k1, &L.v1}) x->resize(static_cast<std::size_t>(kT) * d);
  for (float& x : L.k0) x = nd(rng);
  for (float& x : L.v0) x = nd(rng);
  for (int j = 0; j < kT; ++j) {
    const bool apart = j % kG == 3 || j % kG == 11;
    if (apart) L.planted.push_back(j);
    const float a = sc(rng), b = sc(rng);
    for (int c = 0; c < d; ++c) {
      const std::size_t i = static_cast<std::size_t>(j) * d + c;
      L.k1[i] = apart ? -L.k0[i] + 0.3f * nd(rng) : a * (L.k0[i] + 0.2f * nd(rng));
      L.v1[i] = apart ? -L.v0[i] + 0.3f * nd(rng) : b * (L.v0[i] + 0.2f * nd(rng));
    }
  }
  return L;
}

void append(KVCache& c, int layer, const float* k, const float* v, int n, int d) {
  c.append(layer, TensorView<const float>(k, {1, n, d}), TensorView<const float>(v, {1, n, d}));
}

double norm(const float* x, int d) {
  double s = 0;
  for (int c = 0; c < d; ++c) s += double{x[c]} * x[c];
  return std::sqrt(s);
}

// SLERP of the directions of a and b at t (the header's definition), in double.
std::vector<double> slerp(const float* a, const float* b, int d, double t) {
  const double na = norm(a, d), nb = norm(b, d);
  double cosv = 0;
  for (int c = 0; c < d; ++c) cosv += double{a[c]} * b[c] / (na * nb);
  const double om = std::acos(std::max(-1.0, std::min(1.0, cosv))), so = std::sin(om);
  std::vector<double> u(d);
  double n2 = 0;
  for (int c = 0; c < d; ++c) {
    u[c] = std::sin((1 - t) * om) / so * a[c] / na + std::sin(t * om) / so * b[c] / nb;
    n2 += u[c] * u[c];
  }
  for (double& x : u) x /= std::sqrt(n2);
  return u;
}

std::string recipe(const std::string& codec, const std::string& mc = "minicache:t=0.6,retain=0.125") {
  return codec + " ; [layers=1] " + mc + " | " + codec;
}

TEST(MiniCache, RetainedExactMagnitudesExactDirectionsAreTheSlerp) {
  const Layers L = make_layers(1);
  for (const std::string codec : {"f32:group=16", "kivi:kbits=4,vbits=4,group=16,residual=0"}) {
    KVCache c(CacheConfig{2, 1, 1, kD, 128, recipe(codec)});
    append(c, 0, L.k0.data(), L.v0.data(), kT, kD);
    c.flush();
    EXPECT_TRUE(c.store(0, 0).held_for_merge());
    EXPECT_EQ(c.store(0, 0).page_count(), 0) << "layer 0 waits for layer 1";
    append(c, 1, L.k1.data(), L.v1.data(), kT, kD);
    c.flush();
    for (int l : {0, 1}) {
      ASSERT_EQ(c.store(l, 0).merged_pages(), kT / kG) << codec;
      EXPECT_EQ(c.store(l, 0).retained_tokens(), static_cast<std::int64_t>(L.planted.size())) << codec;
    }
    const DenseKV x0 = c.materialize(0, 0), x1 = c.materialize(1, 0);
    for (int j = 0; j < kT; ++j) {
      const std::size_t o = static_cast<std::size_t>(j) * kD;
      const bool planted = std::find(L.planted.begin(), L.planted.end(), j) != L.planted.end();
      const float* orig[4] = {&L.k0[o], &L.v0[o], &L.k1[o], &L.v1[o]};
      const float* got[4] = {&x0.k.data()[o], &x0.v.data()[o], &x1.k.data()[o], &x1.v.data()[o]};
      for (int w = 0; w < 4; ++w) {
        if (planted) {
          for (int ch = 0; ch < kD; ++ch) ASSERT_EQ(got[w][ch], orig[w][ch]) << codec << " retained token " << j;
          continue;
        }
        EXPECT_NEAR(norm(got[w], kD), norm(orig[w], kD), 2e-6 * norm(orig[w], kD))
            << codec << " token " << j << " magnitude " << w;
      }
      if (planted || codec.rfind("f32", 0) != 0) continue;
      // f32 directions are stored exactly: both layers' restored rows point along the SLERP.
      for (int kv = 0; kv < 2; ++kv) {
        const auto u = slerp(kv ? &L.v0[o] : &L.k0[o], kv ? &L.v1[o] : &L.k1[o], kD, 0.6);
        for (const float* r : {kv ? got[1] : got[0], kv ? got[3] : got[2]}) {
          const double n = norm(r, kD);
          for (int ch = 0; ch < kD; ++ch) EXPECT_NEAR(r[ch] / n, u[ch], 1e-6) << "token " << j << " ch " << ch;
        }
      }
    }
  }
}

TEST(MiniCache, ThresholdRetainsThePairsBelowIt) {
  const Layers L = make_layers(5);
  for (const auto& [mc, want] : std::vector<std::pair<std::string, std::size_t>>{
           {"minicache:retain=0", 0}, {"minicache:retain=0,threshold=0", L.planted.size()},
           {"minicache:retain=0,threshold=1", static_cast<std::size_t>(kT)}}) {
    KVCache c(CacheConfig{2, 1, 1, kD, 128, recipe("f32:group=16", mc)});
    append(c, 0, L.k0.data(), L.v0.data(), kT, kD);
    append(c, 1, L.k1.data(), L.v1.data(), kT, kD);
    c.flush();
    EXPECT_EQ(c.store(1, 0).retained_tokens(), static_cast<std::int64_t>(want)) << mc;
  }
}

TEST(MiniCache, BytesFallByWhatTheFormatPredicts) {
  const int d = 64;
  const Layers L = make_layers(2, d);
  const std::string codec = "kivi:kbits=4,vbits=4,group=16,residual=0";
  const std::int64_t pages = kT / kG;
  const std::int64_t page =
      (static_cast<std::int64_t>(build_pipeline(parse_recipe(codec).base, d).codec->page_bytes(kG, d)) + 15) / 16 * 16;
  KVCache plain(CacheConfig{2, 1, 1, d, 128, codec});
  append(plain, 0, L.k0.data(), L.v0.data(), kT, d);
  append(plain, 1, L.k1.data(), L.v1.data(), kT, d);
  plain.flush();
  const CacheStats a = plain.stats();
  for (const char* mc : {"minicache:retain=0", "minicache:retain=0.125"}) {
    KVCache merged(CacheConfig{2, 1, 1, d, 128, recipe(codec, mc)});
    append(merged, 0, L.k0.data(), L.v0.data(), kT, d);
    append(merged, 1, L.k1.data(), L.v1.data(), kT, d);
    merged.flush();
    const CacheStats b = merged.stats();
    const std::int64_t nret = merged.store(1, 0).retained_tokens();
    // Per page pair: one direction page instead of two; per layer and token two f32
    // magnitudes; per layer and retained token its key and value (f32) and a 4-byte slot.
    const std::int64_t predicted = -pages * page + 2 * pages * kG * 2 * 4 + 2 * nret * (2 * d * 4 + 4);
    const std::int64_t measured = b.total_bytes - a.total_bytes;
    std::printf("%s at head_dim %d: bytes %lld -> %lld (shared directions %lld): change %lld, format predicts %lld\n",
                mc, d, static_cast<long long>(a.total_bytes), static_cast<long long>(b.total_bytes),
                static_cast<long long>(b.shared_bytes - a.shared_bytes), static_cast<long long>(measured),
                static_cast<long long>(predicted));
    // Beyond the format: per page pair three small allocations (the shared direction page's
    // control block and each layer's part, vectors included), under 160 bytes each.
    EXPECT_GE(measured, predicted) << mc;
    EXPECT_LE(measured, predicted + pages * 3 * 160) << mc;
    // The shared part is counted once, in shared_bytes, and in neither layer.
    EXPECT_GE(b.shared_bytes - a.shared_bytes, pages * page) << mc;
    if (nret == 0) {
      EXPECT_LT(measured, -pages * page / 2) << "merging without retention saves most of a page per pair";
      EXPECT_LT(b.layer_bytes(0) + b.layer_bytes(1), a.layer_bytes(0) + a.layer_bytes(1) - pages * page);
    }
  }
}

TEST(MiniCache, AttentionEqualsExactAttentionOverTheRestoredRows) {
  const Layers L = make_layers(3);
  const int qh = 2;
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (const std::string codec : {"f32:group=16,residual=8", "kivi:kbits=2,vbits=2,group=16,residual=8"}) {
    KVCache c(CacheConfig{2, qh, 1, kD, 128, recipe(codec)});
    const int prompt = 40;
    std::vector<float> q(static_cast<std::size_t>(qh) * kT * kD), out(q.size()), ref(kD);
    for (float& x : q) x = nd(rng);
    double worst = 0;
    auto check = [&](const DenseKV& x, int layer, int t0, int n) {
      const int held = static_cast<int>(x.positions.size());
      for (int h = 0; h < qh; ++h)
        for (int i = 0; i < n; ++i) {
          // Query i of the chunk sees the tokens up to t0 + i (all held tokens are ordinary).
          test::ref_attention(q.data() + (static_cast<std::size_t>(h) * n + i) * kD, x.k.data(), x.v.data(),
                              held - n + i + 1, kD, kD, 1.0 / std::sqrt(kD), ref.data());
          for (int ch = 0; ch < kD; ++ch) {
            const double e = std::fabs(out[(static_cast<std::size_t>(h) * n + i) * kD + ch] - ref[ch]);
            worst = std::max(worst, e);
            ASSERT_NEAR(out[(static_cast<std::size_t>(h) * n + i) * kD + ch], ref[ch], 2e-5)
                << codec << " layer " << layer << " step " << t0 + i << " head " << h << " ch " << ch;
          }
        }
    };
    for (int t = 0; t < kT;) {
      const int n = t == 0 ? prompt : 1;
      for (int l : {0, 1}) {
        const auto& k = l ? L.k1 : L.k0;
        const auto& v = l ? L.v1 : L.v0;
        append(c, l, k.data() + static_cast<std::size_t>(t) * kD, v.data() + static_cast<std::size_t>(t) * kD, n, kD);
        // What the step's queries see: pages merged at earlier steps (layer 0's at layer 1's
        // previous attend), the full-precision window (attend() seals and merges after).
        const DenseKV x = c.materialize(l, 0);
        c.attend(l, TensorView<const float>(q.data(), {qh, n, kD}), TensorView<float>(out.data(), {qh, n, kD}));
        check(x, l, t, n);
      }
      t += n;
    }
    EXPECT_GT(c.store(1, 0).merged_pages(), 0) << codec;
    std::printf("%s: worst |attention - exact over restored rows| %.2e\n", codec.c_str(), worst);
  }
}

TEST(MiniCache, PairGivenDifferentPositionsIsDissolved) {
  const Layers L = make_layers(4);
  KVCache c(CacheConfig{2, 1, 1, kD, 256, recipe("f32:group=16")});
  std::vector<std::int64_t> p0(kT), p1(kT);
  for (int j = 0; j < kT; ++j) {
    p0[j] = j;
    p1[j] = 2 * j;
  }
  c.append(0, TensorView<const float>(L.k0.data(), {1, kT, kD}), TensorView<const float>(L.v0.data(), {1, kT, kD}), p0);
  c.append(1, TensorView<const float>(L.k1.data(), {1, kT, kD}), TensorView<const float>(L.v1.data(), {1, kT, kD}), p1);
  c.flush();
  c.flush();  // layer 0 seals on its own once released
  for (int l : {0, 1}) {
    EXPECT_EQ(c.store(l, 0).merged_pages(), 0);
    EXPECT_EQ(c.store(l, 0).page_count(), kT / kG);
  }
  EXPECT_FALSE(c.store(0, 0).held_for_merge());
  // reset() pairs them again.
  c.reset();
  EXPECT_TRUE(c.store(0, 0).held_for_merge());
  append(c, 0, L.k0.data(), L.v0.data(), kT, kD);
  append(c, 1, L.k1.data(), L.v1.data(), kT, kD);
  c.flush();
  EXPECT_EQ(c.store(1, 0).merged_pages(), kT / kG);
}

TEST(MiniCache, Errors) {
  auto make = [](std::string r, int layers = 2, bool pre = false) {
    return [r, layers, pre] {
      CacheConfig c{layers, 1, 1, 16, 64, r};
      if (pre) {
        c.pre_rope_keys = true;
        c.rope = RopeSpec{};
      }
      KVCache x(c);
    };
  };
  expect_error(make(recipe("f32", "minicache:t=1.5")), ErrorCode::kInvalidArgument, {"t", "1.5"});
  expect_error(make(recipe("f32", "minicache:retain=-0.1")), ErrorCode::kInvalidArgument, {"retain", "-0.1"});
  expect_error(make(recipe("f32", "minicache:threshold=2")), ErrorCode::kInvalidArgument, {"threshold", "2"});
  expect_error(make("f32 ; [layers=0] minicache | f32"), ErrorCode::kInvalidArgument, {"layer 0"});
  expect_error(make("f16 ; [layers=1] minicache | f32"), ErrorCode::kInvalidArgument,
               {"layer 0", "codec is 'f16", "layer 1's is 'f32"});
  expect_error(make("f32 ; [layers=1-2] minicache | f32", 3), ErrorCode::kInvalidArgument,
               {"layer 2", "merge stage of its own", "every other layer"});
  expect_error(make("h2o:budget=32 | f32 ; [layers=1] minicache | f32"), ErrorCode::kInvalidArgument,
               {"eviction", "h2o:budget=32"});
  expect_error(make("f32 ; [layers=1] h2o:budget=32 | minicache | f32"), ErrorCode::kInvalidArgument,
               {"eviction", "h2o:budget=32"});
  expect_error(make(recipe("f32"), 2, true), ErrorCode::kInvalidArgument, {"pre-RoPE", "minicache"});
  EXPECT_NO_THROW(make("f32 ; [layers=1,3] minicache | f32", 4)());
}

}  // namespace
