/* The C API (kvslim/kvslim_c.h), from C: a C99 program, no C++ and no test framework, so
 * that it also builds against an installed kvslim (tests/install, find_package and
 * pkg-config) exactly as an engine written in C would.
 *
 * Covered: config validation (codes and messages that name the bad value, struct_size),
 * recipe errors, append/attend against a double-precision causal GQA attention computed
 * here (f32: 1e-4, the float accumulation of a 16-channel dot product and a softmax over
 * < 64 tokens is ~1e-6, so 1e-4 leaves room for any summation order; 4-bit KIVI: 0.1, see
 * kKiviTolerance), pre-RoPE keys against a RoPE applied here, stats, every error code the
 * calls can produce, NULL arguments, save -> load -> bit-identical attention and a file saved
 * again with the same bytes, failed loads leaving the cache as it was, and that
 * kvslim_last_error is per thread.
 *
 * Usage: c_api_test [DIR]: save files go to DIR (default: $TMPDIR, else /tmp). */
#define _POSIX_C_SOURCE 200809L

#include <kvslim/kvslim_c.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int g_checks = 0;
static int g_failures = 0;

#define CHECK(cond)                                                                                  \
  do {                                                                                               \
    ++g_checks;                                                                                      \
    if (!(cond)) {                                                                                   \
      fprintf(stderr, "%s:%d: check failed: %s (last error: \"%s\")\n", __FILE__, __LINE__, #cond, \
              kvslim_last_error());                                                                  \
      ++g_failures;                                                                                  \
    }                                                                                                \
  } while (0)

/* Runs a call and checks its status; the message is printed on a mismatch. */
#define CHECK_STATUS(call, expected)                                                                  \
  do {                                                                                                \
    const kvslim_status got_ = (call);                                                                \
    ++g_checks;                                                                                       \
    if (got_ != (expected)) {                                                                         \
      fprintf(stderr, "%s:%d: %s returned %d (%s), expected %d (%s); last error: \"%s\"\n", __FILE__, \
              __LINE__, #call, got_, kvslim_status_name(got_), (expected),                            \
              kvslim_status_name(expected), kvslim_last_error());                                     \
      ++g_failures;                                                                                   \
    }                                                                                                 \
  } while (0)

/* The latest message contains `part`. */
#define CHECK_MESSAGE(part)                                                                          \
  do {                                                                                               \
    ++g_checks;                                                                                      \
    if (strstr(kvslim_last_error(), (part)) == NULL) {                                               \
      fprintf(stderr, "%s:%d: last error \"%s\" does not contain \"%s\"\n", __FILE__, __LINE__,     \
              kvslim_last_error(), (part));                                                          \
      ++g_failures;                                                                                  \
    }                                                                                                \
  } while (0)

