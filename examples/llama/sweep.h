// `kvslim-llama sweep`: the equal-memory frontier. Candidate recipes come from families
// (codecs such as f16 and kivi, prefix stages such as h2o eviction, crossed with every codec),
// a probe measures each candidate's memory on random keys and values without running the
// model, and the recipes near the targets are evaluated; these are the pieces that do not
// print. Rules and measurements: docs/sweep.md.
//
//   std::vector<std::string> c = sweep_candidates(model.config, {"kivi", "h2o"});
//   MemoryProbe probe(model.config);
//   double r = probe.run(c[0]).ratio_seen;   // stats().ratio_seen after seq_len tokens
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "eval.h"
#include "model.h"

namespace kvslim::llama {

/// One family of candidate recipes. A codec family gives the last stage of a chain ("f16",
/// "kivi:kbits=4,vbits=2,residual=0"); a stage family gives prefixes that go before every
/// codec of the selected codec families ("h2o:budget=128" -> "h2o:budget=128 | f16").
/// Adding a family is one more entry in sweep_families().
struct SweepFamily {
  enum class Kind { kCodec, kStage };
  std::string name;
  Kind kind = Kind::kCodec;
  /// The family's codecs or prefixes for a model (context length = config.seq_len).
  std::function<std::vector<std::string>(const ModelConfig&)> generate;
};

/// Every family, in the order candidates are generated: f16, kivi (K and V bits in
/// {2,3,4,8}, residual 0 and 32), h2o (budgets 1/2, 1/4, 1/8, 1/16 of the context, recent at
/// its default budget/2).
const std::vector<SweepFamily>& sweep_families();

/// "f16, kivi, h2o": the families' names in order, for messages.
std::string sweep_family_names();

/// The family called `name`, or nullptr.
const SweepFamily* find_sweep_family(std::string_view name);

/// The candidate recipes of the families named in `families` (empty = every family): each
/// codec of the selected codec families alone (no eviction), then each prefix of the
/// selected stage families followed by each of those codecs. Throws Error(kInvalidArgument)
/// for an unknown family or a selection without a codec family.
std::vector<std::string> sweep_candidates(const ModelConfig& config,
                                          std::span<const std::string> families = {});

/// What MemoryProbe measured for one recipe.
struct ProbeResult {
  double ratio_seen = 0.0;       // stats().ratio_seen at the end
  std::uint64_t fingerprint = 0; // hash of every attention output and the final byte count
};

/// The memory a recipe ends a window with, measured without the model: a KVCache of the
/// model's shape (layers, query and kv heads, head_dim, max_tokens = seq_len) is fed seq_len
/// tokens of seeded random keys and values (standard normal), each append followed by
/// attend() of random queries, under the protocol of evaluate_perplexity (token by token, or
/// a prefill chunk then token by token). The bytes of codecs without eviction do not depend
/// on the values, so for them the probe is exact; with eviction, which tokens leave (and so
/// how pages re-pack) follows the attention, so it is an estimate (docs/sweep.md). Two
/// recipes with the same fingerprint computed the same attention, bit for bit, at every
/// step and hold the same bytes: they are the same cache (e.g. a 32-token budget inside a
/// 32-token f32 residual window, where the codec never runs), and a sweep keeps the first.
class MemoryProbe {
 public:
  /// prefill: PerplexityOptions::prefill of the evaluation the probe stands in for.
  explicit MemoryProbe(const ModelConfig& config, std::size_t prefill = 0,
                       std::uint64_t seed = 1);
  /// Throws Error for a recipe that does not build.
  ProbeResult run(const std::string& recipe) const;

 private:
  ModelConfig config_;
  std::size_t head_;         // tokens of the first append (1 = token by token)
  std::vector<float> k_, v_;  // [seq_len][n_kv_heads][head_dim] per layer, layers outermost
  std::vector<float> q_;      // [seq_len][n_heads][head_dim] per layer, layers outermost
};

/// Which candidates a sweep evaluates: those whose probed ratio_seen lies in
/// [smallest target / kSweepProbeBelow, largest target * kSweepProbeAbove]. Below: a recipe
/// that misses the smallest target by more than 30% in the probe cannot meet it (the probe is
/// exact without eviction and within a few percent with it, docs/sweep.md); above: a recipe
/// with 50% more compression than the largest target asks is kept as the frontier's far end.
inline constexpr double kSweepProbeBelow = 1.3;
inline constexpr double kSweepProbeAbove = 1.5;

/// A memory goal: `ratio` against an f32 cache of every token seen (RecipeMetrics::ratio_seen).
struct SweepTarget {
  std::string text;  // as typed: "8", "8x", "300B"
  double ratio = 0.0;
};

/// pareto[i]: no other entry has both ratio_seen >= and kld_mean <= that of entry i with at
/// least one strict. Entries with a NaN ratio or KLD are never on the frontier (and never
/// dominate).
std::vector<bool> pareto_front(std::span<const RecipeMetrics> metrics);

/// The index of the entry with the lowest kld_mean among those with ratio_seen >= ratio (ties:
/// the higher ratio_seen, then the first), or -1 if none meets it.
int best_meeting(std::span<const RecipeMetrics> metrics, double ratio);

/// An SVG document (UTF-8, XML declaration first): x = ratio_seen, y = kld_mean, both log
/// scale; every entry a grey dot, the frontier a blue polyline with dots, a dashed vertical
/// line per target, axis ticks and labels, and the best entry per target labelled with its
/// recipe. Entries whose ratio or KLD is not a positive finite number are left out.
std::string frontier_svg(std::span<const RecipeMetrics> metrics, const std::vector<bool>& pareto,
                         std::span<const SweepTarget> targets, std::string_view title);

/// `s` with & < > " ' replaced by XML entities.
std::string xml_escape(std::string_view s);

}  // namespace kvslim::llama
