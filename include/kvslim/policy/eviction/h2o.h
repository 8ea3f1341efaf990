// H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
// Large Language Models"): keep the tokens with the largest accumulated attention plus a
// recent window; evict the lowest-scored others whenever the budget is exceeded, at every
// decode step.
//
//   h2o:budget=N[,recent=R]     R defaults to N/2 (the paper's half heavy, half recent)
//   h2o:ratio=r[,recent=R]      budget = max(R, r * tokens seen)
//
// GQA: the accumulated score of a kv head's token is the attention it received summed over
// all the query heads of its group (and over the queries of each call), i.e. the mass
// attend() computes; a token is kept for the whole group or not at all.
#pragma once

#include "kvslim/policy/eviction/budget.h"
#include "kvslim/policy/policy.h"

namespace kvslim {

/// Accumulated attention (H2O's score): importance += mass of every attend()/observe().
class AccumulatedAttention final : public Scorer {
 public:
  std::string describe() const override { return "attention"; }
  bool needs_attention() const override { return true; }
  void on_append(TokenStore&, std::int64_t, std::int64_t, const float*) const override {}
  void on_attention(TokenStore& store, std::span<const float> mass) const override;
};

class H2OEviction final : public LowestScoreEviction {
 public:
  using LowestScoreEviction::LowestScoreEviction;
  std::string describe() const override { return "h2o:" + b_.describe(); }
  std::shared_ptr<const Scorer> implied_scorer() const override;
};

}  // namespace kvslim