/* Deterministic values in [-1, 1). */
static unsigned long long g_rng = 0x9E3779B97F4A7C15ull;
static float frand(void) {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return (float)((double)(g_rng >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}
static void fill(float* x, size_t n) {
  size_t i;
  for (i = 0; i < n; ++i) x[i] = frand();
}

static void* xmalloc(size_t bytes) {
  void* p = malloc(bytes);
  if (p == NULL) {
    fprintf(stderr, "out of memory\n");
    exit(2);
  }
  return p;
}

/* ---- Reference: everything one layer was given, and attention over it in double. ---- */

typedef struct {
  int q_heads, kv_heads, d;
  int64_t cap, n;
  float* k; /* [kv_heads][cap][d], as appended */
  float* v;
  int64_t* pos; /* [cap] */
} history;

static void history_init(history* h, int q_heads, int kv_heads, int d, int64_t cap) {
  const size_t bytes = (size_t)kv_heads * (size_t)cap * (size_t)d * sizeof(float);
  h->q_heads = q_heads;
  h->kv_heads = kv_heads;
  h->d = d;
  h->cap = cap;
  h->n = 0;
  h->k = (float*)xmalloc(bytes);
  h->v = (float*)xmalloc(bytes);
  h->pos = (int64_t*)xmalloc((size_t)cap * sizeof(int64_t));
}
static void history_free(history* h) {
  free(h->k);
  free(h->v);
  free(h->pos);
}

/* k, v: [kv_heads][n][d]; positions NULL = continue. */
static void history_append(history* h, const float* k, const float* v, int64_t n, const int64_t* positions) {
  int head;
  int64_t t;
  const size_t d = (size_t)h->d;
  if (h->n + n > h->cap) {
    fprintf(stderr, "history capacity exceeded\n");
    exit(2);
  }
  for (head = 0; head < h->kv_heads; ++head)
    for (t = 0; t < n; ++t) {
      const size_t src = ((size_t)head * (size_t)n + (size_t)t) * d;
      const size_t dst = ((size_t)head * (size_t)h->cap + (size_t)(h->n + t)) * d;
      memcpy(h->k + dst, k + src, d * sizeof(float));
      memcpy(h->v + dst, v + src, d * sizeof(float));
    }
  for (t = 0; t < n; ++t)
    h->pos[h->n + t] = positions ? positions[t] : (h->n + t == 0 ? 0 : h->pos[h->n + t - 1] + 1);
  h->n += n;
}

/* RoPE on one key row (double), as kvslim::RopeSpec describes it. */
static void rope_row(double* x, int d, int64_t position, double theta, int rotary_dims, int interleaved,
                     double scaling) {
  const int rot = rotary_dims > 0 ? rotary_dims : d;
  int i;
  for (i = 0; i < rot / 2; ++i) {
    const double freq = pow(theta, -2.0 * (double)i / (double)rot);
    const double angle = ((double)position / scaling) * freq;
    const int a = interleaved ? 2 * i : i;
    const int b = interleaved ? 2 * i + 1 : i + rot / 2;
    const double xa = x[a], xb = x[b];
    x[a] = xa * cos(angle) - xb * sin(angle);
    x[b] = xa * sin(angle) + xb * cos(angle);
  }
}

typedef struct {
  int enabled;
  double theta;
  int rotary_dims, interleaved;
  double scaling;
} rope_spec;

/* Causal attention of the last nq tokens' queries q [q_heads][nq][d] over the history, in
 * double; out [q_heads][nq][d]. scale 0 = 1/sqrt(d). */
static void reference_attend(const history* h, const float* q, int64_t nq, double scale, const rope_spec* rope,
                             double* out) {
  const int d = h->d;
  const int group = h->q_heads / h->kv_heads;
  double* logits = (double*)xmalloc((size_t)h->n * sizeof(double));
  double* key = (double*)xmalloc((size_t)d * sizeof(double));
  int qh, c;
  int64_t i, j;
  if (scale == 0.0) scale = 1.0 / sqrt((double)d);
  for (qh = 0; qh < h->q_heads; ++qh) {
    const int kvh = qh / group;
    for (i = 0; i < nq; ++i) {
      const float* qr = q + ((size_t)qh * (size_t)nq + (size_t)i) * (size_t)d;
      const int64_t visible = h->n - nq + i + 1; /* tokens 0 .. own position */
      double* o = out + ((size_t)qh * (size_t)nq + (size_t)i) * (size_t)d;
      double m = -INFINITY, sum = 0.0;
      for (j = 0; j < visible; ++j) {
        const float* kr = h->k + ((size_t)kvh * (size_t)h->cap + (size_t)j) * (size_t)d;
        double dot = 0.0;
        for (c = 0; c < d; ++c) key[c] = (double)kr[c];
        if (rope && rope->enabled)
          rope_row(key, d, h->pos[j], rope->theta, rope->rotary_dims, rope->interleaved, rope->scaling);
        for (c = 0; c < d; ++c) dot += (double)qr[c] * key[c];
        logits[j] = dot * scale;
        if (logits[j] > m) m = logits[j];
      }
      for (c = 0; c < d; ++c) o[c] = 0.0;
      for (j = 0; j < visible; ++j) {
        const float* vr = h->v + ((size_t)kvh * (size_t)h->cap + (size_t)j) * (size_t)d;
        const double p = exp(logits[j] - m);
        sum += p;
        for (c = 0; c < d; ++c) o[c] += p * (double)vr[c];
      }
      for (c = 0; c < d; ++c) o[c] /= sum;
    }
  }
  free(logits);
  free(key);
}

/* Largest |got - want| over n values. */
static double max_abs_diff(const float* got, const double* want, size_t n) {
  double worst = 0.0;
  size_t i;
  for (i = 0; i < n; ++i) {
    const double e = fabs((double)got[i] - want[i]);
    if (!(e <= worst)) worst = e; /* NaN propagates as the worst */
  }
  return worst;
}

/* ---- A small harness: one cache, one history per layer. ---- */

enum { kQHeads = 4, kKvHeads = 2, kHeadDim = 16, kLayers = 2, kMaxTokens = 256 };

static kvslim_config base_config(const char* recipe) {
  kvslim_config cfg;
  kvslim_config_init(&cfg);
  cfg.layers = kLayers;
  cfg.q_heads = kQHeads;
  cfg.kv_heads = kKvHeads;
  cfg.head_dim = kHeadDim;
  cfg.max_tokens = kMaxTokens;
  cfg.recipe = recipe;
  return cfg;
}

/* Appends n random tokens to `layer` of the cache and the history, attends n random queries
 * and returns the largest error against the reference (or -1 if a call failed). */
static double step(kvslim_cache* cache, history* h, int layer, int64_t n, const int64_t* positions, float scale,
                   const rope_spec* rope) {
  const size_t kv = (size_t)kKvHeads * (size_t)n * kHeadDim;
  const size_t qn = (size_t)kQHeads * (size_t)n * kHeadDim;
  float* k = (float*)xmalloc(kv * sizeof(float));
  float* v = (float*)xmalloc(kv * sizeof(float));
  float* q = (float*)xmalloc(qn * sizeof(float));
  float* out = (float*)xmalloc(qn * sizeof(float));
  double* ref = (double*)xmalloc(qn * sizeof(double));
  double err = -1.0;
  kvslim_status s;
  fill(k, kv);
  fill(v, kv);
  fill(q, qn);
  s = kvslim_append(cache, layer, k, v, n, positions);
  CHECK_STATUS(s, KVSLIM_OK);
  if (s == KVSLIM_OK) {
    history_append(h, k, v, n, positions);
    s = kvslim_attend(cache, layer, q, n, out, scale);
    CHECK_STATUS(s, KVSLIM_OK);
    if (s == KVSLIM_OK) {
      reference_attend(h, q, n, (double)scale, rope, ref);
      err = max_abs_diff(out, ref, qn);
    }
  }
  free(k);
  free(v);
  free(q);
  free(out);
  free(ref);
  return err;
}

/* ---- Tests ---- */

static void test_bad_config(void) {
  kvslim_config cfg = base_config("f32");
  kvslim_cache* cache = (kvslim_cache*)&cfg; /* any non-NULL value: a failed create sets NULL */
  struct {
    kvslim_config c;
    long long future_field;
  } bigger;

  cfg.head_dim = 0;
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_ERR_INVALID_ARGUMENT);
  CHECK(cache == NULL);
  CHECK_MESSAGE("kvslim_cache_create");
  CHECK_MESSAGE("head_dim = 0");

  cfg = base_config("f32");
  cfg.q_heads = 3;
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_ERR_INVALID_ARGUMENT);
  CHECK_MESSAGE("q_heads = 3");

  cfg = base_config("f32");
  cfg.layers = -2;
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_ERR_INVALID_ARGUMENT);
  CHECK_MESSAGE("layers = -2");

  cfg = base_config("f32");
  cfg.max_tokens = 0;
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_ERR_CAPACITY);
  CHECK_MESSAGE("max_tokens = 0");

  cfg = base_config("f32");
  cfg.threads = 1000;
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_ERR_INVALID_ARGUMENT);
  CHECK_MESSAGE("threads = 1000");

  cfg = base_config("f32");
  cfg.non_finite = 7;
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_ERR_INVALID_ARGUMENT);
  CHECK_MESSAGE("non_finite = 7");

  cfg = base_config("f32");
  cfg.pre_rope_keys = 1;
  cfg.rope_theta = 0.5;
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_ERR_INVALID_ARGUMENT);
  CHECK_MESSAGE("theta = 0.5");

  cfg = base_config("f32");
  cfg.pre_rope_keys = 1;
  cfg.rope_rotary_dims = 7;
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_ERR_INVALID_ARGUMENT);
  CHECK_MESSAGE("rotary_dims = 7");

  /* Recipes: an unknown key, an unknown stage, a malformed string. */
  cfg = base_config("kivi:kbits=4,bogus=1");
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_ERR_RECIPE);
  CHECK_MESSAGE("bogus");
  cfg = base_config("nosuchcodec");
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_ERR_RECIPE);
  CHECK_MESSAGE("nosuchcodec");
  cfg = base_config("kivi:kbits=4 | | f16");
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_ERR_RECIPE);
  CHECK(cache == NULL);

  /* struct_size: too small (an uninitialized struct), or a newer struct whose unknown fields
   * are set (refused) or zero (accepted). */
  cfg = base_config("f32");
  cfg.struct_size = 8;
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_ERR_INVALID_ARGUMENT);
  CHECK_MESSAGE("struct_size = 8");
  CHECK_STATUS(kvslim_config_init_size(&cfg, 4), KVSLIM_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(kvslim_config_init_size(&bigger.c, sizeof bigger), KVSLIM_OK);
  CHECK(bigger.c.struct_size == sizeof bigger && bigger.future_field == 0);
  bigger.c.layers = 1;
  bigger.c.q_heads = 2;
  bigger.c.kv_heads = 1;
  bigger.c.head_dim = 8;
  bigger.c.max_tokens = 8;
  bigger.future_field = 1;
  CHECK_STATUS(kvslim_cache_create(&bigger.c, &cache), KVSLIM_ERR_INVALID_ARGUMENT);
  CHECK_MESSAGE("does not know");
  bigger.future_field = 0;
  CHECK_STATUS(kvslim_cache_create(&bigger.c, &cache), KVSLIM_OK);
  CHECK(cache != NULL);
  kvslim_cache_destroy(cache);

  /* Defaults of kvslim_config_init. */
  cfg = base_config(NULL);
  CHECK(cfg.struct_size == sizeof(kvslim_config) && cfg.threads == 1 && cfg.recipe == NULL &&
        cfg.non_finite == KVSLIM_NON_FINITE_REJECT && cfg.pre_rope_keys == 0 && cfg.rope_theta == 10000.0 &&
        cfg.rope_scaling == 1.0 && cfg.rope_rotary_dims == 0 && cfg.rope_interleaved == 0);
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_OK); /* NULL recipe = f32 */
  CHECK(strcmp(kvslim_last_error(), "") == 0);
  kvslim_cache_destroy(cache);
}

