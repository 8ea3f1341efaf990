#include "kvslim/cache/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <exception>
#include <mutex>
#include <thread>

#include "cache/persist.h"
#include "cache/recipe_text.h"
#include "cache/rope.h"
#include "check.h"
#include "kvslim/cache/recipe.h"
#include "kvslim/cache/token_store.h"
#include "kvslim/cpu/isa.h"
#include "kvslim/kernels/kernel_table.h"
#include "kvslim/policy/codebook.h"
#include "kvslim/policy/policy.h"

namespace kvslim {

const HeadStats& CacheStats::head(int layer, int kv_head) const {
  KVSLIM_CHECK(layer >= 0 && layer < layers && kv_head >= 0 && kv_head < kv_heads &&
                   static_cast<std::size_t>(layer) * kv_heads + kv_head < heads.size(),
               ErrorCode::kOutOfRange, "CacheStats::head({}, {}) is out of range: {} layers x {} kv heads", layer,
               kv_head, layers, kv_heads);
  return heads[static_cast<std::size_t>(layer) * kv_heads + kv_head];
}

std::int64_t CacheStats::layer_bytes(int layer) const {
  std::int64_t b = 0;
  for (int h = 0; h < kv_heads; ++h) b += head(layer, h).bytes;
  return b;
}
std::int64_t CacheStats::layer_tokens(int layer) const {
  std::int64_t t = 0;
  for (int h = 0; h < kv_heads; ++h) t += head(layer, h).tokens;
  return t;
}

namespace {

// Worker pool for attend() (CacheConfig::threads > 1). A run splits tasks 0..n-1 (kv heads)
// statically over the calling thread (participant 0) and the workers (1..W): participant p
// runs tasks p, p + W + 1, ... So every participant runs a head on every call, which warms
// its thread-local workspace on the first call: attend() then allocates nothing. One run
// at a time; nothing is allocated per run (the task is a function pointer + context).
class WorkerPool {
 public:
  explicit WorkerPool(int workers) : participants_(workers + 1) {
    threads_.reserve(static_cast<std::size_t>(workers));
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i] { loop(i + 1); });
  }
  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  /// Claim the pool for one run; false if another thread is running it (the caller then does
  /// the work alone rather than wait or oversubscribe).
  bool try_acquire() { return busy_.try_lock(); }
  int participants() const noexcept { return participants_; }
  void release() { busy_.unlock(); }

  /// Runs fn(ctx, task) for every task in [0, ntasks) and returns when every participant is
  /// done; an exception thrown by a task is rethrown here.
  void run(int ntasks, void (*fn)(void*, int), void* ctx) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = fn;
      ctx_ = ctx;
      ntasks_ = ntasks;
      pending_ = participants_ - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return pending_ == 0; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work(int participant) {
    for (int t = participant; t < ntasks_; t += participants_) {
      try {
        fn_(ctx_, t);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }
  // A worker reads the run's fields only between seeing its generation and counting itself
  // done, both under mu_; run() returns (and the next run can start) only after every
  // worker has counted itself done.
  void loop(int participant) {
    std::uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      lock.unlock();
      work(participant);
      lock.lock();
      if (--pending_ == 0) done_.notify_all();
    }
  }

  const int participants_;
  std::mutex busy_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::uint64_t generation_ = 0;
  bool stop_ = false;
  void (*fn_)(void*, int) = nullptr;
  void* ctx_ = nullptr;
  int ntasks_ = 0;
  int pending_ = 0;
  std::exception_ptr error_;
  std::vector<std::thread> threads_;
};

}  // namespace

struct KVCache::Impl {
  CacheConfig cfg;
  const kernels::KernelTable* kt = nullptr;
  // Pipelines are built once per distinct chain and shared by the heads that use it (once
  // per head for chains with per-head stages, BuiltStage::per_head).
  std::vector<std::unique_ptr<Pipeline>> pipelines;
  // Codebooks the cq stages read (from files and from cfg.codebooks): kept alive here, and
  // reported apart in stats() as a per-model cost.
  std::vector<std::pair<std::string, std::shared_ptr<const Codebooks>>> codebooks;
  ByteCounter shared;
  std::vector<TokenStore*, TrackedAllocator<TokenStore*>> stores{TrackedAllocator<TokenStore*>(&shared)};
  std::unique_ptr<WorkerPool> pool;  // only when cfg.threads > 1
  std::vector<float> split_m, split_l, split_o;  // split-KV partial states [task][row]([d])
  // Hadamard rotations (one per distinct seed) and each store's, or null (rotate=hadamard).
  std::vector<std::unique_ptr<const HadamardRotation>> rotations;
  struct HeadRotation {
    const HadamardRotation* keys = nullptr;    // rotates keys and queries, or null
    const HadamardRotation* values = nullptr;  // rotates values and the output back, or null
  };
  std::vector<HeadRotation> rot;
  std::unique_ptr<const detail::RopeTable> rope;  // pre-RoPE keys (cfg.pre_rope_keys)

