// TokenStore: everything one (layer, kv head) of a cache holds.
//
//   index order   [ sinks | sealed pages ... | window (full precision) | demoted | special tokens ]
//   sinks         first Codec::sinks() tokens of the sequence, f32, evicted only by a policy
//                 that says so
//   sealed pages  up to Codec::page_tokens() tokens each, encoded by the head's codec; a
//                 dropped token is masked at once (its slot gets logit -inf) and its memory is
//                 reclaimed when the page is re-packed (more than half of its slots dead)
//   window        newest tokens in f32: KIVI's residual plus the not-yet-complete group, and
//                 the tokens of the latest append until they have attended (flush() runs
//                 after attend and before the next append, so a prefill chunk attends to its
//                 own tokens in full precision)
//   demoted       tokens a demoting policy (MiKV, EvictAction::kDemote) moved out of the head's
//                 codec into the policy's low-precision codec, in the order they were demoted:
//                 pages of that codec, then the last page's tokens still waiting in f32 until
//                 a page of them is full. Every one of them is older than any later query, so
//                 attention never masks them causally. A demoted token never comes back up.
//   specials      weighted f32 tokens (merged tokens, compensation tokens): a special token
//                 of weight w adds ln(w) to its logit, i.e. counts as w identical tokens
//
// "Index" below is the logical index: kept tokens only, in this order (dead page slots are
// not counted). Positions are kept apart from slots (run-length coded: consecutive positions
// cost one run) so eviction never confuses RoPE positions; they follow index order, so the
// demoted segment's positions are not sorted. Importance scores are in index order and follow
// their tokens through drops, demotion and re-packing. Policy authors read tokens through this
// class; engines normally use KVCache only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "kvslim/cache/memory.h"
#include "kvslim/cache/recipe.h"

namespace kvslim {

namespace detail {
class RopeTable;
class StateWriter;
class StateReader;
struct SharedPages;
struct StoreLimits;
}
namespace kernels {
struct KernelTable;
}
class MiniCache;

/// Scratch buffers for attention, reused across calls (one per thread).
struct AttendWorkspace {
  std::vector<float> q, out;            // gathered query rows and outputs [nq][d] (KVCache)
  std::vector<float> m, l, s;           // online softmax state [nq], [nq]; logits [nq][block]
  std::vector<float> probs, block_max;  // only when attention mass is requested
  /// Per query row: 0 if the row is non-finite (its output becomes NaN and it adds no
  /// attention mass). Empty = every row is finite. Set by KVCache before TokenStore::attend.
  std::vector<unsigned char> row_ok;
  /// Set by the caller: keep per-token probabilities for collect_mass() even when attend()
  /// gets no mass pointer. Filled by attend(): one entry per block of slots.
  bool keep_probs = false;
  struct Block {
    std::int64_t slot, index;  // first physical slot (into probs) and first logical index
    int ntok;
    const std::uint64_t* dead;  // page dead bits, or null
  };
  std::vector<Block> blocks;
  std::vector<float> mass;       // KVCache: scorer mass of one head
  std::vector<float> block_sum;  // collect_mass: one block's probabilities summed over rows
  std::vector<std::byte> prepared;     // the codec's query-side state (Codec::prepare)
  std::vector<std::byte> prepared_lo;  // the same for the demoted tokens' codec
  // Pre-RoPE keys (TokenStore::set_rope): one block's keys rotated, its values decoded, the
  // positions of every token, the angles.
  std::vector<float> rope_k, rope_v;
  std::vector<float> merged_p;  // MiniCache pages: softmax weights times value magnitudes
  std::vector<std::int64_t> rope_pos, rope_slot_pos;
  std::shared_ptr<void> rope_state;  // detail::RopeTable::State
  std::int64_t slots = 0;  // physical slots covered by probs rows
};

class TokenStore {
 public:
  /// pipeline must outlive the store.
  TokenStore(int head_dim, const Pipeline* pipeline);
  ~TokenStore();
  TokenStore(const TokenStore&) = delete;
  TokenStore& operator=(const TokenStore&) = delete;

  int head_dim() const noexcept { return d_; }
  const Pipeline& pipeline() const noexcept { return *pipeline_; }
  const Codec& codec() const noexcept { return *pipeline_->codec; }

