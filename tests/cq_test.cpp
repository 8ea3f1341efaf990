// The cq codec (coupled quantization with learned codebooks) inside a KVCache:
//   - every stored group is the nearest centroid of its own (layer, kv head, K/V, group)
//     codebook (brute-force argmin in double over the codebook), so materialize() returns
//     centroids and never mixes heads up;
//   - page bytes are exactly the format's (ntok codes, no metadata; B bits per channel), and
//     the codebooks are reported apart in stats().codebook_bytes;
//   - codebooks from a file (cq:...,codebooks=FILE) give the same bytes and outputs as the
//     same codebooks passed through CacheConfig; the canonical text re-parses;
//   - split-KV threads give one thread's results; every ISA table gives the scalar's within
//     float tolerance (attention against the double reference is in prefill_reference_test);
//   - errors: no codebooks, a codebook file for another shape or model, a missing or corrupted
//     file, shapes outside C·B <= 8.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <tuple>
#include <unistd.h>
#include <vector>

#include "kvslim/cpu/isa.h"
#include "kvslim/kernels/kernel_table.h"
#include "kvslim/kvslim.h"
#include "test_support.h"

using namespace kvslim;
using kvslim::test::expect_error;

namespace {

constexpr int kLayers = 2, kKv = 2, kQ = 4;

std::vector<float> normal(std::mt19937& rng, std::size_t n, float sd = 1.0f) {
  std::normal_distribution<float> nd(0.0f, sd);
  std::vector<float> x(n);
  for (float& f : x) f = nd(rng);
  return x;
}

// Codebooks trained on random rows; head (l, h) rows are shifted by 3·(l·kKv + h) so every
// head's codebook is different and a head that read another's would decode far off.
std::shared_ptr<const Codebooks> make_codebooks(int d, CodebookShape ks, CodebookShape vs) {
  std::mt19937 rng(5);
  const int rows = 600;
  std::vector<std::vector<float>> data;
  CalibrationKV cal(kLayers, kKv, d);
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKv; ++h) {
      auto k = normal(rng, static_cast<std::size_t>(rows) * d), v = normal(rng, k.size());
      for (float& x : k) x += 3.0f * static_cast<float>(l * kKv + h);
      for (float& x : v) x -= 3.0f * static_cast<float>(l * kKv + h);
      data.push_back(std::move(k));
      data.push_back(std::move(v));
      cal.set(l, h, {data[data.size() - 2].data(), data.back().data(), rows, nullptr, nullptr});
    }
  return std::make_shared<const Codebooks>(train_codebooks(cal, ks, vs));
}

struct Rows {
  std::vector<float> k, v;  // [layer][kv][n][d]
};
Rows make_rows(int n, int d, unsigned seed) {
  std::mt19937 rng(seed);
  Rows r{normal(rng, static_cast<std::size_t>(kLayers) * kKv * n * d), {}};
  r.v = normal(rng, r.k.size());
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKv; ++h)
      for (int j = 0; j < n * d; ++j) {
        const std::size_t i = (static_cast<std::size_t>(l * kKv + h) * n) * d + j;
        r.k[i] += 3.0f * static_cast<float>(l * kKv + h);
        r.v[i] -= 3.0f * static_cast<float>(l * kKv + h);
      }
  return r;
}

void fill(KVCache& c, const Rows& r, int n, int d) {
  for (int l = 0; l < kLayers; ++l) {
    const std::size_t off = static_cast<std::size_t>(l) * kKv * n * d;
    c.append(l, TensorView<const float>(r.k.data() + off, {kKv, n, d}),
             TensorView<const float>(r.v.data() + off, {kKv, n, d}));
  }
  c.flush();
}

// Brute force: the centroid of `cb` nearest to x (double precision, lowest index on ties).
const float* nearest_bf(const float* x, const float* cen, int count, int C) {
  int best = 0;
  double bd = INFINITY;
  for (int k = 0; k < count; ++k) {
    double dd = 0.0;
    for (int c = 0; c < C; ++c) dd += std::pow(static_cast<double>(x[c]) - cen[k * C + c], 2);
    if (dd < bd) bd = dd, best = k;
  }
  return cen + best * C;
}