  ~Impl() {
    TrackedAllocator<TokenStore> alloc(&shared);
    for (TokenStore* s : stores) {
      s->~TokenStore();
      alloc.deallocate(s, 1);
    }
  }
  TokenStore& at(int layer, int h) const { return *stores[static_cast<std::size_t>(layer) * cfg.kv_heads + h]; }
  const HadamardRotation* rot_k(int layer, int h) const {
    return rot[static_cast<std::size_t>(layer) * cfg.kv_heads + h].keys;
  }
  const HadamardRotation* rot_v(int layer, int h) const {
    return rot[static_cast<std::size_t>(layer) * cfg.kv_heads + h].values;
  }
  // The rotation for a pipeline's codec (shared by every store with the same seed), or null.
  HeadRotation rotation_for(const Pipeline& p) {
    const RotationSpec r = p.codec->rotation();
    const Codec* lo = p.eviction ? p.eviction->demote_codec() : nullptr;
    KVSLIM_CHECK(!lo || lo->rotation() == r, ErrorCode::kRecipe,
                 "recipe '{}': the demotion codec '{}' must use the same rotation as the codec '{}' (both hold the "
                 "head's tokens, in one basis)",
                 detail::clip_recipe(p.text), lo->describe(), p.codec->describe());
    if (!r.hadamard) return {};
    const HadamardRotation* found = nullptr;
    for (const auto& x : rotations)
      if (x->seed() == r.seed) found = x.get();
    if (!found) {
      rotations.push_back(std::make_unique<const HadamardRotation>(cfg.head_dim, r.seed));
      found = rotations.back().get();
    }
    return {r.keys ? found : nullptr, r.values ? found : nullptr};
  }

  void check_layer(int layer) const {
    KVSLIM_CHECK(layer >= 0 && layer < cfg.layers, ErrorCode::kOutOfRange, "layer {} is out of range [0, {})", layer,
                 cfg.layers);
  }
  void check_head(int h) const {
    KVSLIM_CHECK(h >= 0 && h < cfg.kv_heads, ErrorCode::kOutOfRange, "kv head {} is out of range [0, {})", h,
                 cfg.kv_heads);
  }
};

namespace {

void check_view(const void* data, const Layout& l, const char* what, std::int64_t heads, std::int64_t n,
                std::int64_t d, const char* heads_name) {
  KVSLIM_CHECK(l.rank == 3, ErrorCode::kShapeMismatch, "{} must be rank 3 [{}][tokens][head_dim], got rank {} {}",
               what, heads_name, l.rank, l.describe());
  KVSLIM_CHECK(l.shape[0] == heads && l.shape[2] == d && (n < 0 ? l.shape[1] >= 1 : l.shape[1] == n),
               ErrorCode::kShapeMismatch, "{} has shape {}, expected [{}={}][{}][head_dim={}]", what, l.describe(),
               heads_name, heads, n < 0 ? std::string("tokens>=1") : std::to_string(n), d);
  KVSLIM_CHECK(l.strides[2] == 1, ErrorCode::kShapeMismatch,
               "{} has head_dim stride {}, expected 1 (channels must be contiguous): {}", what, l.strides[2],
               l.describe());
  KVSLIM_CHECK(data != nullptr, ErrorCode::kInvalidArgument, "{} has shape {} but a null data pointer", what,
               l.describe());
}

// One workspace per thread: attend() allocates nothing once it has warmed up.
AttendWorkspace& workspace() {
  thread_local AttendWorkspace ws;
  return ws;
}

}  // namespace

