// kvslim_bench: decode attention per format through KVCache (the AVX2/AVX-512 kernel
// suite extends this). Names: BM_attend/<isa>/<format>/ctx:<tokens>.
#include <benchmark/benchmark.h>

#include <random>
#include <string>
#include <vector>

#include "kvslim/kvslim.h"

namespace {

void BM_attend(benchmark::State& state, kvslim::Isa isa, std::string recipe) {
  const int ctx = static_cast<int>(state.range(0));
  const int qh = 32, kvh = 8, d = 128;
  kvslim::set_active_isa(isa);
  kvslim::KVCache cache(kvslim::CacheConfig{1, qh, kvh, d, ctx + 1, recipe});
  std::vector<float> kv(static_cast<std::size_t>(kvh) * 1024 * d), q(static_cast<std::size_t>(qh) * d), out(q.size());
  std::mt19937 rng(1);
  std::normal_distribution<float> n;
  for (auto& x : kv) x = n(rng);
  for (auto& x : q) x = n(rng);
  for (int t = 0; t < ctx; t += 1024) {
    const int c = std::min(1024, ctx - t);
    kvslim::Layout l;
    l.rank = 3;
    l.shape = {kvh, c, d, 0};
    l.strides = {1024L * d, d, 1, 0};
    cache.append(0, kvslim::TensorView<const float>(kv.data(), l), kvslim::TensorView<const float>(kv.data(), l));
  }
  cache.append(0, kvslim::TensorView<const float>(kv.data(), {kvh, 1, d}), kvslim::TensorView<const float>(kv.data(), {kvh, 1, d}));
  const auto st = cache.stats();
  for (auto _ : state) {
    cache.attend(0, kvslim::TensorView<const float>(q.data(), {qh, 1, d}), kvslim::TensorView<float>(out.data(), {qh, 1, d}));
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["kv_bytes"] = static_cast<double>(st.total_bytes);
  state.counters["bytes_per_second"] =
      benchmark::Counter(static_cast<double>(st.total_bytes), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bits_per_value"] = st.bits_per_value;
}

const int kRegistered = [] {
  for (kvslim::Isa isa : kvslim::available_isas())
    for (const char* fmt : {"f32", "f16", "bf16", "kivi:kbits=4,vbits=4,residual=0", "kivi:kbits=2,vbits=2,residual=0"}) {
      std::string name = std::string("BM_attend/") + kvslim::isa_name(isa) + "/" + fmt;
      benchmark::RegisterBenchmark(name.c_str(), BM_attend, isa, std::string(fmt))
          ->Arg(4096)
          ->Arg(16384)
          ->Unit(benchmark::kMillisecond);
    }
  return 0;
}();

}  // namespace

BENCHMARK_MAIN();
