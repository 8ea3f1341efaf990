// SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"):
// prompt compression. At the end of a prefill chunk, every prompt token outside the
// observation window (the chunk's last W tokens) is scored by the attention the window's W
// queries give it (summed over the kv head's query heads), smoothed by pooling over K
// neighbouring tokens; the top budget - W are kept together with the window. Decode tokens
// are then kept, as in the paper: the budget applies to the prompt only.
//
//   snapkv:budget=N[,window=W][,kernel=K][,pool=avg|max]   defaults W = 32, K = 7, avg
//
// A prefill chunk is an append of more than one token; every such chunk is compressed
// (chunked prefill compresses after each chunk).
#pragma once

#include "kvslim/policy/policy.h"

namespace kvslim {

/// The observation-window attention of the latest prefill chunk (overwrites importance;
/// decode steps leave it alone).
class ObservationScore final : public Scorer {
 public:
  explicit ObservationScore(int window) : window_(window) {}
  std::string describe() const override { return "observation"; }
  bool needs_attention() const override { return true; }
  void on_append(TokenStore&, std::int64_t, std::int64_t, const float*) const override {}
  void on_attention(TokenStore& store, std::span<const float> mass) const override;
  int observation_window() const override { return window_; }

 private:
  int window_;
};

class SnapKVEviction final : public EvictionPolicy {
 public:
  SnapKVEviction(int budget, int window, int kernel, bool max_pool)
      : budget_(budget), window_(window), kernel_(kernel), max_pool_(max_pool) {}
  std::string describe() const override;
  EvictAction action() const override { return EvictAction::kDrop; }
  std::int64_t budget(std::int64_t) const override { return budget_; }
  std::int64_t fixed_budget() const override { return budget_; }
  void select(const TokenStore& store, std::vector<std::int64_t>& victims) const override;
  std::shared_ptr<const Scorer> implied_scorer() const override;
  /// Pooled score of prompt token j: mean (or max) of scores[j - K/2 .. j + K/2] within
  /// [0, n). Exposed for the oracle test.
  static std::vector<float> pool(const float* scores, std::int64_t n, int kernel, bool max_pool);

 private:
  int budget_, window_, kernel_;
  bool max_pool_;
};

}  // namespace kvslim