KVCache::KVCache(const CacheConfig& config) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.cfg = config;
  const CacheConfig& c = m.cfg;
  KVSLIM_CHECK(c.layers >= 1, ErrorCode::kInvalidArgument, "CacheConfig.layers = {} must be >= 1", c.layers);
  KVSLIM_CHECK(c.kv_heads >= 1, ErrorCode::kInvalidArgument, "CacheConfig.kv_heads = {} must be >= 1", c.kv_heads);
  KVSLIM_CHECK(c.q_heads >= 1 && c.q_heads % c.kv_heads == 0, ErrorCode::kInvalidArgument,
               "CacheConfig.q_heads = {} must be a positive multiple of kv_heads = {}", c.q_heads, c.kv_heads);
  KVSLIM_CHECK(c.head_dim >= 1 && c.head_dim <= 4096, ErrorCode::kInvalidArgument,
               "CacheConfig.head_dim = {} must be in [1, 4096]", c.head_dim);
  KVSLIM_CHECK(c.max_tokens >= 1, ErrorCode::kCapacity, "CacheConfig.max_tokens = {} must be >= 1", c.max_tokens);
  KVSLIM_CHECK(c.threads >= 1 && c.threads <= 256, ErrorCode::kInvalidArgument,
               "CacheConfig.threads = {} must be in [1, 256]", c.threads);
  m.kt = &kernels::active();
  KVSLIM_CHECK(!c.pre_rope_keys || c.rope, ErrorCode::kInvalidArgument,
               "CacheConfig.pre_rope_keys is set but CacheConfig.rope is empty: pre-RoPE keys need the RoPE the "
               "model applies (theta, rotary_dims, style, scaling)");
  KVSLIM_CHECK(!c.rope || c.pre_rope_keys, ErrorCode::kInvalidArgument,
               "CacheConfig.rope is given but pre_rope_keys is false: the cache uses a RoPE spec only to rotate "
               "pre-RoPE keys");
  if (c.rope) {
    const RopeSpec& r = *c.rope;
    const int rot = r.rotary_dims > 0 ? r.rotary_dims : c.head_dim;
    KVSLIM_CHECK(r.rotary_dims >= 0 && rot <= c.head_dim && rot % 2 == 0, ErrorCode::kInvalidArgument,
                 "CacheConfig.rope.rotary_dims = {} disagrees with head_dim {} (it must be even and at most head_dim; "
                 "0 means head_dim)",
                 r.rotary_dims, c.head_dim);
    KVSLIM_CHECK(std::isfinite(r.theta) && r.theta > 1.0, ErrorCode::kInvalidArgument,
                 "CacheConfig.rope.theta = {} must be a finite base > 1", r.theta);
    KVSLIM_CHECK(std::isfinite(r.scaling) && r.scaling > 0.0, ErrorCode::kInvalidArgument,
                 "CacheConfig.rope.scaling = {} must be finite and > 0", r.scaling);
  }

  const RecipeSpec spec = parse_recipe(c.recipe);
  for (const OverrideSpec& o : spec.overrides) {
    for (const auto& [a, b] : o.layers)
      KVSLIM_CHECK(b < c.layers, ErrorCode::kRecipe, "recipe '{}': layer {} is out of range [0, {})",
                   detail::clip_recipe(c.recipe), b, c.layers);
    for (const auto& [a, b] : o.heads)
      KVSLIM_CHECK(b < c.kv_heads, ErrorCode::kRecipe, "recipe '{}': kv head {} is out of range [0, {})",
                   detail::clip_recipe(c.recipe), b, c.kv_heads);
  }
  std::vector<const ChainSpec*> built_from;  // [pipeline], null for a per-head pipeline
  m.stores.reserve(static_cast<std::size_t>(c.layers) * c.kv_heads);
  TrackedAllocator<TokenStore> alloc(&m.shared);
  StageContext ctx;
  ctx.head_dim = c.head_dim;
  ctx.layers = c.layers;
  ctx.kv_heads = c.kv_heads;
  ctx.codebooks = c.codebooks;
  ctx.loaded = &m.codebooks;
  for (int l = 0; l < c.layers; ++l)
    for (int h = 0; h < c.kv_heads; ++h) {
      const ChainSpec& chain = spec.chain_for(l, h);
      std::size_t idx = 0;
      while (idx < built_from.size() && built_from[idx] != &chain) ++idx;
      if (idx == built_from.size()) {
        ctx.layer = l;
        ctx.kv_head = h;
        auto p = std::make_unique<Pipeline>(build_pipeline(chain, ctx));
        // Budgets are checked against the capacity before anything else about the stage.
        if (p->eviction && p->eviction->fixed_budget() > 0)
          KVSLIM_CHECK(p->eviction->fixed_budget() <= c.max_tokens, ErrorCode::kCapacity,
                       "recipe '{}': eviction budget {} of '{}' is larger than the cache capacity max_tokens {}",
                       detail::clip_recipe(chain.text()), p->eviction->fixed_budget(), p->eviction->describe(),
                       c.max_tokens);
        KVSLIM_CHECK(p->codec->sinks() <= c.max_tokens, ErrorCode::kCapacity,
                     "recipe '{}': sinks={} is larger than the cache capacity max_tokens {}",
                     detail::clip_recipe(chain.text()), p->codec->sinks(), c.max_tokens);
        if (p->merge && p->merge->fixed_budget() > 0)
          KVSLIM_CHECK(p->merge->fixed_budget() <= c.max_tokens, ErrorCode::kCapacity,
                       "recipe '{}': merge budget {} of '{}' is larger than the cache capacity max_tokens {}",
                       detail::clip_recipe(chain.text()), p->merge->fixed_budget(), p->merge->describe(),
                       c.max_tokens);
        const bool shared = !p->per_head;
        m.pipelines.push_back(std::move(p));
        built_from.push_back(shared ? &chain : nullptr);
      }
      m.rot.push_back(m.rotation_for(*m.pipelines[idx]));
      if (c.rope) {
        const Pipeline& p = *m.pipelines[idx];
        const Codec* lo = p.eviction ? p.eviction->demote_codec() : nullptr;
        // Codebooks are trained on post-RoPE keys; a compensation token averages keys of
        // different positions, which has no position to rotate by; a Hadamard rotation of the
        // keys does not commute with RoPE.
        for (const Codec* cd : {p.codec.get(), lo})
          KVSLIM_CHECK(!cd || cd->takes_pre_rope_keys(), ErrorCode::kInvalidArgument,
                       "recipe '{}': pre-RoPE keys cannot use '{}' (it is calibrated on post-RoPE keys, as cq's "
                       "codebooks are)",
                       detail::clip_recipe(p.text), cd->describe());
        KVSLIM_CHECK(!p.eviction || p.eviction->action() != EvictAction::kCompensate, ErrorCode::kInvalidArgument,
                     "recipe '{}': pre-RoPE keys cannot be folded into a compensation token ('{}': its mean key has no "
                     "position)",
                     detail::clip_recipe(p.text), p.eviction->describe());
        KVSLIM_CHECK(!p.merge, ErrorCode::kInvalidArgument,
                     "recipe '{}': pre-RoPE keys cannot be merged ('{}': a merged key averages keys of different "
                     "positions, which have no one position to rotate by)",
                     detail::clip_recipe(p.text), p.merge ? p.merge->describe() : "");
        KVSLIM_CHECK(!m.rot.back().keys, ErrorCode::kInvalidArgument,
                     "recipe '{}': rotate=hadamard rotates the keys, which does not commute with RoPE on pre-RoPE keys "
                     "(use rotated=v)",
                     detail::clip_recipe(p.text));
      }
      TokenStore* s = alloc.allocate(1);
      new (s) TokenStore(c.head_dim, m.pipelines[idx].get());
      m.stores.push_back(s);
    }
  // MiniCache: a layer whose chain has a cross-layer merge stage seals its pages together with
  // the same kv head of the layer below (kvslim/policy/merge/minicache.h).
  for (int l = 0; l < c.layers; ++l)
    for (int h = 0; h < c.kv_heads; ++h) {
      TokenStore& up = m.at(l, h);
      const Pipeline& pu = up.pipeline();
      if (!pu.merge || !pu.merge->cross_layer()) continue;
      const std::string name = pu.merge->describe();
      KVSLIM_CHECK(l > 0, ErrorCode::kInvalidArgument,
                   "recipe '{}': '{}' on layer 0 has no layer below to merge with (it merges layer l with l-1)",
                   detail::clip_recipe(c.recipe), name);
      const Pipeline& pl = m.at(l - 1, h).pipeline();
      KVSLIM_CHECK(pl.codec->describe() == pu.codec->describe(), ErrorCode::kInvalidArgument,
                   "recipe '{}': '{}' on layer {} kv head {} needs layer {} to store its pages the same way, but its "
                   "codec is '{}' and layer {}'s is '{}'",
                   detail::clip_recipe(c.recipe), name, l, h, l - 1, pl.codec->describe(), l, pu.codec->describe());
      KVSLIM_CHECK(!pl.merge, ErrorCode::kInvalidArgument,
                   "recipe '{}': '{}' on layer {} cannot merge with layer {}, which has a merge stage of its own "
                   "('{}'; a layer merges with one neighbour: name every other layer, e.g. [layers=1,3,5])",
                   detail::clip_recipe(c.recipe), name, l, l - 1, pl.merge->describe());
      for (const Pipeline* p : {&pl, &pu})
        KVSLIM_CHECK(!p->eviction, ErrorCode::kInvalidArgument,
                     "recipe '{}': '{}' on layer {} cannot be combined with eviction ('{}' on layer {}): merged pages "
                     "hold two layers' tokens and cannot drop one",
                     detail::clip_recipe(c.recipe), name, l, p->eviction->describe(), p == &pl ? l - 1 : l);
      up.pair_with_lower(&m.at(l - 1, h), &m.shared);
    }
  if (c.rope) {
    // The offset table spans the largest block attention hands the rotation (kDenseBlock = 64
    // rows of the window, or a page).
    int max_block = 64;
    for (const auto& p : m.pipelines) {
      max_block = std::max(max_block, p->codec->page_tokens());
      if (p->eviction && p->eviction->demote_codec())
        max_block = std::max(max_block, p->eviction->demote_codec()->page_tokens());
    }
    m.rope = std::make_unique<const detail::RopeTable>(*c.rope, c.head_dim, max_block);
    for (TokenStore* s : m.stores) s->set_rope(m.rope.get());
  }
  // Work is split by kv head, and with fewer heads than threads by ranges of one head's
  // pages (split-KV, at most kMaxSplits per head), so every thread can help.
  constexpr int kMaxSplits = 8;
  const int workers = std::min(c.threads, c.kv_heads * kMaxSplits) - 1;
  if (workers > 0) m.pool = std::make_unique<WorkerPool>(workers);
}

