// Random eviction: the baseline every quality table needs. Each token gets a uniform random
// priority from (seed, its index in the sequence) when it is appended; the lowest priorities
// outside the recent window leave first, so the kept set is a uniform sample, reproducible
// for a seed on every ISA and thread count.
//
//   random:budget=N[,recent=R][,seed=S]  or  random:ratio=r,...    R defaults to N/2, S to 0
#pragma once

#include <cstdint>

#include "kvslim/policy/eviction/budget.h"
#include "kvslim/policy/policy.h"

namespace kvslim {

class RandomScore final : public Scorer {
 public:
  explicit RandomScore(std::uint64_t seed) : seed_(seed) {}
  std::string describe() const override { return "randomscore"; }
  bool needs_attention() const override { return false; }
  void on_append(TokenStore& store, std::int64_t first, std::int64_t count, const float* k) const override;
  void on_attention(TokenStore&, std::span<const float>) const override {}

 private:
  std::uint64_t seed_;
};

class RandomEviction final : public LowestScoreEviction {
 public:
  RandomEviction(TokenBudget b, std::uint64_t seed) : LowestScoreEviction(b), seed_(seed) {}
  std::string describe() const override;
  std::shared_ptr<const Scorer> implied_scorer() const override;

 private:
  std::uint64_t seed_;
};

}  // namespace kvslim
