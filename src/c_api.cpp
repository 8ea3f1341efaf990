// The C API (include/kvslim/kvslim_c.h) over KVCache. Every entry point is noexcept and turns
// what the C++ side throws into a status code plus a thread-local message.
#include "kvslim/kvslim_c.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <exception>
#include <new>
#include <span>
#include <string>
#include <utility>

#include "kvslim/cache/kv_cache.h"
#include "kvslim/error.h"
#include "kvslim/version.h"

struct kvslim_cache {
  explicit kvslim_cache(const kvslim::CacheConfig& config) : cache(config) {}
  kvslim::KVCache cache;
};

namespace {

using kvslim::ErrorCode;

// ErrorCode -> status. The switch has no default, so an ErrorCode without a case here is a
// -Wswitch warning (an error with KVSLIM_WERROR); the static_asserts pin every code to
// ErrorCode + 1, the rule the header promises.
constexpr kvslim_status to_status(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kInvalidArgument: return KVSLIM_ERR_INVALID_ARGUMENT;
    case ErrorCode::kShapeMismatch: return KVSLIM_ERR_SHAPE_MISMATCH;
    case ErrorCode::kOutOfRange: return KVSLIM_ERR_OUT_OF_RANGE;
    case ErrorCode::kRecipe: return KVSLIM_ERR_RECIPE;
    case ErrorCode::kNonFinite: return KVSLIM_ERR_NON_FINITE;
    case ErrorCode::kPosition: return KVSLIM_ERR_POSITION;
    case ErrorCode::kCapacity: return KVSLIM_ERR_CAPACITY;
    case ErrorCode::kUnsupportedIsa: return KVSLIM_ERR_UNSUPPORTED_ISA;
    case ErrorCode::kIo: return KVSLIM_ERR_IO;
    case ErrorCode::kFormat: return KVSLIM_ERR_FORMAT;
    case ErrorCode::kInvalidState: return KVSLIM_ERR_INVALID_STATE;
    case ErrorCode::kVersion: return KVSLIM_ERR_VERSION;
    case ErrorCode::kMismatch: return KVSLIM_ERR_MISMATCH;
  }
  return KVSLIM_ERR_INTERNAL;
}

constexpr ErrorCode kLastErrorCode = ErrorCode::kMismatch;  // the last enumerator of error.h
constexpr int kErrorCodes = static_cast<int>(kLastErrorCode) + 1;

constexpr bool codes_are_error_code_plus_one() {
  for (int i = 0; i < kErrorCodes; ++i)
    if (to_status(static_cast<ErrorCode>(i)) != i + 1) return false;
  return true;
}
static_assert(codes_are_error_code_plus_one(), "kvslim_c.h codes must be kvslim::ErrorCode + 1");
static_assert(to_status(ErrorCode::kInvalidArgument) == 1 && to_status(ErrorCode::kShapeMismatch) == 2 &&
              to_status(ErrorCode::kOutOfRange) == 3 && to_status(ErrorCode::kRecipe) == 4 &&
              to_status(ErrorCode::kNonFinite) == 5 && to_status(ErrorCode::kPosition) == 6 &&
              to_status(ErrorCode::kCapacity) == 7 && to_status(ErrorCode::kUnsupportedIsa) == 8 &&
              to_status(ErrorCode::kIo) == 9 && to_status(ErrorCode::kFormat) == 10 &&
              to_status(ErrorCode::kInvalidState) == 11 && to_status(ErrorCode::kVersion) == 12 &&
              to_status(ErrorCode::kMismatch) == 13);
static_assert(kErrorCodes < KVSLIM_ERR_NULL_ARGUMENT, "ErrorCode values would collide with the C-only codes");

// The first version of each struct: a caller's struct_size must be at least this.
constexpr std::size_t kConfigV1Size = offsetof(kvslim_config, rope_scaling) + sizeof(double);
constexpr std::size_t kStatsV1Size = offsetof(kvslim_cache_stats, outlier_bytes) + sizeof(std::int64_t);
static_assert(kConfigV1Size == sizeof(kvslim_config) && kStatsV1Size == sizeof(kvslim_cache_stats),
              "a field was added: keep the V1 sizes, copy only the fields struct_size covers");
// A struct_size beyond this is taken for an uninitialized struct, not a future version.
constexpr std::size_t kMaxStructSize = 4096;

// The calling thread's latest message: t_error points into t_message, or at a literal when
// even the message could not be allocated.
thread_local std::string t_message;
thread_local const char* t_error = "";

void clear_error() noexcept { t_error = ""; }

void set_error(const char* function, const char* what) noexcept {
  try {
    t_message.assign(function);
    t_message.append(": ");
    t_message.append(what);
    t_error = t_message.c_str();
  } catch (...) {
    t_error = "kvslim: out of memory while storing an error message";
  }
}

