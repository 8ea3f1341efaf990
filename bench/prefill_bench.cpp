// BM_prefill/<isa>/<format>/ctx:<n>: prefill attention of one chunk of n tokens (one layer,
// head_dim 128, 32 query / 8 kv heads, causal), timed as append + attend of the whole chunk
// through KVCache (the chunk attends to itself in f32 whatever the codec: KIVI's prefill),
// against BM_prefill_gemm/ctx:<n>: the same attention with Eigen matrix products per kv head
// (gemm_reference.h). Here Eigen is compiled for baseline x86-64 like the rest of the suite;
// kvslim_gemm_native (bench/gemm_native_bench.cpp, -march=native, its own executable so no
// Eigen code compiled for two ISAs meets in one binary) gives the roofline a blocked prefill
// kernel should approach. Counter: flops (4 n^2 d per query head over the causal half).
#include <benchmark/benchmark.h>

#include <cmath>
#include <string>
#include <vector>

#include "bench_util.h"
#include "gemm_reference.h"
#include "kvslim/kvslim.h"

namespace kvslim::bench {
namespace {

constexpr int kQH = 32, kKVH = 8, kD = 128;
const int kPrefillCtx[] = {512, 2048};


void BM_prefill(benchmark::State& state, Isa isa, std::string recipe, int n) {
  set_active_isa(isa);
  std::vector<float> k(static_cast<std::size_t>(kKVH) * n * kD), v(k.size()), q(static_cast<std::size_t>(kQH) * n * kD),
      out(q.size());
  fill_random(k.data(), k.size(), 1);
  fill_random(v.data(), v.size(), 2);
  fill_random(q.data(), q.size(), 3);
  for (auto _ : state) {
    state.PauseTiming();
    KVCache cache(CacheConfig{1, kQH, kKVH, kD, n, recipe});
    state.ResumeTiming();
    cache.append(0, TensorView<const float>(k.data(), {kKVH, n, kD}), TensorView<const float>(v.data(), {kKVH, n, kD}));
    cache.attend(0, TensorView<const float>(q.data(), {kQH, n, kD}), TensorView<float>(out.data(), {kQH, n, kD}));
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["flops"] =
      benchmark::Counter(causal_flops(kQH, kD, n), benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

void register_prefill() {
  for (int n : kPrefillCtx) {
    benchmark::RegisterBenchmark(("BM_prefill_gemm/ctx:" + std::to_string(n)).c_str(), BM_prefill_gemm<kQH, kKVH, kD>, n)
        ->Unit(benchmark::kMillisecond);
    for (Isa isa : available_isas()) {
      if (isa == Isa::kScalar) continue;
      for (const auto& [name, recipe] : std::vector<std::pair<std::string, std::string>>{
               {"f32", "f32"}, {"f16", "f16"}, {"kivi4", "kivi:kbits=4,vbits=4,residual=0"}})
        benchmark::RegisterBenchmark(("BM_prefill/" + std::string(isa_name(isa)) + "/" + name + "/ctx:" + std::to_string(n)).c_str(),
                                     BM_prefill, isa, recipe, n)
            ->Unit(benchmark::kMillisecond);
    }
  }
}

}  // namespace kvslim::bench
