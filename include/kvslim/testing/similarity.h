// How similar the key and value states of adjacent layers are, per (kv head, token), in
// real recordings: where MiniCache's cross-layer merging (one shared direction and two
// magnitudes for layers l-1 and l, the largest-angle pairs retained unmerged) can apply.
// Used by kvslim-eval --layer-similarity and docs/merging.md.
#pragma once

#include <cstdint>
#include <vector>

#include "kvslim/testing/recordings.h"

namespace kvslim::testing {

struct LayerPairSimilarity {
  int lower = 0, upper = 0;         // layers l-1 and l
  double k_cos = 0, v_cos = 0;      // mean cosine of the (kv head, token) state pairs
  double k_below = 0, v_below = 0;  // fraction of state pairs with cosine < threshold (angle above
                                    // arccos(threshold)): the tokens MiniCache would retain at that threshold
  std::int64_t pairs = 0;           // (kv head, token) pairs counted
};

/// For every adjacent layer pair (l-1, l), l = 1..layers-1, of one recording: the cosine of
/// the two layers' keys and of their values for the same kv head and token, pooled over kv
/// heads and tokens, in double precision. Keys are the post-RoPE `k` (what a cache stores):
/// RoPE is the same rotation for both layers at one position, so the cosine equals the
/// pre-RoPE one up to rounding. A pair with a zero vector on either side counts with cosine 0.
/// Error(kInvalidArgument) naming the threshold unless it is in [-1, 1]; Error(kShapeMismatch)
/// if a tensor's size does not match the recording's shape.
std::vector<LayerPairSimilarity> layer_similarity(const Recording& r, double threshold);

/// The same pooled over several recordings of one model (means and fractions weighted by
/// pairs; recordings may differ in tokens). Error(kInvalidArgument) if the list is empty or
/// two recordings disagree in layers, kv_heads or head_dim (both named).
std::vector<LayerPairSimilarity> layer_similarity(const std::vector<Recording>& rs, double threshold);

}  // namespace kvslim::testing
