// A seeded generator of LLM-like keys, values and queries, for the shapes and traits the
// small real models lack: head_dim 64/128, thousands of tokens, a few key outlier channels
// 10-20x the median channel, RoPE, an attention sink on the first tokens and a heavy-tailed
// (Zipf-like) distribution of attention over the rest. Deterministic for a given seed on
// every platform (own PRNG, no std:: distributions).
//
// Real recordings remain the judge of quality; this is for scale, shapes and speed.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace kvslim::testing {

struct SyntheticOptions {
  int q_heads = 32;
  int kv_heads = 8;
  int head_dim = 128;
  int tokens = 4096;
  std::uint64_t seed = 1;
  int outlier_channels = 4;      // key channels (in RoPE pairs) with large magnitude
  // Where the outlier pairs sit: true (default) on the lowest RoPE frequencies, where RoPE
  // barely turns them; false on the fastest ones, where RoPE turns their large mean within
  // a page (the case pre-RoPE key caching is for).
  bool outliers_low_frequency = true;
  // What makes an outlier channel large: false (default) a spread outlier_scale x wider;
  // true a mean of +-outlier_scale x the channel's scale on a normal spread, the same sign on
  // every token (KVQuant's pre-RoPE outlier channels, "consistently large magnitude").
  bool outliers_consistent = false;
  float outlier_scale = 15.0f;   // their magnitude relative to the median channel
  int sink_tokens = 1;           // first tokens that act as attention sinks
  float sink_strength = 9.0f;    // logit of the sink token (after the 1/sqrt(d) scale)
  float zipf_exponent = 1.1f;    // popularity of heavy-hitter tokens ~ 1 / rank^s
  int targets_per_query = 8;     // heavy hitters each query looks at
  float focus = 7.0f;            // logit a query gives each of its targets
  float rope_theta = 10000.0f;   // RoPE base, half-split (Hugging Face) layout
  // Planted retrieval heads (RazorAttention calibration). With period > 0 the token sequence
  // (SyntheticLayer::token_ids) is one random sequence of `period` distinct ids repeated, and
  // every query head of the kv heads named in retrieval_heads, as (layer, kv head), attends
  // from token t >= period to t - period + 1 (induction: what followed the earlier occurrence
  // of its token, logit retrieval_focus) and to t - period (echo, half that logit) instead
  // of heavy hitters. The other heads are unchanged.
  int period = 0;
  std::vector<std::pair<int, int>> retrieval_heads;
  float retrieval_focus = 10.0f;
  // > 0: the heads that are not retrieval heads pick their heavy hitters among the newest
  // local_window tokens only (the local heads RazorAttention assumes); 0: anywhere.
  int local_window = 0;
  // Outliers of large models that the small real ones lack (off by default; they draw from
  // their own random stream, so the data of the options above does not change with them):
  // value channels value_outlier_scale x the others (per-token value quantizers spend their
  // range on them), and massive activations: massive_tokens tokens (the first one, then
  // random ones) whose keys and values carry +-massive_scale x the median channel magnitude
  // in two channels per head (Sun et al. 2024, "Massive activations in large language models").
  int value_outlier_channels = 0;
  float value_outlier_scale = 15.0f;
  int massive_tokens = 0;
  float massive_scale = 100.0f;
};

struct SyntheticLayer {
  int q_heads = 0, kv_heads = 0, head_dim = 0, tokens = 0;
  std::vector<float> k;  // [kv_heads][tokens][head_dim], post-RoPE
  std::vector<float> v;  // [kv_heads][tokens][head_dim]
  std::vector<float> q;  // [q_heads][tokens][head_dim], post-RoPE
  std::vector<int> outlier_channels;  // key channels that carry outliers
  std::vector<int> token_ids;         // [tokens]: the sequence's token ids (see period)
  std::vector<int> value_outlier_channels;  // value channels that carry outliers
  std::vector<int> massive_tokens;          // tokens with massive activations, ascending

  const float* k_head(int h) const { return k.data() + static_cast<std::size_t>(h) * tokens * head_dim; }
  const float* v_head(int h) const { return v.data() + static_cast<std::size_t>(h) * tokens * head_dim; }
  const float* q_head(int h) const { return q.data() + static_cast<std::size_t>(h) * tokens * head_dim; }
};

/// Generate one layer; `layer` perturbs the seed so layers differ.
SyntheticLayer generate_layer(const SyntheticOptions& options, int layer = 0);

}  // namespace kvslim::testing
