// The in-run roofline: what one core (and two) can read from memory, and memcpy.
//   BM_read_bandwidth  sum-reduce of a 1 GiB buffer (bytes/s read); threads:2 splits it
//   BM_memcpy          memcpy of 512 MiB into another 512 MiB buffer (bytes/s copied)
// Attention moves KV bytes and the encoders read f32 input; compare their bytes/s with these.
#include <benchmark/benchmark.h>

#include <cstring>
#include <memory>

#include "bench_util.h"

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

}  // namespace

void register_roofline() {
  benchmark::RegisterBenchmark("BM_read_bandwidth", BM_read_bandwidth)
      ->Threads(1)
      ->Threads(2)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("BM_memcpy", BM_memcpy)->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace kvslim::bench
