#include "kvslim/policy/rotation.h"

#include <cmath>

#include "check.h"
#include "kvslim/kernels/kernel_table.h"
#include "util/splitmix.h"

namespace kvslim {

HadamardRotation::HadamardRotation(int head_dim, std::uint64_t seed) : d_(head_dim), seed_(seed) {
  KVSLIM_CHECK(head_dim >= 1 && head_dim <= 4096, ErrorCode::kInvalidArgument,
               "Hadamard rotation: head_dim {} must be in [1, 4096]", head_dim);
  f_.resize(static_cast<std::size_t>(d_));
  detail::SplitMix64 rng{seed ^ 0x6a09e667f3bcc909ull};
  for (int base = 0, rest = d_; rest > 0;) {
    int blk = 1;
    while (blk * 2 <= rest) blk *= 2;
    const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(blk)));
    for (int c = base; c < base + blk; ++c) f_[c] = (rng.next() >> 63) ? -norm : norm;
    base += blk;
    rest -= blk;
  }
}

void HadamardRotation::forward(const kernels::KernelTable& kt, float* rows, int n) const noexcept {
  kt.hadamard_rows(rows, n, d_, f_.data(), nullptr);
}

void HadamardRotation::inverse(const kernels::KernelTable& kt, float* rows, int n) const noexcept {
  kt.hadamard_rows(rows, n, d_, nullptr, f_.data());
}

}  // namespace kvslim
