// CacheConfig: the shape of a KV cache and the recipe that compresses it.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace kvslim {

class Codebooks;

/// What append() does with NaN or Inf in keys/values.
enum class NonFinitePolicy {
  kReject,  // throw Error(kNonFinite) naming layer, head, token and channel (default)
  kAllow,   // store as given (lossy codecs may then produce NaN scales)
};

/// RoPE as the model applies it (the cache applies it to pre-RoPE keys; CacheConfig::rope).
/// Channel pair i of the rotated channels turns by angle (position / scaling) * freq_i,
/// freq_i = theta^(-2i / rotary_dims).
struct RopeSpec {
  double theta = 10000.0;    // base, > 0
  int rotary_dims = 0;       // channels rotated, even and <= head_dim; 0 = head_dim
  bool interleaved = false;  // pairs (2i, 2i+1) (llama2.c, Meta) or (i, i + rotary_dims/2) (Hugging Face)
  double scaling = 1.0;      // linear position scaling (position interpolation), > 0
};

/// Shape of the cache. One KVCache holds one sequence.
struct CacheConfig {
  int layers = 0;            // transformer layers
  int q_heads = 0;           // query heads per layer
  int kv_heads = 0;          // key/value heads per layer; q_heads % kv_heads == 0 (GQA/MQA)
  int head_dim = 0;          // channels per head
  std::int64_t max_tokens = 0;  // most tokens one (layer, kv head) may hold; appends past it throw
  /// Compression recipe, e.g. "f16" or "kivi:kbits=2,vbits=2,group=32,residual=128".
  /// Grammar in kvslim/cache/recipe.h and docs/recipes.md.
  std::string recipe = "f32";
  NonFinitePolicy non_finite = NonFinitePolicy::kReject;
  /// Threads attend() may use, 1-256. With threads > 1 the kv heads of a layer are shared
  /// out among the calling thread and min(threads, 8 * kv_heads) - 1 worker threads that the
  /// cache starts in its constructor and joins in its destructor (they sleep between calls).
  /// With fewer kv heads than threads (MQA, few-head GQA), each head's pages are split into
  /// ranges on different threads and their softmax states merged (split-KV; results equal
  /// one thread's up to float rounding), unless attention mass is wanted (AttendOptions.mass
  /// or a scorer such as H2O's): then heads are the unit. 1 (the default) never starts a
  /// thread. A call that finds the workers busy (another layer attending concurrently) runs
  /// its heads alone. attend() still allocates nothing in steady state: each worker warms up
  /// its own scratch on its first call.
  int threads = 1;
  /// Codebooks of the recipe's `cq` stages that name no codebooks=FILE (kvslim/policy/
  /// codebook.h). Shared, read-only; must match the cache's shape and the stages' shapes.
  std::shared_ptr<const Codebooks> codebooks = nullptr;
  /// Pre-RoPE key caching (KVQuant): with pre_rope_keys, append() takes keys *before* RoPE
  /// (queries stay post-RoPE, as the model computes them) and attention rotates every key by
  /// `rope` at its position, so quantization sees keys whose outlier channels are not smeared
  /// by the rotation. materialize() returns the keys as appended (pre-RoPE). pre_rope_keys
  /// needs `rope`, and `rope` is used only with pre_rope_keys (docs/outliers.md).
  bool pre_rope_keys = false;
  std::optional<RopeSpec> rope = std::nullopt;
};

}  // namespace kvslim