// A NULL pointer argument; the message names it.
struct NullArgument {
  const char* name;
};

template <class P>
P* require(P* p, const char* name) {
  if (p == nullptr) throw NullArgument{name};
  return p;
}

// Runs f, mapping every exception to a status; the message is prefixed with the function.
template <class F>
kvslim_status guarded(const char* function, F&& f) noexcept {
  try {
    std::forward<F>(f)();
    clear_error();
    return KVSLIM_OK;
  } catch (const NullArgument& e) {
    try {
      set_error(function, fmt::format("argument '{}' is NULL", e.name).c_str());
    } catch (...) {
      set_error(function, "a pointer argument is NULL");
    }
    return KVSLIM_ERR_NULL_ARGUMENT;
  } catch (const kvslim::Error& e) {
    set_error(function, e.what());
    return to_status(e.code());
  } catch (const std::bad_alloc&) {
    set_error(function, "out of memory");
    return KVSLIM_ERR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    set_error(function, e.what());
    return KVSLIM_ERR_INTERNAL;
  } catch (...) {
    set_error(function, "unknown exception");
    return KVSLIM_ERR_INTERNAL;
  }
}

[[noreturn]] void invalid(std::string message) { throw kvslim::Error(ErrorCode::kInvalidArgument, message); }

// Checks a caller's struct_size against the first version's size: too small is an
// uninitialized or foreign struct, bytes past the fields this library knows must be zero.
void check_struct_size(const void* s, std::size_t size, std::size_t v1_size, std::size_t known_size, const char* what,
                       bool trailing_must_be_zero) {
  if (size < v1_size || size > kMaxStructSize)
    invalid(fmt::format("{}->struct_size = {} is not a valid size (this library's {} is {} bytes; initialize it "
                        "with sizeof({}){})",
                        what, size, what, known_size, what, trailing_must_be_zero ? " or kvslim_config_init" : ""));
  if (trailing_must_be_zero) {
    const auto* bytes = static_cast<const unsigned char*>(s);
    for (std::size_t i = known_size; i < size; ++i)
      if (bytes[i] != 0)
        invalid(fmt::format("{} sets fields this library ({}) does not know (byte {} of {} is nonzero)", what,
                            kvslim::kVersion, i, size));
  }
}

// The defaults of kvslim_config_init, in a struct of `size` bytes (size >= kConfigV1Size).
void init_config(kvslim_config* cfg, std::size_t size) noexcept {
  std::memset(static_cast<void*>(cfg), 0, size);
  cfg->struct_size = size;
  cfg->recipe = nullptr;
  cfg->threads = 1;
  cfg->non_finite = KVSLIM_NON_FINITE_REJECT;
  cfg->rope_theta = 10000.0;
  cfg->rope_scaling = 1.0;
}

kvslim::CacheConfig to_cpp(const kvslim_config* cfg) {
  check_struct_size(cfg, cfg->struct_size, kConfigV1Size, sizeof(kvslim_config), "kvslim_config", true);
  kvslim_config c;
  init_config(&c, sizeof c);
  std::memcpy(&c, cfg, std::min(cfg->struct_size, sizeof c));
  kvslim::CacheConfig out;
  out.layers = c.layers;
  out.q_heads = c.q_heads;
  out.kv_heads = c.kv_heads;
  out.head_dim = c.head_dim;
  out.max_tokens = c.max_tokens;
  out.recipe = c.recipe ? c.recipe : "f32";
  out.threads = c.threads;
  switch (c.non_finite) {
    case KVSLIM_NON_FINITE_REJECT: out.non_finite = kvslim::NonFinitePolicy::kReject; break;
    case KVSLIM_NON_FINITE_ALLOW: out.non_finite = kvslim::NonFinitePolicy::kAllow; break;
    default:
      invalid(fmt::format("kvslim_config.non_finite = {} must be KVSLIM_NON_FINITE_REJECT ({}) or "
                          "KVSLIM_NON_FINITE_ALLOW ({})",
                          c.non_finite, static_cast<int>(KVSLIM_NON_FINITE_REJECT),
                          static_cast<int>(KVSLIM_NON_FINITE_ALLOW)));
  }
  out.pre_rope_keys = c.pre_rope_keys != 0;
  if (out.pre_rope_keys) {
    kvslim::RopeSpec r;
    r.theta = c.rope_theta;
    r.rotary_dims = c.rope_rotary_dims;
    r.interleaved = c.rope_interleaved != 0;
    r.scaling = c.rope_scaling;
    out.rope = r;
  }
  return out;
}

}  // namespace

