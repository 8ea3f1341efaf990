#include "kvslim/cache/token_store.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cache/rope.h"
#include "check.h"
#include "util/dot.h"
#include "kvslim/kernels/kernel_table.h"
#include "kvslim/policy/merge/minicache.h"
#include "kvslim/policy/policy.h"

namespace kvslim {
namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Tokens per block for full-precision segments (sinks, window, specials).
constexpr int kDenseBlock = 64;
// Attention prefetches the page this many pages ahead of the one it reads (measured on the
// reference machine: 4 is best for KIVI's 3-5 KB pages and neutral for f16/f32 pages).
constexpr std::size_t kPrefetchAhead = 4;

std::size_t round16(std::size_t n) { return (n + 15) & ~std::size_t{15}; }

// Erase rows [n][d] of a row-major buffer whose indices are in sorted `idx` (relative).
template <class V>
std::int64_t erase_rows(V& buf, std::int64_t rows, int d, const std::vector<std::int64_t>& idx) {
  std::int64_t w = 0;
  std::size_t x = 0;
  const std::size_t ud = static_cast<std::size_t>(d);
  for (std::int64_t r = 0; r < rows; ++r) {
    if (x < idx.size() && idx[x] == r) {
      ++x;
      continue;
    }
    if (w != r) std::memmove(buf.data() + w * d, buf.data() + r * d, ud * sizeof(buf[0]));
    ++w;
  }
  buf.resize(static_cast<std::size_t>(w) * ud);
  return w;
}
}  // namespace

TokenStore::TokenStore(int head_dim, const Pipeline* pipeline)
    : d_(head_dim),
      pipeline_(pipeline),
      page_tokens_(pipeline->codec->page_tokens()),
      // Pages are rounded to 16 bytes, the allocator's own alignment, so what we count is
      // what we ask for.
      residual_(pipeline->codec->residual()),
      sink_target_(pipeline->codec->sinks()),
      sink_k_(TrackedAllocator<float>(&counter_)),
      sink_v_(TrackedAllocator<float>(&counter_)),
      pages_(TrackedAllocator<Page>(&counter_)),
      win_k_(TrackedAllocator<float>(&counter_)),
      win_v_(TrackedAllocator<float>(&counter_)),
      special_k_(TrackedAllocator<float>(&counter_)),
      special_v_(TrackedAllocator<float>(&counter_)),
      special_w_(TrackedAllocator<float>(&counter_)),
      special_pos_(TrackedAllocator<std::int64_t>(&counter_)),
      runs_(&counter_),
      importance_(TrackedAllocator<float>(&counter_)),
      lo_codec_(pipeline->eviction ? pipeline->eviction->demote_codec() : nullptr) {
  if (lo_codec_) {
    lo_ = std::make_unique<Demoted>(&counter_);
    counter_.bytes += static_cast<std::int64_t>(sizeof(Demoted));
  }
}

TokenStore::~TokenStore() = default;

std::int64_t TokenStore::page_slots() const noexcept {
  std::int64_t n = 0;
  for (const Page& p : pages_) n += p.ntok;
  return n;
}

std::int64_t TokenStore::lo_slots() const noexcept {
  std::int64_t n = lo_stage_;
  if (lo_)
    for (const Page& p : lo_->pages) n += p.ntok;
  return n;
}