KVCache::~KVCache() = default;
KVCache::KVCache(KVCache&&) noexcept = default;
KVCache& KVCache::operator=(KVCache&&) noexcept = default;

KVCache::Impl& KVCache::impl() const {
  KVSLIM_CHECK(impl_ != nullptr, ErrorCode::kInvalidState,
               "this KVCache was moved from; assign a new cache to it before using it");
  return *impl_;
}

const CacheConfig& KVCache::config() const { return impl().cfg; }

void KVCache::append(int layer, TensorView<const float> k, TensorView<const float> v,
                     std::span<const std::int64_t> positions) {
  Impl& m = impl();
  const CacheConfig& c = m.cfg;
  m.check_layer(layer);
  check_view(k.data(), k.layout(), "k", c.kv_heads, -1, c.head_dim, "kv_heads");
  const std::int64_t n = k.dim(1);
  check_view(v.data(), v.layout(), "v", c.kv_heads, n, c.head_dim, "kv_heads");
  KVSLIM_CHECK(positions.empty() || static_cast<std::int64_t>(positions.size()) == n, ErrorCode::kShapeMismatch,
               "append to layer {}: {} positions for {} tokens", layer, positions.size(), n);

  // What the previous append still owes (eviction, sealing) happens first, so the capacity
  // check sees the budgeted cache. Then validate everything before adding anything, so a
  // failed append adds nothing.
  for (int h = 0; h < c.kv_heads; ++h) m.at(layer, h).flush(*m.kt);
  const TokenStore& s0 = m.at(layer, 0);
  KVSLIM_CHECK(!positions.empty() || s0.last_position() <= std::numeric_limits<std::int64_t>::max() - n,
               ErrorCode::kPosition,
               "append to layer {}: {} tokens without positions would continue past the largest position after "
               "{}; pass positions explicitly",
               layer, n, s0.last_position());
  std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    pos[i] = positions.empty() ? s0.last_position() + 1 + i : positions[i];
    const std::int64_t prev = i == 0 ? s0.last_position() : pos[i - 1];
    KVSLIM_CHECK(pos[i] > prev, ErrorCode::kPosition,
                 "append to layer {}: position {} (token {} of {}) does not follow position {}; positions must "
                 "strictly increase",
                 layer, pos[i], i, n, prev);
  }
  // A rotated head stores R k and R v (kvslim/policy/rotation.h), rotated once here into
  // rk/rv ([kv_heads][n][head_dim], rows of unrotated heads unused): the codec checks the rows
  // it will encode, and the append below reads the same rows.
  const std::size_t hn = static_cast<std::size_t>(n) * c.head_dim;
  std::vector<float> rk, rv;
  auto rotates = [&](int h) { return m.rot_k(layer, h) || m.rot_v(layer, h); };
  for (int h = 0; h < c.kv_heads; ++h) {
    if (!rotates(h)) continue;
    rk.resize(static_cast<std::size_t>(c.kv_heads) * hn);
    rv.resize(rk.size());
    float* kh = rk.data() + h * hn;
    float* vh = rv.data() + h * hn;
    for (std::int64_t i = 0; i < n; ++i) {
      std::memcpy(kh + i * c.head_dim, k.row(h, i), static_cast<std::size_t>(c.head_dim) * 4);
      std::memcpy(vh + i * c.head_dim, v.row(h, i), static_cast<std::size_t>(c.head_dim) * 4);
    }
    if (const HadamardRotation* r = m.rot_k(layer, h)) r->forward(*m.kt, kh, static_cast<int>(n));
    if (const HadamardRotation* r = m.rot_v(layer, h)) r->forward(*m.kt, vh, static_cast<int>(n));
  }
  for (int h = 0; h < c.kv_heads; ++h) {
    const TokenStore& s = m.at(layer, h);
    KVSLIM_CHECK(s.size() + n <= c.max_tokens, ErrorCode::kCapacity,
                 "append of {} tokens to layer {} kv head {} would hold {} tokens, more than max_tokens {}", n, layer,
                 h, s.size() + n, c.max_tokens);
    for (std::int64_t i = 0; i < n; ++i) {
      const float* kr = k.row(h, i);
      const float* vr = v.row(h, i);
      if (c.non_finite == NonFinitePolicy::kReject)
        for (int ch = 0; ch < c.head_dim; ++ch) {
          KVSLIM_CHECK(std::isfinite(kr[ch]), ErrorCode::kNonFinite,
                       "append to layer {}: key of kv head {}, token {}, channel {} is {}", layer, h, i, ch, kr[ch]);
          KVSLIM_CHECK(std::isfinite(vr[ch]), ErrorCode::kNonFinite,
                       "append to layer {}: value of kv head {}, token {}, channel {} is {}", layer, h, i, ch,
                       vr[ch]);
        }
      if (rotates(h))
        s.codec().check_rows(rk.data() + h * hn + i * c.head_dim, rv.data() + h * hn + i * c.head_dim, 1, c.head_dim);
      else
        s.codec().check_rows(kr, vr, 1, c.head_dim);
    }
  }
  for (int h = 0; h < c.kv_heads; ++h) {
    if (rotates(h)) {
      m.at(layer, h).append(*m.kt, rk.data() + h * hn, c.head_dim, rv.data() + h * hn, c.head_dim, n, pos.data());
    } else {
      m.at(layer, h).append(*m.kt, k.row(h, 0), k.stride(1), v.row(h, 0), v.stride(1), n, pos.data());
    }
  }
}

