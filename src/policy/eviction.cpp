// The eviction family: H2O, StreamingLLM, L2-norm, SnapKV and random (headers in
// include/kvslim/policy/eviction/), their scorers and recipe factories.
#include <algorithm>
#include <cmath>

#include "check.h"
#include "kvslim/cache/token_store.h"
#include "kvslim/policy/eviction/budget.h"
#include "kvslim/policy/eviction/h2o.h"
#include "kvslim/policy/eviction/l2norm.h"
#include "kvslim/policy/eviction/random.h"
#include "kvslim/policy/eviction/razor.h"
#include "kvslim/policy/eviction/snapkv.h"
#include "kvslim/policy/eviction/streaming.h"
#include "policy/codecs.h"

namespace kvslim {

// ---- shared pieces ----

TokenBudget TokenBudget::read(StageParams& p, const char* stage, double recent_fraction) {
  TokenBudget b;
  const bool has_budget = p.has("budget"), has_ratio = p.has("ratio");
  KVSLIM_CHECK(has_budget != has_ratio, ErrorCode::kInvalidArgument,
               "recipe stage '{}': give exactly one of budget=N (tokens per kv head) or ratio=r (fraction of the "
               "tokens seen)",
               stage);
  if (has_budget) b.budget = p.get_int("budget", 0, 1, 1 << 30);
  if (has_ratio) {
    b.ratio = p.get_double("ratio", 0.0, -1e300, 1e300);
    KVSLIM_CHECK(b.ratio > 0.0 && b.ratio <= 1.0, ErrorCode::kInvalidArgument,
                 "recipe stage '{}': ratio={} must be in (0, 1]", stage, b.ratio);
  }
  const int def_recent = has_budget ? static_cast<int>(static_cast<double>(b.budget) * recent_fraction) : 32;
  b.recent = p.get_int("recent", def_recent, 0, 1 << 30);
  KVSLIM_CHECK(!has_budget || b.recent < b.budget, ErrorCode::kInvalidArgument,
               "recipe stage '{}': recent={} must be smaller than budget={}", stage, b.recent, b.budget);
  return b;
}

std::int64_t TokenBudget::at(std::int64_t seen) const {
  if (budget > 0) return budget;
  return std::max<std::int64_t>({1, recent, static_cast<std::int64_t>(std::floor(ratio * static_cast<double>(seen)))});
}

std::string TokenBudget::describe() const {
  return budget > 0 ? fmt::format("budget={},recent={}", budget, recent) : fmt::format("ratio={},recent={}", ratio, recent);
}

Evictable evictable(const TokenStore& store, int recent) {
  Evictable e;
  e.first = store.sink_count();
  e.end = std::max(e.first, store.ordinary() - recent);
  return e;
}

void lowest_scored(const TokenStore& store, Evictable range, std::int64_t count, std::vector<std::int64_t>& victims) {
  count = std::min(count, range.end - range.first);
  if (count <= 0) return;
  const auto imp = store.importance();
  if (count == 1) {  // a decode step: one linear scan, no allocation
    std::int64_t best = range.first;
    for (std::int64_t j = range.first + 1; j < range.end; ++j)
      if (imp[j] < imp[best]) best = j;  // strict: ties keep the older token
    victims.push_back(best);
    return;
  }
  std::vector<std::int64_t> cand;
  cand.reserve(static_cast<std::size_t>(range.end - range.first));
  for (std::int64_t j = range.first; j < range.end; ++j) cand.push_back(j);
  auto less = [&](std::int64_t a, std::int64_t b) { return imp[a] < imp[b] || (imp[a] == imp[b] && a < b); };
  std::nth_element(cand.begin(), cand.begin() + (count - 1), cand.end(), less);
  victims.insert(victims.end(), cand.begin(), cand.begin() + count);
}

namespace {
// Tokens over the budget, or 0.
std::int64_t excess(const TokenStore& store, std::int64_t budget) { return std::max<std::int64_t>(0, store.size() - budget); }

std::uint64_t splitmix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
}  // namespace

void LowestScoreEviction::select(const TokenStore& store, std::vector<std::int64_t>& victims) const {
  lowest_scored(store, evictable(store, b_.recent), excess(store, budget(store.seen())), victims);
}

// ---- H2O ----

void AccumulatedAttention::on_attention(TokenStore& store, std::span<const float> mass) const {
  auto imp = store.importance();
  for (std::size_t j = 0; j < mass.size() && j < imp.size(); ++j) imp[j] += mass[j];
}

std::shared_ptr<const Scorer> H2OEviction::implied_scorer() const { return std::make_shared<AccumulatedAttention>(); }

// ---- StreamingLLM ----

std::string StreamingEviction::describe() const { return fmt::format("streaming:sinks={},window={}", sinks_, window_); }

void outside_sinks_and_window(const TokenStore& store, int sinks, int window, std::vector<std::int64_t>& victims) {
  const std::int64_t ord = store.ordinary();
  for (std::int64_t j = sinks; j < ord - window; ++j) victims.push_back(j);
}

void StreamingEviction::select(const TokenStore& store, std::vector<std::int64_t>& victims) const {
  outside_sinks_and_window(store, sinks_, window_, victims);
}

// ---- RazorAttention ----

std::string RazorEviction::describe() const {
  return fmt::format("razor:sinks={},window={}{}", sinks_, window_, compensate_ ? "" : ",compensate=0");
}

void RazorEviction::select(const TokenStore& store, std::vector<std::int64_t>& victims) const {
  outside_sinks_and_window(store, sinks_, window_, victims);
}

// ---- L2 norm ----

void KeyNormScore::on_append(TokenStore& store, std::int64_t first, std::int64_t count, const float* k) const {
  auto imp = store.importance();
  const int d = store.head_dim();
  for (std::int64_t i = 0; i < count; ++i) {
    double n2 = 0.0;
    for (int c = 0; c < d; ++c) n2 += static_cast<double>(k[i * d + c]) * k[i * d + c];
    imp[first + i] = -static_cast<float>(std::sqrt(n2));
  }
}

std::shared_ptr<const Scorer> L2NormEviction::implied_scorer() const { return std::make_shared<KeyNormScore>(); }

// ---- random ----

void RandomScore::on_append(TokenStore& store, std::int64_t first, std::int64_t count, const float*) const {
  auto imp = store.importance();
  // The token's number in the sequence (seen() already counts this append).
  const std::int64_t seq0 = store.seen() - (store.ordinary() - first);
  for (std::int64_t i = 0; i < count; ++i) {
    const std::uint64_t h = splitmix(seed_ ^ splitmix(static_cast<std::uint64_t>(seq0 + i)));
    imp[first + i] = static_cast<float>(h >> 40) * (1.0f / 16777216.0f);  // 24 bits: exact in float
  }
}

std::string RandomEviction::describe() const { return fmt::format("random:{},seed={}", b_.describe(), seed_); }

std::shared_ptr<const Scorer> RandomEviction::implied_scorer() const { return std::make_shared<RandomScore>(seed_); }

// ---- SnapKV ----

void ObservationScore::on_attention(TokenStore& store, std::span<const float> mass) const {
  if (store.last_append_count() <= 1) return;  // decode: the prompt's scores stay
  auto imp = store.importance();
  for (std::size_t j = 0; j < mass.size() && j < imp.size(); ++j) imp[j] = mass[j];
}

std::string SnapKVEviction::describe() const {
  return fmt::format("snapkv:budget={},window={},kernel={},pool={}", budget_, window_, kernel_, max_pool_ ? "max" : "avg");
}

std::vector<float> SnapKVEviction::pool(const float* scores, std::int64_t n, int kernel, bool max_pool) {
  std::vector<float> out(static_cast<std::size_t>(n));
  const std::int64_t h = kernel / 2;
  for (std::int64_t j = 0; j < n; ++j) {
    const std::int64_t a = std::max<std::int64_t>(0, j - h), b = std::min<std::int64_t>(n, j + h + 1);
    double acc = max_pool ? -INFINITY : 0.0;
    for (std::int64_t i = a; i < b; ++i) acc = max_pool ? std::max(acc, static_cast<double>(scores[i])) : acc + scores[i];
    // avg pooling divides by the kernel size, as a zero-padded avg_pool1d does
    out[static_cast<std::size_t>(j)] = static_cast<float>(max_pool ? acc : acc / kernel);
  }
  return out;
}

void SnapKVEviction::select(const TokenStore& store, std::vector<std::int64_t>& victims) const {
  const std::int64_t chunk = store.last_append_count();
  if (chunk <= 1 || store.size() <= budget_) return;  // decode tokens are kept
  const std::int64_t ord = store.ordinary();
  const std::int64_t w = std::min<std::int64_t>(window_, chunk);
  // Prompt tokens outside the observation window, after the codec sinks.
  const Evictable range{store.sink_count(), std::max<std::int64_t>(store.sink_count(), ord - w)};
  const std::int64_t keep = std::max<std::int64_t>(0, budget_ - (store.size() - (range.end - range.first)));
  const std::int64_t n = range.end - range.first;
  if (n <= keep) return;
  const auto imp = store.importance();
  const std::vector<float> pooled = pool(imp.data() + range.first, n, kernel_, max_pool_);
  std::vector<std::int64_t> cand(static_cast<std::size_t>(n));
  for (std::int64_t j = 0; j < n; ++j) cand[static_cast<std::size_t>(j)] = j;
  // Keep the `keep` highest pooled scores (ties: the older token stays).
  auto more = [&](std::int64_t a, std::int64_t b) { return pooled[a] > pooled[b] || (pooled[a] == pooled[b] && a < b); };
  std::nth_element(cand.begin(), cand.begin() + keep, cand.end(), more);
  for (std::size_t i = static_cast<std::size_t>(keep); i < cand.size(); ++i) victims.push_back(range.first + cand[i]);
}

std::shared_ptr<const Scorer> SnapKVEviction::implied_scorer() const { return std::make_shared<ObservationScore>(window_); }

// ---- factories ----

namespace detail {

BuiltStage eviction_stage(std::shared_ptr<const EvictionPolicy> e) {
  return BuiltStage{StageKind::kEviction, nullptr, std::move(e), nullptr, nullptr};
}

BuiltStage make_h2o(StageParams& p, int) {
  const TokenBudget b = TokenBudget::read(p, "h2o", 0.5);
  p.check_all_used({"budget", "ratio", "recent"});
  return eviction_stage(std::make_shared<H2OEviction>(b));
}

BuiltStage make_l2norm(StageParams& p, int) {
  const TokenBudget b = TokenBudget::read(p, "l2norm", 0.5);
  p.check_all_used({"budget", "ratio", "recent"});
  return eviction_stage(std::make_shared<L2NormEviction>(b));
}

BuiltStage make_random(StageParams& p, int) {
  const TokenBudget b = TokenBudget::read(p, "random", 0.5);
  const int seed = p.get_int("seed", 0, 0, 1 << 30);
  p.check_all_used({"budget", "ratio", "recent", "seed"});
  return eviction_stage(std::make_shared<RandomEviction>(b, static_cast<std::uint64_t>(seed)));
}

BuiltStage make_streaming(StageParams& p, int) {
  const int sinks = p.get_int("sinks", 4, 0, 1 << 20);
  const int window = p.get_int("window", 1020, 1, 1 << 30);
  p.check_all_used({"sinks", "window"});
  return eviction_stage(std::make_shared<StreamingEviction>(sinks, window));
}

BuiltStage make_razor(StageParams& p, int) {
  const int sinks = p.get_int("sinks", 4, 0, 1 << 20);
  const int window = p.get_int("window", 1020, 1, 1 << 30);
  const int compensate = p.get_int("compensate", 1, 0, 1);
  p.check_all_used({"sinks", "window", "compensate"});
  return eviction_stage(std::make_shared<RazorEviction>(sinks, window, compensate != 0));
}

BuiltStage make_snapkv(StageParams& p, int) {
  const int budget = p.get_int("budget", 1024, 1, 1 << 30);
  const int window = p.get_int("window", 32, 1, 1 << 20);
  const int kernel = p.get_int("kernel", 7, 1, 1023);
  const std::string pool = p.get_string("pool", "avg");
  KVSLIM_CHECK(pool == "avg" || pool == "max", ErrorCode::kInvalidArgument,
               "recipe stage 'snapkv': pool={} must be avg or max", pool);
  KVSLIM_CHECK(window <= budget, ErrorCode::kInvalidArgument,
               "recipe stage 'snapkv': window={} is larger than budget={}", window, budget);
  p.check_all_used({"budget", "window", "kernel", "pool"});
  return eviction_stage(std::make_shared<SnapKVEviction>(budget, window, kernel, pool == "max"));
}

}  // namespace detail
}  // namespace kvslim
