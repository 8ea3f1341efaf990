// MiniCache (Liu et al., 2024, "MiniCache: KV Cache Compression in Depth Dimension for Large
// Language Models"): from the middle of a network on, the K and V states of adjacent layers
// point in nearly the same direction. Per token, one direction is stored for both layers -
// the SLERP of their unit vectors at t - and each layer keeps its own magnitude; the token
// pairs with the largest angle stay unmerged (token retention).
//
//   minicache[:t=0.6,retain=0.05,threshold=C]
//
// named on layer l (an override such as "[layers=3,5,7] minicache | kivi:kbits=4,vbits=4")
// merges layer l with layer l-1, per kv head:
//   - Pages are merged as they are sealed: when layer l seals a page, layer l-1 holds the same
//     tokens in its full-precision window (its own sealing waits for layer l's), and the pair
//     becomes one page of directions in the chain's codec format (quantized by it: KIVI, f16,
//     ...) plus, per layer, f32 magnitudes and the retained tokens' original rows. Until then
//     both layers read their own full-precision tokens.
//   - Direction per token and for K and V apart: u = SLERP(a, b; t) of a = x_(l-1) / |x_(l-1)|
//     and b = x_l / |x_l| (t = 0: layer l-1's direction, 1: layer l's). A layer's magnitude is
//     its norm divided by the norm of the direction as the codec stored it, so a restored row
//     m u has exactly the original norm on every codec.
//   - Retained per page: the round(retain * tokens) tokens whose pair is least similar
//     (min of the K and V cosines between the two layers; ties: the older), plus every token
//     below `threshold` if it is given. Both layers keep those tokens' original f32 rows.
//   - Attention restores m u inside the page's scores and value sums (logit = m_k q . u_k, the
//     softmax weight times m_v enters the value sum of the codes); retained slots use the
//     originals. Nothing is decoded into a buffer.
//   - The shared direction pages are counted once, in CacheStats::shared_bytes (they belong
//     to neither layer alone); each layer's HeadStats count its magnitudes and retained rows.
// Errors (at cache construction): layer 0; layer l-1 with a different codec, an eviction or
// merge stage of its own (including minicache: a layer merges with one neighbour only, so
// name every other layer); an eviction stage on layer l; pre-RoPE keys. A pair whose two
// layers are given different positions is dissolved (both seal on their own until reset()).
// The two layers of a pair must not be called concurrently (layer l's flush seals layer
// l-1's pages).
#pragma once

#include <vector>

#include "kvslim/policy/policy.h"

namespace kvslim {

class MiniCache final : public MergePolicy {
 public:
  struct Options {
    double t = 0.6;
    double retain = 0.05;
    double threshold = -2.0;  // below -1: not given
  };
  explicit MiniCache(Options o) : o_(o) {}
  std::string describe() const override;
  bool cross_layer() const override { return true; }
  void merge(const kernels::KernelTable&, TokenStore&) const override {}
  void merge_layers(const kernels::KernelTable& kt, TokenStore& lower, TokenStore& upper) const override;
  const Options& options() const noexcept { return o_; }

  /// One page pair: lower (k0, v0) and upper (k1, v1) rows [ntok][d]. Writes the unit
  /// directions dk, dv [ntok][d] (SLERP at t, computed in double) and the retained slots,
  /// ascending.
  void merge_rows(const float* k0, const float* v0, const float* k1, const float* v1, int ntok, int d, float* dk,
                  float* dv, std::vector<int>& retained) const;

 private:
  Options o_;
};

}  // namespace kvslim