void KVCache::attend(int layer, TensorView<const float> q, TensorView<float> out, const AttendOptions& options) {
  Impl& m = impl();
  const CacheConfig& c = m.cfg;
  m.check_layer(layer);
  check_view(q.data(), q.layout(), "q", c.q_heads, -1, c.head_dim, "q_heads");
  const std::int64_t n = q.dim(1);
  check_view(out.data(), out.layout(), "out", c.q_heads, n, c.head_dim, "q_heads");
  const TokenStore& s0 = m.at(layer, 0);
  KVSLIM_CHECK(n <= s0.last_append_count(), ErrorCode::kShapeMismatch,
               "attend on layer {} with {} queries, but the latest append brought {} tokens (queries must be the "
               "latest appended tokens)",
               layer, n, s0.last_append_count());
  if (options.mass) {
    for (int h = 0; h < c.kv_heads; ++h)
      KVSLIM_CHECK(options.mass_stride >= m.at(layer, h).size(), ErrorCode::kShapeMismatch,
                   "attend on layer {}: mass_stride {} is smaller than the {} tokens kv head {} holds", layer,
                   options.mass_stride, m.at(layer, h).size(), h);
  }
  for (int h = 0; h < c.kv_heads; ++h)
    for (const auto& sc : m.at(layer, h).pipeline().scorers)
      KVSLIM_CHECK(!sc->needs_attention() || !options.accumulate_mass, ErrorCode::kInvalidArgument,
                   "attend on layer {}: recipe scorer '{}' computes its own attention mass; "
                   "AttendOptions.accumulate_mass would sum calls whose token order eviction changes between them "
                   "(use plain mass, or observe())",
                   layer, sc->describe());
  KVSLIM_CHECK(std::isfinite(options.scale) && options.scale >= 0.0f, ErrorCode::kInvalidArgument,
               "attend: scale {} must be finite and >= 0 (0 = 1/sqrt(head_dim))", options.scale);
  if (c.non_finite == NonFinitePolicy::kReject)
    for (int h = 0; h < c.q_heads; ++h)
      for (std::int64_t i = 0; i < n; ++i) {
        const float* qr = q.row(h, i);
        for (int ch = 0; ch < c.head_dim; ++ch)
          KVSLIM_CHECK(std::isfinite(qr[ch]), ErrorCode::kNonFinite,
                       "attend on layer {}: query of q head {}, token {}, channel {} is {}", layer, h, i, ch, qr[ch]);
      }
  const float scale = options.scale > 0.0f ? options.scale : 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  struct Task {
    Impl* m;
    int layer, group, d, nq;
    std::int64_t n;
    float scale;
    const TensorView<const float>* q;
    const TensorView<float>* out;
    const AttendOptions* options;
    void (*gather)(const Task&, int, AttendWorkspace&);
    int splits;  // split-KV: ranges per head (1 = whole heads)
  };
  // One kv head: gather its query rows (scaled), attend, scatter the outputs. Runs on any
  // thread; each thread has its own workspace.
  // Rows of kv head h: query head (h*group + g), query i -> row g*n + i. A row with NaN/Inf
  // (only reachable with NonFinitePolicy::kAllow) is zeroed for the kernels and flagged, so
  // its output is NaN on every ISA and it adds no attention mass.
  auto gather = [](const Task& t, int h, AttendWorkspace& ws) {
    const std::int64_t nt = t.n;
    const int d = t.d, group = t.group;
    ws.q.resize(static_cast<std::size_t>(t.nq) * d);
    ws.out.resize(static_cast<std::size_t>(t.nq) * d);
    ws.row_ok.clear();
    for (int g = 0; g < group; ++g)
      for (std::int64_t i = 0; i < nt; ++i) {
        const float* src = t.q->row(h * group + g, i);
        float* dst = ws.q.data() + (g * nt + i) * d;
        bool finite = true;
        for (int ch = 0; ch < d; ++ch) finite &= std::isfinite(src[ch]);
        if (!finite && ws.row_ok.empty()) ws.row_ok.assign(static_cast<std::size_t>(t.nq), 1);
        if (!finite) ws.row_ok[static_cast<std::size_t>(g * nt + i)] = 0;
        for (int ch = 0; ch < d; ++ch) dst[ch] = finite ? src[ch] * t.scale : 0.0f;
      }
    if (const HadamardRotation* r = t.m->rot_k(t.layer, h)) r->forward(*t.m->kt, ws.q.data(), t.nq);
  };
  auto head = [](void* ctx, int h) {
    const Task& t = *static_cast<const Task*>(ctx);
    const std::int64_t nt = t.n;
    const int d = t.d, group = t.group;
    AttendWorkspace& ws = workspace();
    t.gather(t, h, ws);
    TokenStore& s = t.m->at(t.layer, h);
    float* mass = nullptr;
    if (t.options->mass) {
      mass = t.options->mass + h * t.options->mass_stride;
      if (!t.options->accumulate_mass) std::fill(mass, mass + s.size(), 0.0f);
    }
    // Scorers that consume attention get it as a by-product, into a buffer of the
    // cache's (per thread), whether or not the engine asked for the mass too.
    int obs_window = -1;  // -1: no scorer needs attention
    for (const auto& sc : s.pipeline().scorers)
      if (sc->needs_attention()) obs_window = std::max(obs_window, sc->observation_window());
    ws.keep_probs = obs_window >= 0;
    s.attend(*t.m->kt, ws.q.data(), t.nq, static_cast<int>(nt), ws.out.data(), mass, ws);
    if (obs_window >= 0) {
      ws.mass.assign(static_cast<std::size_t>(s.size()), 0.0f);
      const int first = obs_window > 0 ? std::max(0, static_cast<int>(nt) - obs_window) : 0;
      s.collect_mass(ws, t.nq, static_cast<int>(nt), first, ws.mass.data());
      for (const auto& sc : s.pipeline().scorers)
        if (sc->needs_attention()) sc->on_attention(s, ws.mass);
    }
    if (const HadamardRotation* r = t.m->rot_v(t.layer, h)) r->inverse(*t.m->kt, ws.out.data(), t.nq);
    for (int g = 0; g < group; ++g)
      for (std::int64_t i = 0; i < nt; ++i)
        std::memcpy(t.out->row(h * group + g, i), ws.out.data() + (g * nt + i) * d, static_cast<std::size_t>(d) * 4);
    // The queries have attended: evict, and seal what the latest append no longer needs in
    // full precision, so stats() reports the steady state right after the call.
    s.flush(*t.m->kt);
  };
  const int group = c.q_heads / c.kv_heads;
  Task task{&m, layer, group, c.head_dim, group * static_cast<int>(n), n, scale, &q, &out, &options, gather, 1};
  if (!(m.pool && m.pool->try_acquire())) {
    for (int h = 0; h < c.kv_heads; ++h) head(&task, h);
    return;
  }
  struct Release {
    WorkerPool* p;
    ~Release() { p->release(); }
  } release{m.pool.get()};
  // Split-KV: with fewer kv heads than threads (MQA, few-head GQA), each head's pages are cut
  // into ranges that run on different threads, and their online-softmax states are merged.
  // Only without attention mass (the mass needs every range's final normalization) and when
  // every range gets at least kMinSplitPages pages. Results equal one thread's up to float
  // rounding of the merge (tests/kernels_attention_test.cpp bounds it).
  constexpr std::int64_t kMinSplitPages = 8;
  const int participants = m.pool->participants();
  bool mass_wanted = options.mass != nullptr;
  std::int64_t min_pages = std::numeric_limits<std::int64_t>::max();
  for (int h = 0; h < c.kv_heads; ++h) {
    const TokenStore& s = m.at(layer, h);
    min_pages = std::min(min_pages, s.page_count());
    for (const auto& sc : s.pipeline().scorers) mass_wanted |= sc->needs_attention();
  }
  const int splits = (participants + c.kv_heads - 1) / c.kv_heads;
  if (mass_wanted || splits < 2 || min_pages < kMinSplitPages * splits) {
    m.pool->run(c.kv_heads, head, &task);
    return;
  }
  task.splits = splits;
  const std::size_t unq = static_cast<std::size_t>(task.nq), ntasks = static_cast<std::size_t>(c.kv_heads) * splits;
  m.split_m.resize(ntasks * unq);
  m.split_l.resize(ntasks * unq);
  m.split_o.resize(ntasks * unq * static_cast<std::size_t>(c.head_dim));
  auto part = [](void* ctx, int i) {
    const Task& t = *static_cast<const Task*>(ctx);
    const int h = i / t.splits, k = i % t.splits;
    AttendWorkspace& ws = workspace();
    t.gather(t, h, ws);
    const TokenStore& s = t.m->at(t.layer, h);
    const std::size_t np = static_cast<std::size_t>(s.page_count()), sp = static_cast<std::size_t>(t.splits);
    const TokenStore::AttendRange range{np * k / sp, np * (k + 1) / sp, k == 0, k == t.splits - 1};
    const std::size_t rows = static_cast<std::size_t>(t.nq);
    s.attend_partial(*t.m->kt, ws.q.data(), t.nq, static_cast<int>(t.n), range,
                     t.m->split_o.data() + static_cast<std::size_t>(i) * rows * t.d, ws);
    std::copy(ws.m.begin(), ws.m.end(), t.m->split_m.begin() + static_cast<std::ptrdiff_t>(i * rows));
    std::copy(ws.l.begin(), ws.l.end(), t.m->split_l.begin() + static_cast<std::ptrdiff_t>(i * rows));
  };
  m.pool->run(static_cast<int>(ntasks), part, &task);
  const int d = c.head_dim;
  for (int h = 0; h < c.kv_heads; ++h) {
    for (int g = 0; g < group; ++g)
      for (std::int64_t i = 0; i < n; ++i) {
        const std::size_t r = static_cast<std::size_t>(g * n + i);
        const float* qr = q.row(h * group + g, i);
        bool finite = true;
        for (int ch = 0; ch < d; ++ch) finite &= std::isfinite(qr[ch]);
        float mx = -std::numeric_limits<float>::infinity();
        for (int k = 0; k < splits; ++k) mx = std::max(mx, m.split_m[(static_cast<std::size_t>(h) * splits + k) * unq + r]);
        float* o = out.row(h * group + g, i);
        std::fill(o, o + d, 0.0f);
        float l = 0.0f;
        for (int k = 0; k < splits; ++k) {
          const std::size_t ti = static_cast<std::size_t>(h) * splits + k;
          const float mk = m.split_m[ti * unq + r];
          if (mk == -std::numeric_limits<float>::infinity()) continue;  // the range saw nothing
          const float w = std::exp(mk - mx);
          l += m.split_l[ti * unq + r] * w;
          const float* ok = m.split_o.data() + (ti * unq + r) * d;
          for (int ch = 0; ch < d; ++ch) o[ch] += ok[ch] * w;
        }
        const float inv = !finite ? std::numeric_limits<float>::quiet_NaN() : l > 0.0f ? 1.0f / l : 0.0f;
        for (int ch = 0; ch < d; ++ch) o[ch] = finite ? o[ch] * inv : inv;
        if (const HadamardRotation* rr = m.rot_v(layer, h)) rr->inverse(*m.kt, o, 1);
      }
    m.at(layer, h).flush(*m.kt);
  }
}

