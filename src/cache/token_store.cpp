#include "kvslim/cache/token_store.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "check.h"
#include "kvslim/kernels/kernel_table.h"
#include "kvslim/policy/policy.h"

namespace kvslim {
namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Tokens per block for full-precision segments (sinks, window, specials).
constexpr int kDenseBlock = 64;
// Attention prefetches the page this many pages ahead of the one it reads (measured on the
// reference machine: 4 is best for KIVI's 3-5 KB pages and neutral for f16/f32 pages).
constexpr std::size_t kPrefetchAhead = 4;

std::int64_t round16(std::size_t n) { return static_cast<std::int64_t>((n + 15) & ~std::size_t{15}); }
}  // namespace

TokenStore::TokenStore(int head_dim, const Pipeline* pipeline)
    : d_(head_dim),
      pipeline_(pipeline),
      page_tokens_(pipeline->codec->page_tokens()),
      // Pages are rounded to 16 bytes, the allocator's own alignment, so what we count is
      // what we ask for.
      page_bytes_(round16(pipeline->codec->page_bytes(head_dim))),
      residual_(pipeline->codec->residual()),
      sink_target_(pipeline->codec->sinks()),
      sink_k_(TrackedAllocator<float>(&counter_)),
      sink_v_(TrackedAllocator<float>(&counter_)),
      pages_(TrackedAllocator<Bytes>(&counter_)),
      win_k_(TrackedAllocator<float>(&counter_)),
      win_v_(TrackedAllocator<float>(&counter_)),
      special_k_(TrackedAllocator<float>(&counter_)),
      special_v_(TrackedAllocator<float>(&counter_)),
      special_w_(TrackedAllocator<float>(&counter_)),
      special_pos_(TrackedAllocator<std::int64_t>(&counter_)),
      runs_(TrackedAllocator<PosRun>(&counter_)),
      importance_(TrackedAllocator<float>(&counter_)) {}

TokenStore::~TokenStore() = default;

std::vector<std::int64_t> TokenStore::positions() const {
  std::vector<std::int64_t> out;
  out.reserve(static_cast<std::size_t>(size()));
  for (const PosRun& r : runs_)
    for (std::int64_t i = 0; i < r.count; ++i) out.push_back(r.first + i);
  out.insert(out.end(), special_pos_.begin(), special_pos_.end());
  return out;
}

