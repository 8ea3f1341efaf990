// TokenStore's part of saved caches (docs/formats.md, "Saved cache", the HEAD section).
//
// Fields are written in the order below; counts that follow from others (kept tokens per
// segment, merged pages, retained tokens) are recomputed on load, not stored, so they cannot
// disagree with the data. Position runs are written as (first, count) pairs and re-coded on
// load, which gives the canonical block layout of PositionRuns (the same runs, possibly fewer
// bytes than a list that went through many erasures).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "cache/persist.h"
#include "check.h"
#include "kvslim/cache/token_store.h"
#include "kvslim/policy/policy.h"

namespace kvslim {

namespace {
constexpr std::uint8_t kPlainPage = 0, kMergedPage = 1;

bool all_finite(const float* p, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}
}  // namespace

void TokenStore::save_page(detail::StateWriter& w, detail::SharedPages& shared, const Page& p) const {
  w.put<std::uint8_t>(p.merged ? kMergedPage : kPlainPage);
  w.put<std::int32_t>(p.ntok);
  w.put<std::int32_t>(p.live);
  w.put_array(p.dead.data(), p.dead.size());
  if (!p.merged) {
    w.put_array(p.data.data(), p.data.size());
    return;
  }
  const MergedPart& mp = *p.merged;
  w.put<std::uint32_t>(shared.index_of(mp.dir.get()));
  w.put_array(mp.mag.data(), mp.mag.size());
  w.put_array(mp.slot.data(), mp.slot.size());
  w.put_array(mp.ret.data(), mp.ret.size());
}

TokenStore::Page TokenStore::load_page(detail::StateReader& r, detail::SharedPages& shared, const Codec& codec,
                                       bool merged_ok, std::size_t index) {
  const std::string what = fmt::format("page {}", index);
  const char* w = what.c_str();
  const auto kind = r.get<std::uint8_t>(w);
  r.check(kind == kPlainPage || (kind == kMergedPage && merged_ok), w,
          "kind {} is not a page this head can hold (0 = encoded page{})", kind,
          merged_ok ? ", 1 = MiniCache page" : "");
  const auto ntok = r.get<std::int32_t>(w);
  r.check(ntok >= 1 && ntok <= codec.page_tokens(), w, "holds {} tokens, outside [1, {}] for '{}'", ntok,
          codec.page_tokens(), codec.describe());
  const auto live = r.get<std::int32_t>(w);
  Page p = kind == kPlainPage ? make_page(ntok, codec)
                              : Page{Bytes(TrackedAllocator<std::byte>(&counter_)),
                                     Words(TrackedAllocator<std::uint64_t>(&counter_)), ntok, ntok, nullptr};
  const std::size_t words = (static_cast<std::size_t>(ntok) + 63) / 64;
  r.get_array(p.dead, w, words);
  r.check(p.dead.empty() || p.dead.size() == words, w, "has {} words of dead bits, expected 0 or {}", p.dead.size(),
          words);
  int dead = 0;
  for (std::size_t i = 0; i < p.dead.size(); ++i) {
    const std::uint64_t valid = (i + 1) * 64 <= static_cast<std::size_t>(ntok) ? ~std::uint64_t{0}
                                                                                 : (std::uint64_t{1} << (ntok & 63)) - 1;
    r.check((p.dead[i] & ~valid) == 0, w, "dead bits are set past its {} slots", ntok);
    dead += std::popcount(p.dead[i]);
  }
  r.check(live == ntok - dead, w, "says {} live tokens but {} of its {} slots are dead", live, dead, ntok);
  p.live = live;
  if (kind == kPlainPage) {
    r.get_exact(p.data, p.data.size(), w);
    r.check(codec.page_ok(p.data.data(), ntok, d_), w, "'{}' rejects its contents (an index points past the page)",
            codec.describe());
    return p;
  }
  r.check(dead == 0, w, "a MiniCache page cannot have dropped tokens ({} are)", dead);
  const auto id = r.get<std::uint32_t>(w);
  r.check(id < shared.loaded.size(), w, "references shared page {} of {}", id, shared.loaded.size());
  r.check(shared.loaded[id]->size() == page_alloc_bytes(ntok, codec), w,
          "its shared directions are {} bytes, expected {} for {} tokens of '{}'", shared.loaded[id]->size(),
          page_alloc_bytes(ntok, codec), ntok, codec.describe());
  auto part = std::allocate_shared<MergedPart>(TrackedAllocator<MergedPart>(&counter_), &counter_);
  part->dir = shared.loaded[id];
  r.get_exact(part->mag, 2 * static_cast<std::uint64_t>(ntok), w);
  r.get_array(part->slot, w, static_cast<std::uint64_t>(ntok));
  for (std::size_t i = 0; i < part->slot.size(); ++i)
    r.check(part->slot[i] >= 0 && part->slot[i] < ntok && (i == 0 || part->slot[i] > part->slot[i - 1]), w,
            "retained slot {} is out of order or outside [0, {})", part->slot[i], ntok);
  r.get_exact(part->ret, 2 * part->slot.size() * static_cast<std::uint64_t>(d_), w);
  p.merged = std::move(part);
  return p;
}

void TokenStore::load_runs(detail::StateReader& r, PositionRuns& runs, bool sorted, std::int64_t expect,
                           const char* what) {
  const std::size_t n = r.get_count<std::int64_t>(what, static_cast<std::uint64_t>(std::max<std::int64_t>(expect, 0)));
  std::int64_t total = 0, end = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const auto first = r.get<std::int64_t>(what);
    const auto count = r.get<std::int64_t>(what);
    r.check(first >= 0 && count >= 1 && count <= expect - total && first <= last_pos_ - count + 1, what,
            "run {} (first position {}, {} tokens) is outside the {} positions up to the last, {}", i, first, count,
            expect, last_pos_);
    r.check(!sorted || first >= end, what, "run {} starts at position {}, before the previous run's end {}", i, first,
            end);
    runs.push_run(first, count);
    total += count;
    end = first + count;
  }
  r.check(total == expect, what, "hold {} positions for {} tokens", total, expect);
}