void KVCache::observe(int layer, int kv_head, std::span<const float> mass) {
  Impl& m = impl();
  m.check_layer(layer);
  m.check_head(kv_head);
  TokenStore& s = m.at(layer, kv_head);
  KVSLIM_CHECK(static_cast<std::int64_t>(mass.size()) == s.size(), ErrorCode::kShapeMismatch,
               "observe on layer {} kv head {}: {} mass values for {} tokens", layer, kv_head, mass.size(), s.size());
  for (std::size_t j = 0; j < mass.size(); ++j)
    KVSLIM_CHECK(std::isfinite(mass[j]) && mass[j] >= 0.0f, ErrorCode::kNonFinite,
                 "observe on layer {} kv head {}: mass[{}] = {} is not a finite non-negative value", layer, kv_head,
                 j, mass[j]);
  for (const auto& sc : s.pipeline().scorers)
    if (sc->needs_attention()) sc->on_attention(s, mass);
}

DenseKV KVCache::materialize(int layer, int kv_head) const {
  const Impl& m = impl();
  m.check_layer(layer);
  m.check_head(kv_head);
  const TokenStore& s = m.at(layer, kv_head);
  DenseKV out;
  out.k = Tensor<float>({s.size(), m.cfg.head_dim});
  out.v = Tensor<float>({s.size(), m.cfg.head_dim});
  out.log_weights.resize(static_cast<std::size_t>(s.size()));
  s.materialize(*m.kt, out.k.data(), out.v.data(), out.log_weights.data());
  // A rotated store holds R k and/or R v.
  if (const HadamardRotation* r = m.rot_k(layer, kv_head)) r->inverse(*m.kt, out.k.data(), static_cast<int>(s.size()));
  if (const HadamardRotation* r = m.rot_v(layer, kv_head)) r->inverse(*m.kt, out.v.data(), static_cast<int>(s.size()));
  out.positions = s.positions();
  return out;
}

