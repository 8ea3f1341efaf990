// Internal: splitmix64 (Steele, Lea, Flood 2014), a tiny seedable PRNG that gives the same
// stream on every platform (no std:: distributions). Used by calibration code and tests.
#pragma once

#include <cstdint>

namespace kvslim::detail {

struct SplitMix64 {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, 1), 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
};

}  // namespace kvslim::detail
