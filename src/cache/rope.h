// Internal: RoPE applied by the cache to pre-RoPE keys (CacheConfig::pre_rope_keys).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "kvslim/cache/config.h"

namespace kvslim::detail {

class RopeTable {
 public:
  RopeTable(const RopeSpec& spec, int head_dim) : d_(head_dim) {
    rot_ = spec.rotary_dims > 0 ? spec.rotary_dims : head_dim;
    half_ = rot_ / 2;
    interleaved_ = spec.interleaved;
    freq_.resize(static_cast<std::size_t>(half_));
    step_c_.resize(freq_.size());
    step_s_.resize(freq_.size());
    for (int i = 0; i < half_; ++i) {
      freq_[i] = std::pow(spec.theta, -2.0 * i / rot_) / spec.scaling;
      step_c_[i] = std::cos(freq_[i]);
      step_s_[i] = std::sin(freq_[i]);
    }
  }

  /// Rotates rows k [n][head_dim] in place, row j by position pos[j] (pos[j] < 0: left as is,
  /// a dead slot). Angles are exact sincos (double) at the first row and after any position
  /// gap; from one position to the next they advance by the angle-addition rule in double,
  /// exact to ~1e-16 per step, so a run of rows costs no trigonometry per row.
  void rotate(float* k, int n, const std::int64_t* pos, std::vector<double>& cs) const {
    cs.resize(2 * freq_.size());
    double* c = cs.data();
    double* s = c + half_;
    std::int64_t prev = -2;
    for (int j = 0; j < n; ++j) {
      const std::int64_t p = pos[j];
      if (p < 0) continue;
      if (p == prev + 1) {
        for (int i = 0; i < half_; ++i) {
          const double cn = c[i] * step_c_[i] - s[i] * step_s_[i];
          s[i] = s[i] * step_c_[i] + c[i] * step_s_[i];
          c[i] = cn;
        }
      } else {
        for (int i = 0; i < half_; ++i) {
          c[i] = std::cos(static_cast<double>(p) * freq_[i]);
          s[i] = std::sin(static_cast<double>(p) * freq_[i]);
        }
      }
      prev = p;
      float* x = k + static_cast<std::ptrdiff_t>(j) * d_;
      for (int i = 0; i < half_; ++i) {
        float& a = x[interleaved_ ? 2 * i : i];
        float& b = x[interleaved_ ? 2 * i + 1 : i + half_];
        const double x0 = a, x1 = b;
        a = static_cast<float>(x0 * c[i] - x1 * s[i]);
        b = static_cast<float>(x0 * s[i] + x1 * c[i]);
      }
    }
  }

 private:
  int d_, rot_, half_;
  bool interleaved_;
  std::vector<double> freq_, step_c_, step_s_;
};

}  // namespace kvslim::detail