  /// Tokens held, all segments.
  std::int64_t size() const noexcept { return sinks_ + sealed_tokens() + window_ + demoted() + specials(); }
  std::int64_t sink_count() const noexcept { return sinks_; }
  /// Kept tokens in sealed pages.
  std::int64_t sealed_tokens() const noexcept { return sealed_live_; }
  /// Sealed pages, and page slots (kept + masked dropped tokens not yet reclaimed).
  std::int64_t page_count() const noexcept { return static_cast<std::int64_t>(pages_.size()); }
  std::int64_t page_slots() const noexcept;
  /// Pages encoded by re-packing since construction or reset() (each re-encodes its tokens:
  /// lossless for float codecs, a second key rounding for KIVI).
  std::int64_t repacked_pages() const noexcept { return repacked_pages_; }
  /// Kept tokens that are not special (sinks + pages + window), i.e. the index where the
  /// specials start.
  std::int64_t ordinary() const noexcept { return sinks_ + sealed_live_ + window_; }
  std::int64_t window_count() const noexcept { return window_; }
  std::int64_t specials() const noexcept { return static_cast<std::int64_t>(special_w_.size()); }
  /// Special token s (0 <= s < specials(), logical index specials_first() + s): key and value
  /// rows of d floats, and ln of its weight.
  const float* special_key(std::int64_t s) const noexcept { return special_k_.data() + s * d_; }
  const float* special_value(std::int64_t s) const noexcept { return special_v_.data() + s * d_; }
  float special_log_weight(std::int64_t s) const noexcept { return special_w_[static_cast<std::size_t>(s)]; }
  /// Tokens in the demoted segment (index ordinary() .. ordinary() + demoted()), and how many of
  /// them are encoded in pages of the demotion codec (the rest wait in f32 for a full page).
  std::int64_t demoted() const noexcept { return lo_live_ + lo_stage_; }
  std::int64_t demoted_encoded() const noexcept { return lo_live_; }
  std::int64_t demoted_pages() const noexcept { return lo_ ? static_cast<std::int64_t>(lo_->pages.size()) : 0; }
  /// Index of the first special token.
  std::int64_t specials_first() const noexcept { return ordinary() + demoted(); }
  /// The low-precision codec demoted tokens use (the eviction policy's), or null.
  const Codec* demote_codec() const noexcept { return lo_codec_; }
  /// Bytes this store has allocated (all containers).
  std::int64_t bytes() const noexcept { return counter_.bytes; }
  /// Keys are stored pre-RoPE: attention rotates each by its position with `rope` (owned by
  /// the caller, KVCache; null: keys are used as stored). Set before the first append.
  void set_rope(const detail::RopeTable* rope) noexcept { rope_ = rope; }
  /// Of those, the bytes of sealed pages (both tiers) that hold exactly kept outliers
  /// (Codec::outlier_bytes: dense-and-sparse side lists).
  std::int64_t outlier_bytes() const noexcept;
  /// Position of every token, in index order.
  std::vector<std::int64_t> positions() const;
  /// Last appended position, or -1 if nothing was appended since reset.
  std::int64_t last_position() const noexcept { return last_pos_; }
  /// Tokens in the most recent append (the queries attend() may causally mask).
  std::int64_t last_append_count() const noexcept { return last_append_; }
  /// Tokens appended since construction or reset(), evicted ones included.
  std::int64_t seen() const noexcept { return seen_; }
  /// Per-token importance maintained by the pipeline's scorers (empty if it has none).
  std::span<float> importance() noexcept { return {importance_.data(), importance_.size()}; }
  std::span<const float> importance() const noexcept { return {importance_.data(), importance_.size()}; }

  /// Append n tokens. k, v: row i at k + i*k_stride (d contiguous floats). pos: n strictly
  /// increasing positions, all greater than last_position() (checked by KVCache).
  void append(const kernels::KernelTable& kt, const float* k, std::int64_t k_stride, const float* v,
              std::int64_t v_stride, std::int64_t n, const std::int64_t* pos);

  /// Run what waits for the latest append to have attended: the eviction policy (once per
  /// append), then sealing of every complete page of window tokens beyond the codec's
  /// residual. KVCache calls it after attend() and at the start of append(); idempotent.
  void flush(const kernels::KernelTable& kt);

  /// Remove tokens by index (any order; duplicates ignored). Throws Error(kOutOfRange) for
  /// an index outside [0, size()). Page slots are masked at once; pages with more than half
  /// of their slots dead are re-packed with their neighbours (see docs/architecture.md).
  void drop(const kernels::KernelTable& kt, std::span<const std::int64_t> victims);

  /// Add a weighted full-precision token (merge / compensation). weight >= 1 counts it as
  /// `weight` identical tokens in the softmax.
  void add_special(const float* k, const float* v, float weight, std::int64_t position);

