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
// head holding E tokens more than its budget is brought back to it:
//   1. Entries are the ordinary tokens after the codec sinks and before the newest R, and
//      the merged states made earlier (each at its pivot's position), in position order.
//      "Adjacent" means adjacent in that order. The recent window is never merged.
//   2. Merging sets are runs of adjacent entries whose key cosine is >= T, as in the paper,
//      joined edge by edge: the E most similar adjacent pairs (cosine >= T; ties: the older
//      pair) are taken, and each maximal chain of taken pairs is one set. Each taken pair
//      removes one entry, so the head ends exactly at its budget when there are E such
//      pairs. A merged state can absorb its neighbours at later steps, so a run that leaves
//      the recent window token by token still becomes one state.
//   3. Each set keeps one state: pivot p = the largest importance (ties: the older entry),
//      weights g_i = n_i exp(-|k_i - k_p|^2 / (2 S^2 |k_p|^2)) normalized to sum 1, where n_i
//      is what entry i stands for (1, or a merged state's weight; the distance is relative to
//      the pivot's norm, so S means the same on every model); k = sum g_i k_i, v = sum g_i
//      v_i (in double); weight sum n_i; position: the pivot's; importance: the set's sum.
//      keep=pivot is the ablation: the pivot is kept as it is (weight 1) and the others
//      dropped, i.e. the same tokens leave without being merged.
//   4. If fewer than E pairs pass T, the rest of the excess is evicted: the lowest-importance
//      ordinary entries first, then the lowest-importance merged states (ties: the older).
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
