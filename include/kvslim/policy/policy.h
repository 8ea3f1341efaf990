// The four policy interfaces a recipe chain is built from, and the stage registry.
//
//   Scorer          per-token importance (accumulated attention, key L2 norm, ...)
//   EvictionPolicy  which tokens leave the cache, or are demoted to a cheaper codec (MiKV)
//                   or folded into a compensation token (RazorAttention)
//   MergePolicy     within-head token merging (KVMerger) or cross-layer merging (MiniCache)
//   Codec           how a page of tokens is stored and how attention reads it
//
// docs/architecture.md shows how each published method maps onto these. Policies are
// immutable after construction and shared across heads; per-head state (scores, masks) lives
// in the TokenStore they are handed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvslim/policy/rotation.h"

namespace kvslim {

namespace kernels {
struct KernelTable;
struct BlockMask;
struct OnlineState;
}
class TokenStore;
class Codebooks;

/// Key=value parameters of one recipe stage. Every key a factory reads is marked used;
/// keys left unused after the factory returns are reported as unknown.
class StageParams {
 public:
  StageParams(std::string stage, std::vector<std::pair<std::string, std::string>> kv);

  /// Integer parameter in [lo, hi]; `def` if absent. Throws Error naming stage, key, value.
  int get_int(std::string_view key, int def, int lo, int hi);
  /// Float parameter in [lo, hi].
  double get_double(std::string_view key, double def, double lo, double hi);
  /// String parameter (any value).
  std::string get_string(std::string_view key, std::string def);
  bool has(std::string_view key) const;
  /// Throws Error(kRecipe) listing the keys nobody read, and the keys that are known.
  void check_all_used(const std::vector<std::string>& known) const;
  const std::string& stage() const noexcept { return stage_; }

 private:
  const std::string* find(std::string_view key);
  std::string stage_;
  std::vector<std::pair<std::string, std::string>> kv_;
  std::vector<bool> used_;
};

/// How a page of tokens is stored. A codec encodes pages of `page_tokens()` tokens from
/// full-precision rows (and smaller pages of 1..page_tokens() tokens when eviction re-packs
/// sparse pages), and provides attention over its format. Attention never decodes a page
/// into a buffer; decode() exists for materialize(), re-packing and tests.
///
/// Attention runs in two steps per attend call and kv head: prepare() once (query-side work:
/// scaled or quantized queries, lookup tables of q . centroid), then attend_page() for every
/// page: scores, the BlockMask (evicted slots, per-token logit biases, the causal rule), the
/// online-softmax update and the weighted value sum, in one call. A codec that only
/// implements scores() and accumulate() gets a correct attend_page() composed of them; the
/// built-in codecs override it with one fused kernel (kernel_table.h).
/// In every call below, ntok is the page's own token count and the layout depends on it.
class Codec {
 public:
  virtual ~Codec() = default;
  /// Canonical recipe text of this stage ("kivi:kbits=2,vbits=2,group=32,...").
  virtual std::string describe() const = 0;
  /// Tokens per sealed page (the quantization group along tokens).
  virtual int page_tokens() const = 0;
  /// Newest tokens kept in full precision beyond the unsealed remainder (KIVI's R).
  virtual int residual() const = 0;
  /// First tokens of a sequence kept in full precision forever (attention sinks).
  virtual int sinks() const = 0;
  /// Encoded bytes of a page of ntok (1..page_tokens()) tokens at this head_dim.
  virtual std::size_t page_bytes(int ntok, int head_dim) const = 0;
  /// Throws Error if rows cannot be encoded faithfully (e.g. outside the f16 range).
  virtual void check_rows(const float* k, const float* v, int ntok, int d) const = 0;
  /// k, v: [ntok][d] contiguous, 1 <= ntok <= page_tokens(). page: page_bytes(ntok, d) bytes.
  virtual void encode(const kernels::KernelTable& kt, const float* k, const float* v, int ntok,
                      int d, std::byte* page) const = 0;
  /// Inverse of encode (lossy): k, v [ntok][d].
  virtual void decode(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d,
                      float* k, float* v) const = 0;
  /// The keys of decode() only, k [ntok][d]; `scratch` (ntok * d floats) may be used for the
  /// values. Default: decode(kt, page, ntok, d, k, scratch). Pre-RoPE caches decode keys
  /// this way to rotate them.
  virtual void decode_keys(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, float* k,
                           float* scratch) const {
    decode(kt, page, ntok, d, k, scratch);
  }
  /// s[r][j] = q[r] . k_j for the page's tokens; q [nq][d] (pre-scaled), s [nq][ntok].
  virtual void scores(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d,
                      const float* q, int nq, float* s) const = 0;
  /// o[r][c] += sum_j p[r][j] v_j[c]; p [nq][ntok], o [nq][d].
  virtual void accumulate(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d,
                          const float* p, int nq, float* o) const = 0;