  /// Fold ordinary tokens (indices < ordinary(), any order) into the head's compensation
  /// token (RazorAttention), creating it on first use, then drop them: the token's key and
  /// value become the mean over everything folded so far, its weight the count. The mean is
  /// updated in double from the stored f32 mean (no extra memory): m' = (m N + sum) / N',
  /// one f32 rounding per call, earlier roundings shrink by N / N'. Throws Error(kOutOfRange) for an index outside [0, ordinary()).
  void compensate(const kernels::KernelTable& kt, std::span<const std::int64_t> victims);
  /// Re-encode ordinary tokens (indices < ordinary(), any order) with the demotion codec and
  /// move them to the end of the demoted segment, scores and positions with them (MiKV).
  /// Throws Error(kInvalidState) if the pipeline has no demotion codec, Error(kOutOfRange)
  /// for an index outside [0, ordinary()).
  void demote(const kernels::KernelTable& kt, std::span<const std::int64_t> victims);
  /// Logical index of the compensation token, or -1 if the head has none.
  std::int64_t compensation_index() const noexcept { return comp_ < 0 ? -1 : specials_first() + comp_; }
  /// Tokens folded into the compensation token since construction or reset().
  std::int64_t compensated() const noexcept { return comp_n_; }

  /// Keys and values of ordinary tokens idx (strictly increasing, < ordinary()), decoded as
  /// materialize() would, into k, v [idx.size()][d]. Each sealed page touched is decoded once.
  /// Throws Error(kOutOfRange) / Error(kInvalidArgument) for bad indices.
  void rows(const kernels::KernelTable& kt, std::span<const std::int64_t> idx, float* k, float* v) const;

  /// Decode every token into k, v: [size()][d]; log_weights (may be null): [size()], 0 for
  /// ordinary tokens and ln(w) for specials.
  void materialize(const kernels::KernelTable& kt, float* k, float* v, float* log_weights) const;

  /// Attention for nq query rows over every segment with one online softmax.
  ///   q      [nq][d] f32 rows, pre-scaled by the softmax scale
  ///   nquery queries per query head: row r is query (r % nquery) of the last nquery tokens of
  ///          the latest append; it sees every older token and the chunk's tokens up to its
  ///          own (causal within the chunk, in whatever segment they are stored)
  ///   out    [nq][d] contiguous: the normalized attention output of each row
  ///   mass   null, or [size()]: += attention probability each token received, summed
  ///          over all rows
  /// Scratch comes from ws (grown on first use, reused after): O(nq * (d + page)) floats,
  /// plus O(nq * size()) only when mass is requested.
  void attend(const kernels::KernelTable& kt, const float* q, int nq, int nquery, float* out, float* mass,
              AttendWorkspace& ws) const;
  /// A part of one head's tokens, for splitting a head over threads (split-KV): pages
  /// [page_begin, page_end), plus the sinks (head) and the window and specials (tail).
  struct AttendRange {
    std::size_t page_begin, page_end;
    bool head, tail;
  };
  /// Attention state over one range only: ws.m and ws.l hold the online-softmax maximum and
  /// sum per row and out the unnormalized weighted values; the caller merges the ranges
  /// (o = sum_i o_i e^(m_i - m), l = sum_i l_i e^(m_i - m), out = o / l). No mass.
  void attend_partial(const kernels::KernelTable& kt, const float* q, int nq, int nquery, const AttendRange& range,
                      float* out, AttendWorkspace& ws) const;

  /// After attend() with a mass request (mass may be null there and the probabilities are
  /// still kept when keep_probs is set): add into mass [size()] the probability each token
  /// received from the rows whose query index (r % nquery) >= first_query.
  void collect_mass(AttendWorkspace& ws, int nq, int nquery, int first_query, float* mass) const;

  /// Drop everything; keep the pipeline (and a MiniCache pairing).
  void reset();

  /// MiniCache (cross-layer merging): this store (layer l) seals its pages together with
  /// `lower` (layer l-1, same kv head, same codec): each pair of pages becomes one page of
  /// shared unit directions, counted in `shared` (KVCache's shared bytes: both layers
  /// reference it), plus per-layer magnitudes and the retained tokens' originals. The lower
  /// store's own sealing then waits for this one's. KVCache sets this up; pass null to undo.
  void pair_with_lower(TokenStore* lower, ByteCounter* shared);
  /// Called by MiniCache::merge_layers from this store's flush(): seals every complete page
  /// beyond the residual that both windows hold (the same tokens at the same positions). If
  /// the two ever disagree (different positions, or the lower layer behind), the pair is
  /// dissolved until reset() and both seal on their own.
  void seal_merged(const kernels::KernelTable& kt, const MiniCache& mc);
  /// Sealed pages that hold merged (MiniCache) tokens, and of their slots, the retained ones.
  std::int64_t merged_pages() const noexcept { return merged_pages_; }
  std::int64_t retained_tokens() const noexcept { return retained_; }
  /// True while this store's sealing waits for its MiniCache upper layer.
  bool held_for_merge() const noexcept { return held_; }

