// Internal: dot products of f32 rows in double precision, for the policies' bookkeeping
// (merging's cosines, MiniCache's norms), not for attention, which the kernel tables do.
#pragma once

#include <cmath>

namespace kvslim::detail {

// Four independent partial sums: the compiler vectorizes those (it may not reorder a single
// sum).
inline double dot_f64(const float* a, const float* b, int d) noexcept {
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  int c = 0;
  for (; c + 4 <= d; c += 4)
    for (int u = 0; u < 4; ++u) s[u] += static_cast<double>(a[c + u]) * b[c + u];
  for (; c < d; ++c) s[0] += static_cast<double>(a[c]) * b[c];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

inline double norm_f64(const float* x, int d) noexcept { return std::sqrt(dot_f64(x, x, d)); }

}  // namespace kvslim::detail
