/* kvslim C API: a compressed KV cache for engines written in C, Rust, Go, ... (C99).
 *
 *   kvslim_config cfg;
 *   kvslim_config_init(&cfg);
 *   cfg.layers = 32; cfg.q_heads = 32; cfg.kv_heads = 8; cfg.head_dim = 128;
 *   cfg.max_tokens = 32768;
 *   cfg.recipe = "kivi:kbits=2,vbits=2,group=32,residual=128";
 *   kvslim_cache* cache = NULL;
 *   if (kvslim_cache_create(&cfg, &cache) != KVSLIM_OK)
 *     fprintf(stderr, "kvslim: %s\n", kvslim_last_error());
 *   // per layer, for a prefill chunk or one decode token:
 *   kvslim_append(cache, layer, k, v, n, NULL);          // k, v: [kv_heads][n][head_dim]
 *   kvslim_attend(cache, layer, q, n, out, 0.0f);        // q, out: [q_heads][n][head_dim]
 *   kvslim_cache_destroy(cache);
 *
 * The same library as the C++ API (kvslim/cache/kv_cache.h, which documents the semantics
 * of every call in detail); this header includes no C++ and needs only a C99 compiler.
 *
 * Errors. Every function except kvslim_cache_destroy, kvslim_last_error, kvslim_status_name
 * and kvslim_version returns a kvslim_status: KVSLIM_OK (0) or an error code. Outputs are
 * written through pointer arguments, and only on success (kvslim_cache_create also sets
 * *out to NULL on failure). No C++ exception ever crosses this interface.
 * kvslim_last_error() is the message of the calling thread's latest call: it names the bad
 * value and what was expected, and is "" after a call that succeeded.
 *
 * Ownership. kvslim_cache_create allocates a cache that the caller owns and frees with
 * kvslim_cache_destroy. The config, its recipe string, and every buffer passed to a call are
 * only read during the call (the cache keeps copies of what it needs). Strings returned by
 * the library are never freed by the caller: kvslim_last_error's is valid until the calling
 * thread's next kvslim call, kvslim_status_name's and kvslim_version's forever.
 *
 * Threads. One cache holds one sequence. kvslim_append and kvslim_attend on *different*
 * layers of one cache may run concurrently; calls on the same layer must not, and
 * kvslim_flush, kvslim_stats, kvslim_save, kvslim_load, kvslim_reset and
 * kvslim_cache_destroy must not run concurrently with any other call on that cache.
 * Different caches are independent. With config.threads > 1, kvslim_attend shares its work
 * with worker threads that the cache starts at creation and joins at destruction.
 *
 * ABI growth. kvslim_config and kvslim_cache_stats begin with struct_size; new fields are
 * only ever added at the end. The library reads and writes only the first struct_size bytes
 * (fields it does not know are zero-initialized by kvslim_config_init and must stay zero). */
#ifndef KVSLIM_KVSLIM_C_H
#define KVSLIM_KVSLIM_C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* KVSLIM_OK, or an error code. Codes 1-13 are kvslim::ErrorCode (C++) + 1. */
typedef int kvslim_status;

enum {
  KVSLIM_OK = 0,
  KVSLIM_ERR_INVALID_ARGUMENT = 1, /* a value out of its allowed range (bits, group, threads, ...) */
  KVSLIM_ERR_SHAPE_MISMATCH = 2,   /* a token count does not fit the cache or the latest append */
  KVSLIM_ERR_OUT_OF_RANGE = 3,     /* layer or head index out of range */
  KVSLIM_ERR_RECIPE = 4,           /* unknown recipe stage or key, malformed recipe string */
  KVSLIM_ERR_NON_FINITE = 5,       /* NaN or Inf in appended keys/values (non_finite = REJECT) */
  KVSLIM_ERR_POSITION = 6,         /* token positions going backwards or repeating */
  KVSLIM_ERR_CAPACITY = 7,         /* cache full (max_tokens), budget larger than capacity */
  KVSLIM_ERR_UNSUPPORTED_ISA = 8,  /* KVSLIM_ISA asks for an instruction set this CPU lacks */
  KVSLIM_ERR_IO = 9,               /* file could not be opened, read or written */
  KVSLIM_ERR_FORMAT = 10,          /* corrupted, truncated or unknown file contents */
  KVSLIM_ERR_INVALID_STATE = 11,   /* the cache cannot take this call now */
  KVSLIM_ERR_VERSION = 12,         /* a saved cache from a newer format version */
  KVSLIM_ERR_MISMATCH = 13,        /* a saved cache whose config, recipe or codebooks differ */
  KVSLIM_ERR_NULL_ARGUMENT = 100,  /* a required pointer argument is NULL (the message names it) */
  KVSLIM_ERR_OUT_OF_MEMORY = 101,  /* an allocation failed; the call had no effect */
  KVSLIM_ERR_INTERNAL = 102        /* an unexpected failure inside the library (a bug: report it) */
};

