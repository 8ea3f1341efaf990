// The in-run roofline: what one core (and two) can read from memory, and memcpy.
//   BM_read_bandwidth  sum-reduce of a 1 GiB buffer (bytes/s read); threads:2 splits it
//   BM_memcpy          memcpy of 512 MiB into another 512 MiB buffer (bytes/s copied)
//   BM_fma_peak/<isa>  independent vector FMAs (fma_per_second: FMA instructions per second,
//                      8 lanes for avx2, 16 for avx512): the compute roofline of a float
//                      kernel, which needs nq * head_dim * 2 / lanes FMAs per token and kv head
// Attention moves KV bytes and the encoders read f32 input; compare their bytes/s with these.
#include <benchmark/benchmark.h>
#include <immintrin.h>

#include <cstring>
#include <memory>
#include <string>

#include "bench_util.h"
#include "kvslim/cpu/isa.h"

namespace kvslim::bench {

void fill_random(float* x, std::size_t n, std::uint64_t seed) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (std::size_t i = 0; i < n; ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    x[i] = static_cast<float>(static_cast<std::uint32_t>(s >> 40)) * (4.0f / 16777216.0f) - 2.0f;
  }
}

const std::vector<float>& big_input() {
  static const std::vector<float> buf = [] {
    std::vector<float> b((std::size_t{512} << 20) / sizeof(float));
    fill_random(b.data(), b.size(), 7);
    return b;
  }();
  return buf;
}

namespace {

const std::vector<std::uint64_t>& gib_buffer() {
  static const std::vector<std::uint64_t> buf = [] {
    std::vector<std::uint64_t> b((std::size_t{1} << 30) / sizeof(std::uint64_t));
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = i * 0x9E3779B97F4A7C15ull;
    return b;
  }();
  return buf;
}

void BM_read_bandwidth(benchmark::State& state) {
  const auto& buf = gib_buffer();
  // Each thread sums its own contiguous share.
  const std::size_t share = buf.size() / static_cast<std::size_t>(state.threads());
  const std::uint64_t* p = buf.data() + share * static_cast<std::size_t>(state.thread_index());
  for (auto _ : state) {
    std::uint64_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (std::size_t i = 0; i + 8 <= share; i += 8)
      for (int k = 0; k < 8; ++k) s[k] += p[i + k];
    std::uint64_t t = 0;
    for (std::uint64_t x : s) t += x;
    benchmark::DoNotOptimize(t);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(share * sizeof(std::uint64_t)));
}

void BM_memcpy(benchmark::State& state) {
  const auto& src = big_input();
  const std::size_t bytes = src.size() * sizeof(float);
  static std::unique_ptr<char[]> dst;
  if (!dst) {
    dst.reset(new char[bytes]);
    std::memset(dst.get(), 1, bytes);
  }
  for (auto _ : state) {
    std::memcpy(dst.get(), src.data(), bytes);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(bytes));
}

// 12 independent accumulator chains (more than FMA latency x ports on current x86 cores),
// kIters rounds: returns something so the loop is not removed.
constexpr int kFmaIters = 1 << 16;
__attribute__((target("avx2,fma"))) float fma_loop_avx2(float seed) {
  __m256 a[12];
  const __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(seed);
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(static_cast<float>(i));
  for (int it = 0; it < kFmaIters; ++it)
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], x, y);
  __m256 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
  return _mm256_cvtss_f32(s);
}
__attribute__((target("avx512f"))) float fma_loop_avx512(float seed) {
  __m512 a[12];
  const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(seed);
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  for (int it = 0; it < kFmaIters; ++it)
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], x, y);
  __m512 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, a[i]);
  alignas(64) float t[16];
  _mm512_store_ps(t, s);
  return t[0] + t[15];
}

void BM_fma_peak(benchmark::State& state, Isa isa) {
  float r = 0.0f;
  for (auto _ : state) {
    r += isa == Isa::kAvx512 ? fma_loop_avx512(r * 1e-9f) : fma_loop_avx2(r * 1e-9f);
    benchmark::DoNotOptimize(r);
  }
  state.counters["fma_per_second"] = benchmark::Counter(12.0 * kFmaIters, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

void register_roofline() {
  for (Isa isa : available_isas()) {
    if (isa == Isa::kScalar) continue;
    benchmark::RegisterBenchmark((std::string("BM_fma_peak/") + isa_name(isa)).c_str(), BM_fma_peak, isa)
        ->Unit(benchmark::kMicrosecond);
  }
  benchmark::RegisterBenchmark("BM_read_bandwidth", BM_read_bandwidth)
      ->Threads(1)
      ->Threads(2)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("BM_memcpy", BM_memcpy)->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace kvslim::bench
