#include "calibrate_codebooks.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "check.h"
#include "engine.h"
#include "eval.h"

namespace kvslim::llama {
namespace {

// Copies every layer's keys and values per kv head and adds the attention mass each key
// received from the chunk's queries. The chunk is the whole window, starting at position 0.
class RowObserver final : public ForwardObserver {
 public:
  explicit RowObserver(const ModelConfig& c)
      : c_(c), k_(heads()), v_(heads()), w_(heads()), p_(static_cast<std::size_t>(c.seq_len)) {}

  void on_layer(const LayerActivations& a) override {
    const int d = c_.head_dim, H = c_.n_kv_heads, Q = c_.n_heads, group = Q / H, n = a.n;
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    for (int h = 0; h < H; ++h) {
      const std::size_t hi = static_cast<std::size_t>(a.layer) * H + h;
      const std::size_t base = w_[hi].size();
      for (int t = 0; t < n; ++t) {
        const float* kr = a.k + (static_cast<std::size_t>(t) * H + h) * d;
        const float* vr = a.v + (static_cast<std::size_t>(t) * H + h) * d;
        k_[hi].insert(k_[hi].end(), kr, kr + d);
        v_[hi].insert(v_[hi].end(), vr, vr + d);
      }
      std::vector<double> mass(static_cast<std::size_t>(n), 0.0);
      p_.resize(static_cast<std::size_t>(n));
      for (int g = 0; g < group; ++g) {
        const int qh = h * group + g;
        for (int t = 0; t < n; ++t) {
          const float* q = a.q + (static_cast<std::size_t>(t) * Q + qh) * d;
          double mx = -1e300;
          for (int j = 0; j <= t; ++j) {
            const float* kr = a.k + (static_cast<std::size_t>(j) * H + h) * d;
            double s = 0.0;
            for (int c = 0; c < d; ++c) s += static_cast<double>(q[c]) * kr[c];
            p_[j] = s * scale;
            mx = std::max(mx, p_[j]);
          }
          double sum = 0.0;
          for (int j = 0; j <= t; ++j) sum += (p_[j] = std::exp(p_[j] - mx));
          for (int j = 0; j <= t; ++j) mass[j] += p_[j] / sum;
        }
      }
      w_[hi].resize(base + n);
      for (int t = 0; t < n; ++t) w_[hi][base + t] = static_cast<float>(mass[t]);
    }
  }

  std::size_t heads() const { return static_cast<std::size_t>(c_.n_layers) * c_.n_kv_heads; }
  const ModelConfig& c_;
  std::vector<std::vector<float>> k_, v_, w_;  // [layer * kv_heads + h][rows (x head_dim)]
  std::vector<double> p_;
};

}  // namespace

std::int64_t default_calibration_offset(std::string_view text) {
  const std::size_t mid = text.size() / 2;
  const std::size_t at = text.find(kStoryMarker, mid);
  return static_cast<std::int64_t>(at == std::string_view::npos ? mid : at);
}

CodebookCalibrationResult calibrate_codebooks(const Model& model, std::string_view text,
                                              const CodebookCalibrationOptions& o) {
  const ModelConfig& c = model.config;
  const auto [kshape, vshape] = cq_recipe_shapes(o.recipe);
  const std::int64_t skip = o.skip_bytes >= 0 ? o.skip_bytes : default_calibration_offset(text);
  KVSLIM_CHECK(skip < static_cast<std::int64_t>(text.size()), ErrorCode::kInvalidArgument,
               "calibrate-codebooks: --skip-bytes {} is not inside the text ({} bytes)", skip, text.size());
  const std::int64_t want = o.tokens > 0 ? o.tokens : 16 * static_cast<std::int64_t>(c.seq_len);
  const std::vector<int> stream =
      token_stream(*model.tokenizer, text.substr(static_cast<std::size_t>(skip)), static_cast<std::size_t>(want));
  const auto wins = windows_of(stream.size(), static_cast<std::size_t>(c.seq_len), 0);
  KVSLIM_CHECK(!wins.empty(), ErrorCode::kInvalidArgument,
               "calibrate-codebooks: the text from byte {} on gives {} tokens, fewer than one window of 2", skip,
               stream.size());

  CodebookCalibrationResult r{Codebooks(c.n_layers, c.n_kv_heads, c.head_dim, kshape, vshape)};
  r.skip_bytes = skip;
  RowObserver obs(c);
  Engine engine(model, "f32");
  const auto t0 = std::chrono::steady_clock::now();
  for (const auto& [b, e] : wins) {
    engine.reset();
    (void)engine.forward(std::span<const int>(stream.data() + b, e - b), Logits::kLast, &obs);
    ++r.windows;
    if (static_cast<int>(e - b) == c.seq_len) ++r.full_windows;
  }
  const auto t1 = std::chrono::steady_clock::now();
  r.rows = static_cast<std::int64_t>(obs.w_.front().size());
  CalibrationKV cal(c.n_layers, c.n_kv_heads, c.head_dim);
  for (int l = 0; l < c.n_layers; ++l)
    for (int h = 0; h < c.n_kv_heads; ++h) {
      const std::size_t hi = static_cast<std::size_t>(l) * c.n_kv_heads + h;
      const float* w = o.mass ? obs.w_[hi].data() : nullptr;
      cal.set(l, h, {obs.k_[hi].data(), obs.v_[hi].data(), r.rows, w, w});
    }
  r.codebooks = train_codebooks(cal, kshape, vshape, o.train);
  r.seconds_forward = std::chrono::duration<double>(t1 - t0).count();
  r.seconds_train = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  return r;
}

}  // namespace kvslim::llama
