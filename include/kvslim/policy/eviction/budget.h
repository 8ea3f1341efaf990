// Shared pieces of the eviction policies: a token budget (absolute or relative to the
// tokens seen) with a protected recent window, and the selection of the lowest-scored
// tokens among the evictable ones.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvslim/policy/policy.h"

namespace kvslim {

/// budget=N (tokens per kv head) or ratio=r (a fraction of the tokens seen so far, never
/// below `recent`), plus recent=R, the newest tokens that are never evicted.
struct TokenBudget {
  std::int64_t budget = 0;  // absolute, or 0 when ratio is used
  double ratio = 0.0;       // (0, 1] when relative
  int recent = 0;

  /// Reads budget/ratio/recent from a stage; recent defaults to recent_default(budget).
  /// Throws Error(kInvalidArgument) for recent >= budget, ratio outside (0, 1], both or
  /// neither of budget and ratio.
  static TokenBudget read(StageParams& p, const char* stage, double recent_fraction);
  std::int64_t at(std::int64_t seen) const;
  std::string describe() const;  // "budget=N,recent=R" or "ratio=r,recent=R"
};

/// Indices [first, end) of ordinary tokens a policy may evict: after the codec sinks and
/// before the newest `recent` ordinary tokens.
struct Evictable {
  std::int64_t first = 0, end = 0;
};
Evictable evictable(const TokenStore& store, int recent);

/// Appends to victims the `count` evictable tokens with the lowest importance (ties: the
/// older token goes first), so the result does not depend on the ISA or the sort.
void lowest_scored(const TokenStore& store, Evictable range, std::int64_t count, std::vector<std::int64_t>& victims);

/// The shape H2O, L2-norm and random share: hold the budget by dropping the lowest-importance
/// tokens outside the recent window (and the codec sinks); they differ only in their scorer.
class LowestScoreEviction : public EvictionPolicy {
 public:
  explicit LowestScoreEviction(TokenBudget b) : b_(b) {}
  EvictAction action() const override { return EvictAction::kDrop; }
  std::int64_t budget(std::int64_t seen) const override { return b_.at(seen); }
  std::int64_t fixed_budget() const override { return b_.budget; }
  void select(const TokenStore& store, std::vector<std::int64_t>& victims) const override;

 protected:
  TokenBudget b_;
};

}  // namespace kvslim