std::string tmp_file(const char* name) {
  return (std::filesystem::temp_directory_path() / fmt::format("kvslim_cq_{}_{}", ::getpid(), name)).string();
}

}  // namespace

TEST(Cq, StoredGroupsAreTheNearestCentroidOfTheirOwnHead) {
  struct Shape {
    CodebookShape k, v;
  };
  for (const Shape s : {Shape{{4, 2}, {4, 2}}, Shape{{8, 1}, {2, 2}}, Shape{{1, 1}, {2, 4}}, Shape{{2, 1}, {1, 2}}}) {
    const int d = 16, n = 70;  // 2 pages of 32 and 6 tokens in the window (residual 0)
    SCOPED_TRACE(fmt::format("K C={} B={}, V C={} B={}", s.k.channels, s.k.bits, s.v.channels, s.v.bits));
    const auto cb = make_codebooks(d, s.k, s.v);
    CacheConfig cfg{kLayers, kQ, kKv, d, 256,
                    fmt::format("cq:kchannels={},kbits={},vchannels={},vbits={},residual=0", s.k.channels, s.k.bits,
                                s.v.channels, s.v.bits)};
    cfg.codebooks = cb;
    KVCache cache(cfg);
    const Rows r = make_rows(n, d, 11);
    fill(cache, r, n, d);
    for (int l = 0; l < kLayers; ++l)
      for (int h = 0; h < kKv; ++h) {
        const DenseKV kv = cache.materialize(l, h);
        ASSERT_EQ(kv.positions.size(), static_cast<std::size_t>(n));
        const std::size_t base = static_cast<std::size_t>(l * kKv + h) * n * d;
        const int sealed = n / 32 * 32;
        for (int j = 0; j < n; ++j)
          for (int pass = 0; pass < 2; ++pass) {
            const bool val = pass == 1;
            const CodebookShape sh = val ? s.v : s.k;
            const float* x = (val ? r.v : r.k).data() + base + static_cast<std::size_t>(j) * d;
            const float* got = (val ? kv.v : kv.k).data() + static_cast<std::size_t>(j) * d;
            for (int g = 0; g < d / sh.channels; ++g) {
              const float* want = j < sealed ? nearest_bf(x + g * sh.channels, cb->centroids(l, h, val, g),
                                                          sh.centroids(), sh.channels)
                                             : x + g * sh.channels;  // the window is full precision
              for (int c = 0; c < sh.channels; ++c)
                ASSERT_EQ(got[g * sh.channels + c], want[c])
                    << "layer " << l << " head " << h << " token " << j << (val ? " V" : " K") << " group " << g;
            }
          }
      }
  }
}

TEST(Cq, PageBytesAreCodesOnlyAndCodebooksAreReportedApart) {
  const int d = 64, n = 256;
  for (const auto& [ks, vs, bits] : {std::tuple{CodebookShape{4, 2}, CodebookShape{4, 2}, 2.0},
                                     std::tuple{CodebookShape{8, 1}, CodebookShape{8, 1}, 1.0},
                                     std::tuple{CodebookShape{4, 1}, CodebookShape{2, 2}, 1.5}}) {
    const auto cb = make_codebooks(d, ks, vs);
    CacheConfig cfg{kLayers, kQ, kKv, d, n,
                    fmt::format("cq:kchannels={},kbits={},vchannels={},vbits={},residual=0", ks.channels, ks.bits,
                                vs.channels, vs.bits)};
    cfg.codebooks = cb;
    KVCache cache(cfg);
    fill(cache, make_rows(n, d, 3), n, d);
    const CacheStats st = cache.stats();
    // Codes only: n tokens x d channels x B bits for K and for V, per head.
    const double code_bytes = n * d * (ks.bits + vs.bits) / 8.0;
    for (const HeadStats& h : st.heads) {
      EXPECT_GE(h.bytes, code_bytes);
      EXPECT_LT(h.bytes, code_bytes * 1.25 + 512) << "bookkeeping should be small next to the codes";
    }
    EXPECT_NEAR(st.bits_per_value, bits, bits * 0.25 + 0.3);
    EXPECT_EQ(st.codebook_bytes, static_cast<std::int64_t>(cb->data().size() * 4));
    EXPECT_EQ(cb->data().size(), static_cast<std::size_t>(kLayers * kKv * d) *
                                     (static_cast<std::size_t>(ks.centroids()) + vs.centroids()));
  }
}

