// Retrieval-head calibration (kvslim/policy/retrieval.h).
#include "kvslim/policy/retrieval.h"

#include <algorithm>
#include <cmath>
#include <unordered_map>

#include "check.h"
#include "kvslim/cache/recipe.h"

namespace kvslim {
namespace {

constexpr int kMinPeriod = 4;

std::uint64_t splitmix(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

std::vector<int> retrieval_calibration_tokens(int length, int repeats, std::uint64_t seed, int first_token, int vocab) {
  KVSLIM_CHECK(repeats >= 2, ErrorCode::kInvalidArgument,
               "retrieval calibration: repeats={} must be at least 2 (echo and induction need an earlier occurrence)",
               repeats);
  KVSLIM_CHECK(length >= kMinPeriod * repeats, ErrorCode::kInvalidArgument,
               "retrieval calibration: length={} is too short for repeats={}: each repeat would hold {} tokens, at "
               "least {} are needed (length >= {})",
               length, repeats, length / repeats, kMinPeriod, kMinPeriod * repeats);
  const int period = length / repeats;
  KVSLIM_CHECK(first_token >= 0 && vocab - first_token >= period, ErrorCode::kInvalidArgument,
               "retrieval calibration: a repeat of {} distinct tokens needs that many token ids, but [{}, {}) holds {}",
               period, first_token, vocab, std::max(0, vocab - first_token));
  // Distinct tokens within a repeat: a partial Fisher-Yates shuffle of the id range.
  std::vector<int> ids(static_cast<std::size_t>(vocab - first_token));
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = first_token + static_cast<int>(i);
  std::uint64_t s = seed * 0x2545F4914F6CDD1Dull + 7;
  for (int i = 0; i < period; ++i) {
    const std::size_t j = static_cast<std::size_t>(i) + splitmix(s) % (ids.size() - static_cast<std::size_t>(i));
    std::swap(ids[static_cast<std::size_t>(i)], ids[j]);
  }
  std::vector<int> out;
  out.reserve(static_cast<std::size_t>(period) * repeats);
  for (int r = 0; r < repeats; ++r) out.insert(out.end(), ids.begin(), ids.begin() + period);
  return out;
}

RetrievalScores::RetrievalScores(int layers, int q_heads, int kv_heads, std::vector<int> tokens)
    : layers_(layers), q_heads_(q_heads), kv_heads_(kv_heads), tokens_(std::move(tokens)) {
  KVSLIM_CHECK(layers >= 1 && kv_heads >= 1 && q_heads >= kv_heads && q_heads % kv_heads == 0,
               ErrorCode::kInvalidArgument,
               "RetrievalScores: layers={}, q_heads={}, kv_heads={} (q_heads must be a positive multiple of kv_heads)",
               layers, q_heads, kv_heads);
  KVSLIM_CHECK(!tokens_.empty(), ErrorCode::kInvalidArgument, "RetrievalScores: the token sequence is empty");
  const std::size_t T = tokens_.size();
  std::unordered_map<int, std::vector<std::int64_t>> seen;  // token -> earlier positions
  first_.assign(1, 0);
  ind_first_.assign(1, 0);
  for (std::size_t t = 0; t < T; ++t) {
    auto& prev = seen[tokens_[t]];
    for (std::int64_t j : prev) {
      echo_.push_back(j);
      // The successor of an earlier occurrence; the query itself is excluded (a token
      // repeated twice in a row would otherwise count its own position).
      if (j + 1 < static_cast<std::int64_t>(t)) ind_.push_back(j + 1);
    }
    first_.push_back(static_cast<std::int64_t>(echo_.size()));
    ind_first_.push_back(static_cast<std::int64_t>(ind_.size()));
    prev.push_back(static_cast<std::int64_t>(t));
  }
  std::int64_t counted = 0;
  for (std::size_t t = 0; t < T; ++t) {
    if (first_[t] == first_[t + 1]) continue;
    ++counted;
    uniform_echo_ += static_cast<double>(first_[t + 1] - first_[t]) / static_cast<double>(t + 1);
    uniform_ind_ += static_cast<double>(ind_first_[t + 1] - ind_first_[t]) / static_cast<double>(t + 1);
  }
  if (counted > 0) {
    uniform_echo_ /= static_cast<double>(counted);
    uniform_ind_ /= static_cast<double>(counted);
  }
  const std::size_t heads = static_cast<std::size_t>(layers) * q_heads;
  echo_sum_.assign(heads, 0.0);
  ind_sum_.assign(heads, 0.0);
  count_.assign(heads, 0);
}

std::size_t RetrievalScores::at(int layer, int q_head) const {
  KVSLIM_CHECK(layer >= 0 && layer < layers_ && q_head >= 0 && q_head < q_heads_, ErrorCode::kOutOfRange,
               "RetrievalScores: (layer {}, q head {}) is outside {} layers x {} query heads", layer, q_head, layers_,
               q_heads_);
  return static_cast<std::size_t>(layer) * q_heads_ + q_head;
}

void RetrievalScores::add(int layer, int q_head, std::int64_t t, std::span<const float> probs) {
  const std::size_t h = at(layer, q_head);
  KVSLIM_CHECK(t >= 0 && t < static_cast<std::int64_t>(tokens_.size()), ErrorCode::kOutOfRange,
               "RetrievalScores::add: query position {} is outside the {} calibration tokens", t, tokens_.size());
  KVSLIM_CHECK(static_cast<std::int64_t>(probs.size()) == t + 1, ErrorCode::kShapeMismatch,
               "RetrievalScores::add: query position {} needs {} probabilities (positions 0..{}), got {}", t, t + 1, t,
               probs.size());
  const std::size_t ut = static_cast<std::size_t>(t);
  if (first_[ut] == first_[ut + 1]) return;  // the token's first occurrence
  double e = 0.0, in = 0.0;
  for (std::int64_t i = first_[ut]; i < first_[ut + 1]; ++i) e += probs[static_cast<std::size_t>(echo_[i])];
  for (std::int64_t i = ind_first_[ut]; i < ind_first_[ut + 1]; ++i) in += probs[static_cast<std::size_t>(ind_[i])];
  KVSLIM_CHECK(std::isfinite(e) && std::isfinite(in), ErrorCode::kNonFinite,
               "RetrievalScores::add: non-finite probabilities for layer {}, q head {}, position {}", layer, q_head, t);
  echo_sum_[h] += e;
  ind_sum_[h] += in;
  ++count_[h];
}

void RetrievalScores::add_chunk(int layer, std::int64_t first, int n, int head_dim, const float* q, const float* k,
                                float scale) {
  (void)at(layer, 0);
  KVSLIM_CHECK(first >= 0 && n >= 1 && first + n <= static_cast<std::int64_t>(tokens_.size()) && head_dim >= 1,
               ErrorCode::kShapeMismatch,
               "RetrievalScores::add_chunk: positions {}..{} (head_dim {}) do not fit the {} calibration tokens", first,
               first + n - 1, head_dim, tokens_.size());
  KVSLIM_CHECK(q != nullptr && k != nullptr, ErrorCode::kInvalidArgument, "RetrievalScores::add_chunk: null q or k");
  const int group = q_heads_ / kv_heads_;
  const std::size_t d = static_cast<std::size_t>(head_dim);
  std::vector<double> logit;
  std::vector<float> p;
  for (int i = 0; i < n; ++i) {
    const std::int64_t t = first + i;
    logit.resize(static_cast<std::size_t>(t) + 1);
    p.resize(logit.size());
    for (int h = 0; h < q_heads_; ++h) {
      const float* qr = q + (static_cast<std::size_t>(i) * q_heads_ + h) * d;
      const int kvh = h / group;
      double mx = -INFINITY;
      for (std::int64_t j = 0; j <= t; ++j) {
        const float* kr = k + (static_cast<std::size_t>(j) * kv_heads_ + kvh) * d;
        double s = 0.0;
        for (std::size_t c = 0; c < d; ++c) s += static_cast<double>(qr[c]) * kr[c];
        logit[static_cast<std::size_t>(j)] = s * scale;
        mx = std::max(mx, logit[static_cast<std::size_t>(j)]);
      }
      double sum = 0.0;
      for (double& x : logit) sum += (x = std::exp(x - mx));
      for (std::size_t j = 0; j < logit.size(); ++j) p[j] = static_cast<float>(logit[j] / sum);
      add(layer, h, t, p);
    }
  }
}

double RetrievalScores::echo(int layer, int q_head) const {
  const std::size_t h = at(layer, q_head);
  return count_[h] ? echo_sum_[h] / static_cast<double>(count_[h]) : 0.0;
}

double RetrievalScores::induction(int layer, int q_head) const {
  const std::size_t h = at(layer, q_head);
  return count_[h] ? ind_sum_[h] / static_cast<double>(count_[h]) : 0.0;
}

std::int64_t RetrievalScores::queries(int layer, int q_head) const { return count_[at(layer, q_head)]; }

std::vector<RetrievalHead> RetrievalScores::heads() const {
  const int group = q_heads_ / kv_heads_;
  std::vector<RetrievalHead> out;
  for (int l = 0; l < layers_; ++l)
    for (int kvh = 0; kvh < kv_heads_; ++kvh) {
      RetrievalHead r;
      r.layer = l;
      r.kv_head = kvh;
      r.score = -1.0;
      for (int g = 0; g < group; ++g) {
        const int h = kvh * group + g;
        const double e = echo(l, h), in = induction(l, h);
        r.echo = std::max(r.echo, e);
        r.induction = std::max(r.induction, in);
        if (e + in > r.score) {
          r.score = e + in;
          r.q_head = h;
        }
      }
      out.push_back(r);
    }
  return out;
}

std::vector<RetrievalHead> RetrievalScores::ranked() const {
  std::vector<RetrievalHead> out = heads();
  std::stable_sort(out.begin(), out.end(), [](const RetrievalHead& a, const RetrievalHead& b) { return a.score > b.score; });
  return out;
}

std::vector<RetrievalHead> RetrievalScores::select(double fraction) const {
  KVSLIM_CHECK(fraction > 0.0 && fraction < 1.0, ErrorCode::kInvalidArgument,
               "retrieval heads: the fraction kept full must be in (0, 1), got {}", fraction);
  const int total = layers_ * kv_heads_;
  const int n = std::clamp(static_cast<int>(std::lround(fraction * total)), 1, total);
  std::vector<RetrievalHead> r = ranked();
  r.resize(static_cast<std::size_t>(n));
  return r;
}

std::string retrieval_recipe(std::span<const RetrievalHead> chosen, const std::string& keep, const std::string& compress,
                             const std::vector<std::string>& header) {
  KVSLIM_CHECK(keep.find_first_of("\n#;[") == std::string::npos && compress.find_first_of("\n#;[") == std::string::npos,
               ErrorCode::kRecipe, "retrieval_recipe: the keep chain '{}' and the compress chain '{}' must be single chains",
               keep, compress);
  std::string out;
  for (const std::string& line : header) out += "# " + line + "\n";
  out += compress + "\n";
  std::vector<RetrievalHead> sorted(chosen.begin(), chosen.end());
  std::sort(sorted.begin(), sorted.end(),
            [](const RetrievalHead& a, const RetrievalHead& b) { return std::pair(a.layer, a.kv_head) < std::pair(b.layer, b.kv_head); });
  for (const RetrievalHead& h : sorted)
    out += fmt::format("[layers={} heads={}] {}  # retrieval head: echo {:.4f}, induction {:.4f} (q head {})\n", h.layer,
                       h.kv_head, keep, h.echo, h.induction, h.q_head);
  (void)parse_recipe(out);  // what we write must read back
  return out;
}

}  // namespace kvslim