void TokenStore::PositionRuns::put(Bytes& bytes, std::uint64_t v) {
  while (v >= 0x80) {
    bytes.push_back(static_cast<std::byte>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  bytes.push_back(static_cast<std::byte>(v));
}

void TokenStore::PositionRuns::close_into(Block& b, std::int64_t first, std::int64_t count) const {
  // Zigzag when the positions may go down (the demoted segment).
  const std::int64_t gap = first - b.end;
  put(b.bytes, signed_ ? (static_cast<std::uint64_t>(gap) << 1) ^ static_cast<std::uint64_t>(gap >> 63)
                       : static_cast<std::uint64_t>(gap));
  put(b.bytes, static_cast<std::uint64_t>(count - 1));
  b.end = first + count;
  b.tokens += count;
  ++b.runs;
}

void TokenStore::PositionRuns::push_run(std::int64_t first, std::int64_t count) {
  if (open_count_ > 0 && first == open_first_ + open_count_) {
    open_count_ += count;
    return;
  }
  if (open_count_ > 0) {
    if (blocks_.empty() || blocks_.back().runs >= kRunsPerBlock) {
      const std::int64_t base = blocks_.empty() ? 0 : blocks_.back().end;
      blocks_.push_back(Block{Bytes(TrackedAllocator<std::byte>(counter_)), base, base, 0, 0});
    }
    close_into(blocks_.back(), open_first_, open_count_);
  }
  open_first_ = first;
  open_count_ = count;
}

template <class F>
void TokenStore::PositionRuns::decode(const Block& b, F&& f) const {
  std::size_t i = 0;
  std::int64_t end = b.base;
  auto get = [&] {
    std::uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
      const auto byte = static_cast<std::uint64_t>(b.bytes[i++]);
      v |= (byte & 0x7F) << shift;
      if (!(byte & 0x80)) return v;
    }
  };
  while (i < b.bytes.size()) {
    const std::uint64_t z = get();
    const std::int64_t first = end + static_cast<std::int64_t>(signed_ ? (z >> 1) ^ (~(z & 1) + 1) : z);
    const std::int64_t count = static_cast<std::int64_t>(get()) + 1;
    f(first, count);
    end = first + count;
  }
}

template <class F>
void TokenStore::PositionRuns::for_each_run(F&& f) const {
  for (const Block& b : blocks_) decode(b, f);
  if (open_count_ > 0) f(open_first_, open_count_);
}

std::vector<std::pair<std::int64_t, std::int64_t>> TokenStore::PositionRuns::runs() const {
  std::vector<std::pair<std::int64_t, std::int64_t>> out;
  for_each_run([&](std::int64_t first, std::int64_t count) { out.emplace_back(first, count); });
  return out;
}

void TokenStore::PositionRuns::erase(const std::vector<std::int64_t>& idx) {
  std::vector<std::pair<std::int64_t, std::int64_t>> pieces;
  std::size_t x = 0;
  std::int64_t start = 0;  // index of the current run's first token
  // Split the runs of [first, first + count) around the victims at indices from `start`.
  auto split = [&](std::int64_t first, std::int64_t count) {
    std::int64_t from = 0;
    for (; x < idx.size() && idx[x] < start + count; ++x) {
      const std::int64_t off = idx[x] - start;
      if (off > from) pieces.emplace_back(first + from, off - from);
      from = off + 1;
    }
    if (from < count) pieces.emplace_back(first + from, count - from);
    start += count;
  };
  for (Block& b : blocks_) {
    if (x >= idx.size()) break;
    if (idx[x] >= start + b.tokens) {  // untouched block
      start += b.tokens;
      continue;
    }
    pieces.clear();
    decode(b, split);
    b.bytes.clear();
    b.end = b.base;
    b.tokens = 0;
    b.runs = 0;
    for (const auto& [first, count] : pieces) close_into(b, first, count);
  }
  if (x < idx.size() && open_count_ > 0) {
    pieces.clear();
    split(open_first_, open_count_);
    open_count_ = 0;
    for (const auto& [first, count] : pieces) push_run(first, count);
  }
  std::erase_if(blocks_, [](const Block& b) { return b.tokens == 0; });
}

void TokenStore::PositionRuns::clear() {
  decltype(blocks_) empty(blocks_.get_allocator());
  blocks_.swap(empty);
  open_first_ = open_count_ = 0;
}

std::vector<std::int64_t> TokenStore::positions() const {
  std::vector<std::int64_t> out;
  out.reserve(static_cast<std::size_t>(size()));
  runs_.for_each_run([&](std::int64_t first, std::int64_t count) {
    for (std::int64_t i = 0; i < count; ++i) out.push_back(first + i);
  });
  if (lo_)
    lo_->runs.for_each_run([&](std::int64_t first, std::int64_t count) {
      for (std::int64_t i = 0; i < count; ++i) out.push_back(first + i);
    });
  out.insert(out.end(), special_pos_.begin(), special_pos_.end());
  return out;
}

void TokenStore::push_position(std::int64_t p) {
  runs_.push_run(p, 1);
  last_pos_ = p;
}

void TokenStore::grow_window(std::int64_t rows) {
  const auto n = static_cast<std::size_t>(rows * d_);
  if (n > win_k_.capacity()) {
    // Double like a vector would, but never past the steady-state need (residual + one
    // page) unless a large chunk asks for more: that memory would sit unused in stats().
    const std::size_t steady = static_cast<std::size_t>((residual_ + page_tokens_) * d_);
    const std::size_t cap = std::max(n, std::min(2 * win_k_.capacity(), std::max(steady, n)));
    win_k_.reserve(cap);
    win_v_.reserve(cap);
  }
  win_k_.resize(n);
  win_v_.resize(n);
}

std::size_t TokenStore::page_alloc_bytes(int ntok, const Codec& codec) const {
  return round16(codec.page_bytes(ntok, d_));
}

TokenStore::Page TokenStore::make_page(int ntok, const Codec& codec) {
  Page p{Bytes(page_alloc_bytes(ntok, codec), std::byte{0}, TrackedAllocator<std::byte>(&counter_)),
         Words(TrackedAllocator<std::uint64_t>(&counter_)), ntok, ntok, nullptr};
  return p;
}

void TokenStore::flush(const kernels::KernelTable& kt) {
  // Eviction first, so tokens about to leave are never sealed.
  if (evict_pending_) {
    evict_pending_ = false;
    if (pipeline_->eviction) {
      victims_.clear();
      pipeline_->eviction->select(*this, victims_);
      const EvictAction action = pipeline_->eviction->action();
      if (!victims_.empty()) {
        if (action == EvictAction::kCompensate)
          compensate(kt, victims_);
        else if (action == EvictAction::kDemote)
          demote(kt, victims_);
        else
          drop(kt, victims_);
      }
      if (action == EvictAction::kDemote) {
        victims_.clear();
        pipeline_->eviction->select_drops(*this, victims_);
        if (!victims_.empty()) drop(kt, victims_);
      }
    }
    if (pipeline_->merge && !pipeline_->merge->cross_layer()) pipeline_->merge->merge(kt, *this);
  }
  if (lower_ && pair_ok_) pipeline_->merge->merge_layers(kt, *lower_, *this);
  seal_pages(kt);
}

// Seal every complete page that is not needed for the residual window.
void TokenStore::seal_pages(const kernels::KernelTable& kt) {
  if (held_) return;  // a MiniCache lower layer: its upper layer seals both (seal_merged)
  const std::int64_t g = page_tokens_;
  std::int64_t sealed = 0;
  while (window_ - sealed - g >= residual_) {
    Page page = make_page(page_tokens_, *pipeline_->codec);
    const std::size_t off = static_cast<std::size_t>(sealed * d_);
    pipeline_->codec->encode(kt, win_k_.data() + off, win_v_.data() + off, page_tokens_, d_, page.data.data());
    pages_.push_back(std::move(page));
    sealed_live_ += g;
    sealed += g;
  }
  pop_window(sealed);
}

void TokenStore::pop_window(std::int64_t sealed) {
  if (sealed == 0) return;
  const std::int64_t g = page_tokens_;
  const std::size_t off = static_cast<std::size_t>(sealed * d_);
  const std::size_t keep = static_cast<std::size_t>((window_ - sealed) * d_);
  std::memmove(win_k_.data(), win_k_.data() + off, keep * sizeof(float));
  std::memmove(win_v_.data(), win_v_.data() + off, keep * sizeof(float));
  window_ -= sealed;
  grow_window(window_);
  // After a large prefill chunk the window buffer is much larger than it will ever need to
  // be again; give the memory back so stats() stays honest.
  const std::size_t steady = static_cast<std::size_t>((residual_ + g) * d_);
  // An empty window (residual 0: everything sealed) holds no memory either: the next
  // append regrows it, a few doublings per page.
  if (window_ == 0 || win_k_.capacity() > 2 * std::max(steady, keep)) {
    win_k_.shrink_to_fit();
    win_v_.shrink_to_fit();
  }
}

void TokenStore::pair_with_lower(TokenStore* lower, ByteCounter* shared) {
  if (lower_) lower_->held_ = lower_->has_upper_ = false;
  lower_ = lower;
  shared_counter_ = shared;
  pair_ok_ = lower != nullptr;
  if (lower) lower->held_ = lower->has_upper_ = true;
}

void TokenStore::seal_merged(const kernels::KernelTable& kt, const MiniCache& mc) {
  if (!lower_ || !pair_ok_) return;
  TokenStore& lo = *lower_;
  const std::int64_t g = page_tokens_;
  if (window_ - g < residual_) return;
  const Codec& codec = *pipeline_->codec;
  // Both windows must hold the same tokens: the same segments before them and the same
  // positions. Otherwise the pair is dissolved and each layer seals on its own.
  const std::vector<std::int64_t> pu = positions(), pl = lo.positions();
  auto dissolve = [&] {
    pair_ok_ = false;
    lo.held_ = false;
  };
  if (lo.sinks_ != sinks_ || lo.sealed_live_ != sealed_live_ || lo.window_ < window_ || lo.specials() != 0 ||
      specials() != 0) {
    dissolve();
    return;
  }
  const std::size_t first = static_cast<std::size_t>(sinks_ + sealed_live_);
  for (std::int64_t j = 0; j < window_; ++j)
    if (pu[first + static_cast<std::size_t>(j)] != pl[first + static_cast<std::size_t>(j)]) {
      dissolve();
      return;
    }
  const std::size_t ud = static_cast<std::size_t>(d_), n = static_cast<std::size_t>(g) * ud;
  std::vector<float> dk(n), dv(n), qk(n), qv(n);
  std::vector<double> dn(static_cast<std::size_t>(2 * g));
  std::vector<int> ret;
  std::int64_t sealed = 0;
  while (window_ - sealed - g >= residual_) {
    const std::size_t off = static_cast<std::size_t>(sealed) * ud;
    const float* k0 = lo.win_k_.data() + off;
    const float* v0 = lo.win_v_.data() + off;
    const float* k1 = win_k_.data() + off;
    const float* v1 = win_v_.data() + off;
    mc.merge_rows(k0, v0, k1, v1, static_cast<int>(g), d_, dk.data(), dv.data(), ret);
    auto dir = std::allocate_shared<Bytes>(TrackedAllocator<Bytes>(shared_counter_),
                                           page_alloc_bytes(static_cast<int>(g), codec), std::byte{0},
                                           TrackedAllocator<std::byte>(shared_counter_));
    codec.encode(kt, dk.data(), dv.data(), static_cast<int>(g), d_, dir->data());
    // The directions as stored (quantized by the codec): a layer's magnitude is its norm over
    // the stored direction's, so that restoring gives the original norm exactly.
    codec.decode(kt, dir->data(), static_cast<int>(g), d_, qk.data(), qv.data());
    // The stored directions' norms, once for both layers.
    for (std::int64_t j = 0; j < g; ++j) {
      dn[static_cast<std::size_t>(j)] = detail::norm_f64(qk.data() + j * d_, d_);
      dn[static_cast<std::size_t>(g + j)] = detail::norm_f64(qv.data() + j * d_, d_);
    }
    for (TokenStore* st : {&lo, this}) {
      const float* k = st == this ? k1 : k0;
      const float* v = st == this ? v1 : v0;
      auto part = std::allocate_shared<MergedPart>(TrackedAllocator<MergedPart>(&st->counter_), &st->counter_);
      part->dir = dir;
      part->mag.resize(static_cast<std::size_t>(2 * g));
      for (std::int64_t j = 0; j < g; ++j) {
        const double sk = dn[static_cast<std::size_t>(j)], sv = dn[static_cast<std::size_t>(g + j)];
        part->mag[static_cast<std::size_t>(j)] =
            sk > 0.0 ? static_cast<float>(detail::norm_f64(k + j * d_, d_) / sk) : 0.0f;
        part->mag[static_cast<std::size_t>(g + j)] =
            sv > 0.0 ? static_cast<float>(detail::norm_f64(v + j * d_, d_) / sv) : 0.0f;
      }
      part->slot.assign(ret.begin(), ret.end());
      part->ret.resize(ret.size() * 2 * ud);
      for (std::size_t i = 0; i < ret.size(); ++i) {
        const std::size_t o = static_cast<std::size_t>(ret[i]) * ud;
        std::memcpy(part->ret.data() + i * ud, k + o, ud * sizeof(float));
        std::memcpy(part->ret.data() + (ret.size() + i) * ud, v + o, ud * sizeof(float));
      }
      Page pg{Bytes(TrackedAllocator<std::byte>(&st->counter_)), Words(TrackedAllocator<std::uint64_t>(&st->counter_)),
              static_cast<int>(g), static_cast<int>(g), std::move(part)};
      st->pages_.push_back(std::move(pg));
      st->sealed_live_ += g;
      ++st->merged_pages_;
      st->retained_ += static_cast<std::int64_t>(ret.size());
    }
    sealed += g;
  }
  pop_window(sealed);
  lo.pop_window(sealed);
}

void TokenStore::decode_page(const kernels::KernelTable& kt, const Page& p, const Codec& codec, float* k,
                             float* v) const {
  if (!p.merged) {
    codec.decode(kt, p.data.data(), p.ntok, d_, k, v);
    return;
  }
  const MergedPart& mp = *p.merged;
  codec.decode(kt, mp.dir->data(), p.ntok, d_, k, v);
  const std::size_t ud = static_cast<std::size_t>(d_);
  for (int j = 0; j < p.ntok; ++j) {
    const float mk = mp.mag[static_cast<std::size_t>(j)], mv = mp.mag[static_cast<std::size_t>(p.ntok + j)];
    for (std::size_t c = 0; c < ud; ++c) {
      k[j * ud + c] *= mk;
      v[j * ud + c] *= mv;
    }
  }
  for (std::size_t i = 0; i < mp.slot.size(); ++i) {
    const std::size_t o = static_cast<std::size_t>(mp.slot[i]) * ud;
    std::memcpy(k + o, mp.ret.data() + i * ud, ud * sizeof(float));
    std::memcpy(v + o, mp.ret.data() + (mp.slot.size() + i) * ud, ud * sizeof(float));
  }
}

std::int64_t TokenStore::outlier_bytes() const noexcept {
  std::int64_t n = 0;
  for (const Page& pg : pages_)
    if (!pg.merged) n += static_cast<std::int64_t>(codec().outlier_bytes(pg.ntok, d_));
  if (lo_)
    for (const Page& pg : lo_->pages) n += static_cast<std::int64_t>(lo_codec_->outlier_bytes(pg.ntok, d_));
  return n;
}

void TokenStore::append(const kernels::KernelTable& kt, const float* k, std::int64_t k_stride, const float* v,
                        std::int64_t v_stride, std::int64_t n, const std::int64_t* pos) {
  flush(kt);
  const std::int64_t first = ordinary();
  std::int64_t i = 0;
  // The first tokens of the sequence become sinks.
  const std::int64_t sink_first = sinks_;
  while (i < n && seen_ + i < sink_target_ && window_ == 0 && pages_.empty()) {
    sink_k_.insert(sink_k_.end(), k + i * k_stride, k + i * k_stride + d_);
    sink_v_.insert(sink_v_.end(), v + i * v_stride, v + i * v_stride + d_);
    push_position(pos[i]);
    ++sinks_;
    ++i;
  }
  const std::int64_t n_sink = i;
  const std::int64_t win_first = window_;
  if (i < n) {
    grow_window(window_ + (n - i));
    for (; i < n; ++i) {
      std::memcpy(win_k_.data() + window_ * d_, k + i * k_stride, static_cast<std::size_t>(d_) * sizeof(float));
      std::memcpy(win_v_.data() + window_ * d_, v + i * v_stride, static_cast<std::size_t>(d_) * sizeof(float));
      push_position(pos[i]);
      ++window_;
    }
  }
  last_append_ = n;
  seen_ += n;
  evict_pending_ = true;
  if (!pipeline_->scorers.empty()) {
    // New tokens sit after the window, before the demoted tokens and the specials.
    importance_.insert(importance_.begin() + first, static_cast<std::size_t>(n), 0.0f);
    for (const auto& sc : pipeline_->scorers) {
      if (n_sink) sc->on_append(*this, first, n_sink, sink_k_.data() + sink_first * d_);
      if (n > n_sink) sc->on_append(*this, first + n_sink, n - n_sink, win_k_.data() + win_first * d_);
    }
  }
}

void TokenStore::drop(const kernels::KernelTable& kt, std::span<const std::int64_t> victims) {
  if (victims.empty()) return;
  std::vector<std::int64_t> idx(victims.begin(), victims.end());
  std::sort(idx.begin(), idx.end());
  idx.erase(std::unique(idx.begin(), idx.end()), idx.end());
  const std::int64_t total = size();
  KVSLIM_CHECK(idx.front() >= 0 && idx.back() < total, ErrorCode::kOutOfRange,
               "drop: token index {} is out of range [0, {})", idx.front() < 0 ? idx.front() : idx.back(), total);
  const std::int64_t ord = ordinary();
  KVSLIM_CHECK(merged_pages_ == 0 || idx.front() >= sinks_ + sealed_live_ ||
                   *std::lower_bound(idx.begin(), idx.end(), sinks_) >= sinks_ + sealed_live_,
               ErrorCode::kInvalidState,
               "drop: token index {} is in a sealed page merged across layers (minicache), which cannot drop tokens",
               *std::lower_bound(idx.begin(), idx.end(), sinks_));

  // The latest append's queries are the last ordinary tokens; if any of them leaves, only the
  // suffix after the last one dropped can still attend (KVCache checks n <= last_append_).
  const std::int64_t chunk_first = ord - last_append_;
  for (auto it = idx.rbegin(); it != idx.rend(); ++it)
    if (*it < ord && *it >= chunk_first) {
      last_append_ = ord - 1 - *it;
      break;
    }

  // Importance (index order), then positions: only the position blocks that hold victims
  // are re-coded (PositionRuns::erase).
  if (!importance_.empty()) {
    // Move the spans between victims down (memmove), not element by element.
    std::size_t w = static_cast<std::size_t>(idx[0]);
    for (std::size_t x = 0; x < idx.size(); ++x) {
      const std::size_t from = static_cast<std::size_t>(idx[x]) + 1;
      const std::size_t to = x + 1 < idx.size() ? static_cast<std::size_t>(idx[x + 1]) : importance_.size();
      if (to > from) std::memmove(importance_.data() + w, importance_.data() + from, (to - from) * sizeof(float));
      w += to - from;
    }
    importance_.resize(w);
  }
  {
    const std::size_t dropped_ord =
        static_cast<std::size_t>(std::lower_bound(idx.begin(), idx.end(), ord) - idx.begin());
    if (dropped_ord > 0) {
      const std::vector<std::int64_t> ord_idx(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(dropped_ord));
      runs_.erase(ord_idx);
    }
  }

  // Split the victims by segment (relative indices). Pages are masked in place.
  std::vector<std::int64_t> in_sinks, in_window, in_lo_stage, in_specials, in_lo;
  std::size_t x = 0;
  for (; x < idx.size() && idx[x] < sinks_; ++x) in_sinks.push_back(idx[x]);
  // Marks the victims among a page list whose first token has logical index `base`;
  // returns whether any slot was masked. live_total is the list's live count.
  auto mark = [&](PageList& pages, std::int64_t base, std::int64_t& live_total) {
    const std::int64_t end = base + live_total;  // before this drop
    bool touched = false;
    for (Page& p : pages) {
      if (x >= idx.size() || idx[x] >= end) break;
      // Walk the page's live slots: logical base .. base + live.
      int live_seen = 0, dropped = 0;
      for (int j = 0; j < p.ntok && x < idx.size() && idx[x] < base + p.live; ++j) {
        if (p.is_dead(j)) continue;
        if (idx[x] == base + live_seen) {
          if (p.dead.empty()) p.dead.assign(static_cast<std::size_t>((p.ntok + 63) / 64), 0);
          p.dead[static_cast<std::size_t>(j) >> 6] |= std::uint64_t{1} << (j & 63);
          ++x;
          ++dropped;
          touched = true;
        }
        ++live_seen;
      }
      base += p.live;
      p.live -= dropped;
      live_total -= dropped;
    }
    return touched;
  };
  const bool touched = mark(pages_, sinks_, sealed_live_);
  for (; x < idx.size() && idx[x] < ord; ++x) in_window.push_back(idx[x] - (ord - window_));
  const std::size_t lo_from = x;
  const std::int64_t stage_first = ord + lo_live_, lo_end = stage_first + lo_stage_;  // before this drop
  const bool touched_lo = lo_ && mark(lo_->pages, ord, lo_live_);
  for (; x < idx.size() && idx[x] < lo_end; ++x) in_lo_stage.push_back(idx[x] - stage_first);
  for (std::size_t y = lo_from; y < x; ++y) in_lo.push_back(idx[y] - ord);
  for (; x < idx.size(); ++x) in_specials.push_back(idx[x] - lo_end);
  if (!in_lo.empty()) lo_->runs.erase(in_lo);

  if (!in_sinks.empty()) {
    erase_rows(sink_k_, sinks_, d_, in_sinks);
    sinks_ = erase_rows(sink_v_, sinks_, d_, in_sinks);
  }
  if (!in_window.empty()) {
    erase_rows(win_k_, window_, d_, in_window);
    window_ = erase_rows(win_v_, window_, d_, in_window);
  }
  if (!in_lo_stage.empty()) {
    erase_rows(lo_->k, lo_stage_, d_, in_lo_stage);
    lo_stage_ = erase_rows(lo_->v, lo_stage_, d_, in_lo_stage);
  }
  if (!in_specials.empty()) {
    if (comp_ >= 0) {  // the compensation token moves down, or goes
      const auto below = std::lower_bound(in_specials.begin(), in_specials.end(), comp_);
      if (below != in_specials.end() && *below == comp_) {
        comp_ = -1;
        comp_n_ = 0;
      } else {
        comp_ -= below - in_specials.begin();
      }
    }
    const std::int64_t ns = specials();
    erase_rows(special_k_, ns, d_, in_specials);
    erase_rows(special_v_, ns, d_, in_specials);
    erase_rows(special_w_, ns, 1, in_specials);
    erase_rows(special_pos_, ns, 1, in_specials);
  }
  if (touched) repack(kt, pages_, *pipeline_->codec);
  if (touched_lo) repack(kt, lo_->pages, *lo_codec_);
}

// Re-pack when a page has more than a quarter of its slots dead: every such page, and every
// small page (fewer than half of page_tokens() slots) starts a run that takes the following
// pages until the run holds at least page_tokens() live tokens; the run's live rows are
// decoded and encoded again as full pages (the last one partial when the run ends short).
// So pages stay full (the kernels' fast paths, few per-page costs) and at least 3/4 live.
// Lossless for f32/f16/bf16 (decode then encode gives the same bits); KIVI re-quantizes keys
// over each new page's range (values per token come back to the same codes up to rounding).
// Order, positions and importance are unchanged.
void TokenStore::repack(const kernels::KernelTable& kt, PageList& pages, const Codec& codec) {
  const int g = codec.page_tokens();
  auto candidate = [](const Page& p) { return 4 * p.live < 3 * p.ntok; };
  auto small = [g](const Page& p) { return 2 * p.ntok < g; };
  bool any = false;
  for (const Page& p : pages) any |= candidate(p);
  if (!any) return;

  std::vector<Page, TrackedAllocator<Page>> out{TrackedAllocator<Page>(&counter_)};
  out.reserve(pages.size());
  std::vector<float> k, v, rk, rv;  // scratch, freed on return
  const std::size_t ud = static_cast<std::size_t>(d_);
  const std::size_t n = pages.size();
  std::size_t i = 0;
  while (i < n) {
    if (!candidate(pages[i]) && !small(pages[i])) {
      out.push_back(std::move(pages[i++]));
      continue;
    }
    std::size_t j = i;
    std::int64_t total = 0;
    while (j < n && total < g) total += pages[j++].live;
    rk.resize(static_cast<std::size_t>(total) * ud);
    rv.resize(rk.size());
    std::size_t row = 0;
    for (std::size_t q = i; q < j; ++q) {
      const Page& p = pages[q];
      k.resize(static_cast<std::size_t>(p.ntok) * ud);
      v.resize(k.size());
      codec.decode(kt, p.data.data(), p.ntok, d_, k.data(), v.data());
      for (int s = 0; s < p.ntok; ++s) {
        if (p.is_dead(s)) continue;
        std::memcpy(rk.data() + row * ud, k.data() + static_cast<std::size_t>(s) * ud, ud * sizeof(float));
        std::memcpy(rv.data() + row * ud, v.data() + static_cast<std::size_t>(s) * ud, ud * sizeof(float));
        ++row;
      }
    }
    for (std::int64_t r0 = 0; r0 < total; r0 += g) {
      const int nt = static_cast<int>(std::min<std::int64_t>(g, total - r0));
      Page np = make_page(nt, codec);
      codec.encode(kt, rk.data() + r0 * d_, rv.data() + r0 * d_, nt, d_, np.data.data());
      out.push_back(std::move(np));
      ++repacked_pages_;
    }
    i = j;
  }
  pages.swap(out);
}

void TokenStore::add_special(const float* k, const float* v, float weight, std::int64_t position) {
  KVSLIM_CHECK(std::isfinite(weight) && weight >= 1.0f, ErrorCode::kInvalidArgument,
               "special token weight {} must be finite and >= 1", weight);
  special_k_.insert(special_k_.end(), k, k + d_);
  special_v_.insert(special_v_.end(), v, v + d_);
  special_w_.push_back(std::log(weight));
  special_pos_.push_back(position);
  if (!pipeline_->scorers.empty()) importance_.push_back(0.0f);
}

template <class F>
void TokenStore::for_rows(const kernels::KernelTable& kt, const std::vector<std::int64_t>& idx, F&& f) const {
  // Where the rows are stored: sinks, sealed pages (decoded, live slots in logical order),
  // the window.
  const std::size_t ud = static_cast<std::size_t>(d_);
  const std::int64_t ord = ordinary();
  std::size_t x = 0;
  for (; x < idx.size() && idx[x] < sinks_; ++x)
    f(sink_k_.data() + static_cast<std::size_t>(idx[x]) * ud, sink_v_.data() + static_cast<std::size_t>(idx[x]) * ud);
  std::int64_t base = sinks_;
  std::vector<float> pk, pv;
  for (const Page& p : pages_) {
    if (x >= idx.size() || idx[x] >= sinks_ + sealed_live_) break;
    if (idx[x] >= base + p.live) {
      base += p.live;
      continue;
    }
    pk.resize(static_cast<std::size_t>(p.ntok) * ud);
    pv.resize(pk.size());
    decode_page(kt, p, *pipeline_->codec, pk.data(), pv.data());
    for (int j = 0, live = 0; j < p.ntok && x < idx.size() && idx[x] < base + p.live; ++j) {
      if (p.is_dead(j)) continue;
      if (idx[x] == base + live) {
        f(pk.data() + static_cast<std::size_t>(j) * ud, pv.data() + static_cast<std::size_t>(j) * ud);
        ++x;
      }
      ++live;
    }
    base += p.live;
  }
  for (; x < idx.size(); ++x) {
    const std::size_t r = static_cast<std::size_t>(idx[x] - (ord - window_));
    f(win_k_.data() + r * ud, win_v_.data() + r * ud);
  }
}

void TokenStore::rows(const kernels::KernelTable& kt, std::span<const std::int64_t> idx, float* k, float* v) const {
  if (idx.empty()) return;
  for (std::size_t i = 1; i < idx.size(); ++i)
    KVSLIM_CHECK(idx[i - 1] < idx[i], ErrorCode::kInvalidArgument,
                 "rows: token indices must be strictly increasing ({} then {})", idx[i - 1], idx[i]);
  KVSLIM_CHECK(idx.front() >= 0 && idx.back() < ordinary(), ErrorCode::kOutOfRange,
               "rows: token index {} is not an ordinary token (range [0, {}))",
               idx.front() < 0 ? idx.front() : idx.back(), ordinary());
  const std::vector<std::int64_t> sorted(idx.begin(), idx.end());
  const std::size_t ud = static_cast<std::size_t>(d_);
  std::size_t r = 0;
  for_rows(kt, sorted, [&](const float* kr, const float* vr) {
    std::memcpy(k + r * ud, kr, ud * sizeof(float));
    std::memcpy(v + r * ud, vr, ud * sizeof(float));
    ++r;
  });
}

namespace {
// Victims sorted and unique, all ordinary tokens (indices < ordinary); `what` names the caller.
std::vector<std::int64_t> sorted_victims(std::span<const std::int64_t> victims, std::int64_t ordinary,
                                         const char* what) {
  std::vector<std::int64_t> idx(victims.begin(), victims.end());
  std::sort(idx.begin(), idx.end());
  idx.erase(std::unique(idx.begin(), idx.end()), idx.end());
  KVSLIM_CHECK(idx.front() >= 0 && idx.back() < ordinary, ErrorCode::kOutOfRange,
               "{}: token index {} is not an ordinary token (range [0, {}))", what,
               idx.front() < 0 ? idx.front() : idx.back(), ordinary);
  return idx;
}
}  // namespace

void TokenStore::demote(const kernels::KernelTable& kt, std::span<const std::int64_t> victims) {
  KVSLIM_CHECK(lo_codec_ != nullptr, ErrorCode::kInvalidState,
               "demote: the pipeline '{}' has no demotion codec", pipeline_->text);
  if (victims.empty()) return;
  const std::vector<std::int64_t> idx = sorted_victims(victims, ordinary(), "demote");
  const std::size_t ud = static_cast<std::size_t>(d_), n = idx.size();
  // Rows as the head's codec holds them (a demoted token is re-encoded from what was
  // stored, not from the original), their scores and positions.
  std::vector<float> k, v;
  k.reserve(n * ud);
  v.reserve(n * ud);
  for_rows(kt, idx, [&](const float* kr, const float* vr) {
    k.insert(k.end(), kr, kr + ud);
    v.insert(v.end(), vr, vr + ud);
  });
  std::vector<float> imp;
  if (!importance_.empty())
    for (std::int64_t j : idx) imp.push_back(importance_[static_cast<std::size_t>(j)]);
  std::vector<std::int64_t> pos;
  pos.reserve(n);
  {
    std::size_t x = 0;
    std::int64_t at = 0;
    runs_.for_each_run([&](std::int64_t first, std::int64_t count) {
      for (; x < n && idx[x] < at + count; ++x) pos.push_back(first + (idx[x] - at));
      at += count;
    });
  }
  drop(kt, idx);
  // Append to the demoted segment, before the specials.
  const std::size_t at = static_cast<std::size_t>(specials_first());
  if (!imp.empty()) importance_.insert(importance_.begin() + static_cast<std::ptrdiff_t>(at), imp.begin(), imp.end());
  for (std::int64_t p : pos) lo_->runs.push_run(p, 1);
  lo_->k.insert(lo_->k.end(), k.begin(), k.end());
  lo_->v.insert(lo_->v.end(), v.begin(), v.end());
  lo_stage_ += static_cast<std::int64_t>(n);
  seal_demoted(kt);
}

// Encode every full page of waiting demoted tokens with the demotion codec.
void TokenStore::seal_demoted(const kernels::KernelTable& kt) {
  const int g = lo_codec_->page_tokens();
  std::int64_t sealed = 0;
  while (lo_stage_ - sealed >= g) {
    Page page = make_page(g, *lo_codec_);
    const std::size_t off = static_cast<std::size_t>(sealed * d_);
    lo_codec_->encode(kt, lo_->k.data() + off, lo_->v.data() + off, g, d_, page.data.data());
    lo_->pages.push_back(std::move(page));
    lo_live_ += g;
    sealed += g;
  }
  if (sealed == 0) return;
  const std::size_t off = static_cast<std::size_t>(sealed * d_);
  lo_->k.erase(lo_->k.begin(), lo_->k.begin() + static_cast<std::ptrdiff_t>(off));
  lo_->v.erase(lo_->v.begin(), lo_->v.begin() + static_cast<std::ptrdiff_t>(off));
  lo_stage_ -= sealed;
  // At most a page of rows waits; give back what a large demotion left behind.
  if (lo_->k.capacity() > 2 * static_cast<std::size_t>(g * d_)) {
    lo_->k.shrink_to_fit();
    lo_->v.shrink_to_fit();
  }
}

void TokenStore::compensate(const kernels::KernelTable& kt, std::span<const std::int64_t> victims) {
  if (victims.empty()) return;
  const std::vector<std::int64_t> idx = sorted_victims(victims, ordinary(), "compensate");
  const std::size_t ud = static_cast<std::size_t>(d_);
  std::vector<double> sk(ud, 0.0), sv(ud, 0.0);
  auto add = [&](const float* k, const float* v) {
    for (std::size_t c = 0; c < ud; ++c) {
      sk[c] += k[c];
      sv[c] += v[c];
    }
  };
  for_rows(kt, idx, add);
  // The newest position folded (idx.back() is the newest victim: index order is position order).
  std::int64_t newest = -1, at = 0;
  runs_.for_each_run([&](std::int64_t first, std::int64_t count) {
    if (idx.back() >= at && idx.back() < at + count) newest = first + (idx.back() - at);
    at += count;
  });
  const std::int64_t before = comp_n_;
  comp_n_ += static_cast<std::int64_t>(idx.size());

  drop(kt, idx);  // specials keep their indices relative to specials_first(): comp_ stays valid
  const double inv = 1.0 / static_cast<double>(comp_n_), old_w = static_cast<double>(before);
  if (comp_ < 0) {
    std::vector<float> mk(ud), mv(ud);
    for (std::size_t c = 0; c < ud; ++c) {
      mk[c] = static_cast<float>(sk[c] * inv);
      mv[c] = static_cast<float>(sv[c] * inv);
    }
    comp_ = specials();
    add_special(mk.data(), mv.data(), static_cast<float>(comp_n_), newest);
    return;
  }
  float* mk = special_k_.data() + static_cast<std::size_t>(comp_) * ud;
  float* mv = special_v_.data() + static_cast<std::size_t>(comp_) * ud;
  for (std::size_t c = 0; c < ud; ++c) {
    mk[c] = static_cast<float>((mk[c] * old_w + sk[c]) * inv);
    mv[c] = static_cast<float>((mv[c] * old_w + sv[c]) * inv);
  }
  special_w_[static_cast<std::size_t>(comp_)] = std::log(static_cast<float>(comp_n_));
  special_pos_[static_cast<std::size_t>(comp_)] = newest;
}

void TokenStore::materialize(const kernels::KernelTable& kt, float* k, float* v, float* log_weights) const {
  const std::size_t d = static_cast<std::size_t>(d_);
  std::size_t row = 0;
  auto copy_rows = [&](const float* ks, const float* vs, std::int64_t n) {
    if (n == 0) return;  // empty segments may have null data; memcpy forbids that
    std::memcpy(k + row * d, ks, static_cast<std::size_t>(n) * d * sizeof(float));
    std::memcpy(v + row * d, vs, static_cast<std::size_t>(n) * d * sizeof(float));
    row += static_cast<std::size_t>(n);
  };
  copy_rows(sink_k_.data(), sink_v_.data(), sinks_);
  std::vector<float> pk, pv;
  auto pages = [&](const PageList& list, const Codec& codec) {
    for (const Page& p : list) {
      if (p.live == p.ntok) {
        decode_page(kt, p, codec, k + row * d, v + row * d);
        row += static_cast<std::size_t>(p.ntok);
        continue;
      }
      pk.resize(static_cast<std::size_t>(p.ntok) * d);
      pv.resize(pk.size());
      decode_page(kt, p, codec, pk.data(), pv.data());
      for (int s = 0; s < p.ntok; ++s)
        if (!p.is_dead(s)) copy_rows(pk.data() + s * d, pv.data() + s * d, 1);
    }
  };
  pages(pages_, *pipeline_->codec);
  copy_rows(win_k_.data(), win_v_.data(), window_);
  if (lo_) {
    pages(lo_->pages, *lo_codec_);
    copy_rows(lo_->k.data(), lo_->v.data(), lo_stage_);
  }
  copy_rows(special_k_.data(), special_v_.data(), specials());
  if (log_weights) {
    const std::size_t n_plain = row - static_cast<std::size_t>(specials());
    for (std::size_t i = 0; i < n_plain; ++i) log_weights[i] = 0.0f;
    for (std::size_t i = 0; i < special_w_.size(); ++i) log_weights[n_plain + i] = special_w_[i];
  }
}

void TokenStore::attend(const kernels::KernelTable& kt, const float* q, int nq, int nquery, float* out,
                        float* mass, AttendWorkspace& ws) const {
  attend_blocks(kt, q, nq, nquery, out, mass != nullptr || ws.keep_probs, {0, pages_.size(), true, true}, ws);
  const int d = d_;
  const bool all_ok = ws.row_ok.empty();
  for (int r = 0; r < nq; ++r) {
    // A non-finite query row (NonFinitePolicy::kAllow) gives NaN on every ISA, whatever
    // the kernels made of it.
    const float inv = !all_ok && !ws.row_ok[r] ? std::numeric_limits<float>::quiet_NaN()
                      : ws.l[r] > 0.0f         ? 1.0f / ws.l[r]
                                               : 0.0f;
    for (int c = 0; c < d; ++c) out[r * d + c] = all_ok || ws.row_ok[r] ? out[r * d + c] * inv : inv;
  }
  if (mass) collect_mass(ws, nq, nquery, 0, mass);
}

void TokenStore::attend_partial(const kernels::KernelTable& kt, const float* q, int nq, int nquery,
                                const AttendRange& range, float* out, AttendWorkspace& ws) const {
  attend_blocks(kt, q, nq, nquery, out, false, range, ws);
}

void TokenStore::attend_blocks(const kernels::KernelTable& kt, const float* q, int nq, int nquery, float* out,
                               bool want_probs, const AttendRange& range, AttendWorkspace& ws) const {
  const int d = d_;
  const std::size_t unq = static_cast<std::size_t>(nq);
  ws.m.assign(unq, kNegInf);
  ws.l.assign(unq, 0.0f);
  std::fill(out, out + unq * d, 0.0f);
  const int block = std::max({page_tokens_, lo_codec_ ? lo_codec_->page_tokens() : 0, kDenseBlock});
  if (ws.s.size() < unq * block) ws.s.resize(unq * block);
  // Physical slots: dead page slots are scored (then masked) like the others.
  const std::int64_t slots = sinks_ + page_slots() + window_ + lo_slots() + specials();
  ws.blocks.clear();
  ws.slots = slots;
  if (want_probs) {
    ws.probs.resize(unq * static_cast<std::size_t>(slots));
    ws.block_max.clear();
  }
  float* s = ws.s.data();
  std::int64_t slot = 0;   // physical slot of the block's first token
  std::int64_t index = 0;  // logical index of the block's first live token
  if (!range.head) {  // a later range of one head's pages (split-KV): start where it starts
    slot = index = sinks_;
    for (std::size_t i = 0; i < range.page_begin; ++i) {
      slot += pages_[i].ntok;
      index += pages_[i].live;
    }
  }

  // Causal mask within the latest append. Its tokens are the last last_append_ ordinary
  // (non-special) tokens in index order, whichever segments they landed in (sinks, pages or
  // window); query i of the nquery queries is chunk token (last_append_ - nquery + i), so
  // row r sees ordinary tokens with index < causal_end - nquery + (r % nquery) + 1
  // (kernels::BlockMask applies it; in decode, one query, it masks nothing).
  const std::int64_t first_limit = ordinary() - nquery + 1;
  kernels::OnlineState st{ws.m.data(), ws.l.data(), out, s};
  // Every block: the fused kernel updates the softmax state (and copies its probabilities
  // for the mass output), then the block is recorded for collect_mass().
  // past: every query sees the block (demoted tokens and specials stand for the past).
  auto run_block = [&](int ntok, int live, const std::uint64_t* dead, const float* bias, bool past, auto&& attend) {
    kernels::BlockMask mask;
    mask.dead = dead;
    mask.bias = bias;
    mask.first = index;
    mask.limit0 = past ? kernels::BlockMask::kNoLimit : first_limit;
    mask.nquery = nquery;
    st.probs = want_probs ? ws.probs.data() + slot : nullptr;
    st.probs_stride = slots;
    attend(mask);
    if (want_probs) {
      ws.blocks.push_back({slot, index, ntok, dead});
      ws.block_max.insert(ws.block_max.end(), ws.m.begin(), ws.m.end());
    }
    slot += ntok;
    index += live;
  };
  // Full-precision rows [n][d]: ordinary tokens (causally masked) or specials (a per-token
  // logit bias ln(weight), never masked).
  // Pre-RoPE keys (set_rope): each block's keys are rotated by their positions into
  // ws.rope_k first. Dense rows have no dead slots, so row j of a block is logical index
  // index + j; page slots map to positions by skipping dead ones (-1: not rotated, masked).
  detail::RopeTable::State* rope_state = nullptr;
  if (rope_) {
    if (!ws.rope_state) ws.rope_state = std::make_shared<detail::RopeTable::State>();
    rope_state = static_cast<detail::RopeTable::State*>(ws.rope_state.get());
    rope_state->pos = -1;  // angles are carried from block to block within this call only
    ws.rope_pos = positions();
    ws.rope_k.resize(static_cast<std::size_t>(block) * d);
    ws.rope_v.resize(ws.rope_k.size());
    ws.rope_slot_pos.resize(static_cast<std::size_t>(block));
  }
  auto rotated_keys = [&](const float* ks, int bn, const std::uint64_t* dead) {
    for (int j = 0, live = 0; j < bn; ++j) {
      const bool is_dead = dead && ((dead[j >> 6] >> (j & 63)) & 1u);
      ws.rope_slot_pos[j] = is_dead ? -1 : ws.rope_pos[static_cast<std::size_t>(index + live++)];
    }
    if (ks != ws.rope_k.data()) std::copy(ks, ks + static_cast<std::ptrdiff_t>(bn) * d, ws.rope_k.data());
    rope_->rotate(kt, ws.rope_k.data(), bn, ws.rope_slot_pos.data(), *rope_state);
    return ws.rope_k.data();
  };
  auto dense = [&](const float* ks, const float* vs, std::int64_t n, const float* bias, bool past) {
    for (std::int64_t b0 = 0; b0 < n; b0 += block) {
      const int bn = static_cast<int>(std::min<std::int64_t>(block, n - b0));
      run_block(bn, bn, nullptr, bias ? bias + b0 : nullptr, past, [&](const kernels::BlockMask& mask) {
        const float* kb = rope_ ? rotated_keys(ks + b0 * d, bn, nullptr) : ks + b0 * d;
        kt.attend_f32(q, nq, kb, vs + b0 * d, bn, d, mask, st);
      });
    }
  };
  // A page with pre-RoPE keys: decoded keys rotated, scored in f32; the values through the
  // codec's accumulate() on the codes (Codec::attend_page's composition otherwise).
  auto rope_page = [&](const Codec& c, const Page& pg, const kernels::BlockMask& mask) {
    const int n = pg.ntok;
    c.decode_keys(kt, pg.data.data(), n, d, ws.rope_k.data(), ws.rope_v.data());
    const std::uint64_t* dead = pg.dead.empty() ? nullptr : pg.dead.data();
    rotated_keys(ws.rope_k.data(), n, dead);
    kt.scores_f32(q, nq, ws.rope_k.data(), n, d, st.s);
    kt.mask_block(st.s, nq, n, mask);
    kt.softmax_block(st.s, nq, n, st.m, st.l, st.o, d);
    if (st.probs)
      for (int r = 0; r < nq; ++r)
        std::copy(st.s + static_cast<std::size_t>(r) * n, st.s + static_cast<std::size_t>(r + 1) * n,
                  st.probs + r * st.probs_stride);
    c.accumulate(kt, pg.data.data(), n, d, st.s, nq, st.o);
  };

  // A MiniCache page: logits on the shared directions' codes times this layer's key
  // magnitudes, the softmax weights times its value magnitudes into the value sum on the codes;
  // retained slots with their original rows.
  auto merged_page = [&](const Codec& c, const Page& pg, const kernels::BlockMask& mask) {
    const TokenStore::MergedPart& mp = *pg.merged;
    const int n = pg.ntok;
    const std::byte* b = mp.dir->data();
    // The codec's unfused calls issue no prefetch of the page kPrefetchAhead on (the fused
    // kernels do, OnlineState::prefetch): without it every merged page waited on its misses.
    // In two bursts, before the scores and before the value sum: a page's lines at once would
    // queue on the L1 fill buffers with no arithmetic to overlap.
    const char* pf = static_cast<const char*>(st.prefetch);
    const std::size_t half = (st.prefetch_bytes / 2 + 63) & ~std::size_t{63};
    auto prefetch = [&](std::size_t from, std::size_t to) {
      for (std::size_t o = from; pf && o < to && o < st.prefetch_bytes; o += 64) __builtin_prefetch(pf + o, 0, 3);
    };
    prefetch(0, half);
    const std::size_t un = static_cast<std::size_t>(n);
    c.scores(kt, b, n, d, q, nq, st.s);
    for (int r = 0; r < nq; ++r)
      for (int j = 0; j < n; ++j) st.s[r * un + j] *= mp.mag[static_cast<std::size_t>(j)];
    // The retained slots' own rows: their keys [r][d], then their values [r][d], in one call each.
    const std::size_t nr = mp.slot.size();
    ws.merged_p.resize(static_cast<std::size_t>(nq) * (un + nr));
    float* col = ws.merged_p.data() + static_cast<std::size_t>(nq) * un;  // [nq][nr]
    if (nr) {
      kt.scores_f32(q, nq, mp.ret.data(), static_cast<int>(nr), d, col);
      for (int r = 0; r < nq; ++r)
        for (std::size_t i = 0; i < nr; ++i) st.s[r * un + static_cast<std::size_t>(mp.slot[i])] = col[r * nr + i];
    }
    kt.mask_block(st.s, nq, n, mask);
    kt.softmax_block(st.s, nq, n, st.m, st.l, st.o, d);
    if (st.probs)
      for (int r = 0; r < nq; ++r) std::copy(st.s + r * un, st.s + (r + 1) * un, st.probs + r * st.probs_stride);
    prefetch(half, st.prefetch_bytes);
    float* pw = ws.merged_p.data();
    for (int r = 0; r < nq; ++r)
      for (int j = 0; j < n; ++j) pw[r * un + j] = st.s[r * un + j] * mp.mag[un + static_cast<std::size_t>(j)];
    if (nr) {
      for (int r = 0; r < nq; ++r)
        for (std::size_t i = 0; i < nr; ++i) {
          const std::size_t j = static_cast<std::size_t>(mp.slot[i]);
          col[r * nr + i] = st.s[r * un + j];
          pw[r * un + j] = 0.0f;
        }
      kt.accum_f32(col, nq, mp.ret.data() + nr * d, static_cast<int>(nr), d, st.o);
    }
    c.accumulate(kt, b, n, d, pw, nq, st.o);
  };

  if (range.head) dense(sink_k_.data(), sink_v_.data(), sinks_, nullptr, false);
  // Query-side state, once per call and codec (aligned to 64 bytes inside a workspace buffer).
  auto prepare = [&](const Codec& codec, std::vector<std::byte>& buf) -> std::byte* {
    const std::size_t prep_bytes = codec.prepared_bytes(nq, d);
    if (!prep_bytes) return nullptr;
    if (buf.size() < prep_bytes + 64) buf.resize(prep_bytes + 64);
    const auto addr = reinterpret_cast<std::uintptr_t>(buf.data());
    std::byte* p = buf.data() + ((64 - addr % 64) % 64);
    codec.prepare(kt, q, nq, d, p);
    return p;
  };
  const Codec& codec = *pipeline_->codec;
  std::byte* prepared = prepare(codec, ws.prepared);
  // Pages are separate allocations, so the hardware prefetchers restart at every page, and
  // the kernels' arithmetic does not overlap misses well on its own: the fused kernel
  // prefetches the page kPrefetchAhead pages on while it processes this one, in bursts
  // between its steps (OnlineState::prefetch).
  const std::size_t npages = std::min(range.page_end, pages_.size());
  for (std::size_t i = range.page_begin; i < npages; ++i) {
    const Page& pg = pages_[i];
    if (i + kPrefetchAhead < npages) {
      const Page& ahead = pages_[i + kPrefetchAhead];
      const Bytes& next = ahead.bytes();
      st.prefetch = next.data();
      st.prefetch_bytes = next.size();
      if (ahead.merged) {  // a MiniCache page's own magnitudes and retained rows live apart
        auto fetch = [](const Floats& f) {
          const char* x = reinterpret_cast<const char*>(f.data());
          for (std::size_t o = 0; o < f.size() * sizeof(float); o += 64) __builtin_prefetch(x + o, 0, 3);
        };
        fetch(ahead.merged->mag);
        fetch(ahead.merged->ret);
      }
    }
    const std::uint64_t* dead = pg.dead.empty() ? nullptr : pg.dead.data();
    run_block(pg.ntok, pg.live, dead, nullptr, false, [&](const kernels::BlockMask& mask) {
      if (pg.merged)
        merged_page(codec, pg, mask);
      else if (rope_)
        rope_page(codec, pg, mask);
      else
        codec.attend_page(kt, pg.data.data(), pg.ntok, d, q, prepared, nq, mask, st);
    });
    st.prefetch = nullptr;
    st.prefetch_bytes = 0;
  }
  // Codecs that accumulate across pages (CQ) add their sums at the final running max.
  if (prepared) codec.finish(kt, prepared, nq, d, st);
  if (range.tail) {
    std::byte* lo_prepared = nullptr;
    dense(win_k_.data(), win_v_.data(), window_, nullptr, false);
    if (lo_ && !lo_->pages.empty()) {
      const Codec& lo = *lo_codec_;
      lo_prepared = prepare(lo, ws.prepared_lo);
      for (const Page& pg : lo_->pages) {
        const std::uint64_t* dead = pg.dead.empty() ? nullptr : pg.dead.data();
        run_block(pg.ntok, pg.live, dead, nullptr, true, [&](const kernels::BlockMask& mask) {
          if (rope_)
            rope_page(lo, pg, mask);
          else
            lo.attend_page(kt, pg.data.data(), pg.ntok, d, q, lo_prepared, nq, mask, st);
        });
      }
    }
    if (lo_) dense(lo_->k.data(), lo_->v.data(), lo_stage_, nullptr, true);
    if (lo_prepared) lo_codec_->finish(kt, lo_prepared, nq, d, st);
    dense(special_k_.data(), special_v_.data(), specials(), special_w_.data(), true);
  }
}

void TokenStore::collect_mass(AttendWorkspace& ws, int nq, int nquery, int first_query, float* mass) const {
  const std::size_t unq = static_cast<std::size_t>(nq);
  const bool all_ok = ws.row_ok.empty();
  const std::size_t nb = ws.blocks.size();
  std::vector<float>& sum = ws.block_sum;
  for (std::size_t b = 0; b < nb; ++b) {
    const AttendWorkspace::Block& blk = ws.blocks[b];
    // Sum the rows over the block's slots first (contiguous, vectorized); skipping dead slots
    // then costs one pass per block instead of one per row.
    float* acc = mass + blk.index;
    if (blk.dead) {
      sum.assign(static_cast<std::size_t>(blk.ntok), 0.0f);
      acc = sum.data();
    }
    for (int r = 0; r < nq; ++r) {
      if (ws.l[r] <= 0.0f || (!all_ok && !ws.row_ok[r]) || (r % nquery) < first_query) continue;
      // Probabilities were normalized by the running max of their block; rescale to the
      // final max and divide by the final sum.
      const float c = std::exp(ws.block_max[b * unq + r] - ws.m[r]) / ws.l[r];
      const float* pr = ws.probs.data() + static_cast<std::size_t>(r) * ws.slots + blk.slot;
      for (int j = 0; j < blk.ntok; ++j) acc[j] += pr[j] * c;
    }
    if (blk.dead) {
      float* mo = mass + blk.index;
      for (int j = 0; j < blk.ntok; ++j)
        if (!((blk.dead[j >> 6] >> (j & 63)) & 1u)) *mo++ += sum[static_cast<std::size_t>(j)];
    }
  }
}

void TokenStore::reset() {
  // Swap with empty containers so the memory is returned, not just cleared.
  auto release = [](auto& c) {
    std::remove_reference_t<decltype(c)> empty(c.get_allocator());
    c.swap(empty);
  };
  release(sink_k_);
  release(sink_v_);
  release(pages_);
  release(win_k_);
  release(win_v_);
  release(special_k_);
  release(special_v_);
  release(special_w_);
  release(special_pos_);
  if (lo_) {
    release(lo_->pages);
    release(lo_->k);
    release(lo_->v);
    lo_->runs.clear();
  }
  lo_live_ = lo_stage_ = 0;
  comp_n_ = 0;
  comp_ = -1;
  runs_.clear();
  release(importance_);
  sinks_ = window_ = 0;
  sealed_live_ = 0;
  last_pos_ = -1;
  last_append_ = 0;
  seen_ = 0;
  evict_pending_ = false;
  repacked_pages_ = 0;
  merged_pages_ = retained_ = 0;
  pair_ok_ = lower_ != nullptr;
  held_ = has_upper_;
}

}  // namespace kvslim