TEST(Cq, CodebookFileEqualsConfigCodebooksAndTextReparses) {
  const int d = 16, n = 100;
  const auto cb = make_codebooks(d, {4, 2}, {4, 2});
  const std::string path = tmp_file("file.kvcb");
  save_codebooks(*cb, path);
  CacheConfig a{kLayers, kQ, kKv, d, n, "cq:channels=4,bits=2,group=16,residual=8"};
  a.codebooks = cb;
  CacheConfig b{kLayers, kQ, kKv, d, n, "cq:channels=4,bits=2,group=16,residual=8,codebooks=" + path};
  KVCache ca(a), cbf(b);
  EXPECT_EQ(ca.recipe_for(1, 1), "cq:channels=4,bits=2,group=16,residual=8,sinks=0");
  EXPECT_EQ(cbf.recipe_for(0, 0), "cq:channels=4,bits=2,group=16,residual=8,sinks=0,codebooks=" + path);
  // The canonical text builds the same cache.
  KVCache again(CacheConfig{kLayers, kQ, kKv, d, n, cbf.recipe_for(0, 0)});
  const Rows r = make_rows(n, d, 4);
  fill(ca, r, n, d);
  fill(cbf, r, n, d);
  fill(again, r, n, d);
  std::mt19937 rng(2);
  const auto q = normal(rng, static_cast<std::size_t>(kQ) * d);
  for (int l = 0; l < kLayers; ++l) {
    std::vector<float> oa(kQ * d), ob(kQ * d), oc(kQ * d);
    ca.attend(l, TensorView<const float>(q.data(), {kQ, 1, d}), TensorView<float>(oa.data(), {kQ, 1, d}));
    cbf.attend(l, TensorView<const float>(q.data(), {kQ, 1, d}), TensorView<float>(ob.data(), {kQ, 1, d}));
    again.attend(l, TensorView<const float>(q.data(), {kQ, 1, d}), TensorView<float>(oc.data(), {kQ, 1, d}));
    EXPECT_EQ(oa, ob);
    EXPECT_EQ(oa, oc);
  }
  EXPECT_EQ(ca.stats().total_bytes, cbf.stats().total_bytes);
  // One file named by every head is one Codebooks.
  EXPECT_EQ(cbf.stats().codebook_bytes, static_cast<std::int64_t>(cb->data().size() * 4));
  std::filesystem::remove(path);
}

TEST(Cq, ThreadsAndIsasAgree) {
  // MQA with one kv head and 4 threads: one head's pages are split into ranges (split-KV),
  // each range finishing its own weight sums.
  const int d = 64, n = 2000;
  std::mt19937 rng(8);
  CalibrationKV cal(1, 1, d);
  const auto ck = normal(rng, 512u * d), cv = normal(rng, 512u * d);
  cal.set(0, 0, {ck.data(), cv.data(), 512, nullptr, nullptr});
  auto cb = std::make_shared<const Codebooks>(train_codebooks(cal, {4, 2}, {2, 2}));
  const auto k = normal(rng, static_cast<std::size_t>(n) * d), v = normal(rng, k.size());
  const auto q = normal(rng, 8u * d, 2.0f);
  auto run = [&](int threads, Isa isa) {
    set_active_isa(isa);
    CacheConfig cfg{1, 8, 1, d, n, "cq:kchannels=4,kbits=2,vchannels=2,vbits=2,group=32,residual=64"};
    cfg.codebooks = cb;
    cfg.threads = threads;
    KVCache c(cfg);
    c.append(0, TensorView<const float>(k.data(), {1, n, d}), TensorView<const float>(v.data(), {1, n, d}));
    c.flush();
    std::vector<float> o(8u * d);
    c.attend(0, TensorView<const float>(q.data(), {8, 1, d}), TensorView<float>(o.data(), {8, 1, d}));
    return o;
  };
  const Isa before = active_isa();
  const auto one = run(1, Isa::kScalar);
  for (Isa isa : available_isas()) {
    for (int t : {1, 4}) {
      const auto o = run(t, isa);
      EXPECT_LT(kvslim::test::rel_l2(o.data(), one.data(), static_cast<long>(o.size())), 2e-6)
          << isa_name(isa) << " threads " << t;
    }
  }
  set_active_isa(before);
}