void TokenStore::push_position(std::int64_t p) {
  if (!runs_.empty() && runs_.back().first + runs_.back().count == p) {
    ++runs_.back().count;
  } else {
    runs_.push_back({p, 1});
  }
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

// Seal every complete page that is not needed for the residual window. Called after attend()
// and at the start of append(), so an append's tokens stay full precision for its own
// attend() (KIVI's prefill semantics) and are sealed right after it.
void TokenStore::flush(const kernels::KernelTable& kt) {
  const std::int64_t g = page_tokens_;
  std::int64_t sealed = 0;
  while (window_ - sealed - g >= residual_) {
    Bytes page(static_cast<std::size_t>(page_bytes_), std::byte{0}, TrackedAllocator<std::byte>(&counter_));
    const std::size_t off = static_cast<std::size_t>(sealed * d_);
    pipeline_->codec->encode(kt, win_k_.data() + off, win_v_.data() + off, page_tokens_, d_, page.data());
    pages_.push_back(std::move(page));
    sealed += g;
  }
  if (sealed == 0) return;
  const std::size_t off = static_cast<std::size_t>(sealed * d_);
  const std::size_t keep = static_cast<std::size_t>((window_ - sealed) * d_);
  std::memmove(win_k_.data(), win_k_.data() + off, keep * sizeof(float));
  std::memmove(win_v_.data(), win_v_.data() + off, keep * sizeof(float));
  window_ -= sealed;
  grow_window(window_);
  // After a large prefill chunk the window buffer is much larger than it will ever need to
  // be again; give the memory back so stats() stays honest.
  const std::size_t steady = static_cast<std::size_t>((residual_ + g) * d_);
  if (win_k_.capacity() > 2 * std::max(steady, keep)) {
    win_k_.shrink_to_fit();
    win_v_.shrink_to_fit();
  }
}

void TokenStore::append(const kernels::KernelTable& kt, const float* k, std::int64_t k_stride, const float* v,
                        std::int64_t v_stride, std::int64_t n, const std::int64_t* pos) {
  flush(kt);
  const std::int64_t first = sinks_ + sealed_tokens() + window_;
  std::int64_t i = 0;
  // The first tokens of the sequence become sinks.
  const std::int64_t sink_first = sinks_;
  while (i < n && sinks_ < sink_target_ && window_ == 0 && pages_.empty()) {
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
  if (!pipeline_->scorers.empty()) {
    // New tokens sit before the specials in index order.
    importance_.insert(importance_.end() - specials(), static_cast<std::size_t>(n), 0.0f);
    for (const auto& sc : pipeline_->scorers) {
      if (n_sink) sc->on_append(*this, first, n_sink, sink_k_.data() + sink_first * d_);
      if (n > n_sink) sc->on_append(*this, first + n_sink, n - n_sink, win_k_.data() + win_first * d_);
    }
  }
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
  for (const Bytes& p : pages_) {
    pipeline_->codec->decode(kt, p.data(), page_tokens_, d_, k + row * d, v + row * d);
    row += static_cast<std::size_t>(page_tokens_);
  }
  copy_rows(win_k_.data(), win_v_.data(), window_);
  copy_rows(special_k_.data(), special_v_.data(), specials());
  if (log_weights) {
    const std::size_t n_plain = row - static_cast<std::size_t>(specials());
    for (std::size_t i = 0; i < n_plain; ++i) log_weights[i] = 0.0f;
    for (std::size_t i = 0; i < special_w_.size(); ++i) log_weights[n_plain + i] = special_w_[i];
  }
}

void TokenStore::attend(const kernels::KernelTable& kt, const float* q, int nq, int nquery, float* out,
                        float* mass, AttendWorkspace& ws) const {
  const int d = d_;
  const std::size_t unq = static_cast<std::size_t>(nq);
  ws.m.assign(unq, kNegInf);
  ws.l.assign(unq, 0.0f);
  std::fill(out, out + unq * d, 0.0f);
  const int block = std::max(page_tokens_, kDenseBlock);
  if (ws.s.size() < unq * block) ws.s.resize(unq * block);
  const std::int64_t total = size();
  if (mass) {
    ws.probs.resize(unq * static_cast<std::size_t>(total));
    ws.block_max.clear();
    ws.block_start.clear();
  }
  float* s = ws.s.data();
  std::int64_t index = 0;  // store index of the block's first token

  // Causal mask within the latest append. Its tokens are the last last_append_ ordinary
  // (non-special) tokens in index order, whichever segments they landed in (sinks, pages or
  // window); query i of the nquery queries is chunk token (last_append_ - nquery + i), so
  // row r sees ordinary tokens with index < causal_end - nquery + (r % nquery) + 1. Only a
  // block that reaches past the first query's limit needs masking; in decode (one query,
  // the newest token) none does.
  const std::int64_t causal_end = sinks_ + sealed_tokens() + window_;
  const std::int64_t first_limit = causal_end - nquery + 1;
  auto mask_causal = [&](int ntok) {
    if (index + ntok <= first_limit) return;
    for (int r = 0; r < nq; ++r) {
      const std::int64_t limit = first_limit + (r % nquery);
      for (std::int64_t j = std::max<std::int64_t>(0, limit - index); j < ntok; ++j) s[r * ntok + j] = kNegInf;
    }
  };

  // Shared tail of every block: online softmax, keep probabilities for the mass output,
  // then the weighted value sum.
  auto finish_block = [&](int ntok, auto&& accumulate) {
    kt.softmax_block(s, nq, ntok, ws.m.data(), ws.l.data(), out, d);
    if (mass) {
      ws.block_start.push_back(index);
      ws.block_max.insert(ws.block_max.end(), ws.m.begin(), ws.m.end());
      for (int r = 0; r < nq; ++r)
        std::memcpy(ws.probs.data() + static_cast<std::size_t>(r) * total + index, s + r * ntok,
                    static_cast<std::size_t>(ntok) * sizeof(float));
    }
    accumulate();
    index += ntok;
  };
  // Full-precision rows [n][d]: ordinary tokens (causally masked) or specials (a per-token
  // logit bias ln(weight), never masked: they stand for tokens of the past).
  auto dense = [&](const float* ks, const float* vs, std::int64_t n, const float* bias) {
    for (std::int64_t b0 = 0; b0 < n; b0 += block) {
      const int bn = static_cast<int>(std::min<std::int64_t>(block, n - b0));
      kt.scores_f32(q, nq, ks + b0 * d, bn, d, s);
      if (bias)
        for (int r = 0; r < nq; ++r)
          for (int j = 0; j < bn; ++j) s[r * bn + j] += bias[b0 + j];
      else
        mask_causal(bn);
      finish_block(bn, [&] { kt.accum_f32(s, nq, vs + b0 * d, bn, d, out); });
    }
  };

  dense(sink_k_.data(), sink_v_.data(), sinks_, nullptr);
  const Codec& codec = *pipeline_->codec;
  // Pages are separate allocations, so the hardware prefetchers restart at every page, and
  // the kernels' arithmetic does not overlap misses well on its own: ask for the page
  // kPrefetchAhead pages on while this one is processed, its first half before the scores
  // (keys come first in every page layout) and the rest before the values.
  const std::size_t npages = pages_.size(), half = static_cast<std::size_t>(page_bytes_) / 2;
  auto prefetch = [](const std::byte* b, std::size_t from, std::size_t to) {
    for (std::size_t o = from; o < to; o += 64) __builtin_prefetch(b + o, 0, 3);
  };
  for (std::size_t i = 0; i < npages; ++i) {
    const std::byte* p = pages_[i].data();
    const std::byte* next = i + kPrefetchAhead < npages ? pages_[i + kPrefetchAhead].data() : nullptr;
    if (next) prefetch(next, 0, half);
    codec.scores(kt, p, page_tokens_, d, q, nq, s);
    mask_causal(page_tokens_);
    if (next) prefetch(next, half, 2 * half);
    finish_block(page_tokens_, [&] { codec.accumulate(kt, p, page_tokens_, d, s, nq, out); });
  }
  dense(win_k_.data(), win_v_.data(), window_, nullptr);
  dense(special_k_.data(), special_v_.data(), specials(), special_w_.data());

  const bool all_ok = ws.row_ok.empty();
  for (int r = 0; r < nq; ++r) {
    // A non-finite query row (NonFinitePolicy::kAllow) gives NaN on every ISA, whatever
    // the kernels made of it.
    const float inv = !all_ok && !ws.row_ok[r] ? std::numeric_limits<float>::quiet_NaN()
                      : ws.l[r] > 0.0f         ? 1.0f / ws.l[r]
                                               : 0.0f;
    for (int c = 0; c < d; ++c) out[r * d + c] = all_ok || ws.row_ok[r] ? out[r * d + c] * inv : inv;
  }
  if (mass) {
    const std::size_t nb = ws.block_start.size();
    for (std::size_t b = 0; b < nb; ++b) {
      const std::int64_t j0 = ws.block_start[b];
      const std::int64_t j1 = b + 1 < nb ? ws.block_start[b + 1] : total;
      for (int r = 0; r < nq; ++r) {
        if (ws.l[r] <= 0.0f || (!all_ok && !ws.row_ok[r])) continue;
        const float c = std::exp(ws.block_max[b * unq + r] - ws.m[r]) / ws.l[r];
        const float* pr = ws.probs.data() + static_cast<std::size_t>(r) * total;
        for (std::int64_t j = j0; j < j1; ++j) mass[j] += pr[j] * c;
      }
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
  release(runs_);
  release(importance_);
  sinks_ = window_ = 0;
  last_pos_ = -1;
  last_append_ = 0;
  seen_ = 0;
}

}  // namespace kvslim
