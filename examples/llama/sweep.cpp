#include "sweep.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <random>

#include "check.h"
#include "engine.h"
#include "kvslim/cache/kv_cache.h"
#include "kvslim/cache/recipe.h"

namespace kvslim::llama {
namespace {

std::vector<std::string> f16_codecs(const ModelConfig&) { return {"f16"}; }

/// KIVI at every K/V split of {2,3,4,8} bits, quantized pages alone (residual 0: a 128-token
/// f32 window would dominate a 512-token context) and with a short 32-token f32 window.
std::vector<std::string> kivi_codecs(const ModelConfig&) {
  std::vector<std::string> out;
  for (int residual : {0, 32})
    for (int kbits : {2, 3, 4, 8})
      for (int vbits : {2, 3, 4, 8})
        out.push_back(fmt::format("kivi:kbits={},vbits={},residual={}", kbits, vbits, residual));
  return out;
}

/// H2O token budgets of 1/2, 1/4, 1/8 and 1/16 of the context; recent = budget / 2 (default).
std::vector<std::string> h2o_prefixes(const ModelConfig& c) {
  std::vector<std::string> out;
  for (int div : {2, 4, 8, 16})
    if (c.seq_len / div >= 2) out.push_back(fmt::format("h2o:budget={}", c.seq_len / div));
  return out;
}

/// MiKV demotion (hi budgets of 1/4 and 1/2 of the context, the rest in 2, 3 or 4-bit KIVI)
/// in front of every codec it is cheaper than (sweep_candidates skips the others).
std::vector<std::string> mikv_prefixes(const ModelConfig& c) {
  std::vector<std::string> out;
  for (int div : {4, 2})
    for (int lo : {2, 3, 4})
      if (c.seq_len / div >= 2)
        out.push_back(fmt::format("mikv:budget={},lo=(kivi:kbits={},vbits={})", c.seq_len / div, lo, lo));
  return out;
}

/// Finite and positive (what a log axis can show).
bool plottable(double x) { return std::isfinite(x) && x > 0.0; }

/// Ticks of a log axis over [lo, hi] (log10 units): decades, or 1-2-5, or 1, 1.5, 2, 3, ... 8
/// per decade, the first of these that gives at least three ticks.
std::vector<double> log_ticks(double lo, double hi) {
  for (const std::vector<double>& mantissas :
       {std::vector<double>{1}, std::vector<double>{1, 2, 5},
        std::vector<double>{1, 1.5, 2, 3, 4, 5, 6, 7, 8}}) {
    std::vector<double> ticks;
    for (int e = static_cast<int>(std::floor(lo)); e <= static_cast<int>(std::ceil(hi)); ++e)
      for (double m : mantissas) {
        const double v = m * std::pow(10.0, e);
        if (std::log10(v) >= lo && std::log10(v) <= hi) ticks.push_back(v);
      }
    if (ticks.size() >= 3 || mantissas.size() > 3) return ticks;
  }
  return {};
}

/// [lo, hi] of log10(values) widened by 6% of the span on each side (a decade if flat).
std::pair<double, double> log_range(const std::vector<double>& values) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (double v : values) {
    lo = std::min(lo, std::log10(v));
    hi = std::max(hi, std::log10(v));
  }
  const double pad = hi > lo ? 0.06 * (hi - lo) : 0.5;
  return {lo - pad, hi + pad};
}

}  // namespace

const std::vector<SweepFamily>& sweep_families() {
  static const std::vector<SweepFamily> families = {
      {"f16", SweepFamily::Kind::kCodec, f16_codecs},
      {"kivi", SweepFamily::Kind::kCodec, kivi_codecs},
      {"h2o", SweepFamily::Kind::kStage, h2o_prefixes},
      {"mikv", SweepFamily::Kind::kStage, mikv_prefixes},
  };
  return families;
}

std::string sweep_family_names() {
  std::string s;
  for (const SweepFamily& f : sweep_families()) s += (s.empty() ? "" : ", ") + f.name;
  return s;
}

const SweepFamily* find_sweep_family(std::string_view name) {
  for (const SweepFamily& f : sweep_families())
    if (f.name == name) return &f;
  return nullptr;
}