static void test_attend_f32(void) {
  kvslim_config cfg = base_config("f32");
  kvslim_cache* cache = NULL;
  kvslim_cache_stats st;
  history h[kLayers];
  int layer, i;
  int64_t tokens = 0;
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_OK);
  if (cache == NULL) return;
  for (layer = 0; layer < kLayers; ++layer) history_init(&h[layer], kQHeads, kKvHeads, kHeadDim, kMaxTokens);
  /* A prefill chunk (causal within the chunk), then decode steps, on both layers. */
  for (layer = 0; layer < kLayers; ++layer) CHECK(step(cache, &h[layer], layer, 13, NULL, 0.0f, NULL) <= 1e-4);
  for (i = 0; i < 6; ++i)
    for (layer = 0; layer < kLayers; ++layer) CHECK(step(cache, &h[layer], layer, 1, NULL, 0.0f, NULL) <= 1e-4);
  /* Another chunk, an explicit scale. */
  CHECK(step(cache, &h[1], 1, 5, NULL, 0.3f, NULL) <= 1e-4);
  CHECK(step(cache, &h[0], 0, 5, NULL, 0.3f, NULL) <= 1e-4);

  CHECK_STATUS(kvslim_tokens(cache, 1, 1, &tokens), KVSLIM_OK);
  CHECK(tokens == 24);
  st.struct_size = sizeof st;
  CHECK_STATUS(kvslim_stats(cache, &st), KVSLIM_OK);
  CHECK(st.struct_size == sizeof st);
  CHECK(st.total_tokens == (int64_t)kLayers * kKvHeads * 24);
  CHECK(st.total_seen == st.total_tokens);
  CHECK(st.kept == 1.0);
  /* f32 pages hold every value in 32 bits, plus positions, page index and padding. */
  CHECK(st.total_bytes >= st.total_tokens * kHeadDim * 2 * 4);
  CHECK(st.bits_per_value >= 32.0 && st.bits_per_value < 64.0);
  CHECK(fabs(st.ratio_vs_f32 * st.bits_per_value - 32.0) < 1e-9);
  CHECK(st.ratio_seen > 0.5 && st.ratio_seen <= 1.0);
  CHECK(st.shared_bytes >= 0 && st.shared_bytes <= st.total_bytes);
  CHECK(st.codebook_bytes == 0 && st.outlier_bytes == 0);

  CHECK_STATUS(kvslim_flush(cache), KVSLIM_OK);
  CHECK_STATUS(kvslim_reset(cache), KVSLIM_OK);
  CHECK_STATUS(kvslim_stats(cache, &st), KVSLIM_OK);
  CHECK(st.total_tokens == 0 && st.total_seen == 0 && st.bits_per_value == 0.0);
  for (layer = 0; layer < kLayers; ++layer) {
    history_free(&h[layer]);
    history_init(&h[layer], kQHeads, kKvHeads, kHeadDim, kMaxTokens);
  }
  /* After reset, positions start again at 0, and the cache attends as a new one. */
  CHECK(step(cache, &h[0], 0, 4, NULL, 0.0f, NULL) <= 1e-4);
  for (layer = 0; layer < kLayers; ++layer) history_free(&h[layer]);
  kvslim_cache_destroy(cache);
}

