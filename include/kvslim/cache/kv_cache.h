// KVCache: the one interface engines use.
//
//   kvslim::CacheConfig cfg;
//   cfg.layers = 32; cfg.q_heads = 32; cfg.kv_heads = 8; cfg.head_dim = 128;
//   cfg.max_tokens = 32768;
//   cfg.recipe = "kivi:kbits=2,vbits=2,group=32,residual=128";
//   kvslim::KVCache cache(cfg);
//   // per layer, per decode step or prefill chunk of n tokens:
//   cache.append(layer, k, v);    // k, v: logical [kv_heads][n][head_dim]
//   cache.attend(layer, q, out);  // q, out: logical [q_heads][n][head_dim]
//
// GQA/MQA: query head h reads kv head h / (q_heads / kv_heads); each kv head is stored once
// and all of its query heads are processed together, so its pages are read once per call.
// One KVCache holds one sequence. Calls on different layers may run concurrently; calls on
// the same layer must not.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvslim/cache/config.h"
#include "kvslim/tensor/tensor.h"

namespace kvslim {

class TokenStore;

/// Optional outputs and settings of attend().
struct AttendOptions {
  /// If set: attention mass per kept token, layout [kv_heads][mass_stride]; entry (h, j) is
  /// the probability token j of kv head h (in positions() order) received, summed over the
  /// head's query heads and the call's queries. mass_stride >= tokens(layer, h) for all h.
  /// The order is the one during the call: an eviction policy runs right after attention
  /// and may drop tokens before attend() returns (positions() then shows what is kept).
  /// Policies that need attention (h2o, snapkv) do not need this: attend() computes the
  /// mass for them in buffers of its own.
  float* mass = nullptr;
  std::int64_t mass_stride = 0;
  /// Add into `mass` instead of overwriting it.
  bool accumulate_mass = false;
  /// Softmax scale; 0 means 1/sqrt(head_dim).
  float scale = 0.0f;
};

/// Dense copy of one (layer, kv head), for engines that run their own attention.
struct DenseKV {
  Tensor<float> k;                       // [tokens][head_dim]
  Tensor<float> v;                       // [tokens][head_dim]
  std::vector<std::int64_t> positions;   // [tokens]
  std::vector<float> log_weights;        // [tokens]: 0, or ln(weight) for merged tokens
};

/// Tokens kept, tokens seen and bytes allocated by one (layer, kv head).
struct HeadStats {
  std::int64_t tokens = 0;  // held now (all segments)
  std::int64_t bytes = 0;   // allocated now
  std::int64_t seen = 0;    // appended since construction / reset(), evicted ones included
  std::int64_t outlier_bytes = 0;  // of `bytes`: side lists of exactly kept outliers (outliers=)
};

struct CacheStats {
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;
  std::vector<HeadStats> heads;     // [layer * kv_heads + kv_head]
  std::int64_t shared_bytes = 0;    // allocated by the cache itself, not by one head
  std::int64_t total_bytes = 0;     // sum of heads' bytes + shared_bytes
  std::int64_t total_tokens = 0;    // sum of heads' tokens
  /// total_bytes * 8 / (total_tokens * head_dim * 2): bits per stored K or V value with
  /// every byte of metadata, padding, window and bookkeeping included. 0 if empty.
  double bits_per_value = 0.0;
  /// 32 / bits_per_value: compression against an f32 cache holding the same tokens.
  double ratio_vs_f32 = 0.0;
  std::int64_t total_seen = 0;      // sum of heads' seen tokens
  /// (total_seen * head_dim * 2 * 4) / total_bytes: the memory saved against an f32 cache of
  /// every token seen (eviction counts as saving, unlike ratio_vs_f32). 0 if empty.
  double ratio_seen = 0.0;
  /// total_tokens / total_seen: the fraction of seen tokens still held. 0 if nothing seen.
  double kept = 0.0;
  /// Bytes of the codebooks the cache's cq stages read (each distinct Codebooks once). Not in
  /// total_bytes: they are a fixed per-model cost shared by every sequence, like weights.
  std::int64_t codebook_bytes = 0;
  /// Of total_bytes: the dense-and-sparse side lists (kivi:outliers=F), summed over heads.
  std::int64_t outlier_bytes = 0;