std::vector<std::string> sweep_candidates(const ModelConfig& config,
                                          std::span<const std::string> families) {
  for (const std::string& name : families)
    KVSLIM_CHECK(find_sweep_family(name) != nullptr, ErrorCode::kInvalidArgument,
                 "unknown sweep family '{}' (families: {})", name, sweep_family_names());
  auto selected = [&](const SweepFamily& f) {
    return families.empty() || std::find(families.begin(), families.end(), f.name) != families.end();
  };
  std::vector<std::string> codecs, prefixes;
  for (const SweepFamily& f : sweep_families()) {
    if (!selected(f)) continue;
    std::vector<std::string> g = f.generate(config);
    auto& dst = f.kind == SweepFamily::Kind::kCodec ? codecs : prefixes;
    dst.insert(dst.end(), g.begin(), g.end());
  }
  KVSLIM_CHECK(!codecs.empty(), ErrorCode::kInvalidArgument,
               "the families selected give no codec; add a codec family (f16 or kivi)");
  std::vector<std::string> out = codecs;
  for (const std::string& p : prefixes)
    for (const std::string& c : codecs) {
      const std::string r = p + " | " + c;
      // Combinations the library rejects (a demotion codec not cheaper than the chain's) are
      // not candidates.
      try {
        (void)build_pipeline(parse_recipe(r).base, config.head_dim);
      } catch (const Error&) {
        continue;
      }
      out.push_back(r);
    }
  return out;
}

MemoryProbe::MemoryProbe(const ModelConfig& config, std::size_t prefill, std::uint64_t seed)
    : config_(config), head_(std::max<std::size_t>(prefill, 1)) {
  const std::size_t T = static_cast<std::size_t>(config.seq_len);
  KVSLIM_CHECK(prefill < T, ErrorCode::kInvalidArgument,
               "prefill of {} tokens must be smaller than the context ({} tokens)", prefill, T);
  const std::size_t per_kv = static_cast<std::size_t>(config.n_layers) * T *
                             static_cast<std::size_t>(config.n_kv_heads * config.head_dim);
  const std::size_t per_q = static_cast<std::size_t>(config.n_layers) * T *
                            static_cast<std::size_t>(config.n_heads * config.head_dim);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto* buf : {&k_, &v_}) {
    buf->resize(per_kv);
    for (float& x : *buf) x = normal(rng);
  }
  q_.resize(per_q);
  for (float& x : q_) x = normal(rng);
}

ProbeResult MemoryProbe::run(const std::string& recipe) const {
  const ModelConfig& c = config_;
  const std::int64_t T = c.seq_len, hd = c.head_dim;
  KVCache cache(cache_config(c, recipe, T));
  std::vector<float> out(head_ * static_cast<std::size_t>(c.n_heads * hd));
  std::uint64_t h = 14695981039346656037ull;  // FNV-1a over the outputs' bit patterns
  auto mix = [&h](std::uint64_t x) { h = (h ^ x) * 1099511628211ull; };
  for (std::int64_t t = 0; t < T;) {
    const std::int64_t n = t == 0 ? static_cast<std::int64_t>(head_) : 1;
    for (int l = 0; l < c.n_layers; ++l) {
      const std::size_t kv_at = static_cast<std::size_t>((l * T + t) * c.n_kv_heads * hd);
      const std::size_t q_at = static_cast<std::size_t>((l * T + t) * c.n_heads * hd);
      cache.append(l, TensorView<const float>::tokens_heads_dim(k_.data() + kv_at, n, c.n_kv_heads, hd),
                   TensorView<const float>::tokens_heads_dim(v_.data() + kv_at, n, c.n_kv_heads, hd));
      cache.attend(l, TensorView<const float>::tokens_heads_dim(q_.data() + q_at, n, c.n_heads, hd),
                   TensorView<float>::tokens_heads_dim(out.data(), n, c.n_heads, hd));
      for (std::size_t i = 0; i < static_cast<std::size_t>(n * c.n_heads * hd); ++i)
        mix(std::bit_cast<std::uint32_t>(out[i]));
    }
    t += n;
  }
  const CacheStats st = cache.stats();
  mix(static_cast<std::uint64_t>(st.total_bytes));
  return {st.ratio_seen, h};
}

std::vector<bool> pareto_front(std::span<const RecipeMetrics> m) {
  auto valid = [](const RecipeMetrics& x) {
    return !std::isnan(x.ratio_seen) && !std::isnan(x.kld_mean);
  };
  std::vector<bool> out(m.size(), false);
  for (std::size_t i = 0; i < m.size(); ++i) {
    if (!valid(m[i])) continue;
    out[i] = std::none_of(m.begin(), m.end(), [&](const RecipeMetrics& o) {
      return valid(o) && o.ratio_seen >= m[i].ratio_seen && o.kld_mean <= m[i].kld_mean &&
             (o.ratio_seen > m[i].ratio_seen || o.kld_mean < m[i].kld_mean);
    });
  }
  return out;
}