  /// Saved caches (KVCache::save / load, docs/formats.md "Saved cache"). save_state writes
  /// everything the store holds, as stored: pages as their codec's bytes, masks, the window,
  /// demoted tokens, specials, positions, scores and counters. load_state fills a store that
  /// was just constructed with the saved store's pipeline and set up like it (set_rope,
  /// pair_with_lower; a MiniCache lower layer is loaded before its upper one). It checks
  /// every invariant that attention and later calls rely on and throws Error(kFormat) naming
  /// the first that fails; a store that threw is garbage and must be destroyed.
  void save_state(detail::StateWriter& w, detail::SharedPages& shared) const;
  void load_state(detail::StateReader& r, detail::SharedPages& shared, const detail::StoreLimits& limits);

 private:
  using Bytes = std::vector<std::byte, TrackedAllocator<std::byte>>;
  /// Positions of the ordinary tokens in index order, as runs of consecutive positions.
  /// Closed runs are varint coded (gap from the previous run's end, count - 1) in blocks of
  /// up to 128 runs: a contiguous prompt costs a few bytes, a token kept alone among evicted
  /// neighbours about two, and dropping a token re-codes one block, not the whole list.
  class PositionRuns {
   public:
    /// signed_gaps: positions may go down between runs (the demoted segment); the gaps are then
    /// zigzag coded, which costs a bit more per gap, so the ordinary tokens' list does not.
    explicit PositionRuns(ByteCounter* c, bool signed_gaps = false)
        : counter_(c), signed_(signed_gaps), blocks_(TrackedAllocator<Block>(c)) {}
    void push_run(std::int64_t first, std::int64_t count);
    /// Every run (first, count) in index order (saved caches).
    std::vector<std::pair<std::int64_t, std::int64_t>> runs() const;
    template <class F>
    void for_each_run(F&& f) const;  // f(first, count) in index order
    /// Remove the tokens at `idx` (sorted, unique, all < the number of positions held).
    void erase(const std::vector<std::int64_t>& idx);
    void clear();

   private:
    static constexpr int kRunsPerBlock = 128;
    struct Block {
      Bytes bytes;
      std::int64_t base = 0;    // the first run's gap is counted from here
      std::int64_t end = 0;     // one past the last run's last position
      std::int64_t tokens = 0;  // positions in the block
      int runs = 0;
    };
    template <class F>
    void decode(const Block& b, F&& f) const;
    static void put(Bytes& bytes, std::uint64_t v);
    void close_into(Block& b, std::int64_t first, std::int64_t count) const;
    ByteCounter* counter_;
    bool signed_;
    std::vector<Block, TrackedAllocator<Block>> blocks_;
    std::int64_t open_first_ = 0, open_count_ = 0;  // the last run, still growing
  };
  using Floats = std::vector<float, TrackedAllocator<float>>;
  using Words = std::vector<std::uint64_t, TrackedAllocator<std::uint64_t>>;
  /// A MiniCache page's own part: the shared unit directions (the codec's page format,
  /// referenced by both layers' pages), this layer's magnitudes [2][ntok] (keys, then values:
  /// the original norm divided by the stored direction's, so a restored row has exactly the
  /// original norm), and the retained slots' original rows [2][nret][d] (keys, then values).
  struct MergedPart {
    std::shared_ptr<const Bytes> dir;
    Floats mag;
    Floats ret;
    std::vector<std::int32_t, TrackedAllocator<std::int32_t>> slot;
    explicit MergedPart(ByteCounter* c)
        : mag(TrackedAllocator<float>(c)), ret(TrackedAllocator<float>(c)), slot(TrackedAllocator<std::int32_t>(c)) {}
  };
  /// A sealed page: ntok slots encoded by the codec; `dead` has one bit per slot (set =
  /// dropped), empty while every slot is live. `merged` is set for a MiniCache page (`data`
  /// is then empty).
  struct Page {
    Bytes data;
    Words dead;
    int ntok = 0;
    int live = 0;
    std::shared_ptr<const MergedPart> merged;
    const Bytes& bytes() const noexcept { return merged ? *merged->dir : data; }
    bool is_dead(int j) const noexcept {
      return !dead.empty() && ((dead[static_cast<std::size_t>(j) >> 6] >> (j & 63)) & 1u);
    }
  };

