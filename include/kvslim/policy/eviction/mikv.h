// Mixed precision instead of eviction.
//
// MiKV (Yang et al., 2024, "No Token Left Behind: Reliable KV Cache Compression via
// Importance-Aware Mixed Precision Quantization"): the tokens an eviction policy would drop
// are kept in a low-precision codec instead; the important ones stay in the chain's codec.
//
//   mikv:budget=N[,recent=R][,lo=(CODEC)][,total=T]      (or ratio=r instead of budget=N)
//
//   budget / ratio   tokens per kv head kept in the chain's own codec (sinks, pages, window);
//                    the lowest-scored others beyond it are demoted, at every step
//   recent           newest tokens never demoted (default budget / 2, as H2O)
//   lo               the demotion codec, a codec recipe in parentheses (default
//                    (kivi:kbits=2,vbits=2)); it must be cheaper per token than the chain's
//                    codec and take no residual or sinks
//   total            optional budget over every tier: beyond it the lowest-scored demoted
//                    tokens are dropped (0 = none, the default)
//
// So `zipcache | mikv:budget=128,recent=32,lo=(kivi:kbits=2,vbits=2),total=512 |
// kivi:kbits=8,vbits=8,residual=32` has three precisions and a drop: the newest 32 tokens f32
// (the codec's residual), 128 salient tokens 8-bit, up to 384 more 2-bit, the rest dropped.
// Scores come from H2O's accumulated attention unless the chain names a scorer (`zipcache`).
// A demoted token never comes back up (docs/mixed_precision.md says why).
//
// ZipCache (He et al., 2024): `zipcache` is a scorer: accumulated attention divided by the
// number of queries that could see the token, which plain accumulation lacks (it favours
// old tokens, which more queries have seen). It counts one query per position (prefill and
// decode both attend with every token), from the token's position to the newest one.
#pragma once

#include <memory>

#include "kvslim/policy/eviction/budget.h"
#include "kvslim/policy/policy.h"

namespace kvslim {

class MiKVEviction final : public EvictionPolicy {
 public:
  MiKVEviction(TokenBudget b, std::shared_ptr<const Codec> lo, std::int64_t total)
      : b_(b), lo_(std::move(lo)), total_(total) {}
  std::string describe() const override;
  EvictAction action() const override { return EvictAction::kDemote; }
  std::int64_t budget(std::int64_t seen) const override { return total_ > 0 ? total_ : (seen > 0 ? seen : 1); }
  std::int64_t fixed_budget() const override { return total_; }
  void select(const TokenStore& store, std::vector<std::int64_t>& victims) const override;
  void select_drops(const TokenStore& store, std::vector<std::int64_t>& victims) const override;
  std::shared_ptr<const Scorer> implied_scorer() const override;
  const Codec* demote_codec() const override { return lo_.get(); }
  /// Tokens per head kept in the chain's codec.
  std::int64_t hi_budget(std::int64_t seen) const { return b_.at(seen); }

 private:
  TokenBudget b_;
  std::shared_ptr<const Codec> lo_;
  std::int64_t total_;
};

/// ZipCache's normalized attention: importance = attention received / queries that could
/// see the token.
class NormalizedAttention final : public Scorer {
 public:
  std::string describe() const override { return "zipcache"; }
  bool needs_attention() const override { return true; }
  void on_append(TokenStore&, std::int64_t, std::int64_t, const float*) const override {}
  void on_attention(TokenStore& store, std::span<const float> mass) const override;
};

}  // namespace kvslim
