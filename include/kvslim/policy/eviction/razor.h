// RazorAttention (Tang et al., 2024, "RazorAttention: Efficient KV Cache Compression Through
// Retrieval Heads"), the part that runs on the non-retrieval heads: keep S attention sinks and
// the newest W tokens, and fold every token that leaves the window into one compensation
// token per head, the mean of the dropped keys and values counted as N tokens in the softmax
// (its logit gets +ln N, TokenStore specials).
//
//   razor:sinks=S,window=W[,compensate=0|1]     defaults S = 4, W = 1020, compensate = 1
//
// Retrieval heads keep their full cache through per-head overrides of the recipe, which
// `kvslim-llama calibrate` writes (docs/retrieval.md). compensate=0 drops the tokens instead
// (the paper's ablation; then the stage behaves as streaming:sinks=S,window=W).
//
// The head then holds at most S + W + 1 tokens whatever it has seen. The compensation token's
// key is the mean of keys that RoPE has already rotated at their own positions; its position
// (TokenStore::positions) is the newest position folded into it. It costs one f32 token:
// the running mean is updated in double from the stored mean (TokenStore::compensate).
#pragma once

#include "kvslim/policy/policy.h"

namespace kvslim {

class RazorEviction final : public EvictionPolicy {
 public:
  RazorEviction(int sinks, int window, bool compensate) : sinks_(sinks), window_(window), compensate_(compensate) {}
  std::string describe() const override;
  EvictAction action() const override { return compensate_ ? EvictAction::kCompensate : EvictAction::kDrop; }
  std::int64_t budget(std::int64_t) const override { return fixed_budget(); }
  std::int64_t fixed_budget() const override { return sinks_ + window_ + (compensate_ ? 1 : 0); }
  void select(const TokenStore& store, std::vector<std::int64_t>& victims) const override;

 private:
  int sinks_, window_;
  bool compensate_;
};

/// The victims of a sinks + window rule (StreamingLLM, RazorAttention): every ordinary token
/// after the first `sinks` and before the newest `window`.
void outside_sinks_and_window(const TokenStore& store, int sinks, int window, std::vector<std::int64_t>& victims);

}  // namespace kvslim