extern "C" {

kvslim_status kvslim_config_init_size(kvslim_config* cfg, size_t size) {
  return guarded("kvslim_config_init", [&] {
    require(cfg, "cfg");
    if (size < kConfigV1Size || size > kMaxStructSize)
      invalid(fmt::format("size {} is not a valid kvslim_config size (this library's is {} bytes)", size,
                          sizeof(kvslim_config)));
    init_config(cfg, size);
  });
}

kvslim_status(kvslim_config_init)(kvslim_config* cfg) { return kvslim_config_init_size(cfg, sizeof(kvslim_config)); }

kvslim_status kvslim_cache_create(const kvslim_config* cfg, kvslim_cache** out) {
  return guarded("kvslim_cache_create", [&] {
    require(out, "out");
    *out = nullptr;
    require(cfg, "cfg");
    *out = new kvslim_cache(to_cpp(cfg));
  });
}

void kvslim_cache_destroy(kvslim_cache* cache) { delete cache; }

kvslim_status kvslim_append(kvslim_cache* cache, int layer, const float* k, const float* v, int64_t n_tokens,
                            const int64_t* positions) {
  return guarded("kvslim_append", [&] {
    require(cache, "cache");
    require(k, "k");
    require(v, "v");
    const kvslim::CacheConfig& c = cache->cache.config();
    using View = kvslim::TensorView<const float>;
    std::span<const std::int64_t> pos;
    if (positions != nullptr && n_tokens > 0) pos = {positions, static_cast<std::size_t>(n_tokens)};
    cache->cache.append(layer, View(k, {c.kv_heads, n_tokens, c.head_dim}), View(v, {c.kv_heads, n_tokens, c.head_dim}),
                        pos);
  });
}

kvslim_status kvslim_attend(kvslim_cache* cache, int layer, const float* q, int64_t n_queries, float* out,
                            float scale) {
  return guarded("kvslim_attend", [&] {
    require(cache, "cache");
    require(q, "q");
    require(out, "out");
    const kvslim::CacheConfig& c = cache->cache.config();
    kvslim::AttendOptions options;
    options.scale = scale;
    cache->cache.attend(layer, kvslim::TensorView<const float>(q, {c.q_heads, n_queries, c.head_dim}),
                        kvslim::TensorView<float>(out, {c.q_heads, n_queries, c.head_dim}), options);
  });
}

kvslim_status kvslim_flush(kvslim_cache* cache) {
  return guarded("kvslim_flush", [&] { require(cache, "cache")->cache.flush(); });
}

kvslim_status kvslim_stats(const kvslim_cache* cache, kvslim_cache_stats* out) {
  return guarded("kvslim_stats", [&] {
    require(cache, "cache");
    require(out, "out");
    check_struct_size(out, out->struct_size, kStatsV1Size, sizeof(kvslim_cache_stats), "kvslim_cache_stats", false);
    const kvslim::CacheStats st = cache->cache.stats();
    kvslim_cache_stats s{};
    s.struct_size = out->struct_size;
    s.total_bytes = st.total_bytes;
    s.shared_bytes = st.shared_bytes;
    s.total_tokens = st.total_tokens;
    s.total_seen = st.total_seen;
    s.bits_per_value = st.bits_per_value;
    s.ratio_vs_f32 = st.ratio_vs_f32;
    s.ratio_seen = st.ratio_seen;
    s.kept = st.kept;
    s.codebook_bytes = st.codebook_bytes;
    s.outlier_bytes = st.outlier_bytes;
    std::memcpy(static_cast<void*>(out), &s, std::min(out->struct_size, sizeof s));
  });
}

kvslim_status kvslim_tokens(const kvslim_cache* cache, int layer, int kv_head, int64_t* out) {
  return guarded("kvslim_tokens", [&] {
    require(cache, "cache");
    require(out, "out");
    *out = cache->cache.tokens(layer, kv_head);
  });
}

kvslim_status kvslim_save(kvslim_cache* cache, const char* path) {
  return guarded("kvslim_save", [&] {
    require(cache, "cache");
    require(path, "path");
    cache->cache.save(std::string(path));
  });
}

kvslim_status kvslim_load(kvslim_cache* cache, const char* path) {
  return guarded("kvslim_load", [&] {
    require(cache, "cache");
    require(path, "path");
    cache->cache.load(std::string(path));
  });
}

kvslim_status kvslim_reset(kvslim_cache* cache) {
  return guarded("kvslim_reset", [&] { require(cache, "cache")->cache.reset(); });
}

const char* kvslim_last_error(void) { return t_error; }

const char* kvslim_status_name(kvslim_status status) {
  if (status == KVSLIM_OK) return "ok";
  if (status >= 1 && status <= kErrorCodes) return kvslim::error_code_name(static_cast<ErrorCode>(status - 1));
  switch (status) {
    case KVSLIM_ERR_NULL_ARGUMENT: return "null_argument";
    case KVSLIM_ERR_OUT_OF_MEMORY: return "out_of_memory";
    case KVSLIM_ERR_INTERNAL: return "internal";
    default: return "unknown";
  }
}

const char* kvslim_version(void) { return kvslim::kVersion; }

}  // extern "C"
