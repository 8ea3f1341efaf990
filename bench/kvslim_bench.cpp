// kvslim_bench: the benchmark suite (Google Benchmark), one executable. Registration order:
//   BM_read_bandwidth, BM_memcpy                    the in-run roofline (roofline_bench.cpp)
//   BM_encode/<isa>/<format>, BM_decode/...         page codecs (codec_bench.cpp)
//   BM_attend/<isa>/<format>/ctx:<tokens>/threads:<n>
//       decode attention through KVCache: one layer, head_dim 128, 32 query / 8 kv heads,
//       one query token against ctx cached tokens (4K, 16K, 64K; the scalar oracle at 4K
//       only), residual=0 so the measured path is the compressed pages, CacheConfig::threads
//       1 and 2. Counters: kv_bytes (CacheStats::total_bytes: everything the layer holds,
//       metadata included), bytes_per_second (kv_bytes read per second), bits_per_value.
//       Google Benchmark appends "/real_time" to every name (wall time is measured, so that
//       threads:2 is timed correctly). Formats f32 ... kivi2q8, kivi4rot / kivi2rot
//       (rotate=hadamard), kivi4o1 (outliers=0.01), kivi4pre / f16pre (pre-RoPE keys),
//       nuq4 / nuq3 / nuq2 (Gaussian Lloyd-Max levels), and cq1 / cq2: coupled
//       quantization with random codebooks.
//   BM_train_codebooks/C:4/B:2/tokens:4096/d:128
//       train_codebooks for one kv head's keys and values (4096 calibration rows, head_dim 128)
//   BM_attend/<isa>/<format>/ctx:<tokens>/threads:<n>/kv:1
//       the same with one kv head (MQA): two threads split that head's pages (split-KV)
//   BM_evict/<isa>/<format>/h2o:4096/ctx:65536
//       a whole decode step with eviction: append one token, attend (the scorer's mass, the
//       H2O selection, dropping and re-packing included) on a cache that has seen 64K tokens
//       and holds at most 4096 per head (h2o:budget=4096,recent=512). The target compares it
//       with BM_attend/<isa>/<format>/ctx:4096 (plain attention over as many tokens).
// bench/README.md has the results on the reference machine and how to reproduce them.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "bench_util.h"
#include "kvslim/kvslim.h"