CacheStats KVCache::stats() const {
  const Impl& m = impl();
  CacheStats st;
  st.layers = m.cfg.layers;
  st.kv_heads = m.cfg.kv_heads;
  st.head_dim = m.cfg.head_dim;
  st.heads.reserve(m.stores.size());
  for (const TokenStore* s : m.stores) {
    st.heads.push_back({s->size(), s->bytes(), s->seen(), s->outlier_bytes()});
    st.outlier_bytes += st.heads.back().outlier_bytes;
    st.total_tokens += s->size();
    st.total_bytes += s->bytes();
    st.total_seen += s->seen();
  }
  st.shared_bytes = m.shared.bytes;
  st.total_bytes += st.shared_bytes;
  for (const auto& [path, cb] : m.codebooks) st.codebook_bytes += static_cast<std::int64_t>(cb->data().size() * sizeof(float));
  if (st.total_tokens > 0) {
    st.bits_per_value = static_cast<double>(st.total_bytes) * 8.0 /
                        (static_cast<double>(st.total_tokens) * m.cfg.head_dim * 2.0);
    st.ratio_vs_f32 = 32.0 / st.bits_per_value;
  }
  if (st.total_seen > 0) {
    st.kept = static_cast<double>(st.total_tokens) / static_cast<double>(st.total_seen);
    if (st.total_bytes > 0)
      st.ratio_seen = static_cast<double>(st.total_seen) * m.cfg.head_dim * 2.0 * 4.0 / static_cast<double>(st.total_bytes);
  }
  return st;
}