/* 4-bit KIVI pages (residual=0: every complete page of 16 tokens quantized once it has
 * attended). The decode queries read quantized keys and values: with values in [-1, 1) a
 * 4-bit code's step is about 2/15 and its rounding error at most half of that, ~0.067 per
 * value; an attention output is a convex mix of values, off by at most that plus what the
 * key error does to the weights (logits move by up to ~0.067 * sum|q| / 4). The measured
 * error is 0.014; the bound 0.1 stays within that analysis and catches a wrong layout or head
 * mapping (errors of the order of the values, ~0.5). */
static const double kKiviTolerance = 0.1;

static void test_attend_kivi(void) {
  kvslim_config cfg = base_config("kivi:kbits=4,vbits=4,group=16,residual=0");
  kvslim_cache* cache = NULL;
  kvslim_cache_stats st;
  history h;
  int i;
  double worst = 0.0, e;
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_OK);
  if (cache == NULL) return;
  history_init(&h, kQHeads, kKvHeads, kHeadDim, kMaxTokens);
  /* The prefill chunk attends to itself in full precision, then is sealed into pages. */
  CHECK(step(cache, &h, 0, 48, NULL, 0.0f, NULL) <= 1e-4);
  for (i = 0; i < 40; ++i) {
    e = step(cache, &h, 0, 1, NULL, 0.0f, NULL);
    CHECK(e >= 0.0 && e <= kKiviTolerance);
    if (e > worst) worst = e;
  }
  CHECK(worst > 1e-4); /* the pages really are quantized */
  printf("kivi 4/4 decode: max |error| %.4f (bound %.2f)\n", worst, kKiviTolerance);
  st.struct_size = sizeof st;
  CHECK_STATUS(kvslim_stats(cache, &st), KVSLIM_OK);
  CHECK(st.total_tokens == 2 * 88); /* layer 0's two kv heads; layer 1 is empty */
  CHECK(st.bits_per_value > 4.0 && st.bits_per_value < 16.0);
  CHECK(st.ratio_vs_f32 > 2.0);
  printf("kivi 4/4: %.2f bits/value, %.2fx smaller than f32\n", st.bits_per_value, st.ratio_vs_f32);
  history_free(&h);
  kvslim_cache_destroy(cache);
}

