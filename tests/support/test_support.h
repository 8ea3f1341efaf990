// Shared test helpers: where ../shared is, and a skip macro with a clear message (a failure
// in CI, so a CI run without the shared data cannot pass).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kvslim/error.h"
#include "kvslim/testing/synthetic.h"

namespace kvslim::test {

/// ../shared (or $KVSLIM_SHARED if set).
std::string shared_dir();
/// shared_dir() + "/" + rel.
std::string shared_path(const std::string& rel);
/// True if the path exists.
bool exists(const std::string& path);
/// True when running in CI: $CI is set to anything but "", "0", "false" or "no"
/// (GitHub Actions, GitLab and most others set CI=true).
bool in_ci();

}  // namespace kvslim::test

/// Skip the current test with a message naming the missing shared file or directory. In CI
/// (see in_ci()) a missing file fails the test instead: CI must not go green without data.
#define KVSLIM_REQUIRE_SHARED(rel)                                                                \
  do {                                                                                            \
    const std::string kvslim_p_ = ::kvslim::test::shared_path(rel);                               \
    if (!::kvslim::test::exists(kvslim_p_)) {                                                     \
      if (::kvslim::test::in_ci())                                                                \
        GTEST_FAIL() << "shared file missing: " << kvslim_p_                                      \
                     << " (CI is set, so this is a failure, not a skip; set KVSLIM_SHARED to the " \
                        "directory holding models/ and data/)";                                   \
      GTEST_SKIP() << "shared file missing: " << kvslim_p_                                        \
                   << " (set KVSLIM_SHARED to the directory holding models/ and data/)";          \
    }                                                                                             \
  } while (0)

namespace kvslim::test {

/// Exact softmax attention in double precision for one query row:
/// out[c] = sum_j softmax_j(scale * q.k_j + log_w_j) v_j[c]; k, v are [ntok][d] rows with
/// row stride `stride`; probs (optional) receives the ntok probabilities.
void ref_attention(const float* q, const float* k, const float* v, long ntok, int d, long stride, double scale,
                   float* out, double* probs = nullptr, const float* log_w = nullptr);

/// n * d standard normal floats from rng (n rows of d).
std::vector<float> random_rows(std::mt19937& rng, int n, int d);

/// f() must throw kvslim::Error with `code` and a message containing every one of `parts`.
void expect_error(const std::function<void()>& f, ErrorCode code, const std::vector<std::string>& parts);

/// One synthetic layer decoded token by token through a KVCache built from `recipe` (append
/// one token, attend its queries): the mean over queries t >= first_scored and every query head
/// of the relative L2 error against exact double-precision attention over every token, and
/// the cache's total bytes at the end.
struct DecodeRun {
  double error = 0.0;
  std::int64_t bytes = 0;
};
DecodeRun synthetic_decode(const kvslim::testing::SyntheticLayer& L, const std::string& recipe, int first_scored);

/// "@" + path (a --recipe @FILE argument), built without GCC 12's -Wrestrict false positive
/// on string literal + std::string.
std::string at_file(const std::string& path);

/// Relative L2 error ||a - b|| / ||b|| over n floats.
double rel_l2(const float* a, const float* b, long n);

/// Exit status (-1 if it did not exit normally) and captured stdout of a shell command.
struct RunResult {
  int status = -1;
  std::string out;
};
/// Runs `exe args...` (each shell-quoted) with `redirect` appended (" 2>&1": stdout + stderr;
/// " 2>/dev/null": stdout only; " 2>&1 >/dev/null": stderr only). stderr is never a terminal.
RunResult run_command(const std::string& exe, const std::vector<std::string>& args, const char* redirect);

}  // namespace kvslim::test
