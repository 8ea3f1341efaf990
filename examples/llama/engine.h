// Engine: the forward pass of a llama-family model over one sequence whose keys and values
// live in a kvslim::KVCache.
//
//   kvslim::llama::Engine engine(model, "kivi:kbits=4,vbits=4");
//   auto logits = engine.forward(prompt_ids);          // prefill: one chunk of n tokens
//   auto next = engine.forward(std::span(&id, 1));     // decode: one token at a time
//
// Per layer: RMSNorm, q/k/v projections, RoPE, KVCache::append + KVCache::attend (GQA is the
// cache's job), output projection, RMSNorm, SwiGLU FFN. Activations are [tokens][width]
// row-major, so q/k/v/attention buffers are [tokens][heads][head_dim] and reach the cache
// through tokens_heads_dim views without copies. Matrix products use Eigen.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kvslim/cache/kv_cache.h"
#include "model.h"

namespace kvslim::llama {

/// The shape of `c`'s cache (layers, query and kv heads, head_dim) with `recipe`, holding up
/// to `max_positions` (>= 1) tokens per head: what Engine builds, and what a probe of a
/// recipe's memory builds without a model. Throws Error(kInvalidArgument) for max_positions < 1.
/// With pre_rope the cache takes keys before RoPE and applies the model's RoPE itself
/// (CacheConfig::pre_rope_keys; `kvslim-llama --pre-rope`).
CacheConfig cache_config(const ModelConfig& c, const std::string& recipe,
                         std::int64_t max_positions, bool pre_rope = false);

/// One layer's attention tensors for a chunk, handed to a ForwardObserver. Every buffer is
/// [n][heads][head_dim] row-major (heads = n_heads for q/attn_out, n_kv_heads otherwise).
struct LayerActivations {
  int layer = 0;
  std::int64_t first_position = 0;  // position of the chunk's first token
  int n = 0;                        // tokens in the chunk
  const float* q = nullptr;         // after RoPE
  const float* k_pre = nullptr;     // before RoPE
  const float* k = nullptr;         // after RoPE (what the cache stores)
  const float* v = nullptr;
  const float* attn_out = nullptr;  // per-head attention output, before the output projection
};

/// Receives the attention tensors of every layer during forward() (used by `dump`).
class ForwardObserver {
 public:
  virtual ~ForwardObserver() = default;
  virtual void on_layer(const LayerActivations& a) = 0;
};

/// Which logits forward() computes.
enum class Logits {
  kAll,   // [n][vocab]: one row per input token (perplexity, recordings)
  kLast,  // [1][vocab]: only the last token's row (generation)
};

/// A model plus one sequence's KV cache. Not thread-safe; one Engine per sequence.
class Engine {
 public:
  /// `recipe` is a kvslim recipe ("f32", "f16", "kivi:kbits=2,vbits=2", ...); the cache holds
  /// up to the model's seq_len tokens. Throws kvslim::Error for a bad recipe.
  Engine(const Model& model, const std::string& recipe);

  /// Same, but positions (and the cache's max_tokens) run up to `max_positions` >= 1, which
  /// may exceed the model's seq_len: RoPE is extended past the trained context (the model
  /// was never trained there, so quality degrades; used to exercise long sequences with
  /// eviction, examples/long_generation.cpp).
  Engine(const Model& model, const std::string& recipe, std::int64_t max_positions);

  /// Same, and with pre_rope the cache receives the keys before RoPE and rotates them itself
  /// in attention (cache_config); queries are rotated here as always.
  Engine(const Model& model, const std::string& recipe, std::int64_t max_positions, bool pre_rope);

  /// Runs `tokens` at positions position() .. position()+n-1 and returns the logits
  /// (row-major, see Logits). The span stays valid until the next call. Throws
  /// Error(kOutOfRange) for token ids outside the vocabulary and Error(kCapacity) past
  /// seq_len (or max_positions).
  std::span<const float> forward(std::span<const int> tokens, Logits which = Logits::kAll,
                                 ForwardObserver* observer = nullptr);

  /// Forgets the sequence (empties the cache, position back to 0).
  void reset();

  /// After cache().load() of a cache that saw tokens 0 .. position-1 of one sequence:
  /// continue at `position`. Throws Error(kMismatch) if the cache saw another number of
  /// tokens, Error(kCapacity) past max_positions().
  void resume(std::int64_t position);

  std::int64_t position() const noexcept { return position_; }
  std::int64_t max_positions() const noexcept { return max_positions_; }
  const Model& model() const noexcept { return *model_; }
  KVCache& cache() noexcept { return cache_; }
  const KVCache& cache() const noexcept { return cache_; }

 private:
  void rope(float* x, int n, int heads) const;

  const Model* model_;
  KVCache cache_;
  std::int64_t max_positions_;
  std::int64_t position_ = 0;
  bool pre_rope_ = false;
  std::vector<float> cos_, sin_;  // [max_positions][head_dim/2]
  // Scratch, [n][width] row-major, reused across calls.
  std::vector<float> x_, xn_, q_, k_, k_pre_, v_, att_, h1_, h3_, logits_;
};

}  // namespace kvslim::llama