void TokenStore::save_state(detail::StateWriter& w, detail::SharedPages& shared) const {
  const std::size_t ud = static_cast<std::size_t>(d_);
  w.put<std::int64_t>(last_pos_);
  w.put<std::int64_t>(last_append_);
  w.put<std::int64_t>(seen_);
  w.put_bool(evict_pending_);
  w.put<std::int64_t>(repacked_pages_);
  w.put<std::int64_t>(comp_n_);
  w.put<std::int64_t>(comp_);
  w.put_bool(pair_ok_);
  w.put_bool(held_);

  w.put_array(sink_k_.data(), static_cast<std::size_t>(sinks_) * ud);
  w.put_array(sink_v_.data(), static_cast<std::size_t>(sinks_) * ud);
  w.put<std::uint64_t>(pages_.size());
  for (const Page& p : pages_) save_page(w, shared, p);
  w.put_array(win_k_.data(), static_cast<std::size_t>(window_) * ud);
  w.put_array(win_v_.data(), static_cast<std::size_t>(window_) * ud);
  const auto runs = runs_.runs();
  w.put<std::uint64_t>(runs.size());
  for (const auto& [first, count] : runs) {
    w.put<std::int64_t>(first);
    w.put<std::int64_t>(count);
  }

  w.put_bool(lo_ != nullptr);
  if (lo_) {
    w.put<std::uint64_t>(lo_->pages.size());
    for (const Page& p : lo_->pages) save_page(w, shared, p);
    w.put_array(lo_->k.data(), static_cast<std::size_t>(lo_stage_) * ud);
    w.put_array(lo_->v.data(), static_cast<std::size_t>(lo_stage_) * ud);
    const auto lo_runs = lo_->runs.runs();
    w.put<std::uint64_t>(lo_runs.size());
    for (const auto& [first, count] : lo_runs) {
      w.put<std::int64_t>(first);
      w.put<std::int64_t>(count);
    }
  }

  w.put_array(special_k_.data(), special_k_.size());
  w.put_array(special_v_.data(), special_v_.size());
  w.put_array(special_w_.data(), special_w_.size());
  w.put_array(special_pos_.data(), special_pos_.size());
  w.put_array(importance_.data(), importance_.size());
}

