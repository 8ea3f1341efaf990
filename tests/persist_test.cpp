// Saved caches (KVCache::save / load, docs/formats.md "Saved cache"):
//   - round trip for every codec and policy family (and their compositions, overrides,
//     pre-RoPE keys, MiniCache's shared pages, CQ codebooks): the loaded cache saves to the
//     same bytes, holds the same tokens and positions, materializes bit for bit the same rows,
//     and decoding on from both gives bit-identical attention outputs and the same evictions;
//   - every truncation point and a flipped bit in every byte of a small saved cache are
//     detected (Error, kFormat or kVersion), and leave the target cache as it was;
//   - payloads changed behind valid checksums never crash (Error or a usable cache);
//   - a future version, a different config, recipe or codebooks, unreadable paths: typed
//     errors naming what is wrong.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kvslim/kvslim.h"
#include "kvslim/policy/codebook.h"
#include "kvslim/testing/synthetic.h"
#include "test_support.h"

using namespace kvslim;
using kvslim::test::expect_error;

namespace {

constexpr int kLayers = 2, kQ = 4, kKv = 2, kD = 32;

struct Data {
  std::vector<kvslim::testing::SyntheticLayer> layers;
  int tokens = 0;
};

Data make_data(int tokens, std::uint64_t seed) {
  kvslim::testing::SyntheticOptions o;
  o.q_heads = kQ;
  o.kv_heads = kKv;
  o.head_dim = kD;
  o.tokens = tokens;
  o.seed = seed;
  o.outlier_channels = 2;
  Data d;
  d.tokens = tokens;
  for (int l = 0; l < kLayers; ++l) d.layers.push_back(kvslim::testing::generate_layer(o, l));
  // MiniCache merges two layers' similar tokens: make layer 1 a perturbed copy of layer 0.
  std::mt19937 rng(static_cast<unsigned>(seed));
  std::normal_distribution<float> nd(0.0f, 0.05f);
  for (std::size_t i = 0; i < d.layers[1].k.size(); ++i) {
    d.layers[1].k[i] = d.layers[0].k[i] * 1.1f + nd(rng);
    d.layers[1].v[i] = d.layers[0].v[i] * 0.9f + nd(rng);
  }
  return d;
}

std::shared_ptr<const Codebooks> random_codebooks(std::uint64_t seed) {
  auto cb = std::make_shared<Codebooks>(kLayers, kKv, kD, CodebookShape{4, 2}, CodebookShape{4, 2});
  std::mt19937 rng(static_cast<unsigned>(seed));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKv; ++h)
      for (bool v : {false, true})
        for (int g = 0; g < cb->groups(v); ++g) {
          float* c = cb->mutable_centroids(l, h, v, g);
          for (int i = 0; i < cb->centroid_count(v) * 4; ++i) c[i] = nd(rng);
        }
  return cb;
}

CacheConfig config(const std::string& recipe) {
  CacheConfig c;
  c.layers = kLayers;
  c.q_heads = kQ;
  c.kv_heads = kKv;
  c.head_dim = kD;
  c.max_tokens = 1024;
  c.recipe = recipe;
  return c;
}

// Appends tokens [t0, t1) to every layer in one chunk and attends with all their queries;
// returns the outputs of every layer, concatenated.
std::vector<float> step(KVCache& c, const Data& d, int t0, int t1) {
  const int n = t1 - t0;
  std::vector<float> all;
  for (int l = 0; l < kLayers; ++l) {
    const kvslim::testing::SyntheticLayer& L = d.layers[static_cast<std::size_t>(l)];
    Layout kl;
    kl.rank = 3;
    kl.shape = {kKv, n, kD, 0};
    kl.strides = {static_cast<std::int64_t>(d.tokens) * kD, kD, 1, 0};
    Layout ql = kl;
    ql.shape[0] = kQ;
    const std::size_t off = static_cast<std::size_t>(t0) * kD;
    c.append(l, TensorView<const float>(L.k.data() + off, kl), TensorView<const float>(L.v.data() + off, kl));
    std::vector<float> out(static_cast<std::size_t>(kQ) * n * kD);
    c.attend(l, TensorView<const float>(L.q.data() + off, ql), TensorView<float>(out.data(), {kQ, n, kD}));
    all.insert(all.end(), out.begin(), out.end());
  }
  return all;
}

