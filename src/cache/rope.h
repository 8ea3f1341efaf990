// Internal: RoPE applied by the cache to pre-RoPE keys (CacheConfig::pre_rope_keys).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kvslim/cache/config.h"
#include "kvslim/kernels/kernel_table.h"

namespace kvslim::detail {

/// Rotates blocks of key rows by their positions. Angles: pair i of position p turns by
/// p * freq_i. Trigonometry is done once per offset at construction: a table of
/// cos/sin(j * freq_i) for offsets j <= max_offset, in double (to advance a block's base
/// angle) and in float (for the rows of a block). A block's base angle comes from the
/// previous block's by angle addition when it lies at most max_offset positions later (the
/// usual case: pages of consecutive tokens), else from exact sincos; a row's angle is its
/// block's base plus its offset, in float (relative error ~2^-23, so the rotated key is the
/// exactly rotated one to ~1e-7).
class RopeTable {
 public:
  /// State carried across the blocks of one attend call (per thread).
  struct State {
    std::int64_t pos = -1;  // position the base angles belong to (-1: none)
    std::vector<double> c, s;
    std::vector<float> cb, sb;
    std::vector<int> off;
  };

  RopeTable(const RopeSpec& spec, int head_dim, int max_offset) : d_(head_dim) {
    rot_ = spec.rotary_dims > 0 ? spec.rotary_dims : head_dim;
    half_ = rot_ / 2;
    interleaved_ = spec.interleaved;
    max_off_ = std::clamp(max_offset, 1, 1024);
    freq_.resize(static_cast<std::size_t>(half_));
    for (int i = 0; i < half_; ++i) freq_[i] = std::pow(spec.theta, -2.0 * i / rot_) / spec.scaling;
    const std::size_t n = static_cast<std::size_t>(max_off_ + 1) * half_;
    oc_.resize(n);
    os_.resize(n);
    ocf_.resize(n);
    osf_.resize(n);
    for (int j = 0; j <= max_off_; ++j)
      for (int i = 0; i < half_; ++i) {
        const std::size_t e = static_cast<std::size_t>(j) * half_ + i;
        oc_[e] = std::cos(j * freq_[i]);
        os_[e] = std::sin(j * freq_[i]);
        ocf_[e] = static_cast<float>(oc_[e]);
        osf_[e] = static_cast<float>(os_[e]);
      }
  }

  /// Rotates rows k [n][head_dim] in place, row j by position pos[j] (< 0: left as is, a
  /// dead slot), with the kernel table's rope_rows.
  void rotate(const kernels::KernelTable& kt, float* k, int n, const std::int64_t* pos, State& st) const {
    int j0 = 0;
    while (j0 < n && pos[j0] < 0) ++j0;
    if (j0 == n) return;
    const std::int64_t p0 = pos[j0];
    st.c.resize(static_cast<std::size_t>(half_));
    st.s.resize(st.c.size());
    st.cb.resize(st.c.size());
    st.sb.resize(st.c.size());
    if (st.pos >= 0 && p0 >= st.pos && p0 - st.pos <= max_off_) {
      const double* oc = oc_.data() + static_cast<std::size_t>(p0 - st.pos) * half_;
      const double* os = os_.data() + static_cast<std::size_t>(p0 - st.pos) * half_;
      for (int i = 0; i < half_; ++i) {
        const double c = st.c[i] * oc[i] - st.s[i] * os[i];
        st.s[i] = st.s[i] * oc[i] + st.c[i] * os[i];
        st.c[i] = c;
      }
    } else {
      exact(p0, st.c.data(), st.s.data());
    }
    st.pos = p0;
    for (int i = 0; i < half_; ++i) {
      st.cb[i] = static_cast<float>(st.c[i]);
      st.sb[i] = static_cast<float>(st.s[i]);
    }
    st.off.resize(static_cast<std::size_t>(n));
    bool far = false;  // rows beyond the offset table (position gaps): one exact row each
    for (int j = 0; j < n; ++j) {
      const std::int64_t off = pos[j] < 0 ? -1 : pos[j] - p0;
      st.off[j] = off >= 0 && off <= max_off_ ? static_cast<int>(off) : -1;
      far |= pos[j] >= 0 && st.off[j] < 0;
    }
    kt.rope_rows(k, n, d_, half_, interleaved_, st.cb.data(), st.sb.data(), ocf_.data(), osf_.data(), st.off.data());
    if (!far) return;
    std::vector<double> ec(static_cast<std::size_t>(half_)), es(ec.size());
    std::vector<float> fc(ec.size()), fs(ec.size()), one(ec.size(), 1.0f), zero(ec.size(), 0.0f);
    for (int j = 0; j < n; ++j) {
      if (pos[j] < 0 || st.off[j] >= 0) continue;
      exact(pos[j], ec.data(), es.data());
      for (int i = 0; i < half_; ++i) {
        fc[i] = static_cast<float>(ec[i]);
        fs[i] = static_cast<float>(es[i]);
      }
      const int o = 0;
      kt.rope_rows(k + static_cast<std::ptrdiff_t>(j) * d_, 1, d_, half_, interleaved_, fc.data(), fs.data(),
                   one.data(), zero.data(), &o);
    }
  }

 private:
  void exact(std::int64_t p, double* c, double* s) const {
    for (int i = 0; i < half_; ++i) {
      c[i] = std::cos(static_cast<double>(p) * freq_[i]);
      s[i] = std::sin(static_cast<double>(p) * freq_[i]);
    }
  }

  int d_, rot_, half_, max_off_;
  bool interleaved_;
  std::vector<double> freq_, oc_, os_;
  std::vector<float> ocf_, osf_;
};

}  // namespace kvslim::detail
