// Randomized Hadamard rotation of keys, queries and values (recipe key rotate=hadamard on
// every codec; docs/rotation.md).
//
// Outlier channels make a quantizer spend its range on a few channels. An orthogonal
// rotation R spreads them over all channels, and attention does not change:
//   q . k = (R q) . (R k),   sum_j p_j v_j = R^T sum_j p_j (R v_j).
// So the cache stores R k and R v, rotates each query row before attention and rotates the
// output back (KVCache does all three; TokenStore sees only rotated rows).
//
// R = H D: D a diagonal of random signs (splitmix64 of the seed), H the normalized
// Walsh-Hadamard transform. For a head_dim that is not a power of two, H is block-diagonal
// over the binary digits of head_dim, largest block first (96 = 64 + 32, 80 = 64 + 16): a
// channel mixes only within its block, so an outlier is spread over its block's channels.
// Each block is normalized by 1/sqrt(its size), so R is orthogonal up to float rounding.
#pragma once

#include <cstdint>
#include <vector>

namespace kvslim {

namespace kernels {
struct KernelTable;
}

/// What a codec's recipe asks for (Codec::rotation()).
struct RotationSpec {
  bool hadamard = false;
  std::uint64_t seed = 0;
  /// What is rotated (recipe key rotated=kv|k|v): keys (and so the queries), values (and so
  /// the output), or both. A per-channel key quantizer (KIVI) already isolates outlier key
  /// channels and loses from a rotation that mixes them into every channel; its values, coded
  /// per token, gain (docs/rotation.md has the numbers).
  bool keys = true;
  bool values = true;
  friend bool operator==(const RotationSpec&, const RotationSpec&) = default;
};

class HadamardRotation {
 public:
  /// head_dim in [1, 4096].
  HadamardRotation(int head_dim, std::uint64_t seed);
  int head_dim() const noexcept { return d_; }
  std::uint64_t seed() const noexcept { return seed_; }
  /// rows [n][head_dim] (contiguous) <- R rows.
  void forward(const kernels::KernelTable& kt, float* rows, int n) const noexcept;
  /// rows <- R^T rows (the inverse, up to float rounding).
  void inverse(const kernels::KernelTable& kt, float* rows, int n) const noexcept;
  /// sign_c / sqrt(size of c's block): R = H_unnormalized diag(this) (forward), and R^T =
  /// diag(this) H_unnormalized (H is symmetric).
  const std::vector<float>& factors() const noexcept { return f_; }

 private:
  int d_;
  std::uint64_t seed_;
  std::vector<float> f_;
};

}  // namespace kvslim