// Prefill of `prefill` tokens in chunks of 40, then decode steps up to `upto`.
void feed(KVCache& c, const Data& d, int prefill, int upto) {
  for (int t = 0; t < prefill; t += 40) step(c, d, t, std::min(prefill, t + 40));
  for (int t = prefill; t < upto; ++t) step(c, d, t, t + 1);
}

std::string saved(KVCache& c) {
  std::ostringstream os(std::ios::binary);
  c.save(os);
  return os.str();
}

void load(KVCache& c, const std::string& bytes) {
  std::istringstream is(bytes, std::ios::binary);
  c.load(is);
}

bool same_floats(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void expect_same_contents(const KVCache& a, const KVCache& b, bool just_loaded) {
  const CacheStats sa = a.stats(), sb = b.stats();
  EXPECT_EQ(sa.total_tokens, sb.total_tokens);
  EXPECT_EQ(sa.total_seen, sb.total_seen);
  EXPECT_EQ(sa.outlier_bytes, sb.outlier_bytes);
  // Containers are rebuilt at their size, position lists in their canonical coding: right
  // after the load, never more bytes than the cache that was saved (later they grow apart).
  if (just_loaded) {
    EXPECT_LE(sb.total_bytes, sa.total_bytes);
  }
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKv; ++h) {
      ASSERT_EQ(a.positions(l, h), b.positions(l, h)) << "layer " << l << " head " << h;
      const DenseKV x = a.materialize(l, h), y = b.materialize(l, h);
      ASSERT_EQ(x.k.numel(), y.k.numel());
      EXPECT_EQ(std::memcmp(x.k.data(), y.k.data(), static_cast<std::size_t>(x.k.numel()) * sizeof(float)), 0);
      EXPECT_EQ(std::memcmp(x.v.data(), y.v.data(), static_cast<std::size_t>(x.v.numel()) * sizeof(float)), 0);
      EXPECT_EQ(x.log_weights, y.log_weights);
      const TokenStore &s = a.store(l, h), &t = b.store(l, h);
      EXPECT_EQ(s.page_count(), t.page_count());
      EXPECT_EQ(s.window_count(), t.window_count());
      EXPECT_EQ(s.demoted(), t.demoted());
      EXPECT_EQ(s.specials(), t.specials());
      EXPECT_EQ(s.merged_pages(), t.merged_pages());
      EXPECT_EQ(s.retained_tokens(), t.retained_tokens());
      EXPECT_EQ(s.compensated(), t.compensated());
      EXPECT_EQ(s.repacked_pages(), t.repacked_pages());
      ASSERT_EQ(s.importance().size(), t.importance().size());
      EXPECT_EQ(std::memcmp(s.importance().data(), t.importance().data(), s.importance().size() * sizeof(float)), 0);
    }
}

struct RoundTrip {
  std::string name, recipe;
  bool pre_rope = false;
  bool codebooks = false;
};

class PersistRoundTrip : public ::testing::TestWithParam<RoundTrip> {};

