// kvslim_gemm_native: the prefill GEMM roofline with Eigen compiled for this CPU
// (-march=native), for the BM_prefill rows of kvslim_bench (bench/README.md). Its own
// executable: nothing in it is part of the library, and it runs only where it was built.
#include <benchmark/benchmark.h>

#include <string>

#include "gemm_reference.h"

int main(int argc, char** argv) {
  for (int n : {512, 2048})
    benchmark::RegisterBenchmark(("BM_prefill_gemm_native/ctx:" + std::to_string(n)).c_str(),
                                 kvslim::bench::BM_prefill_gemm<32, 8, 128>, n)
        ->Unit(benchmark::kMillisecond);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
