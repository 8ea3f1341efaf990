#include "test_support.h"

#include <cstdlib>
#include <filesystem>

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

}  // namespace kvslim::test
