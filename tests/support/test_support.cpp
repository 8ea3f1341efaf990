#include "test_support.h"

#include <cstdlib>
#include <cmath>
#include <filesystem>

#include "kvslim/kvslim.h"

namespace kvslim::test {

std::string shared_dir() {
  if (const char* env = std::getenv("KVSLIM_SHARED"); env && *env) return env;
  return KVSLIM_SHARED_DIR;
}
std::string shared_path(const std::string& rel) { return shared_dir() + "/" + rel; }
bool exists(const std::string& path) {
  std::error_code ec;
  return std::filesystem::exists(path, ec);
}
bool in_ci() {
  const char* env = std::getenv("CI");
  if (!env) return false;
  const std::string v = env;
  return !(v.empty() || v == "0" || v == "false" || v == "FALSE" || v == "False" || v == "no");
}

}  // namespace kvslim::test

#include <cmath>
#include <vector>

namespace kvslim::test {

void ref_attention(const float* q, const float* k, const float* v, long ntok, int d, long stride, double scale,
                   float* out, double* probs, const float* log_w) {
  std::vector<double> s(static_cast<std::size_t>(ntok));
  double mx = -INFINITY;
  for (long j = 0; j < ntok; ++j) {
    double acc = 0.0;
    for (int c = 0; c < d; ++c) acc += static_cast<double>(q[c]) * k[j * stride + c];
    s[j] = acc * scale + (log_w ? log_w[j] : 0.0);
    mx = std::max(mx, s[j]);
  }
  double sum = 0.0;
  for (long j = 0; j < ntok; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  for (int c = 0; c < d; ++c) {
    double acc = 0.0;
    for (long j = 0; j < ntok; ++j) acc += s[j] * v[j * stride + c];
    out[c] = static_cast<float>(acc / sum);
  }
  if (probs)
    for (long j = 0; j < ntok; ++j) probs[j] = s[j] / sum;
}

double rel_l2(const float* a, const float* b, long n) {
  double e = 0.0, r = 0.0;
  for (long i = 0; i < n; ++i) {
    e += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    r += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(e / std::max(r, 1e-300));
}

}  // namespace kvslim::test

#include <sys/wait.h>

#include <cstdio>

namespace kvslim::test {

namespace {
std::string quote_arg(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}
}  // namespace

RunResult run_command(const std::string& exe, const std::vector<std::string>& args, const char* redirect) {
  std::string cmd = quote_arg(exe);
  for (const auto& a : args) cmd += ' ' + quote_arg(a);
  cmd += redirect;
  RunResult r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

std::string at_file(const std::string& path) {
  std::string s(1, '@');
  s.append(path);
  return s;
}

std::vector<float> random_rows(std::mt19937& rng, int n, int d) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(static_cast<std::size_t>(n) * d);
  for (float& f : x) f = nd(rng);
  return x;
}

void expect_error(const std::function<void()>& f, ErrorCode code, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    for (const std::string& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
}

DecodeRun synthetic_decode(const kvslim::testing::SyntheticLayer& L, const std::string& recipe, int first_scored) {
  const int d = L.head_dim, T = L.tokens, g = L.q_heads / L.kv_heads;
  KVCache cache(CacheConfig{1, L.q_heads, L.kv_heads, d, T, recipe});
  std::vector<float> out(static_cast<std::size_t>(L.q_heads) * d), ref(d);
  double sum = 0.0;
  long n = 0;
  for (int t = 0; t < T; ++t) {
    Layout kv;
    kv.rank = 3;
    kv.shape = {L.kv_heads, 1, d, 0};
    kv.strides = {static_cast<std::int64_t>(T) * d, d, 1, 0};
    cache.append(0, TensorView<const float>(L.k.data() + static_cast<std::size_t>(t) * d, kv),
                 TensorView<const float>(L.v.data() + static_cast<std::size_t>(t) * d, kv));
    Layout ql = kv;
    ql.shape[0] = L.q_heads;
    cache.attend(0, TensorView<const float>(L.q.data() + static_cast<std::size_t>(t) * d, ql),
                 TensorView<float>(out.data(), {L.q_heads, 1, d}));
    if (t < first_scored) continue;
    for (int h = 0; h < L.q_heads; ++h) {
      ref_attention(L.q_head(h) + static_cast<std::size_t>(t) * d, L.k_head(h / g), L.v_head(h / g), t + 1, d, d,
                    1.0 / std::sqrt(d), ref.data());
      sum += rel_l2(out.data() + static_cast<std::size_t>(h) * d, ref.data(), d);
      ++n;
    }
  }
  return {n ? sum / static_cast<double>(n) : 0.0, cache.stats().total_bytes};
}

}  // namespace kvslim::test