  /// Bytes of query-side state for nq rows of head_dim d (0: the codec needs none).
  virtual std::size_t prepared_bytes(int nq, int d) const;
  /// Builds that state from the pre-scaled rows q [nq][d] into `prepared` (prepared_bytes()
  /// bytes, 64-byte aligned). Called once per attend call and kv head, before any page.
  virtual void prepare(const kernels::KernelTable& kt, const float* q, int nq, int d, std::byte* prepared) const;
  /// Fused attention over one page (kernel_table.h, "fused block attention"): updates st
  /// (running max, sum, output; st.s is scratch of nq * ntok floats; st.probs if set gets the
  /// page's probabilities). q is the same pre-scaled rows prepare() saw, `prepared` its state,
  /// which a codec may also use as an accumulator across pages (CQ sums the softmax weights
  /// per (value group, code) there and multiplies by the centroids once, in finish()).
  virtual void attend_page(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* q,
                           std::byte* prepared, int nq, const kernels::BlockMask& mask,
                           kernels::OnlineState& st) const;
  /// Called once after the last page of an attend call (or of a split-KV range), before the
  /// output is divided by the softmax sum: folds whatever attend_page() accumulated in
  /// `prepared` into st.o, at the final running max st.m. Default: nothing.
  virtual void finish(const kernels::KernelTable& kt, std::byte* prepared, int nq, int d,
                      kernels::OnlineState& st) const;
  /// The rotation this codec's tokens are stored in (recipe key rotate=hadamard; none by
  /// default). KVCache applies it: it rotates keys and values before append() hands them to
  /// the store, query rows before attention and the output back (kvslim/policy/rotation.h),
  /// so every method above sees rotated rows only.
  virtual RotationSpec rotation() const { return {}; }
  /// False if the codec cannot hold pre-RoPE keys (CacheConfig::pre_rope_keys): its data
  /// was calibrated on post-RoPE keys (cq's codebooks). Default true.
  virtual bool takes_pre_rope_keys() const { return true; }
  /// Bytes of a page of ntok tokens that hold exactly kept outliers (a dense-and-sparse side
  /// list; part of page_bytes()). Reported apart by stats(). Default 0.
  virtual std::size_t outlier_bytes(int ntok, int head_dim) const {
    (void)ntok;
    (void)head_dim;
    return 0;
  }
  /// False if a page read from outside the process (a saved cache, KVCache::load) would make
  /// this codec read out of bounds: an index stored in the page (an outlier's token or
  /// channel) that points past it. Default true: every bit pattern of page_bytes() bytes is a
  /// page the kernels can read (codes always index inside their tables).
  virtual bool page_ok(const std::byte* page, int ntok, int head_dim) const {
    (void)page;
    (void)ntok;
    (void)head_dim;
    return true;
  }
};

/// Per-token importance. Scores live in TokenStore::importance(), one float per kept token,
/// in the store's token order, and follow tokens through eviction and merging.
class Scorer {
 public:
  virtual ~Scorer() = default;
  virtual std::string describe() const = 0;
  /// True if the scorer consumes attention mass (from attend() or observe()).
  virtual bool needs_attention() const = 0;
  /// Tokens [first, first + count) of the store were just appended; k is [count][d].
  virtual void on_append(TokenStore& store, std::int64_t first, std::int64_t count,
                         const float* k) const = 0;
  /// mass[j] = attention the store's token j received in one attend()/observe() call,
  /// summed over the kv head's query heads and the call's queries (only the last
  /// observation_window() queries of the call when that is > 0).
  virtual void on_attention(TokenStore& store, std::span<const float> mass) const = 0;
  /// > 0: on_attention wants the mass of the call's last W queries only (SnapKV's
  /// observation window); 0: of every query.
  virtual int observation_window() const { return 0; }
};

/// What happens to tokens an eviction policy selects.
enum class EvictAction {
  kDrop,        // removed (H2O, StreamingLLM, L2-norm)
  kDemote,      // re-encoded with the policy's low-precision codec (MiKV)
  kCompensate,  // folded into the head's compensation token (RazorAttention)
};

/// Chooses which tokens leave full service. select() runs once per append, after the
/// append's queries have attended (TokenStore::flush: at the end of attend(), at the next
/// append, or on KVCache::flush()), so the budget holds at every decode step, and a policy
/// that needs attention sees the newest step's. It reads the store's importance scores and
/// positions. Codec sinks (TokenStore::sink_count()) are never selected unless the policy
/// says so in its own rule (StreamingLLM keeps its sinks by index instead).
class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual std::string describe() const = 0;
  virtual EvictAction action() const = 0;
  /// Most tokens the head may hold after enforcement, given the tokens it has seen.
  virtual std::int64_t budget(std::int64_t seen) const = 0;
  /// The absolute budget (checked against CacheConfig::max_tokens), or 0 for a relative one.
  virtual std::int64_t fixed_budget() const = 0;
  /// Append the store indices of tokens to evict/demote to `victims` (any order).
  virtual void select(const TokenStore& store, std::vector<std::int64_t>& victims) const = 0;
  /// The scorer this policy reads, added to the pipeline when the chain names none (H2O's
  /// accumulated attention, L2-norm's key norms, ...). Null if it reads no scores.
  virtual std::shared_ptr<const Scorer> implied_scorer() const { return nullptr; }
  /// For kDemote: the codec demoted tokens are stored with; null otherwise.
  virtual const Codec* demote_codec() const { return nullptr; }
  /// For kDemote, after select()'s tokens were demoted: tokens to drop outright (a total
  /// budget over every tier; any indices of the store). Default: none.
  virtual void select_drops(const TokenStore& store, std::vector<std::int64_t>& victims) const {
    (void)store;
    (void)victims;
  }
};