TEST_P(PersistRoundTrip, SameBytesSameContentsSameDecoding) {
  const RoundTrip& p = GetParam();
  const Data d = make_data(360, 7);
  CacheConfig cfg = config(p.recipe);
  if (p.pre_rope) {
    cfg.pre_rope_keys = true;
    cfg.rope = RopeSpec{};
  }
  if (p.codebooks) cfg.codebooks = random_codebooks(3);
  KVCache a(cfg);
  feed(a, d, 200, 320);
  // The state each family adds is really there to be saved.
  std::int64_t merged = 0, demoted = 0, specials = 0, dead = 0, seen = 0, held = 0;
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKv; ++h) {
      const TokenStore& st = a.store(l, h);
      merged += st.merged_pages();
      demoted += st.demoted_encoded();
      specials += st.specials();
      dead += st.page_slots() - st.sealed_tokens();
      seen += st.seen();
      held += st.size();
    }
  const bool mini = p.name == "minicache", mikv = p.name.find("mikv") != std::string::npos;
  const bool merging = p.name == "razor" || p.name == "kvmerger";
  const bool masking = p.name == "h2o" || p.name == "l2norm" || p.name == "random";
  EXPECT_TRUE(!mini || merged > 0);
  EXPECT_TRUE(!mikv || demoted > 0);
  EXPECT_TRUE(!merging || specials > 0);
  EXPECT_TRUE(!masking || dead > 0) << "no masked slots";
  EXPECT_TRUE(held <= seen);
  const std::string s1 = saved(a);
  cfg.threads = 2;  // threads may differ between the saving and the loading cache
  KVCache b(cfg);
  feed(b, d, 40, 60);  // holds something else before the load
  load(b, s1);
  EXPECT_EQ(saved(b), s1) << "a loaded cache saves to different bytes";
  expect_same_contents(a, b, true);
  // Decoding on: bit-identical outputs, evictions and merges, step by step.
  for (int t = 320; t < 360; ++t) {
    const std::vector<float> oa = step(a, d, t, t + 1), ob = step(b, d, t, t + 1);
    ASSERT_TRUE(same_floats(oa, ob)) << "outputs differ at step " << t;
  }
  expect_same_contents(a, b, false);
  EXPECT_EQ(saved(a), saved(b));
}

const std::string kKivi = "kivi:kbits=4,vbits=2,group=16,residual=16";
const std::string kLo = "lo=(kivi:kbits=2,vbits=2,group=16)";

INSTANTIATE_TEST_SUITE_P(
    EveryFamily, PersistRoundTrip,
    ::testing::Values(
        RoundTrip{"f32", "f32:group=16,residual=8"}, RoundTrip{"f16", "f16"}, RoundTrip{"bf16", "bf16:sinks=2"},
        RoundTrip{"kivi2", "kivi:kbits=2,vbits=2,group=16,residual=16"},
        RoundTrip{"kivi_sinks", "kivi:kbits=4,vbits=4,group=16,residual=0,sinks=4"},
        RoundTrip{"kivi_q8", "kivi:kbits=4,vbits=4,group=32,residual=16,qbits=8"},
        RoundTrip{"kivi_outliers", "kivi:kbits=2,vbits=2,group=16,residual=16,outliers=0.02"},
        RoundTrip{"kivi_hadamard", kKivi + ",rotate=hadamard"}, RoundTrip{"nuq", "nuq:kbits=3,vbits=3,group=16,residual=16"},
        RoundTrip{"cq", "cq:channels=4,bits=2,group=16,residual=16", false, true},
        RoundTrip{"pre_rope", kKivi, true}, RoundTrip{"h2o", "h2o:budget=96,recent=32 | " + kKivi},
        RoundTrip{"streaming", "streaming:sinks=4,window=60 | f16"},
        RoundTrip{"l2norm", "l2norm:budget=80 | f32:group=16"},
        RoundTrip{"snapkv", "snapkv:budget=100,window=16 | f16"},
        RoundTrip{"random", "random:budget=90,seed=3 | bf16"},
        RoundTrip{"razor", "razor:sinks=4,window=60 | " + kKivi},
        RoundTrip{"mikv", "mikv:budget=64,recent=16," + kLo + " | kivi:kbits=8,vbits=8,group=16,residual=16"},
        RoundTrip{"zipcache_mikv_total", "zipcache | mikv:budget=48," + kLo + ",total=120 | f16:group=16"},
        RoundTrip{"kvmerger", "kvmerger:budget=96,threshold=0.5 | f32:group=16"},
        RoundTrip{"minicache", kKivi + " ; [layers=1] minicache:t=0.5,retain=0.1 | " + kKivi},
        RoundTrip{"overrides", "h2o:budget=96 | " + kKivi + " ; [layers=1 heads=0] f16"}),
    [](const ::testing::TestParamInfo<RoundTrip>& i) { return i.param.name; });

