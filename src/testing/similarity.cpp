#include "kvslim/testing/similarity.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "check.h"

namespace kvslim::testing {

namespace {

// How a recording is named in messages: hand-built ones (tests) may have no directory.
std::string label(const Recording& r, std::size_t i) {
  if (!r.dir.empty()) return r.dir;
  if (!r.name.empty()) return r.name;
  return "recording #" + std::to_string(i);
}

void check_threshold(double threshold) {
  // Written so that NaN fails too.
  KVSLIM_CHECK(threshold >= -1.0 && threshold <= 1.0, ErrorCode::kInvalidArgument,
               "layer_similarity: threshold {} is not a cosine in [-1, 1]", threshold);
}

void check_shape(const Recording& r, std::size_t i) {
  KVSLIM_CHECK(r.layers >= 0 && r.kv_heads >= 0 && r.head_dim >= 0 && r.tokens >= 0, ErrorCode::kShapeMismatch,
               "layer_similarity: '{}' has a negative shape ({} layers, {} kv heads, {} tokens, head_dim {})",
               label(r, i), r.layers, r.kv_heads, r.tokens, r.head_dim);
  const std::size_t n = static_cast<std::size_t>(r.layers) * r.kv_heads * r.tokens * r.head_dim;
  // The accessors do no bounds checks: a hand-built recording with short tensors would be
  // read past its end.
  KVSLIM_CHECK(r.k.size() == n && r.v.size() == n, ErrorCode::kShapeMismatch,
               "layer_similarity: '{}' has {} k and {} v floats, its shape ({} layers, {} kv heads, {} tokens, "
               "head_dim {}) needs {}",
               label(r, i), r.k.size(), r.v.size(), r.layers, r.kv_heads, r.tokens, r.head_dim, n);
}

/// Cosine of two rows in double; 0 if either is the zero vector (MiniCache has no direction
/// to share there, and 0 keeps the mean defined).
double cosine(const float* a, const float* b, int d) {
  double dot = 0.0, na = 0.0, nb = 0.0;
  for (int c = 0; c < d; ++c) {
    dot += static_cast<double>(a[c]) * b[c];
    na += static_cast<double>(a[c]) * a[c];
    nb += static_cast<double>(b[c]) * b[c];
  }
  if (na == 0.0 || nb == 0.0) return 0.0;
  // One square root of the product: for parallel rows it is exact (sqrt(x * x) == x in IEEE
  // arithmetic), so identical directions give exactly 1; the clamp only catches the last
  // ulp of nearly parallel rows.
  return std::clamp(dot / std::sqrt(na * nb), -1.0, 1.0);
}

/// Sums over (kv head, token) pairs of one layer pair, added up over recordings before the
/// means are taken, so pooling is weighted by pairs.
struct Sums {
  double k_cos = 0, v_cos = 0;
  std::int64_t k_below = 0, v_below = 0, pairs = 0;
};

void accumulate(const Recording& r, double threshold, std::vector<Sums>& sums) {
  const int d = r.head_dim;
  for (int l = 1; l < r.layers; ++l) {
    Sums& s = sums[static_cast<std::size_t>(l - 1)];
    for (int h = 0; h < r.kv_heads; ++h) {
      const float* k0 = r.k_head(l - 1, h);
      const float* k1 = r.k_head(l, h);
      const float* v0 = r.v_head(l - 1, h);
      const float* v1 = r.v_head(l, h);
      for (int t = 0; t < r.tokens; ++t) {
        const std::size_t o = static_cast<std::size_t>(t) * d;
        const double kc = cosine(k0 + o, k1 + o, d), vc = cosine(v0 + o, v1 + o, d);
        s.k_cos += kc;
        s.v_cos += vc;
        s.k_below += kc < threshold;
        s.v_below += vc < threshold;
        ++s.pairs;
      }
    }
  }
}

std::vector<LayerPairSimilarity> finish(const std::vector<Sums>& sums) {
  std::vector<LayerPairSimilarity> out;
  for (std::size_t i = 0; i < sums.size(); ++i) {
    const Sums& s = sums[i];
    LayerPairSimilarity p;
    p.lower = static_cast<int>(i);
    p.upper = static_cast<int>(i) + 1;
    p.pairs = s.pairs;
    if (s.pairs > 0) {  // no tokens: means of nothing stay 0 rather than NaN
      const double n = static_cast<double>(s.pairs);
      p.k_cos = s.k_cos / n;
      p.v_cos = s.v_cos / n;
      p.k_below = static_cast<double>(s.k_below) / n;
      p.v_below = static_cast<double>(s.v_below) / n;
    }
    out.push_back(p);
  }
  return out;
}

}  // namespace

std::vector<LayerPairSimilarity> layer_similarity(const Recording& r, double threshold) {
  check_threshold(threshold);
  check_shape(r, 0);
  std::vector<Sums> sums(static_cast<std::size_t>(std::max(r.layers - 1, 0)));
  accumulate(r, threshold, sums);
  return finish(sums);
}

std::vector<LayerPairSimilarity> layer_similarity(const std::vector<Recording>& rs, double threshold) {
  check_threshold(threshold);
  KVSLIM_CHECK(!rs.empty(), ErrorCode::kInvalidArgument, "layer_similarity: no recordings");
  const Recording& r0 = rs.front();
  for (std::size_t i = 0; i < rs.size(); ++i) {
    const Recording& r = rs[i];
    KVSLIM_CHECK(r.layers == r0.layers && r.kv_heads == r0.kv_heads && r.head_dim == r0.head_dim,
                 ErrorCode::kInvalidArgument,
                 "layer_similarity needs recordings of one model: '{}' has {} layers, {} kv heads, head_dim {} but "
                 "'{}' has {} layers, {} kv heads, head_dim {}",
                 label(r0, 0), r0.layers, r0.kv_heads, r0.head_dim, label(r, i), r.layers, r.kv_heads, r.head_dim);
    check_shape(r, i);
  }
  std::vector<Sums> sums(static_cast<std::size_t>(std::max(r0.layers - 1, 0)));
  for (const Recording& r : rs) accumulate(r, threshold, sums);
  return finish(sums);
}

}  // namespace kvslim::testing