/// Merges tokens within one head (KVMerger) — or, for cross-layer policies, a head with the
/// same head of the previous layer (MiniCache). Merged tokens become weighted special
/// tokens in the store: a token standing for n originals adds ln(n) to its logit.
class MergePolicy {
 public:
  virtual ~MergePolicy() = default;
  virtual std::string describe() const = 0;
  /// True if merge_layers() is the entry point rather than merge().
  virtual bool cross_layer() const = 0;
  /// Within-head merging, called once per append after its queries attended and after the
  /// chain's eviction stage (TokenStore::flush), before sealing.
  virtual void merge(const kernels::KernelTable& kt, TokenStore& store) const = 0;
  /// Cross-layer merging of `upper` (layer l) with `lower` (layer l-1), called once both
  /// layers have appended the same tokens. Default: nothing (within-head policies).
  virtual void merge_layers(const kernels::KernelTable& kt, TokenStore& lower, TokenStore& upper) const {
    (void)kt;
    (void)lower;
    (void)upper;
  }
  /// The scorer merge() reads (KVMerger's pivot: accumulated attention), added to the
  /// pipeline when the chain names no scorer and its eviction stage implies none.
  virtual std::shared_ptr<const Scorer> implied_scorer() const { return nullptr; }
  /// An absolute token budget the policy holds (checked against CacheConfig::max_tokens), or 0.
  virtual std::int64_t fixed_budget() const { return 0; }
};

/// Stage kinds, in chain order.
enum class StageKind { kScorer = 0, kEviction = 1, kMerge = 2, kCodec = 3 };
const char* stage_kind_name(StageKind k) noexcept;

/// A built stage: exactly one of the pointers is set, matching kind.
struct BuiltStage {
  StageKind kind;
  std::shared_ptr<const Scorer> scorer;
  std::shared_ptr<const EvictionPolicy> eviction;
  std::shared_ptr<const MergePolicy> merge;
  std::shared_ptr<const Codec> codec;
  /// True if the stage was built for the one (layer, kv head) of its StageContext (CQ's
  /// codebooks are per head): the cache then builds the chain again for every head instead
  /// of sharing one pipeline among the heads that use it.
  bool per_head = false;
};

/// Where a stage is built. Most stages need only head_dim; stages with per-head or
/// model-level data (codebooks, level tables, RoPE) read the rest.
struct StageContext {
  int head_dim = 0;
  /// The (layer, kv head) the chain is built for, or -1 when it is built without one
  /// (build_pipeline(chain, head_dim): checking a recipe, probing bytes per token). A stage
  /// that needs a head must then still validate its parameters, and may return a stage that
  /// throws when used.
  int layer = -1;
  int kv_head = -1;
  int layers = 0;    // the cache's shape (0 when unknown)
  int kv_heads = 0;
  /// CacheConfig::codebooks (null if none were given).
  std::shared_ptr<const Codebooks> codebooks;
  /// Codebooks used while building this cache: files by path (so that a file named by every
  /// head's chain is read once) and CacheConfig::codebooks under "". May be null.
  std::vector<std::pair<std::string, std::shared_ptr<const Codebooks>>>* loaded = nullptr;
};

/// A factory reads its parameters (head_dim is given so it can validate groups).
using StageFactory = std::function<BuiltStage(StageParams& params, int head_dim)>;
/// A factory that also sees which head it is built for.
using ContextStageFactory = std::function<BuiltStage(StageParams& params, const StageContext& ctx)>;

/// Register a stage under `name` (replaces an existing registration). Engines use this to
/// plug in their own policies; recipes can then name them.
void register_stage(const std::string& name, StageKind kind, StageFactory factory);
void register_stage(const std::string& name, StageKind kind, ContextStageFactory factory);

}  // namespace kvslim