// A small cache whose file covers every section kind: sinks, pages with dead slots, window,
// demoted pages and rows, specials (none here: see the round trips), scores.
struct Small {
  CacheConfig cfg = config("h2o:budget=40,recent=8 | kivi:kbits=2,vbits=2,group=8,residual=8,sinks=2");
  Data d = make_data(80, 11);
};

// The target of failed loads holds something else; it must be left exactly as it was.
void expect_unchanged(KVCache& target, const std::string& before) { EXPECT_EQ(saved(target), before); }

TEST(PersistCorruption, EveryTruncationIsDetected) {
  Small s;
  KVCache a(s.cfg);
  feed(a, s.d, 40, 70);
  const std::string file = saved(a);
  KVCache b(s.cfg);
  feed(b, s.d, 20, 25);
  const std::string before = saved(b);
  const std::int64_t tokens = b.stats().total_tokens;
  int detected = 0;
  for (std::size_t n = 0; n < file.size(); ++n) {
    try {
      load(b, file.substr(0, n));
    } catch (const Error& e) {
      if (e.code() == ErrorCode::kFormat) ++detected;
      ASSERT_EQ(b.stats().total_tokens, tokens);
      continue;
    }
    ADD_FAILURE() << "a file truncated to " << n << " of " << file.size() << " bytes loaded";
  }
  EXPECT_EQ(detected, static_cast<int>(file.size()));
  expect_unchanged(b, before);
  std::printf("truncations detected: %d of %zu\n", detected, file.size());
}

TEST(PersistCorruption, AFlippedBitAnywhereIsDetected) {
  Small s;
  KVCache a(s.cfg);
  feed(a, s.d, 40, 70);
  const std::string file = saved(a);
  KVCache b(s.cfg);
  feed(b, s.d, 20, 25);
  const std::string before = saved(b);
  int detected = 0;
  for (std::size_t i = 0; i < file.size(); ++i) {
    std::string bad = file;
    bad[i] = static_cast<char>(bad[i] ^ (1 << (i % 8)));
    try {
      load(b, bad);
    } catch (const Error& e) {
      if (e.code() == ErrorCode::kFormat || e.code() == ErrorCode::kVersion) ++detected;
      continue;
    }
    ADD_FAILURE() << "a file with bit " << i % 8 << " of byte " << i << " flipped loaded";
  }
  EXPECT_EQ(detected, static_cast<int>(file.size()));
  expect_unchanged(b, before);
  std::printf("flipped bits detected: %d of %zu\n", detected, file.size());
}

// Re-checksums a file after its sections' payloads were changed (the layout of
// docs/formats.md), so that the loader's own checks are what must catch the change.
std::string rechecksum(std::string f) {
  std::size_t pos = 16;
  while (pos + 12 <= f.size()) {
    std::uint64_t len = 0;
    std::memcpy(&len, f.data() + pos + 4, 8);
    if (pos + 12 + len + 8 > f.size()) break;
    const std::uint64_t sum = xxhash64(f.data() + pos + 12, len, xxhash64(f.data() + pos, 12, 0x6b76736c696d3031ull));
    std::memcpy(f.data() + pos + 12 + len, &sum, 8);
    pos += 12 + len + 8;
  }
  return f;
}

