#include "engine.h"

#include <Eigen/Core>
#include <cmath>

#include "check.h"

namespace kvslim::llama {

CacheConfig cache_config(const ModelConfig& c, const std::string& recipe,
                         std::int64_t max_positions, bool pre_rope) {
  KVSLIM_CHECK(max_positions >= 1, ErrorCode::kInvalidArgument,
               "max_positions {} must be at least 1", max_positions);
  CacheConfig cfg;
  cfg.layers = c.n_layers;
  cfg.q_heads = c.n_heads;
  cfg.kv_heads = c.n_kv_heads;
  cfg.head_dim = c.head_dim;
  cfg.max_tokens = max_positions;
  cfg.recipe = recipe;
  if (pre_rope) {
    cfg.pre_rope_keys = true;
    cfg.rope = RopeSpec{c.rope_theta, 0, c.rope == RopeStyle::kInterleaved, 1.0};
  }
  return cfg;
}

namespace {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapMat = Eigen::Map<RowMat>;
using ConstMapMat = Eigen::Map<const RowMat>;

/// y[n][out] = x[n][in] * w[out][in]^T, or += when accumulate.
void matmul_wt(const float* x, int n, int in, const std::vector<float>& w, int out, float* y,
               bool accumulate = false) {
  ConstMapMat X(x, n, in);
  ConstMapMat W(w.data(), out, in);
  MapMat Y(y, n, out);
  if (accumulate)
    Y.noalias() += X * W.transpose();
  else
    Y.noalias() = X * W.transpose();
}

/// out[t] = x[t] / rms(x[t]) * weight. The sum of squares is accumulated in float, as the
/// reference implementations (llama2.c, transformers in float32) do.
void rms_norm(const float* x, int n, int dim, const std::vector<float>& weight, float eps,
              float* out) {
  for (int t = 0; t < n; ++t) {
    const float* xr = x + static_cast<std::ptrdiff_t>(t) * dim;
    float* o = out + static_cast<std::ptrdiff_t>(t) * dim;
    float ss = 0.0f;
    for (int i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int i = 0; i < dim; ++i) o[i] = xr[i] * scale * weight[i];
  }
}

void ensure(std::vector<float>& v, std::size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace

Engine::Engine(const Model& model, const std::string& recipe)
    : Engine(model, recipe, model.config.seq_len) {}

Engine::Engine(const Model& model, const std::string& recipe, std::int64_t max_positions)
    : Engine(model, recipe, max_positions, false) {}

Engine::Engine(const Model& model, const std::string& recipe, std::int64_t max_positions, bool pre_rope)
    : model_(&model),
      cache_(cache_config(model.config, recipe, max_positions, pre_rope)),
      max_positions_(max_positions),
      pre_rope_(pre_rope) {
  const ModelConfig& c = model.config;
  const int half = c.head_dim / 2;
  cos_.resize(static_cast<std::size_t>(max_positions) * half);
  sin_.resize(cos_.size());
  // Angles in double: at position 511 a float angle would carry ~3e-5 rad of rounding.
  for (std::int64_t p = 0; p < max_positions; ++p) {
    for (int j = 0; j < half; ++j) {
      const double freq = std::pow(c.rope_theta, -2.0 * j / c.head_dim);
      const double a = static_cast<double>(p) * freq;
      cos_[static_cast<std::size_t>(p) * half + j] = static_cast<float>(std::cos(a));
      sin_[static_cast<std::size_t>(p) * half + j] = static_cast<float>(std::sin(a));
    }
  }
}

void Engine::reset() {
  cache_.reset();
  position_ = 0;
}

void Engine::resume(std::int64_t position) {
  KVSLIM_CHECK(position >= 0 && position <= max_positions_, ErrorCode::kCapacity,
               "resume at position {}: outside [0, {}] positions of this engine", position, max_positions_);
  const std::int64_t seen = cache_.stats().heads.at(0).seen;
  KVSLIM_CHECK(seen == position, ErrorCode::kMismatch,
               "resume at position {}: the cache has seen {} tokens, not {}", position, seen, position);
  position_ = position;
}

void Engine::rope(float* x, int n, int heads) const {
  const ModelConfig& c = model_->config;
  const int hd = c.head_dim, half = hd / 2;
  for (int t = 0; t < n; ++t) {
    const std::size_t p = static_cast<std::size_t>(position_ + t);
    const float* cs = cos_.data() + p * half;
    const float* sn = sin_.data() + p * half;
    for (int h = 0; h < heads; ++h) {
      float* v = x + (static_cast<std::size_t>(t) * heads + h) * hd;
      for (int j = 0; j < half; ++j) {
        // Interleaved rotates (2j, 2j+1); half-split rotates (j, j + hd/2). Same frequency j.
        float* a = c.rope == RopeStyle::kInterleaved ? v + 2 * j : v + j;
        float* b = c.rope == RopeStyle::kInterleaved ? v + 2 * j + 1 : v + j + half;
        const float x0 = *a, x1 = *b;
        *a = x0 * cs[j] - x1 * sn[j];
        *b = x0 * sn[j] + x1 * cs[j];
      }
    }
  }
}

std::span<const float> Engine::forward(std::span<const int> tokens, Logits which,
                                       ForwardObserver* observer) {
  const ModelConfig& c = model_->config;
  const int n = static_cast<int>(tokens.size());
  KVSLIM_CHECK(n > 0, ErrorCode::kInvalidArgument, "forward() needs at least one token");
  KVSLIM_CHECK(position_ + n <= max_positions_, ErrorCode::kCapacity,
               "forward() of {} tokens at position {} exceeds the {} of {} tokens", n, position_,
               max_positions_ == c.seq_len ? "model's context" : "engine's max_positions",
               max_positions_);
  for (int t = 0; t < n; ++t)
    KVSLIM_CHECK(tokens[t] >= 0 && tokens[t] < c.vocab_size, ErrorCode::kOutOfRange,
                 "token id {} at chunk index {} is outside the vocabulary [0, {})", tokens[t], t,
                 c.vocab_size);

  const int D = c.dim, H = c.hidden_dim, hd = c.head_dim;
  const int q_dim = c.n_heads * hd, kv_dim = c.n_kv_heads * hd;
  const std::size_t un = static_cast<std::size_t>(n);
  ensure(x_, un * D);
  ensure(xn_, un * D);
  ensure(q_, un * q_dim);
  ensure(k_, un * kv_dim);
  ensure(v_, un * kv_dim);
  ensure(att_, un * q_dim);
  ensure(h1_, un * H);
  ensure(h3_, un * H);
  if (observer || pre_rope_) ensure(k_pre_, un * kv_dim);

  for (int t = 0; t < n; ++t)
    std::copy_n(model_->embedding.data() + static_cast<std::size_t>(tokens[t]) * D, D,
                x_.data() + static_cast<std::size_t>(t) * D);

  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& w = model_->layers[static_cast<std::size_t>(l)];
    rms_norm(x_.data(), n, D, w.attn_norm, c.rms_eps, xn_.data());
    matmul_wt(xn_.data(), n, D, w.wq, q_dim, q_.data());
    matmul_wt(xn_.data(), n, D, w.wk, kv_dim, k_.data());
    matmul_wt(xn_.data(), n, D, w.wv, kv_dim, v_.data());
    if (observer || pre_rope_) std::copy_n(k_.data(), un * kv_dim, k_pre_.data());
    rope(q_.data(), n, c.n_heads);
    rope(k_.data(), n, c.n_kv_heads);

    cache_.append(l, TensorView<const float>::tokens_heads_dim(pre_rope_ ? k_pre_.data() : k_.data(), n, c.n_kv_heads, hd),
                  TensorView<const float>::tokens_heads_dim(v_.data(), n, c.n_kv_heads, hd));
    cache_.attend(l, TensorView<const float>::tokens_heads_dim(q_.data(), n, c.n_heads, hd),
                  TensorView<float>::tokens_heads_dim(att_.data(), n, c.n_heads, hd));
    if (observer)
      observer->on_layer({l, position_, n, q_.data(), k_pre_.data(), k_.data(), v_.data(),
                          att_.data()});

    matmul_wt(att_.data(), n, q_dim, w.wo, D, x_.data(), /*accumulate=*/true);

    rms_norm(x_.data(), n, D, w.ffn_norm, c.rms_eps, xn_.data());
    matmul_wt(xn_.data(), n, D, w.w1, H, h1_.data());
    matmul_wt(xn_.data(), n, D, w.w3, H, h3_.data());
    for (std::size_t i = 0; i < un * H; ++i) {
      const float g = h1_[i];
      h1_[i] = g / (1.0f + std::exp(-g)) * h3_[i];  // SiLU(gate) * up
    }
    matmul_wt(h1_.data(), n, H, w.w2, D, x_.data(), /*accumulate=*/true);
  }
  position_ += n;

  const int rows = which == Logits::kAll ? n : 1;
  const float* last = x_.data() + static_cast<std::size_t>(n - rows) * D;
  rms_norm(last, rows, D, model_->final_norm, c.rms_eps, xn_.data());
  logits_.resize(static_cast<std::size_t>(rows) * c.vocab_size);
  ConstMapMat X(xn_.data(), rows, D);
  ConstMapMat W(model_->classifier_weights(), c.vocab_size, D);
  MapMat(logits_.data(), rows, c.vocab_size).noalias() = X * W.transpose();
  return logits_;
}

}  // namespace kvslim::llama