/* Pre-RoPE keys: the cache rotates each key at its position with the config's rope_*
 * fields; the reference applies the same RoPE in double. Explicit positions with gaps. */
static void test_pre_rope(void) {
  kvslim_config cfg = base_config("f32");
  kvslim_cache* cache = NULL;
  history h;
  rope_spec rope;
  int64_t pos[6];
  int i, style;
  for (style = 0; style < 2; ++style) {
    cfg = base_config("f32");
    cfg.pre_rope_keys = 1;
    cfg.rope_theta = style ? 500.0 : 10000.0;
    cfg.rope_rotary_dims = style ? 8 : 0;
    cfg.rope_interleaved = style;
    cfg.rope_scaling = style ? 2.0 : 1.0;
    rope.enabled = 1;
    rope.theta = cfg.rope_theta;
    rope.rotary_dims = cfg.rope_rotary_dims;
    rope.interleaved = cfg.rope_interleaved;
    rope.scaling = cfg.rope_scaling;
    CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_OK);
    if (cache == NULL) return;
    history_init(&h, kQHeads, kKvHeads, kHeadDim, kMaxTokens);
    for (i = 0; i < 6; ++i) pos[i] = 5 + 7 * i;
    CHECK(step(cache, &h, 0, 6, pos, 0.0f, &rope) <= 1e-4);
    pos[0] = 100;
    CHECK(step(cache, &h, 0, 1, pos, 0.0f, &rope) <= 1e-4);
    CHECK(step(cache, &h, 0, 1, NULL, 0.0f, &rope) <= 1e-4); /* continues at 101 */
    history_free(&h);
    kvslim_cache_destroy(cache);
  }
}

/* Every error the calls themselves report, and that a failed append adds nothing. */
static void test_call_errors(void) {
  kvslim_config cfg = base_config("f32");
  kvslim_cache* cache = NULL;
  kvslim_cache_stats st;
  float k[kKvHeads * 3 * kHeadDim], v[kKvHeads * 3 * kHeadDim], q[kQHeads * 3 * kHeadDim],
      out[kQHeads * 3 * kHeadDim];
  int64_t pos[3] = {10, 9, 11};
  int64_t tokens = -1;
  cfg.max_tokens = 4;
  fill(k, sizeof k / sizeof k[0]);
  fill(v, sizeof v / sizeof v[0]);
  fill(q, sizeof q / sizeof q[0]);
  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_OK);
  if (cache == NULL) return;

  CHECK_STATUS(kvslim_append(cache, 2, k, v, 1, NULL), KVSLIM_ERR_OUT_OF_RANGE);
  CHECK_MESSAGE("layer 2");
  CHECK_STATUS(kvslim_append(cache, -1, k, v, 1, NULL), KVSLIM_ERR_OUT_OF_RANGE);
  CHECK_STATUS(kvslim_append(cache, 0, k, v, 0, NULL), KVSLIM_ERR_SHAPE_MISMATCH);
  CHECK_STATUS(kvslim_append(cache, 0, k, v, -5, NULL), KVSLIM_ERR_SHAPE_MISMATCH);
  CHECK_STATUS(kvslim_append(cache, 0, k, v, 3, pos), KVSLIM_ERR_POSITION);
  CHECK_MESSAGE("position 9");
  k[kHeadDim + 3] = NAN; /* kv head 0, token 1, channel 3 */
  CHECK_STATUS(kvslim_append(cache, 0, k, v, 3, NULL), KVSLIM_ERR_NON_FINITE);
  CHECK_MESSAGE("channel 3");
  k[kHeadDim + 3] = 0.5f;
  CHECK_STATUS(kvslim_tokens(cache, 0, 0, &tokens), KVSLIM_OK);
  CHECK(tokens == 0); /* nothing of the failed appends was added */

  CHECK_STATUS(kvslim_append(cache, 0, k, v, 3, NULL), KVSLIM_OK);
  CHECK(strcmp(kvslim_last_error(), "") == 0); /* success clears the message */
  CHECK_STATUS(kvslim_attend(cache, 0, q, 4, out, 0.0f), KVSLIM_ERR_SHAPE_MISMATCH);
  CHECK_STATUS(kvslim_attend(cache, 0, q, 3, out, -1.0f), KVSLIM_ERR_INVALID_ARGUMENT);
  CHECK_MESSAGE("scale -1");
  CHECK_STATUS(kvslim_attend(cache, 5, q, 3, out, 0.0f), KVSLIM_ERR_OUT_OF_RANGE);
  q[0] = INFINITY;
  CHECK_STATUS(kvslim_attend(cache, 0, q, 3, out, 0.0f), KVSLIM_ERR_NON_FINITE);
  q[0] = 0.25f;
  CHECK_STATUS(kvslim_attend(cache, 0, q, 3, out, 0.0f), KVSLIM_OK);
  CHECK_STATUS(kvslim_append(cache, 0, k, v, 2, NULL), KVSLIM_ERR_CAPACITY); /* 3 + 2 > 4 */
  CHECK_MESSAGE("max_tokens 4");
  CHECK_STATUS(kvslim_tokens(cache, 0, 2, &tokens), KVSLIM_ERR_OUT_OF_RANGE);
  CHECK_STATUS(kvslim_tokens(cache, 0, 1, &tokens), KVSLIM_OK);
  CHECK(tokens == 3);
  st.struct_size = 0;
  CHECK_STATUS(kvslim_stats(cache, &st), KVSLIM_ERR_INVALID_ARGUMENT);
  CHECK_MESSAGE("struct_size = 0");
  kvslim_cache_destroy(cache);
}