std::int64_t KVCache::tokens(int layer, int kv_head) const { return checked_store(layer, kv_head).size(); }

std::vector<std::int64_t> KVCache::positions(int layer, int kv_head) const {
  return checked_store(layer, kv_head).positions();
}

std::string KVCache::recipe_for(int layer, int kv_head) const {
  return checked_store(layer, kv_head).pipeline().text;
}

void KVCache::reset() {
  for (TokenStore* s : impl().stores) s->reset();
}

void KVCache::flush() {
  Impl& m = impl();
  for (TokenStore* s : m.stores) s->flush(*m.kt);
}

void KVCache::save(std::ostream& os) {
  Impl& m = impl();
  flush();
  const detail::CacheParts parts{m.cfg, *m.kt, m.stores, m.shared, m.codebooks, m.rope.get()};
  detail::save_cache(parts, os);
}

void KVCache::load(std::istream& is) {
  Impl& m = impl();
  detail::CacheParts parts{m.cfg, *m.kt, m.stores, m.shared, m.codebooks, m.rope.get()};
  detail::load_cache(parts, is);
}

TokenStore& KVCache::checked_store(int layer, int kv_head) const {
  const Impl& m = impl();
  m.check_layer(layer);
  m.check_head(kv_head);
  return m.at(layer, kv_head);
}

TokenStore& KVCache::store(int layer, int kv_head) { return checked_store(layer, kv_head); }
const TokenStore& KVCache::store(int layer, int kv_head) const { return checked_store(layer, kv_head); }

}  // namespace kvslim
