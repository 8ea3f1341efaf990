// The eviction family: H2O, StreamingLLM, L2-norm, SnapKV and random (headers in
// include/kvslim/policy/eviction/), their scorers and recipe factories.
#include <algorithm>
#include <cmath>

#include "check.h"
#include "kvslim/cache/token_store.h"
#include "kvslim/policy/eviction/budget.h"
#include "kvslim/policy/eviction/h2o.h"
#include "kvslim/policy/eviction/l2norm.h"
#include "kvslim/policy/eviction/mikv.h"
#include "kvslim/policy/eviction/random.h"
#include "kvslim/policy/eviction/razor.h"
#include "kvslim/policy/eviction/snapkv.h"
#include "kvslim/policy/eviction/streaming.h"
#include "kvslim/cache/recipe.h"
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

// ---- MiKV and ZipCache ----

std::string MiKVEviction::describe() const {
  return fmt::format("mikv:{},lo=({}){}", b_.describe(), lo_->describe(), total_ > 0 ? fmt::format(",total={}", total_) : "");
}

void MiKVEviction::select(const TokenStore& store, std::vector<std::int64_t>& victims) const {
  // The chain's codec holds the ordinary tokens (sinks, pages, window); the demoted ones
  // sit after them and are never selected again.
  const std::int64_t over = std::max<std::int64_t>(0, store.ordinary() - b_.at(store.seen()));
  lowest_scored(store, evictable(store, b_.recent), over, victims);
}

void MiKVEviction::select_drops(const TokenStore& store, std::vector<std::int64_t>& victims) const {
  if (total_ <= 0) return;
  const std::int64_t over = std::max<std::int64_t>(0, store.size() - total_);
  lowest_scored(store, Evictable{store.ordinary(), store.specials_first()}, over, victims);
}

std::shared_ptr<const Scorer> MiKVEviction::implied_scorer() const { return std::make_shared<AccumulatedAttention>(); }

void NormalizedAttention::on_attention(TokenStore& store, std::span<const float> mass) const {
  // Queries that could see token j: one per position from its own to the newest. This call
  // added the last `n` of them (n = the append's queries), so the old mean over
  // `count - n` queries (at least 0) becomes the mean over `count`.
  auto imp = store.importance();
  const std::vector<std::int64_t> pos = store.positions();
  const std::int64_t last = store.last_position();
  const std::int64_t n = std::max<std::int64_t>(1, store.last_append_count());
  for (std::size_t j = 0; j < mass.size() && j < imp.size(); ++j) {
    const std::int64_t count = std::max<std::int64_t>(1, last - pos[j] + 1);
    const std::int64_t before = std::max<std::int64_t>(0, count - n);
    imp[j] = static_cast<float>((static_cast<double>(imp[j]) * static_cast<double>(before) + mass[j]) /
                                static_cast<double>(count));
  }
}

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

BuiltStage make_mikv(StageParams& p, const StageContext& ctx) {
  const TokenBudget b = TokenBudget::read(p, "mikv", 0.5);
  const std::string lo_text = p.get_string("lo", "kivi:kbits=2,vbits=2");
  const int total = p.get_int("total", 0, 0, 1 << 30);
  p.check_all_used({"budget", "ratio", "recent", "lo", "total"});
  Pipeline lo;
  try {
    RecipeSpec spec = parse_recipe(lo_text);
    KVSLIM_CHECK(spec.overrides.empty() && spec.base.stages.size() == 1, ErrorCode::kRecipe,
                 "a single codec stage is expected");
    const std::string& name = spec.base.stages[0].name;
    const auto stages = registered_stages();
    const bool codec = std::any_of(stages.begin(), stages.end(), [&](const auto& st) {
      return st.first == name && st.second == stage_kind_name(StageKind::kCodec);
    });
    if (!codec) (void)build_pipeline(spec.base, ctx);  // an unknown name says so itself
    KVSLIM_CHECK(codec, ErrorCode::kRecipe, "'{}' is not a codec", name);
    // Demoted tokens are old ones: no residual window unless the tier names one (an error below).
    auto& params = spec.base.stages[0].params;
    if (std::none_of(params.begin(), params.end(), [](const auto& kv) { return kv.first == "residual"; }))
      params.emplace_back("residual", "0");
    lo = build_pipeline(spec.base, ctx);
  } catch (const Error& e) {
    KVSLIM_FAIL(e.code(), "recipe stage 'mikv': lo=({}) is not a demotion codec: {}", lo_text, e.what());
  }
  KVSLIM_CHECK(lo.codec->residual() == 0 && lo.codec->sinks() == 0, ErrorCode::kInvalidArgument,
               "recipe stage 'mikv': lo=({}) must have residual=0 and sinks=0 (demoted tokens are old ones; 0 is the "
               "default there)",
               lo.codec->describe());
  KVSLIM_CHECK(total == 0 || (b.budget > 0 && total > b.budget), ErrorCode::kInvalidArgument,
               "recipe stage 'mikv': total={} must be larger than budget={} (and needs an absolute budget)", total,
               b.budget);
  BuiltStage built = eviction_stage(std::make_shared<MiKVEviction>(b, lo.codec, total));
  built.per_head = lo.per_head;  // a cq tier has per-head codebooks
  return built;
}

BuiltStage make_zipcache(StageParams& p, int) {
  p.check_all_used({});
  return BuiltStage{StageKind::kScorer, std::make_shared<NormalizedAttention>(), nullptr, nullptr, nullptr};
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
