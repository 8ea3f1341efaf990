#include "kvslim/testing/replay.h"

#include <algorithm>
#include <cmath>

#include "check.h"
#include "kvslim/cache/kv_cache.h"

namespace kvslim::testing {

ReplayResult replay(const std::vector<Recording>& recs, const std::string& recipe, const ReplayOptions& opt,
                    const ReplayProgress& progress) {
  KVSLIM_CHECK(opt.chunk >= 1, ErrorCode::kInvalidArgument, "replay: chunk {} must be >= 1", opt.chunk);
  ReplayResult res;
  res.recipe = recipe;
  std::vector<double> errs;
  double cos_sum = 0.0;
  std::int64_t total_values = 0, seen_values = 0;
  double kept_sum = 0.0;
  int done = 0;
  for (const Recording& r : recs) {
    CacheConfig cfg;
    cfg.layers = r.layers;
    cfg.q_heads = r.q_heads;
    cfg.kv_heads = r.kv_heads;
    cfg.head_dim = r.head_dim;
    cfg.max_tokens = r.tokens;
    cfg.recipe = recipe;
    if (opt.pre_rope) {
      KVSLIM_CHECK(!r.k_pre.empty(), ErrorCode::kInvalidArgument, "replay: recording '{}' has no pre-RoPE keys", r.dir);
      cfg.pre_rope_keys = true;
      cfg.rope = RopeSpec{r.rope_theta, 0, r.rope == "interleaved", 1.0};
    }
    KVCache cache(cfg);
    const int T = opt.max_tokens > 0 ? std::min(opt.max_tokens, r.tokens) : r.tokens;
    const std::int64_t d = r.head_dim;
    std::vector<float> out(static_cast<std::size_t>(r.q_heads) * opt.chunk * d);
    for (int t0 = 0; t0 < T; t0 += opt.chunk) {
      const int n = std::min(opt.chunk, T - t0);
      for (int l = 0; l < r.layers; ++l) {
        // Recordings are [heads][tokens][d]: a view with the recording's token stride.
        Layout kv;
        kv.rank = 3;
        kv.shape = {r.kv_heads, n, d, 0};
        kv.strides = {static_cast<std::int64_t>(r.tokens) * d, d, 1, 0};
        cache.append(l, TensorView<const float>((opt.pre_rope ? r.k_pre_head(l, 0) : r.k_head(l, 0)) + t0 * d, kv),
                     TensorView<const float>(r.v_head(l, 0) + t0 * d, kv));
        Layout ql = kv;
        ql.shape[0] = r.q_heads;
        TensorView<float> o(out.data(), {r.q_heads, n, d});
        cache.attend(l, TensorView<const float>(r.q_head(l, 0) + t0 * d, ql), o);
        for (int h = 0; h < r.q_heads; ++h)
          for (int i = 0; i < n; ++i) {
            const float* ref = r.out_head(l, h) + (t0 + i) * d;
            const float* got = o.row(h, i);
            double e2 = 0.0, r2 = 0.0, g2 = 0.0, dot = 0.0;
            for (std::int64_t c = 0; c < d; ++c) {
              e2 += (got[c] - ref[c]) * static_cast<double>(got[c] - ref[c]);
              r2 += static_cast<double>(ref[c]) * ref[c];
              g2 += static_cast<double>(got[c]) * got[c];
              dot += static_cast<double>(got[c]) * ref[c];
            }
            errs.push_back(std::sqrt(e2 / std::max(r2, 1e-30)));
            cos_sum += dot / std::max(std::sqrt(r2 * g2), 1e-30);
          }
      }
    }
    const CacheStats st = cache.stats();
    res.bytes += st.total_bytes;
    total_values += st.total_tokens * d * 2;
    seen_values += st.total_seen * d * 2;
    kept_sum += st.kept;
    if (progress) progress(++done, static_cast<int>(recs.size()));
  }
  res.samples = static_cast<std::int64_t>(errs.size());
  if (!errs.empty()) {
    double sum = 0.0;
    for (double e : errs) sum += e;
    res.rel_err_mean = sum / static_cast<double>(errs.size());
    res.cosine_mean = cos_sum / static_cast<double>(errs.size());
    const std::size_t k = std::min(errs.size() - 1, static_cast<std::size_t>(0.99 * static_cast<double>(errs.size())));
    std::nth_element(errs.begin(), errs.begin() + static_cast<std::ptrdiff_t>(k), errs.end());
    res.rel_err_p99 = errs[k];
  }
  if (total_values > 0) {
    res.bits_per_value = static_cast<double>(res.bytes) * 8.0 / static_cast<double>(total_values);
    res.ratio = 32.0 / res.bits_per_value;
  }
  if (res.bytes > 0)
    res.ratio_seen = static_cast<double>(seen_values) * 32.0 / (static_cast<double>(res.bytes) * 8.0);
  if (!recs.empty()) res.kept = kept_sum / static_cast<double>(recs.size());
  return res;
}

}  // namespace kvslim::testing