static void test_null_arguments(void) {
  kvslim_config cfg = base_config("f32");
  kvslim_cache* cache = NULL;
  kvslim_cache_stats st;
  float x[kQHeads * kHeadDim] = {0};
  int64_t n = 0;
  int s;

  CHECK_STATUS(kvslim_config_init(NULL), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_MESSAGE("'cfg'");
  CHECK_STATUS(kvslim_cache_create(NULL, &cache), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_MESSAGE("kvslim_cache_create: argument 'cfg' is NULL");
  CHECK_STATUS(kvslim_cache_create(&cfg, NULL), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_MESSAGE("'out'");
  kvslim_cache_destroy(NULL);

  CHECK_STATUS(kvslim_append(NULL, 0, x, x, 1, NULL), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_MESSAGE("kvslim_append: argument 'cache' is NULL");
  CHECK_STATUS(kvslim_attend(NULL, 0, x, 1, x, 0.0f), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_STATUS(kvslim_flush(NULL), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_STATUS(kvslim_stats(NULL, &st), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_STATUS(kvslim_tokens(NULL, 0, 0, &n), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_STATUS(kvslim_save(NULL, "x"), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_STATUS(kvslim_load(NULL, "x"), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_STATUS(kvslim_reset(NULL), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_MESSAGE("kvslim_reset");

  CHECK_STATUS(kvslim_cache_create(&cfg, &cache), KVSLIM_OK);
  if (cache == NULL) return;
  CHECK_STATUS(kvslim_append(cache, 0, NULL, x, 1, NULL), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_MESSAGE("'k'");
  CHECK_STATUS(kvslim_append(cache, 0, x, NULL, 1, NULL), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_MESSAGE("'v'");
  CHECK_STATUS(kvslim_append(cache, 0, x, x, 1, NULL), KVSLIM_OK);
  CHECK_STATUS(kvslim_attend(cache, 0, NULL, 1, x, 0.0f), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_MESSAGE("'q'");
  CHECK_STATUS(kvslim_attend(cache, 0, x, 1, NULL, 0.0f), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_MESSAGE("'out'");
  CHECK_STATUS(kvslim_stats(cache, NULL), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_STATUS(kvslim_tokens(cache, 0, 0, NULL), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_STATUS(kvslim_save(cache, NULL), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_MESSAGE("'path'");
  CHECK_STATUS(kvslim_load(cache, NULL), KVSLIM_ERR_NULL_ARGUMENT);
  CHECK_STATUS(kvslim_tokens(cache, 0, 0, &n), KVSLIM_OK);
  CHECK(n == 1); /* the NULL calls changed nothing */
  kvslim_cache_destroy(cache);

  /* Names: every code has its own, anything else is "unknown". */
  CHECK(strcmp(kvslim_status_name(KVSLIM_OK), "ok") == 0);
  CHECK(strcmp(kvslim_status_name(KVSLIM_ERR_INVALID_ARGUMENT), "invalid_argument") == 0);
  CHECK(strcmp(kvslim_status_name(KVSLIM_ERR_RECIPE), "recipe") == 0);
  CHECK(strcmp(kvslim_status_name(KVSLIM_ERR_FORMAT), "format") == 0);
  CHECK(strcmp(kvslim_status_name(KVSLIM_ERR_VERSION), "version") == 0);
  CHECK(strcmp(kvslim_status_name(KVSLIM_ERR_MISMATCH), "mismatch") == 0);
  CHECK(strcmp(kvslim_status_name(KVSLIM_ERR_NULL_ARGUMENT), "null_argument") == 0);
  CHECK(strcmp(kvslim_status_name(KVSLIM_ERR_OUT_OF_MEMORY), "out_of_memory") == 0);
  CHECK(strcmp(kvslim_status_name(KVSLIM_ERR_INTERNAL), "internal") == 0);
  for (s = 1; s <= KVSLIM_ERR_MISMATCH; ++s) CHECK(strcmp(kvslim_status_name(s), "unknown") != 0);
  CHECK(strcmp(kvslim_status_name(14), "unknown") == 0);
  CHECK(strcmp(kvslim_status_name(-1), "unknown") == 0);
  CHECK(strcmp(kvslim_status_name(99), "unknown") == 0);
  CHECK(kvslim_version() != NULL && strlen(kvslim_version()) >= 5);
}

/* ---- save / load ---- */

static char g_dir[512];

static long file_size(const char* path) {
  FILE* f = fopen(path, "rb");
  long n = -1;
  if (f == NULL) return -1;
  if (fseek(f, 0, SEEK_END) == 0) n = ftell(f);
  fclose(f);
  return n;
}

/* Copies the first `bytes` bytes of src to dst. */
static int copy_prefix(const char* src, const char* dst, long bytes) {
  FILE* in = fopen(src, "rb");
  FILE* out = fopen(dst, "wb");
  char* buf = (char*)xmalloc(bytes > 0 ? (size_t)bytes : 1);
  int ok = in && out && (bytes == 0 || fread(buf, 1, (size_t)bytes, in) == (size_t)bytes) &&
           (bytes == 0 || fwrite(buf, 1, (size_t)bytes, out) == (size_t)bytes);
  if (in) fclose(in);
  if (out && fclose(out) != 0) ok = 0;
  free(buf);
  return ok;
}

/* Appends the same random token to layer `layer` of a and b, attends the same query in both
 * and checks the outputs are bit-identical. */
static void check_same_next_token(kvslim_cache* a, kvslim_cache* b, int layer) {
  float k[kKvHeads * kHeadDim], v[kKvHeads * kHeadDim], q[kQHeads * kHeadDim];
  float out_a[kQHeads * kHeadDim], out_b[kQHeads * kHeadDim];
  fill(k, sizeof k / sizeof k[0]);
  fill(v, sizeof v / sizeof v[0]);
  fill(q, sizeof q / sizeof q[0]);
  memset(out_a, 0, sizeof out_a);
  memset(out_b, 0xff, sizeof out_b);
  CHECK_STATUS(kvslim_append(a, layer, k, v, 1, NULL), KVSLIM_OK);
  CHECK_STATUS(kvslim_append(b, layer, k, v, 1, NULL), KVSLIM_OK);
  CHECK_STATUS(kvslim_attend(a, layer, q, 1, out_a, 0.0f), KVSLIM_OK);
  CHECK_STATUS(kvslim_attend(b, layer, q, 1, out_b, 0.0f), KVSLIM_OK);
  CHECK(memcmp(out_a, out_b, sizeof out_a) == 0);
}

/* b was loaded from a's file: the same tokens; its containers are rebuilt at their size, so
 * right after the load it never allocates more than a (later they grow apart). */
static void check_same_stats(const kvslim_cache* a, const kvslim_cache* b, int just_loaded) {
  kvslim_cache_stats sa, sb;
  sa.struct_size = sizeof sa;
  sb.struct_size = sizeof sb;
  CHECK_STATUS(kvslim_stats(a, &sa), KVSLIM_OK);
  CHECK_STATUS(kvslim_stats(b, &sb), KVSLIM_OK);
  CHECK(sa.total_tokens == sb.total_tokens && sa.total_seen == sb.total_seen && sa.kept == sb.kept);
  CHECK(sa.outlier_bytes == sb.outlier_bytes);
  if (just_loaded) CHECK(sb.total_bytes <= sa.total_bytes);
}

/* Both files exist and hold the same bytes. */
static int same_file(const char* p1, const char* p2) {
  FILE* f1 = fopen(p1, "rb");
  FILE* f2 = fopen(p2, "rb");
  int same = f1 != NULL && f2 != NULL;
  while (same) {
    const int c1 = fgetc(f1), c2 = fgetc(f2);
    if (c1 != c2) same = 0;
    if (c1 == EOF || c2 == EOF) break;
  }
  if (f1) fclose(f1);
  if (f2) fclose(f2);
  return same;
}

static void test_save_load(void) {
  /* KIVI with a residual window: quantized pages, the f32 window and the open group. */
  const char* recipe = "kivi:kbits=4,vbits=2,group=16,residual=8";
  kvslim_config cfg = base_config(recipe);
  kvslim_cache *a = NULL, *b = NULL, *other = NULL;
  history ha[kLayers];
  char path[600], again[600], cut[600], missing[600];
  long size;
  int layer, i;
  kvslim_status s;
  snprintf(path, sizeof path, "%s/kvslim_c_api_test_%ld.kvs", g_dir, (long)getpid());
  snprintf(again, sizeof again, "%s/kvslim_c_api_test_%ld_again.kvs", g_dir, (long)getpid());
  snprintf(cut, sizeof cut, "%s/kvslim_c_api_test_%ld_cut.kvs", g_dir, (long)getpid());
  snprintf(missing, sizeof missing, "%s/kvslim_c_api_test_%ld_missing/none.kvs", g_dir, (long)getpid());

  CHECK_STATUS(kvslim_cache_create(&cfg, &a), KVSLIM_OK);
  CHECK_STATUS(kvslim_cache_create(&cfg, &b), KVSLIM_OK);
  if (a == NULL || b == NULL) goto done;
  for (layer = 0; layer < kLayers; ++layer) {
    history_init(&ha[layer], kQHeads, kKvHeads, kHeadDim, kMaxTokens);
    CHECK(step(a, &ha[layer], layer, 37 + layer, NULL, 0.0f, NULL) >= 0.0);
    for (i = 0; i < 3; ++i) CHECK(step(a, &ha[layer], layer, 1, NULL, 0.0f, NULL) >= 0.0);
    history_free(&ha[layer]);
  }

  s = kvslim_save(a, path);
  CHECK_STATUS(s, KVSLIM_OK);
  if (s != KVSLIM_OK) {
    fprintf(stderr, "save failed, skipping the load checks\n");
    goto done;
  }
  size = file_size(path);
  CHECK(size > 0);

  /* A round trip into a second cache: same stats, bit-identical attention on both layers. */
  s = kvslim_load(b, path);
  CHECK_STATUS(s, KVSLIM_OK);
  if (s != KVSLIM_OK) goto done;
  check_same_stats(a, b, 1);
  CHECK_STATUS(kvslim_save(b, again), KVSLIM_OK); /* saved again: the same bytes */
  CHECK(same_file(path, again));
  for (layer = 0; layer < kLayers; ++layer) check_same_next_token(a, b, layer);

  /* Failed loads leave b as it was: a truncated file (FORMAT), an empty one, a missing one
   * (IO), a file of another recipe (MISMATCH). b then still matches a bit for bit. */
  CHECK(copy_prefix(path, cut, size / 2));
  CHECK_STATUS(kvslim_load(b, cut), KVSLIM_ERR_FORMAT);
  CHECK(strlen(kvslim_last_error()) > 0);
  CHECK(copy_prefix(path, cut, size - 1));
  CHECK_STATUS(kvslim_load(b, cut), KVSLIM_ERR_FORMAT);
  CHECK(copy_prefix(path, cut, 0));
  CHECK_STATUS(kvslim_load(b, cut), KVSLIM_ERR_FORMAT);
  CHECK_STATUS(kvslim_load(b, missing), KVSLIM_ERR_IO);
  CHECK_STATUS(kvslim_save(b, missing), KVSLIM_ERR_IO);
  cfg = base_config("f16");
  CHECK_STATUS(kvslim_cache_create(&cfg, &other), KVSLIM_OK);
  if (other != NULL) {
    CHECK_STATUS(kvslim_load(other, path), KVSLIM_ERR_MISMATCH);
    CHECK_MESSAGE("chain");
  }
  check_same_stats(a, b, 0);
  for (layer = 0; layer < kLayers; ++layer) check_same_next_token(a, b, layer);

  /* Saved after a reset: an empty cache round-trips too. */
  CHECK_STATUS(kvslim_reset(a), KVSLIM_OK);
  CHECK_STATUS(kvslim_save(a, path), KVSLIM_OK);
  CHECK_STATUS(kvslim_load(b, path), KVSLIM_OK);
  check_same_stats(a, b, 1);
  check_same_next_token(a, b, 0);

done:
  remove(path);
  remove(again);
  remove(cut);
  kvslim_cache_destroy(a);
  kvslim_cache_destroy(b);
  kvslim_cache_destroy(other);
}

/* ---- kvslim_last_error is per thread ---- */

typedef struct {
  int saw_empty_first;
  int got_own_code;
  int own_message_ok;
} thread_result;

static void* other_thread(void* arg) {
  thread_result* r = (thread_result*)arg;
  kvslim_config cfg = base_config("f32");
  kvslim_cache* cache = NULL;
  r->saw_empty_first = strcmp(kvslim_last_error(), "") == 0; /* the main thread's error is not ours */
  cfg.kv_heads = 0;
  r->got_own_code = kvslim_cache_create(&cfg, &cache) == KVSLIM_ERR_INVALID_ARGUMENT;
  r->own_message_ok = strstr(kvslim_last_error(), "kv_heads = 0") != NULL;
  return NULL;
}

static void test_last_error_is_thread_local(void) {
  char mine[512];
  pthread_t t;
  thread_result r = {0, 0, 0};
  CHECK_STATUS(kvslim_reset(NULL), KVSLIM_ERR_NULL_ARGUMENT);
  snprintf(mine, sizeof mine, "%s", kvslim_last_error());
  CHECK(strlen(mine) > 0);
  CHECK(pthread_create(&t, NULL, other_thread, &r) == 0);
  CHECK(pthread_join(t, NULL) == 0);
  CHECK(r.saw_empty_first);
  CHECK(r.got_own_code);
  CHECK(r.own_message_ok);
  CHECK(strcmp(kvslim_last_error(), mine) == 0); /* the other thread's error did not replace ours */
}

int main(int argc, char** argv) {
  const char* dir = argc > 1 ? argv[1] : getenv("TMPDIR");
  setvbuf(stdout, NULL, _IONBF, 0); /* keep stdout and the failures on stderr in order */
  snprintf(g_dir, sizeof g_dir, "%s", dir && *dir ? dir : "/tmp");
  printf("kvslim %s C API test\n", kvslim_version());
  test_bad_config();
  test_attend_f32();
  test_attend_kivi();
  test_pre_rope();
  test_call_errors();
  test_null_arguments();
  test_save_load();
  test_last_error_is_thread_local();
  if (g_failures) {
    printf("%d of %d checks FAILED\n", g_failures, g_checks);
    return 1;
  }
  printf("kvslim C API ok: %d checks passed\n", g_checks);
  return 0;
}
