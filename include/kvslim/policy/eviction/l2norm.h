// L2-norm eviction (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for
// KV Cache Compression"): keep the tokens whose keys have the smallest L2 norm, plus the
// recent window. No attention needed. The paper leaves the first layers whole: say so with
// an override, e.g. "l2norm:budget=512 ; [layers=0-1] f32".
//
//   l2norm:budget=N[,recent=R]  or  l2norm:ratio=r[,recent=R]    R defaults to N/2
#pragma once

#include "kvslim/policy/eviction/budget.h"
#include "kvslim/policy/policy.h"

namespace kvslim {

/// importance = -||k||: the smallest norms are the most important.
class KeyNormScore final : public Scorer {
 public:
  std::string describe() const override { return "keynorm"; }
  bool needs_attention() const override { return false; }
  void on_append(TokenStore& store, std::int64_t first, std::int64_t count, const float* k) const override;
  void on_attention(TokenStore&, std::span<const float>) const override {}
};

class L2NormEviction final : public LowestScoreEviction {
 public:
  using LowestScoreEviction::LowestScoreEviction;
  std::string describe() const override { return "l2norm:" + b_.describe(); }
  std::shared_ptr<const Scorer> implied_scorer() const override;
};

}  // namespace kvslim