  void attend_blocks(const kernels::KernelTable& kt, const float* q, int nq, int nquery, float* out, bool want_probs,
                     const AttendRange& range, AttendWorkspace& ws) const;
  void grow_window(std::int64_t rows);
  void push_position(std::int64_t p);
  void seal_pages(const kernels::KernelTable& kt);
  using PageList = std::vector<Page, TrackedAllocator<Page>>;
  void repack(const kernels::KernelTable& kt, PageList& pages, const Codec& codec);
  Page make_page(int ntok, const Codec& codec);
  /// Bytes a page of ntok tokens is allocated (the codec's bytes rounded up to 16).
  std::size_t page_alloc_bytes(int ntok, const Codec& codec) const;
  void save_page(detail::StateWriter& w, detail::SharedPages& shared, const Page& p) const;
  Page load_page(detail::StateReader& r, detail::SharedPages& shared, const Codec& codec, bool merged_ok,
                 std::size_t index);
  void load_runs(detail::StateReader& r, PositionRuns& runs, bool sorted, std::int64_t expect, const char* what);
  /// A sealed page's rows, decoded (and for a MiniCache page restored) into k, v [ntok][d].
  void decode_page(const kernels::KernelTable& kt, const Page& p, const Codec& codec, float* k, float* v) const;
  /// Removes the first n rows of the window (sealed into a page).
  void pop_window(std::int64_t n);
  /// Calls f(k, v) with the decoded rows of ordinary tokens idx (sorted, unique, < ordinary()).
  template <class F>
  void for_rows(const kernels::KernelTable& kt, const std::vector<std::int64_t>& idx, F&& f) const;
  void seal_demoted(const kernels::KernelTable& kt);
  std::int64_t lo_slots() const noexcept;

  int d_;
  const Pipeline* pipeline_;
  int page_tokens_;
  int residual_;
  int sink_target_;
  ByteCounter counter_;

  Floats sink_k_, sink_v_;  // [sinks][d]
  std::int64_t sinks_ = 0;
  std::vector<Page, TrackedAllocator<Page>> pages_;
  std::int64_t sealed_live_ = 0;
  Floats win_k_, win_v_;  // [window capacity][d]
  std::int64_t window_ = 0;
  Floats special_k_, special_v_, special_w_;  // [n][d], [n][d], [n] (ln weight)
  std::vector<std::int64_t, TrackedAllocator<std::int64_t>> special_pos_;
  PositionRuns runs_;
  Floats importance_;
  std::int64_t last_pos_ = -1;
  std::int64_t last_append_ = 0;
  std::int64_t seen_ = 0;
  bool evict_pending_ = false;
  std::int64_t repacked_pages_ = 0;
  const Codec* lo_codec_;  // the demotion codec, or null
  const detail::RopeTable* rope_ = nullptr;  // pre-RoPE keys: attention rotates them
  // MiniCache pairing: this store's lower layer and the counter of the directions both share;
  // pair_ok_ until dissolved (reset() restores it); held_: this store is a lower layer whose
  // sealing waits (has_upper_: it was paired at all).
  TokenStore* lower_ = nullptr;
  ByteCounter* shared_counter_ = nullptr;
  bool pair_ok_ = false, held_ = false, has_upper_ = false;
  std::int64_t merged_pages_ = 0, retained_ = 0;
  /// The demoted segment's containers, allocated only for a pipeline that demotes (every
  /// store's own size counts in stats()).
  struct Demoted {
    explicit Demoted(ByteCounter* c)
        : pages(TrackedAllocator<Page>(c)), k(TrackedAllocator<float>(c)), v(TrackedAllocator<float>(c)), runs(c, true) {}
    PageList pages;
    Floats k, v;        // demoted tokens waiting for a full page [lo_stage_][d]
    PositionRuns runs;  // positions of the demoted segment, in its index order
  };
  std::unique_ptr<Demoted> lo_;
  std::int64_t lo_live_ = 0;   // kept tokens in lo_->pages
  std::int64_t lo_stage_ = 0;  // rows in lo_->k / lo_->v
  std::int64_t comp_n_ = 0;          // tokens folded into the compensation token
  std::int64_t comp_ = -1;           // its index among the specials, -1: none
  std::vector<std::int64_t> victims_;  // scratch for the eviction policy (not kept memory)
};

}  // namespace kvslim