  /// Throws Error(kOutOfRange) for a layer or head outside the cache.
  const HeadStats& head(int layer, int kv_head) const;
  std::int64_t layer_bytes(int layer) const;
  std::int64_t layer_tokens(int layer) const;
};

class KVCache {
 public:
  /// Validates the config and builds every head's pipeline from the recipe. Throws Error.
  explicit KVCache(const CacheConfig& config);
  ~KVCache();
  /// A moved-from cache holds nothing: every call on it throws Error(kInvalidState) until a
  /// cache is move-assigned to it. Destroying it is fine.
  KVCache(KVCache&&) noexcept;
  KVCache& operator=(KVCache&&) noexcept;
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  const CacheConfig& config() const;

  /// Append n tokens to a layer (n = 1 for decode, n > 1 for a prefill chunk).
  ///   k, v       logical [kv_heads][n][head_dim], innermost stride 1, any other strides
  ///   positions  n strictly increasing positions, greater than the layer's last one;
  ///              empty = continue from the last position + 1 (0 for the first token)
  /// It first finishes what the layer's previous append still owes (eviction and sealing,
  /// if no attend() ran since), then validates everything; a call that throws adds nothing.
  void append(int layer, TensorView<const float> k, TensorView<const float> v,
              std::span<const std::int64_t> positions = {});

  /// Attention of n queries against everything the layer holds.
  ///   q    logical [q_heads][n][head_dim], innermost stride 1 (post-RoPE, unscaled)
  ///   out  logical [q_heads][n][head_dim], innermost stride 1
  /// The n queries are the last n tokens of the latest append (n <= its size): each sees
  /// every older token and the chunk's tokens up to and including its own (causal within
  /// the chunk). Non-finite queries follow CacheConfig::non_finite (kAllow: NaN out).
  ///
  /// When does a token get compressed? The tokens of an append stay full precision until
  /// they have attended, as in KIVI (a prefill chunk attends to itself exactly); attend()
  /// then seals every complete page beyond the codec's residual window before returning,
  /// so stats() right after attend() is the steady state. An engine that appends without
  /// attending through kvslim calls flush() (or the next append() does it).
  void attend(int layer, TensorView<const float> q, TensorView<float> out,
              const AttendOptions& options = {});

  /// Do, in every layer and head, what attend() does after attention: run the eviction
  /// policy once for the latest append, and seal complete pages beyond the residual window.
  /// Idempotent; cheap when there is nothing to do.
  void flush();

  /// Feed attention probabilities computed outside kvslim to the layer's scorers (engines
  /// that run their own attention over materialize()). mass: [tokens(layer, kv_head)] in
  /// positions() order. Eviction then runs at flush() or at the layer's next append.
  void observe(int layer, int kv_head, std::span<const float> mass);

  /// Dense f32 copy of one head (decoded, lossy for lossy codecs).
  DenseKV materialize(int layer, int kv_head) const;

  CacheStats stats() const;
  std::int64_t tokens(int layer, int kv_head) const;
  std::vector<std::int64_t> positions(int layer, int kv_head) const;
  /// Canonical chain text in force for one head, e.g. "kivi:kbits=2,vbits=2,...".
  std::string recipe_for(int layer, int kv_head) const;
  /// Drop every token; keep configuration and pipelines.
  void reset();

  /// Write everything the cache holds, as stored (compressed pages, masks, demoted tiers,
  /// special tokens, scores, positions), in the versioned format of docs/formats.md. Runs
  /// flush() first, so what is saved is the steady state. Throws Error(kIo) if the stream
  /// fails.
  void save(std::ostream& os);
  void save(const std::string& path);
  /// Replace the cache's contents with a saved cache's. The file's config, recipe and
  /// codebook identities must equal this cache's (Error(kMismatch) names the first field that
  /// differs; threads may differ). Everything is read and checked before anything is
  /// replaced: on any error the cache is left as it was. Errors: kFormat (bad magic,
  /// truncation, checksum mismatch, inconsistent contents, naming the section), kVersion (a
  /// newer format), kMismatch, kIo (file cannot be opened or read).
  void load(std::istream& is);
  void load(const std::string& path);

  /// Advanced: the store of one head (for policy authors and tests).
  TokenStore& store(int layer, int kv_head);
  const TokenStore& store(int layer, int kv_head) const;

 private:
  struct Impl;
  Impl& impl() const;  // throws Error(kInvalidState) on a moved-from cache
  TokenStore& checked_store(int layer, int kv_head) const;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvslim
