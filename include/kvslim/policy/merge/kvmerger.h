// KVMerger (Wang et al., 2024, "Model Tells You Where to Merge: Adaptive KV Cache Merging for
// LLMs on Long-Context Tasks"): adjacent keys of one head that are nearly parallel form
// merging sets; each set becomes one state, a Gaussian-kernel weighted average around its
// pivot (the token with the most accumulated attention), with the same weights for keys and
// values. The state is a weighted special token that counts as the set's size in the softmax
// (logit + ln n), so n identical tokens merged give exactly the attention of the n tokens.
//
//   kvmerger:budget=N[,recent=R,threshold=T,sigma=S,keep=merge|pivot]
//   kvmerger:ratio=r[,...]
//
// After every append has attended (TokenStore::flush, after the chain's eviction stage), a
// head holding more than its budget is brought back to it:
//   1. Candidates are the ordinary tokens after the codec sinks and before the newest R
//      (merged states and the recent window are never merged). "Adjacent" means adjacent
//      among the tokens the head still holds.
//   2. Merging sets are maximal runs of candidates whose key cosine with the previous
//      candidate is >= T. Sets are merged whole, one after another until the head is within
//      its budget (so it may end below it, by at most the last set's size - 2): first the
//      closed runs (the candidate after them breaks the run) in order of their mean adjacent
//      cosine (the most similar first; ties: the older), then the run that reaches the recent
//      window. A run still growing out of the window goes last so that a run is merged once,
//      whole, rather than pair by pair as its tokens leave the window.
//   3. Each set keeps one state: pivot p = the largest importance (ties: the older token),
//      weights g_i = exp(-|k_i - k_p|^2 / (2 S^2 |k_p|^2)) normalized to sum 1 (the distance is
//      relative to the pivot's norm, so S means the same on every model), k = sum g_i k_i,
//      v = sum g_i v_i (in double), weight n, position and importance: the pivot's position
//      and the set's summed importance. keep=pivot is the ablation: the pivot is kept as it
//      is (weight 1) and the others dropped, i.e. the same tokens leave without being merged.
//   4. If merging cannot remove enough (no runs left), the lowest-importance candidates are
//      evicted, and after them the lowest-importance merged states (ties: the older).
// Merged states are stored in f32 as special tokens (with any codec: they are few).
#pragma once

#include "kvslim/policy/eviction/budget.h"
#include "kvslim/policy/policy.h"

namespace kvslim {

class KVMerger final : public MergePolicy {
 public:
  struct Options {
    TokenBudget budget;
    double threshold = 0.9;  // cosine
    double sigma = 0.5;
    bool keep_pivot = false;  // keep=pivot ablation
  };
  explicit KVMerger(Options o) : o_(o) {}
  std::string describe() const override;
  bool cross_layer() const override { return false; }
  void merge(const kernels::KernelTable& kt, TokenStore& store) const override;
  std::shared_ptr<const Scorer> implied_scorer() const override;
  std::int64_t fixed_budget() const override { return o_.budget.budget; }
  const Options& options() const noexcept { return o_; }

 private:
  Options o_;
};

}  // namespace kvslim