TEST(PersistCorruption, ChangedPayloadsBehindValidChecksumsNeverCrash) {
  for (const char* recipe : {"h2o:budget=40,recent=8 | kivi:kbits=2,vbits=2,group=8,residual=8,sinks=2",
                             "mikv:budget=24,recent=8,lo=(kivi:kbits=2,vbits=2,group=8) | f16:group=8",
                             "kivi:kbits=2,vbits=2,group=8,residual=8,outliers=0.05",
                             "f16:group=8 ; [layers=1] minicache:retain=0.2 | f16:group=8",
                             "razor:sinks=2,window=20 | f32:group=8"}) {
    SCOPED_TRACE(recipe);
    Small s;
    s.cfg.recipe = recipe;
    KVCache a(s.cfg);
    feed(a, s.d, 40, 70);
    const std::string file = saved(a);
    std::mt19937 rng(5);
    int rejected = 0, loaded = 0;
    const std::size_t stride = std::max<std::size_t>(1, file.size() / 1200);
    for (std::size_t i = 16; i < file.size(); i += stride) {
      std::string bad = file;
      bad[i] = static_cast<char>(bad[i] ^ static_cast<char>(1 + rng() % 255));
      bad = rechecksum(bad);
      KVCache b(s.cfg);
      try {
        load(b, bad);
      } catch (const Error&) {
        ++rejected;
        continue;
      }
      ++loaded;  // a change the format cannot tell from data (a float, a code): must be usable
      std::vector<float> out = step(b, s.d, 70, 71);
      (void)out;
      (void)saved(b);
    }
    EXPECT_GT(rejected, 0);
    std::printf("%s: %d changed payloads rejected, %d loaded as data\n", recipe, rejected, loaded);
  }
}

TEST(PersistErrors, FutureVersionConfigRecipeCodebooksAndPaths) {
  Small s;
  KVCache a(s.cfg);
  feed(a, s.d, 40, 50);
  const std::string file = saved(a);

  std::string future = file;
  future[8] = 2;
  KVCache b(s.cfg);
  expect_error([&] { load(b, future); }, ErrorCode::kVersion, {"format version 2", "newer"});
  expect_error([&] { load(b, "not a cache at all"); }, ErrorCode::kFormat, {"not a kvslim saved cache"});
  expect_error([&] { load(b, file + "x"); }, ErrorCode::kFormat, {"bytes follow the END section"});

  CacheConfig other = s.cfg;
  other.max_tokens = 512;
  KVCache c1(other);
  expect_error([&] { load(c1, file); }, ErrorCode::kMismatch, {"max_tokens", "1024", "512"});
  other = s.cfg;
  other.recipe = "h2o:budget=40,recent=8 | kivi:kbits=4,vbits=2,group=8,residual=8,sinks=2";
  KVCache c2(other);
  expect_error([&] { load(c2, file); }, ErrorCode::kMismatch, {"layer 0 kv head 0", "kbits=2", "kbits=4"});
  other = s.cfg;
  other.layers = 3;
  KVCache c3(other);
  expect_error([&] { load(c3, file); }, ErrorCode::kMismatch, {"layers is 2 in the file but 3 here"});
  // An equivalent recipe text (same chains) is fine.
  other = s.cfg;
  other.recipe = "h2o:recent=8,budget=40 | kivi:vbits=2,kbits=2,residual=8,group=8,sinks=2";
  KVCache c4(other);
  EXPECT_NO_THROW(load(c4, file));

  CacheConfig cq = config("cq:channels=4,bits=2,group=16,residual=16");
  cq.codebooks = random_codebooks(1);
  KVCache q1(cq);
  feed(q1, s.d, 40, 50);
  const std::string qfile = saved(q1);
  cq.codebooks = random_codebooks(2);
  KVCache q2(cq);
  expect_error([&] { load(q2, qfile); }, ErrorCode::kMismatch, {"codebooks", "fingerprint"});

  expect_error([&] { b.load(std::string("/nonexistent/dir/cache.kvs")); }, ErrorCode::kIo,
               {"/nonexistent/dir/cache.kvs"});
  expect_error([&] { a.save(std::string("/nonexistent/dir/cache.kvs")); }, ErrorCode::kIo, {"/nonexistent/dir"});
}

TEST(PersistFiles, PathOverloadsRoundTrip) {
  Small s;
  KVCache a(s.cfg);
  feed(a, s.d, 40, 60);
  const std::string path = ::testing::TempDir() + "persist_test_cache.kvs";
  a.save(path);
  KVCache b(s.cfg);
  b.load(path);
  EXPECT_EQ(saved(b), saved(a));
  std::remove(path.c_str());
}

}  // namespace