/* kvslim_config.non_finite: what kvslim_append does with NaN or Inf in keys/values. */
enum {
  KVSLIM_NON_FINITE_REJECT = 0, /* fail with KVSLIM_ERR_NON_FINITE naming head, token, channel */
  KVSLIM_NON_FINITE_ALLOW = 1   /* store as given (lossy codecs may then produce NaN) */
};

/* Shape of a cache and the recipe that compresses it. Initialize with kvslim_config_init,
 * then set the fields. Meaning and limits of each field: kvslim/cache/config.h. */
typedef struct kvslim_config {
  size_t struct_size;   /* sizeof(kvslim_config); set by kvslim_config_init */
  int layers;           /* transformer layers, >= 1 */
  int q_heads;          /* query heads per layer, a multiple of kv_heads */
  int kv_heads;         /* key/value heads per layer, >= 1 (GQA/MQA: q_heads / kv_heads per kv head) */
  int head_dim;         /* channels per head, 1-4096 */
  int64_t max_tokens;   /* most tokens one (layer, kv head) may hold, >= 1 */
  const char* recipe;   /* e.g. "f16", "kivi:kbits=2,vbits=2"; NULL = "f32" (docs/recipes.md) */
  int threads;          /* threads kvslim_attend may use, 1-256 (default 1: never starts one) */
  int non_finite;       /* KVSLIM_NON_FINITE_REJECT (default) or KVSLIM_NON_FINITE_ALLOW */
  /* Pre-RoPE key caching (KVQuant): nonzero = kvslim_append takes keys before RoPE and
   * attention rotates them by the rope_* fields below, which are used only then. */
  int pre_rope_keys;
  double rope_theta;    /* RoPE base, > 1 (default 10000) */
  int rope_rotary_dims; /* channels rotated, even and <= head_dim; 0 (default) = head_dim */
  int rope_interleaved; /* nonzero: pairs (2i, 2i+1); 0 (default): pairs (i, i + rotary_dims/2) */
  double rope_scaling;  /* linear position scaling, > 0 (default 1) */
} kvslim_config;

/* Memory and token totals of a cache (kvslim::CacheStats). Set struct_size to
 * sizeof(kvslim_cache_stats) before calling kvslim_stats. */
typedef struct kvslim_cache_stats {
  size_t struct_size;
  int64_t total_bytes;    /* bytes allocated now: every head's plus shared_bytes */
  int64_t shared_bytes;   /* allocated by the cache itself, not by one head */
  int64_t total_tokens;   /* tokens held now, summed over layers and kv heads */
  int64_t total_seen;     /* tokens appended since creation / reset, evicted ones included */
  double bits_per_value;  /* total_bytes * 8 / (total_tokens * head_dim * 2), metadata included; 0 if empty */
  double ratio_vs_f32;    /* 32 / bits_per_value: vs an f32 cache of the same tokens; 0 if empty */
  double ratio_seen;      /* vs an f32 cache of every token seen (eviction counts); 0 if empty */
  double kept;            /* total_tokens / total_seen; 0 if nothing seen */
  int64_t codebook_bytes; /* codebooks the cq stages read (not in total_bytes) */
  int64_t outlier_bytes;  /* of total_bytes: kivi outlier side lists */
} kvslim_cache_stats;

/* A cache: opaque, created by kvslim_cache_create, freed by kvslim_cache_destroy. */
typedef struct kvslim_cache kvslim_cache;

/* Default config: struct_size set, shape fields 0 (to be set), recipe NULL ("f32"),
 * threads 1, non_finite REJECT, pre_rope_keys 0, rope_theta 10000, rope_scaling 1, other
 * fields 0. kvslim_config_init_size(cfg, size) does the same for a struct of `size` bytes,
 * for bindings that cannot use the macro below (size >= the size of this version's struct). */