TEST(Cq, Errors) {
  const int d = 16;
  const auto cb = make_codebooks(d, {4, 2}, {4, 2});
  auto with = [&](const std::string& recipe, int head_dim, int layers = kLayers) {
    return [=] {
      CacheConfig cfg{layers, kQ, kKv, head_dim, 64, recipe};
      cfg.codebooks = cb;
      KVCache c(cfg);
    };
  };
  expect_error(with("cq:channels=4,bits=1", d), ErrorCode::kInvalidArgument, {"recipe stage 'cq'", "CacheConfig::codebooks", "1"});
  expect_error(with("cq:channels=4,bits=2", 32), ErrorCode::kInvalidArgument, {"head_dim", "16", "32"});
  expect_error(with("cq:channels=4,bits=2", d, 3), ErrorCode::kInvalidArgument, {"layers", "2", "3"});
  expect_error(with("cq:channels=3,bits=2", d), ErrorCode::kInvalidArgument, {"3"});
  expect_error(with("cq:channels=8,bits=2", d), ErrorCode::kInvalidArgument, {"16"});  // C·B > 8
  expect_error(with("cq:channels=4,bits=2,rotate=1", d), ErrorCode::kRecipe, {"unknown key 'rotate'"});
  expect_error(with("cq:channels=4,bits=2,codebooks=/nonexistent/x.kvcb", d), ErrorCode::kIo, {"/nonexistent/x.kvcb"});
  // A corrupted file: one flipped byte in the middle.
  const std::string path = tmp_file("bad.kvcb");
  save_codebooks(*cb, path);
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(std::filesystem::file_size(path) / 2));
    f.put('\x5a');
  }
  expect_error(with("cq:codebooks=" + path, d), ErrorCode::kFormat, {"recipe stage 'cq'"});
  std::filesystem::remove(path);
  // Without a head (checking a recipe), a cq stage builds but cannot code.
  const Pipeline p = build_pipeline(parse_recipe("cq:channels=2,bits=2").base, d);
  std::vector<float> rows(16 * d, 1.0f);
  std::vector<std::byte> page(p.codec->page_bytes(16, d));
  EXPECT_EQ(page.size(), 16u * 2 * (d / 2 * 4 / 8));
  expect_error([&] { p.codec->encode(kernels::active(), rows.data(), rows.data(), 16, d, page.data()); },
               ErrorCode::kInvalidState, {"without a cache head"});
}

TEST(Cq, RecipeShapes) {
  auto [k, v] = cq_recipe_shapes("h2o:budget=64 | cq:channels=4,bits=2,vbits=1 ; [layers=0] f16");
  EXPECT_EQ(k, (CodebookShape{4, 2}));
  EXPECT_EQ(v, (CodebookShape{4, 1}));
  expect_error([] { (void)cq_recipe_shapes("kivi"); }, ErrorCode::kInvalidArgument, {"has no cq stage"});
  expect_error([] { (void)cq_recipe_shapes("cq:bits=2 ; [layers=1] cq:bits=1"); }, ErrorCode::kInvalidArgument,
               {"different codebook shapes"});
}