int best_meeting(std::span<const RecipeMetrics> m, double ratio) {
  int best = -1;
  for (std::size_t i = 0; i < m.size(); ++i) {
    if (!(m[i].ratio_seen >= ratio) || std::isnan(m[i].kld_mean)) continue;
    const RecipeMetrics* b = best < 0 ? nullptr : &m[static_cast<std::size_t>(best)];
    if (!b || m[i].kld_mean < b->kld_mean ||
        (m[i].kld_mean == b->kld_mean && m[i].ratio_seen > b->ratio_seen))
      best = static_cast<int>(i);
  }
  return best;
}

std::string xml_escape(std::string_view s) {
  std::string out;
  for (char ch : s) {
    switch (ch) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default: out += ch;
    }
  }
  return out;
}

std::string frontier_svg(std::span<const RecipeMetrics> m, const std::vector<bool>& pareto,
                         std::span<const SweepTarget> targets, std::string_view title) {
  constexpr double kW = 860, kH = 540, kLeft = 90, kRight = 30, kTop = 64, kBottom = 70;
  std::vector<std::size_t> shown;
  std::vector<double> xs, ys;
  for (std::size_t i = 0; i < m.size(); ++i)
    if (plottable(m[i].ratio_seen) && plottable(m[i].kld_mean)) {
      shown.push_back(i);
      xs.push_back(m[i].ratio_seen);
      ys.push_back(m[i].kld_mean);
    }
  for (const SweepTarget& t : targets)
    if (plottable(t.ratio)) xs.push_back(t.ratio);
  if (xs.empty()) xs.push_back(1.0);
  if (ys.empty()) ys.push_back(1.0);
  const auto [x0, x1] = log_range(xs);
  const auto [y0, y1] = log_range(ys);
  auto px = [&](double v) { return kLeft + (std::log10(v) - x0) / (x1 - x0) * (kW - kLeft - kRight); };
  auto py = [&](double v) { return kH - kBottom - (std::log10(v) - y0) / (y1 - y0) * (kH - kTop - kBottom); };

  std::string s = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  s += fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} "
      "{1}\" font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect width=\"{0}\" height=\"{1}\" fill=\"white\"/>\n"
      "<text x=\"{2}\" y=\"22\" font-size=\"15\">{3}</text>\n",
      kW, kH, kLeft, xml_escape(title));
  const double bx = kLeft, by = kH - kBottom, ex = kW - kRight, ey = kTop;
  s += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"black\"/>\n",
                   bx, ey, ex - bx, by - ey);
  for (double v : log_ticks(x0, x1))
    s += fmt::format(
        "<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#e4e4e4\"/>"
        "<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{3}\" stroke=\"black\"/>"
        "<text x=\"{0:.1f}\" y=\"{4}\" text-anchor=\"middle\">{5:g}x</text>\n",
        px(v), by, ey, by + 5, by + 20, v);
  for (double v : log_ticks(y0, y1))
    s += fmt::format(
        "<line x1=\"{1}\" y1=\"{0:.1f}\" x2=\"{2}\" y2=\"{0:.1f}\" stroke=\"#e4e4e4\"/>"
        "<line x1=\"{1}\" y1=\"{0:.1f}\" x2=\"{3}\" y2=\"{0:.1f}\" stroke=\"black\"/>"
        "<text x=\"{4}\" y=\"{0:.1f}\" text-anchor=\"end\" dominant-baseline=\"middle\">{5:g}</text>\n",
        py(v), bx, ex, bx - 5, bx - 8, v);
  s += fmt::format(
      "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">ratio_seen: f32 bytes of every token seen / "
      "cache bytes (log scale)</text>\n"
      "<text transform=\"translate(22 {}) rotate(-90)\" text-anchor=\"middle\">KLD vs the f32 "
      "cache, nats (log scale)</text>\n",
      (bx + ex) / 2, kH - 25, (by + ey) / 2);

  for (const SweepTarget& t : targets) {
    if (!plottable(t.ratio)) continue;
    s += fmt::format(
        "<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#c03030\" "
        "stroke-dasharray=\"6 4\"/><text x=\"{3:.1f}\" y=\"{4}\" fill=\"#c03030\">{5}</text>\n",
        px(t.ratio), by, ey, px(t.ratio) + 3, ey + 14, xml_escape(t.text));
  }
  for (std::size_t i : shown)
    s += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"#999999\"/>\n",
                     px(m[i].ratio_seen), py(m[i].kld_mean));

  std::vector<std::size_t> front;
  for (std::size_t i : shown)
    if (i < pareto.size() && pareto[i]) front.push_back(i);
  std::sort(front.begin(), front.end(),
            [&](std::size_t a, std::size_t b) { return m[a].ratio_seen < m[b].ratio_seen; });
  std::string points;
  for (std::size_t i : front)
    points += fmt::format("{}{:.1f},{:.1f}", points.empty() ? "" : " ", px(m[i].ratio_seen),
                          py(m[i].kld_mean));
  s += fmt::format("<polyline points=\"{}\" fill=\"none\" stroke=\"#1f5fbf\" stroke-width=\"2\"/>\n",
                   points);
  for (std::size_t i : front)
    s += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"4\" fill=\"#1f5fbf\"/>\n",
                     px(m[i].ratio_seen), py(m[i].kld_mean));

  // The best recipe per target, one label per recipe naming every target it wins.
  std::vector<std::pair<int, std::string>> labels;
  for (const SweepTarget& t : targets) {
    const int b = best_meeting(m, t.ratio);
    if (b < 0 || !plottable(m[static_cast<std::size_t>(b)].kld_mean)) continue;
    auto it = std::find_if(labels.begin(), labels.end(), [&](const auto& l) { return l.first == b; });
    if (it == labels.end())
      labels.emplace_back(b, t.text);
    else
      it->second += ", " + t.text;
  }
  for (std::size_t j = 0; j < labels.size(); ++j) {
    const RecipeMetrics& r = m[static_cast<std::size_t>(labels[j].first)];
    const double x = px(r.ratio_seen), y = py(r.kld_mean);
    const bool left = x > (bx + ex) / 2;  // right half: text runs leftwards
    const double ly = std::max(ey + 30 + 14.0 * static_cast<double>(j), y - 18 - 14.0 * static_cast<double>(j));
    const double lx = left ? x - 10 : x + 10;
    s += fmt::format(
        "<circle cx=\"{0:.1f}\" cy=\"{1:.1f}\" r=\"6\" fill=\"none\" stroke=\"#c03030\"/>"
        "<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{2:.1f}\" y2=\"{3:.1f}\" stroke=\"#c03030\"/>"
        "<text x=\"{2:.1f}\" y=\"{3:.1f}\" text-anchor=\"{4}\" font-size=\"11\" stroke=\"white\" "
        "stroke-width=\"3\" paint-order=\"stroke\">best at {5}: {6}</text>\n",
        x, y, lx, ly, left ? "end" : "start", xml_escape(labels[j].second), xml_escape(r.recipe));
  }

  // Legend: one row between the title and the plot.
  const double ly = 44;
  s += fmt::format(
      "<g font-size=\"11\" dominant-baseline=\"middle\">"
      "<circle cx=\"{0}\" cy=\"{4}\" r=\"3\" fill=\"#999999\"/>"
      "<text x=\"{0}\" dx=\"8\" y=\"{4}\">evaluated recipe</text>"
      "<line x1=\"{7}\" y1=\"{4}\" x2=\"{8}\" y2=\"{4}\" stroke=\"#1f5fbf\" stroke-width=\"2\"/>"
      "<circle cx=\"{1}\" cy=\"{4}\" r=\"4\" fill=\"#1f5fbf\"/>"
      "<text x=\"{8}\" dx=\"5\" y=\"{4}\">Pareto frontier</text>"
      "<line x1=\"{2}\" y1=\"{5}\" x2=\"{2}\" y2=\"{6}\" stroke=\"#c03030\" stroke-dasharray=\"4 2\"/>"
      "<text x=\"{2}\" dx=\"6\" y=\"{4}\">target</text>"
      "<circle cx=\"{3}\" cy=\"{4}\" r=\"6\" fill=\"none\" stroke=\"#c03030\"/>"
      "<text x=\"{3}\" dx=\"10\" y=\"{4}\">best recipe per target (lowest KLD meeting it)</text></g>\n",
      bx + 4, bx + 130, bx + 250, bx + 320, ly, ly - 7, ly + 7, bx + 120, bx + 140);
  s += "</svg>\n";
  return s;
}

}  // namespace kvslim::llama