void TokenStore::load_state(detail::StateReader& r, detail::SharedPages& shared, const detail::StoreLimits& limits) {
  KVSLIM_CHECK(size() == 0 && seen_ == 0, ErrorCode::kInvalidState,
               "TokenStore::load_state needs a freshly constructed store (this one holds {} tokens)", size());
  const std::size_t ud = static_cast<std::size_t>(d_);
  const std::int64_t cap = limits.max_tokens;
  const auto rows = static_cast<std::uint64_t>(cap) * ud;  // most floats one segment can hold
  last_pos_ = r.get<std::int64_t>("last position");
  last_append_ = r.get<std::int64_t>("last append");
  seen_ = r.get<std::int64_t>("tokens seen");
  evict_pending_ = r.get_bool("eviction pending");
  repacked_pages_ = r.get<std::int64_t>("re-packed pages");
  comp_n_ = r.get<std::int64_t>("compensated tokens");
  comp_ = r.get<std::int64_t>("compensation token");
  pair_ok_ = r.get_bool("MiniCache pairing");
  held_ = r.get_bool("MiniCache hold");
  r.check(last_pos_ >= -1 && seen_ >= 0 && (seen_ == 0) == (last_pos_ == -1), "counters",
          "last position {} and {} tokens seen disagree", last_pos_, seen_);
  r.check(repacked_pages_ >= 0 && comp_n_ >= 0, "counters", "negative counts ({} re-packed pages, {} compensated)",
          repacked_pages_, comp_n_);
  r.check(!pair_ok_ || lower_, "MiniCache pairing", "set on a head that has no lower layer to merge with");
  r.check(!held_ || has_upper_, "MiniCache hold", "set on a head that has no upper layer");
  // The lower layer of a pair is loaded first; a pair is dissolved in both at once.
  if (lower_)
    r.check(pair_ok_ == lower_->held_, "MiniCache pairing", "this layer says the pair is {} but its lower layer says {}",
            pair_ok_ ? "active" : "dissolved", lower_->held_ ? "active" : "dissolved");

  r.get_array(sink_k_, "sink keys", static_cast<std::uint64_t>(sink_target_) * ud);
  r.check(sink_k_.size() % ud == 0, "sink keys", "{} floats are not whole rows of {}", sink_k_.size(), d_);
  sinks_ = static_cast<std::int64_t>(sink_k_.size() / ud);
  r.get_exact(sink_v_, sink_k_.size(), "sink values");

  const bool merged_ok = lower_ || has_upper_;
  const std::size_t npages = r.get_count<std::byte>("pages", static_cast<std::uint64_t>(cap));
  pages_.reserve(npages);
  for (std::size_t i = 0; i < npages; ++i) {
    pages_.push_back(load_page(r, shared, codec(), merged_ok, i));
    const Page& p = pages_.back();
    sealed_live_ += p.live;
    if (p.merged) {
      ++merged_pages_;
      retained_ += static_cast<std::int64_t>(p.merged->slot.size());
    }
  }

  r.get_array(win_k_, "window keys", rows);
  r.check(win_k_.size() % ud == 0, "window keys", "{} floats are not whole rows of {}", win_k_.size(), d_);
  window_ = static_cast<std::int64_t>(win_k_.size() / ud);
  r.get_exact(win_v_, win_k_.size(), "window values");
  {
    // Saved caches hold the window's rows only; give it the capacity append() would have.
    Floats k{TrackedAllocator<float>(&counter_)}, v{TrackedAllocator<float>(&counter_)};
    k.swap(win_k_);
    v.swap(win_v_);
    grow_window(window_);
    std::memcpy(win_k_.data(), k.data(), k.size() * sizeof(float));
    std::memcpy(win_v_.data(), v.data(), v.size() * sizeof(float));
  }
  load_runs(r, runs_, true, ordinary(), "positions");

  const bool has_lo = r.get_bool("demoted segment");
  r.check(has_lo == (lo_ != nullptr), "demoted segment", "the file {} one but this head's pipeline {}",
          has_lo ? "has" : "has no", lo_ ? "demotes" : "does not demote");
  if (lo_) {
    const std::size_t nlo = r.get_count<std::byte>("demoted pages", static_cast<std::uint64_t>(cap));
    lo_->pages.reserve(nlo);
    for (std::size_t i = 0; i < nlo; ++i) {
      lo_->pages.push_back(load_page(r, shared, *lo_codec_, false, i));
      lo_live_ += lo_->pages.back().live;
    }
    r.get_array(lo_->k, "demoted keys", static_cast<std::uint64_t>(lo_codec_->page_tokens()) * ud);
    r.check(lo_->k.size() % ud == 0 && lo_->k.size() / ud < static_cast<std::size_t>(lo_codec_->page_tokens()),
            "demoted keys", "{} floats are not fewer than a page ({}) of whole rows of {}", lo_->k.size(),
            lo_codec_->page_tokens(), d_);
    lo_stage_ = static_cast<std::int64_t>(lo_->k.size() / ud);
    r.get_exact(lo_->v, lo_->k.size(), "demoted values");
    load_runs(r, lo_->runs, false, lo_live_ + lo_stage_, "demoted positions");
  }

  r.get_array(special_k_, "special keys", rows);
  r.check(special_k_.size() % ud == 0, "special keys", "{} floats are not whole rows of {}", special_k_.size(), d_);
  const std::size_t ns = special_k_.size() / ud;
  r.get_exact(special_v_, special_k_.size(), "special values");
  r.get_exact(special_w_, ns, "special weights");
  r.get_exact(special_pos_, ns, "special positions");
  for (std::size_t s = 0; s < ns; ++s) {
    r.check(std::isfinite(special_w_[s]) && special_w_[s] >= 0.0f, "special weights",
            "token {} has ln(weight) {}, expected finite and >= 0", s, special_w_[s]);
    r.check(special_pos_[s] >= 0 && special_pos_[s] <= last_pos_, "special positions",
            "token {} has position {}, outside [0, {}]", s, special_pos_[s], last_pos_);
  }
  r.check(comp_ >= -1 && comp_ < specials() && (comp_ >= 0 || comp_n_ == 0), "compensation token",
          "index {} (with {} tokens folded) is not one of the {} special tokens", comp_, comp_n_, specials());

  r.get_array(importance_, "importance", static_cast<std::uint64_t>(cap));
  r.check(importance_.size() == (pipeline_->scorers.empty() ? 0u : static_cast<std::size_t>(size())), "importance",
          "{} scores for {} tokens (the pipeline {} scores)", importance_.size(), size(),
          pipeline_->scorers.empty() ? "keeps no" : "keeps");

  r.check(size() <= cap, "tokens", "{} tokens are more than max_tokens {}", size(), cap);
  r.check(seen_ >= ordinary() + demoted(), "tokens seen", "{} tokens seen but {} are held outside the specials", seen_,
          ordinary() + demoted());
  r.check(last_append_ >= 0 && last_append_ <= ordinary(), "last append",
          "{} tokens in the latest append, but {} ordinary tokens are held", last_append_, ordinary());
  if (limits.finite_rows) {
    for (const Floats* f : {&sink_k_, &sink_v_, &win_k_, &win_v_, &special_k_, &special_v_})
      r.check(all_finite(f->data(), f->size()), "full-precision rows",
              "NaN or Inf in a row of a cache that rejects non-finite input");
    if (lo_)
      r.check(all_finite(lo_->k.data(), lo_->k.size()) && all_finite(lo_->v.data(), lo_->v.size()),
              "full-precision rows", "NaN or Inf in a demoted row of a cache that rejects non-finite input");
  }
}

}  // namespace kvslim