kvslim_status kvslim_config_init_size(kvslim_config* cfg, size_t size);
kvslim_status kvslim_config_init(kvslim_config* cfg);
/* C callers get the size their own header knows, so a newer library never writes past it. */
#define kvslim_config_init(cfg) kvslim_config_init_size((cfg), sizeof(kvslim_config))

/* Validate the config, build every head's pipeline from the recipe and return a new cache in
 * *out (NULL on failure). Errors: INVALID_ARGUMENT, CAPACITY, RECIPE (message names the bad
 * field, value or recipe key), NULL_ARGUMENT, OUT_OF_MEMORY. */
kvslim_status kvslim_cache_create(const kvslim_config* cfg, kvslim_cache** out);

/* Free a cache and join its worker threads. NULL is fine (does nothing). */
void kvslim_cache_destroy(kvslim_cache* cache);

/* Append n_tokens tokens to a layer (1 for decode, more for a prefill chunk).
 *   k, v       [kv_heads][n_tokens][head_dim] floats, contiguous (post-RoPE keys unless
 *              pre_rope_keys)
 *   positions  NULL = continue from the layer's last position + 1 (0 first); or n_tokens
 *              strictly increasing positions, greater than the layer's last one
 * A call that fails adds nothing. Errors: OUT_OF_RANGE (layer), SHAPE_MISMATCH
 * (n_tokens < 1), POSITION, CAPACITY, NON_FINITE, NULL_ARGUMENT. */
kvslim_status kvslim_append(kvslim_cache* cache, int layer, const float* k, const float* v,
                            int64_t n_tokens, const int64_t* positions);

/* Attention of n_queries queries, the last n_queries tokens of the layer's latest append
 * (causal within the chunk), against everything the layer holds.
 *   q    [q_heads][n_queries][head_dim] floats, contiguous, post-RoPE, unscaled
 *   out  [q_heads][n_queries][head_dim] floats, contiguous, written
 *   scale  softmax scale; 0 = 1 / sqrt(head_dim)
 * Then seals complete pages and runs the recipe's eviction (as the C++ attend()).
 * Errors: OUT_OF_RANGE, SHAPE_MISMATCH (more queries than the latest append's tokens),
 * INVALID_ARGUMENT (scale), NON_FINITE, NULL_ARGUMENT. */
kvslim_status kvslim_attend(kvslim_cache* cache, int layer, const float* q, int64_t n_queries,
                            float* out, float scale);

/* For engines that append without attending through kvslim: run eviction and seal pages in
 * every layer, as kvslim_attend does after attention. Idempotent. */
kvslim_status kvslim_flush(kvslim_cache* cache);

/* Totals of the cache into *out; out->struct_size must be set (sizeof(kvslim_cache_stats)). */
kvslim_status kvslim_stats(const kvslim_cache* cache, kvslim_cache_stats* out);

/* Tokens held by one (layer, kv head) into *out. Errors: OUT_OF_RANGE, NULL_ARGUMENT. */
kvslim_status kvslim_tokens(const kvslim_cache* cache, int layer, int kv_head, int64_t* out);

/* Write everything the cache holds, compressed as stored, to a file (docs/formats.md); runs
 * kvslim_flush first. Errors: IO, NULL_ARGUMENT. */
kvslim_status kvslim_save(kvslim_cache* cache, const char* path);

/* Replace the cache's contents with a saved cache's. The file's config and recipe must equal
 * the cache's (threads may differ). Everything is checked before anything is replaced: on
 * failure the cache is as it was. Errors: IO (cannot open or read), FORMAT (bad magic,
 * truncation, checksum), VERSION (a newer format), MISMATCH (names the first field that
 * differs), NULL_ARGUMENT. */
kvslim_status kvslim_load(kvslim_cache* cache, const char* path);

/* Drop every token; keep configuration and pipelines. */
kvslim_status kvslim_reset(kvslim_cache* cache);

/* The calling thread's latest error message, "" if its latest kvslim call succeeded (or it
 * made none). Valid until the thread's next kvslim call; never NULL; do not free. */
const char* kvslim_last_error(void);

/* Stable lowercase name of a status: "ok", "invalid_argument", ..., "null_argument",
 * "out_of_memory", "internal"; "unknown" for any other value. Never NULL. */
const char* kvslim_status_name(kvslim_status status);

/* Library version, e.g. "0.1.0". */
const char* kvslim_version(void);

#ifdef __cplusplus
}
#endif

#endif /* KVSLIM_KVSLIM_C_H */
