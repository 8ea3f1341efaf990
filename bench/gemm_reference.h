// The GEMM reference of prefill attention (Eigen), shared by kvslim_bench (baseline x86-64)
// and kvslim_gemm_native (-march=native): per kv head S = (Q/sqrt(d)) K^T over the group's
// query rows, causal mask, row softmax, O = P V.
#pragma once

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <vector>


namespace kvslim::bench {

inline double causal_flops(int qh, int d, int n) { return 4.0 * qh * d * (static_cast<double>(n) * (n + 1) / 2.0); }

template <int kQH, int kKVH, int kD>
void BM_prefill_gemm(benchmark::State& state, int n) {
  using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const int g = kQH / kKVH;
  std::vector<M> K(kKVH, M(n, kD)), V(kKVH, M(n, kD)), Q(kKVH, M(g * n, kD));
  for (int h = 0; h < kKVH; ++h) {
    K[h].setRandom();
    V[h].setRandom();
    Q[h].setRandom();
  }
  M S(g * n, n), O(g * n, kD);
  const float scale = 1.0f / std::sqrt(static_cast<float>(kD));
  for (auto _ : state) {
    for (int h = 0; h < kKVH; ++h) {
      S.noalias() = (Q[h] * scale) * K[h].transpose();
      for (int r = 0; r < g * n; ++r) {
        const int i = r % n;  // query i sees keys 0..i
        float* row = S.row(r).data();
        float mx = -INFINITY;
        for (int j = 0; j <= i; ++j) mx = std::max(mx, row[j]);
        float sum = 0.0f;
        for (int j = 0; j <= i; ++j) sum += (row[j] = std::exp(row[j] - mx));
        const float inv = 1.0f / sum;
        for (int j = 0; j <= i; ++j) row[j] *= inv;
        for (int j = i + 1; j < n; ++j) row[j] = 0.0f;
      }
      O.noalias() = S * V[h];
      benchmark::DoNotOptimize(O.data());
    }
  }
  state.counters["flops"] =
      benchmark::Counter(causal_flops(kQH, kD, n), benchmark::Counter::kIsIterationInvariantRate);
}


}  // namespace kvslim::bench