namespace kvslim::bench {
namespace {

struct AttendFormat {
  const char* name;
  const char* recipe;
  bool pre_rope = false;  // CacheConfig::pre_rope_keys (RoPE applied in attention)
};
const AttendFormat kAttendFormats[] = {
    {"f32", "f32"},
    {"f16", "f16"},
    {"bf16", "bf16"},
    {"kivi8", "kivi:kbits=8,vbits=8,residual=0"},
    {"kivi4", "kivi:kbits=4,vbits=4,residual=0"},
    {"kivi2", "kivi:kbits=2,vbits=2,residual=0"},
    {"kivi1", "kivi:kbits=1,vbits=1,residual=0"},  // the uniform 1-bit baseline
    // attend() with 8-bit integer dot products (kernel_table.h, attend_kivi_q8)
    {"kivi4q8", "kivi:kbits=4,vbits=4,residual=0,qbits=8"},
    {"kivi2q8", "kivi:kbits=2,vbits=2,residual=0,qbits=8"},
    // Outlier-aware options (docs/outliers.md): Hadamard rotation of K, Q, V and the output
    // (its cost is the target: at most 10% of the step), and 1% dense-and-sparse side lists.
    {"kivi4rot", "kivi:kbits=4,vbits=4,residual=0,rotate=hadamard"},
    {"kivi2rot", "kivi:kbits=2,vbits=2,residual=0,rotate=hadamard"},
    {"kivi4o1", "kivi:kbits=4,vbits=4,residual=0,outliers=0.01"},
    // Pre-RoPE keys: the cache rotates every key by its position in attention (docs/outliers.md).
    {"kivi4pre", "kivi:kbits=4,vbits=4,residual=0", true},
    {"f16pre", "f16", true},
    // NUQ (kvslim/policy/nuq.h): per-token f16 scale x Gaussian Lloyd-Max levels, looked up in
    // registers by the attention kernels (kernel_table.h, "NUQ page layout").
    {"nuq4", "nuq:kbits=4,vbits=4,residual=0"},
    {"nuq3", "nuq:kbits=3,vbits=3,residual=0"},
    {"nuq2", "nuq:kbits=2,vbits=2,residual=0"},
    // Coupled quantization (codebook.h) at the CQ paper's 1 and 2 bits per channel: 8 and 4
    // channels per 8-bit code. Attention runs on the codes through per-query tables
    // (kernel_table.h, "CQ"); the codebooks are random (seeded normal) since its speed does
    // not depend on their values.
    // Pages of 256 tokens (group=256, docs/cq.md "Speed"): CQ pages carry no metadata, so the
    // page size costs no memory, and from 128 tokens the 8-bit-code kernels walk a page group
    // by group with the tables' slices in L1 (src/kernels/avx2/cq_simd-inl.h).
    {"cq1", "cq:kchannels=8,kbits=1,vchannels=8,vbits=1,group=256,residual=0"},
    {"cq2", "cq:channels=4,bits=2,group=256,residual=0"},
};

// Random but valid codebooks for the cq formats of a recipe (nullptr for other recipes). The
// centroids are drawn from the data's own distribution (fill_random's uniform [-2, 2)), so the
// tokens' codes spread over all centroids as with trained codebooks. (Normal centroids put
// most of this data's codes on a few central centroids: tables then stay in L1 and the
// kernels look up to 1.6x faster than on real codes.)
std::shared_ptr<const Codebooks> bench_codebooks(const std::string& recipe, int layers, int kvh, int d) {
  if (recipe.rfind("cq:", 0) != 0) return nullptr;
  const auto shapes = cq_recipe_shapes(recipe);
  auto cb = std::make_shared<Codebooks>(layers, kvh, d, shapes.first, shapes.second);
  std::uint64_t seed = 11;
  for (int l = 0; l < layers; ++l)
    for (int h = 0; h < kvh; ++h)
      for (int v = 0; v < 2; ++v)
        for (int g = 0; g < cb->groups(v != 0); ++g) {
          const int n = cb->centroid_count(v != 0) * cb->shape(v != 0).channels;
          fill_random(cb->mutable_centroids(l, h, v != 0, g), static_cast<std::size_t>(n), seed++);
        }
  return cb;
}
const int kContexts[] = {4096, 16384, 65536};

// With --benchmark_repetitions=N: the least disturbed run (this machine shares its host).
double min_of(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }
const int kThreads[] = {1, 2};

// Appends ctx tokens to layer 0 in chunks of `chunk`, cycling through k, v ([kvh][chunk][d]);
// after_each (may be empty) runs after every chunk.
void append_chunks(KVCache& cache, const std::vector<float>& k, const std::vector<float>& v, int kvh, int d, int chunk,
                   int ctx, const std::function<void()>& after_each) {
  for (int t = 0; t < ctx; t += chunk) {
    const int n = std::min(chunk, ctx - t);
    Layout l;
    l.rank = 3;
    l.shape = {kvh, n, d, 0};
    l.strides = {static_cast<std::int64_t>(chunk) * d, d, 1, 0};
    cache.append(0, TensorView<const float>(k.data(), l), TensorView<const float>(v.data(), l));
    if (after_each) after_each();
  }
}

void BM_attend(benchmark::State& state, Isa isa, AttendFormat f, int ctx, int threads, int kKVH) {
  constexpr int kQH = 32, kD = 128, kChunk = 1024;
  set_active_isa(isa);  // the cache binds its kernel table at construction
  CacheConfig cfg{1, kQH, kKVH, kD, ctx + 1, f.recipe};
  cfg.threads = threads;
  cfg.codebooks = bench_codebooks(f.recipe, 1, kKVH, kD);
  if (f.pre_rope) {
    cfg.pre_rope_keys = true;
    cfg.rope = RopeSpec{};
  }
  KVCache cache(cfg);
  std::vector<float> k(static_cast<std::size_t>(kKVH) * kChunk * kD), v(k.size()), q(static_cast<std::size_t>(kQH) * kD),
      out(q.size());
  fill_random(k.data(), k.size(), 1);
  fill_random(v.data(), v.size(), 2);
  fill_random(q.data(), q.size(), 3);
  append_chunks(cache, k, v, kKVH, kD, kChunk, ctx, nullptr);
  // The decode step: one new token, then its attention over everything.
  cache.append(0, TensorView<const float>(k.data(), {kKVH, 1, kD}), TensorView<const float>(v.data(), {kKVH, 1, kD}));
  const CacheStats st = cache.stats();
  const TensorView<const float> qv(q.data(), {kQH, 1, kD});
  const TensorView<float> ov(out.data(), {kQH, 1, kD});
  for (auto _ : state) {
    cache.attend(0, qv, ov);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["kv_bytes"] = static_cast<double>(st.total_bytes);
  state.counters["bytes_per_second"] =
      benchmark::Counter(static_cast<double>(st.total_bytes), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bits_per_value"] = st.bits_per_value;
}

// policy: the stage before the codec that holds the 4096-token budget (h2o, or kvmerger: its
// merge step decodes the candidates' keys every step; on these random keys no adjacent pair
// reaches its threshold, so every step also falls back to eviction: the worst case).
void BM_evict(benchmark::State& state, Isa isa, AttendFormat f, int ctx, const char* policy) {
  constexpr int kQH = 32, kKVH = 8, kD = 128, kChunk = 1024, kBudget = 4096;
  set_active_isa(isa);
  CacheConfig cfg{1, kQH, kKVH, kD, 2 * kBudget, std::string(policy) + " | " + f.recipe};
  KVCache cache(cfg);
  std::vector<float> k(static_cast<std::size_t>(kKVH) * kChunk * kD), v(k.size()), q(static_cast<std::size_t>(kQH) * kD),
      out(q.size());
  fill_random(k.data(), k.size(), 1);
  fill_random(v.data(), v.size(), 2);
  fill_random(q.data(), q.size(), 3);
  const TensorView<const float> qv(q.data(), {kQH, 1, kD});
  const TensorView<float> ov(out.data(), {kQH, 1, kD});
  // Fill to ctx seen tokens in chunks, each followed by one query's attention (which scores
  // and evicts down to the budget).
  const auto attend_once = [&] { cache.attend(0, qv, ov); };
  append_chunks(cache, k, v, kKVH, kD, kChunk, ctx, attend_once);
  int step = 0;
  for (auto _ : state) {
    const std::size_t off = static_cast<std::size_t>(step++ % kChunk) * kD;
    Layout l;
    l.rank = 3;
    l.shape = {kKVH, 1, kD, 0};
    l.strides = {static_cast<std::int64_t>(kChunk) * kD, kD, 1, 0};
    cache.append(0, TensorView<const float>(k.data() + off, l), TensorView<const float>(v.data() + off, l));
    cache.attend(0, qv, ov);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const CacheStats st = cache.stats();
  state.counters["kv_bytes"] = static_cast<double>(st.total_bytes);
  state.counters["tokens_per_head"] = static_cast<double>(st.total_tokens) / kKVH;
  // Page slots per kept page token: > 1 while dropped slots wait for their page's re-pack.
  const TokenStore& s0 = cache.store(0, 0);
  state.counters["slots_per_token"] = static_cast<double>(s0.page_slots()) / static_cast<double>(std::max<std::int64_t>(1, s0.sealed_tokens()));
  state.counters["pages"] = static_cast<double>(s0.page_count());
  state.counters["ratio_seen"] = st.ratio_seen;
}

// Layer 1 of a 2-layer cache with `[layers=1] minicache:retain=R | codec` (32/8 heads,
// head_dim 128): one decode step's attention over ctx merged tokens.
void BM_attend_minicache(benchmark::State& state, Isa isa, AttendFormat f, int ctx, const char* retain) {
  constexpr int kQH = 32, kKVH = 8, kD = 128, kChunk = 1024;
  set_active_isa(isa);
  KVCache cache(CacheConfig{2, kQH, kKVH, kD, ctx + 1,
                            std::string(f.recipe) + " ; [layers=1] minicache:retain=" + retain + " | " + f.recipe});
  std::vector<float> k(static_cast<std::size_t>(kKVH) * kChunk * kD), v(k.size()), k1(k.size()),
      q(static_cast<std::size_t>(kQH) * kD), out(q.size());
  fill_random(k.data(), k.size(), 1);
  fill_random(v.data(), v.size(), 2);
  fill_random(k1.data(), k1.size(), 4);
  for (std::size_t i = 0; i < k.size(); ++i) k1[i] = k[i] + 0.3f * k1[i];  // layer 1 near layer 0
  fill_random(q.data(), q.size(), 3);
  for (int t = 0; t <= ctx; t += kChunk) {
    const int n = std::min(kChunk, ctx + 1 - t);
    Layout l;
    l.rank = 3;
    l.shape = {kKVH, n, kD, 0};
    l.strides = {static_cast<std::int64_t>(kChunk) * kD, kD, 1, 0};
    cache.append(0, TensorView<const float>(k.data(), l), TensorView<const float>(v.data(), l));
    cache.append(1, TensorView<const float>(k1.data(), l), TensorView<const float>(v.data(), l));
  }
  cache.flush();
  const TensorView<const float> qv(q.data(), {kQH, 1, kD});
  const TensorView<float> ov(out.data(), {kQH, 1, kD});
  for (auto _ : state) {
    cache.attend(1, qv, ov);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const CacheStats st = cache.stats();
  state.counters["kv_bytes"] = static_cast<double>(st.layer_bytes(1) + st.shared_bytes / 2);
  state.counters["merged_pages"] = static_cast<double>(cache.store(1, 0).merged_pages());
}

// Codebook training (train_codebooks): one (layer, kv head), 4096 calibration tokens, head_dim
// 128, C=4 B=2 (256 centroids per group, 32 groups) for keys and values, default options.
void BM_train_codebooks(benchmark::State& state) {
  constexpr int kRows = 4096, kD = 128;
  std::vector<float> k(static_cast<std::size_t>(kRows) * kD), v(k.size());
  fill_random(k.data(), k.size(), 1);
  fill_random(v.data(), v.size(), 2);
  CalibrationKV cal(1, 1, kD);
  cal.set(0, 0, {k.data(), v.data(), kRows, nullptr, nullptr});
  for (auto _ : state) {
    Codebooks cb = train_codebooks(cal, {4, 2}, {4, 2});
    benchmark::DoNotOptimize(cb.data().data());
  }
}

}  // namespace

// Every attention row: wall time (threads), the least disturbed repetition, milliseconds.
template <class... Args>
void register_ms(const std::string& name, Args&&... args) {
  benchmark::RegisterBenchmark(name.c_str(), std::forward<Args>(args)...)
      ->UseRealTime()
      ->ComputeStatistics("min", min_of)
      ->Unit(benchmark::kMillisecond);
}

void register_attend() {
  for (Isa isa : available_isas())
    for (const AttendFormat& f : kAttendFormats)
      for (int ctx : kContexts)
        for (int th : kThreads) {
          // The scalar table is the test oracle: seconds per step at long contexts, and
          // nothing to learn from them.
          if (isa == Isa::kScalar && ctx > kContexts[0]) continue;
          const std::string name = std::string("BM_attend/") + isa_name(isa) + "/" + f.name + "/ctx:" +
                                   std::to_string(ctx) + "/threads:" + std::to_string(th);
          register_ms(name, BM_attend, isa, f, ctx, th, 8);
        }
  // MQA (32 query heads, 1 kv head): with 2 threads the head's pages are split between them.
  benchmark::RegisterBenchmark("BM_train_codebooks/C:4/B:2/tokens:4096/d:128", BM_train_codebooks)
      ->Unit(benchmark::kMillisecond)
      ->Iterations(1)
      ->Repetitions(1);
  for (Isa isa : available_isas()) {
    if (isa == Isa::kScalar) continue;
    for (const AttendFormat& f : kAttendFormats)
      for (int ctx : {16384, 65536})
        for (int th : kThreads) {
          if (std::string(f.name) != "f16" && std::string(f.name) != "kivi4") continue;
          const std::string name = std::string("BM_attend/") + isa_name(isa) + "/" + f.name + "/ctx:" +
                                   std::to_string(ctx) + "/threads:" + std::to_string(th) + "/kv:1";
          register_ms(name, BM_attend, isa, f, ctx, th, 1);
        }
  }
  for (Isa isa : available_isas()) {
    if (isa == Isa::kScalar) continue;
    for (const AttendFormat& f : kAttendFormats) {
      if (std::string(f.name) != "f16" && std::string(f.name) != "kivi4" && std::string(f.name) != "kivi2") continue;
      const std::string name = std::string("BM_evict/") + isa_name(isa) + "/" + f.name + "/h2o:4096/ctx:65536";
      register_ms(name, BM_evict, isa, f, 65536, "h2o:budget=4096,recent=512");
      if (std::string(f.name) == "kivi2") continue;
      register_ms(std::string("BM_evict/") + isa_name(isa) + "/" + f.name + "/kvmerger:4096/ctx:65536", BM_evict, isa,
                  f, 65536, "kvmerger:budget=4096,recent=512,threshold=0.9");
    }
  }
  // MiniCache: attention of layer 1, whose pages are merged with layer 0's, against the same
  // codec unmerged (BM_attend of that format, one layer).
  for (Isa isa : available_isas()) {
    if (isa == Isa::kScalar) continue;
    for (const AttendFormat& f : kAttendFormats) {
      if (std::string(f.name) != "f16" && std::string(f.name) != "kivi4") continue;
      for (int ctx : {16384, 65536})
        for (const char* retain : {"0", "0.05"})
          register_ms(std::string("BM_attend_minicache/") + isa_name(isa) + "/" + f.name + "/retain:" + retain +
                          "/ctx:" + std::to_string(ctx),
                      BM_attend_minicache, isa, f, ctx, retain);
    }
  }
}

}  // namespace kvslim::bench

int main(int argc, char** argv) {
  kvslim::bench::register_roofline();
  kvslim::bench::register_codecs();
  kvslim::bench::register_attend();
  kvslim::bench::register_prefill();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
