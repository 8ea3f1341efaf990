// StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention
// Sinks"): keep the first S tokens (attention sinks) and the newest W; evict the rest,
// oldest first.
//
//   streaming:sinks=S,window=W     defaults S = 4, W = 1020 (budget S + W = 1024)
//
// The sinks are the first S tokens the head holds, in whatever segment the codec keeps them
// (add the codec's own sinks=S to keep them in f32 as well).
#pragma once

#include "kvslim/policy/policy.h"

namespace kvslim {

class StreamingEviction final : public EvictionPolicy {
 public:
  StreamingEviction(int sinks, int window) : sinks_(sinks), window_(window) {}
  std::string describe() const override;
  EvictAction action() const override { return EvictAction::kDrop; }
  std::int64_t budget(std::int64_t) const override { return sinks_ + window_; }
  std::int64_t fixed_budget() const override { return sinks_ + window_; }
  void select(const TokenStore& store, std::vector<std::int64_t>& victims) const override;

 private:
  int sinks_, window_;
};

}  // namespace kvslim
