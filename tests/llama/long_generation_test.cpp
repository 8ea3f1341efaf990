// The kvslim-long-generation example, run briefly as users run it: with non-evicting recipes
// (f16; KIVI-2 without a full-precision window) every progress row parses, tokens kept equal
// tokens seen (prompt + steps), bytes grow with the tokens, and the bytes-per-seen-token and
// ratio columns agree with the bytes column (to their printed digits: 0.05 B and 0.005x, plus
// slack for the cache's bookkeeping being included in both). With the default evicting recipe
// the cache must stay bounded: that test skips while the library still reports h2o as
// reserved but not implemented yet (issue 8), and checks tokens kept level off once it is.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cctype>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "llama_test_util.h"

namespace kvslim::llama {
namespace {

using kvslim::test::RunResult;

RunResult run(const std::vector<std::string>& args, const char* redirect = " 2>&1") {
  return kvslim::test::run_command(KVSLIM_LONG_GENERATION_EXE, args, redirect);
}

struct Row {
  long step = 0, seen = 0, kept = 0, bytes = 0;
  double bytes_per_seen = 0.0, ratio = 0.0;
};

/// Rows are the lines that start (after spaces) with a digit: step seen kept bytes B/seen Rx.
std::vector<Row> rows_of(const std::string& out) {
  std::vector<Row> rows;
  std::istringstream lines(out);
  std::string line;
  while (std::getline(lines, line)) {
    const std::size_t b = line.find_first_not_of(' ');
    if (b == std::string::npos || !std::isdigit(static_cast<unsigned char>(line[b]))) continue;
    std::istringstream in(line);
    Row r;
    char x = 0;
    in >> r.step >> r.seen >> r.kept >> r.bytes >> r.bytes_per_seen >> r.ratio >> x;
    EXPECT_TRUE(in && x == 'x') << "unparseable row: " << line;
    rows.push_back(r);
  }
  return rows;
}

std::vector<std::string> base_args() {
  return {"--model", kvslim::test::shared_path(test::kStories), "--tokens", "300", "--every",
          "100", "--prompt", "Once upon a time"};
}

TEST(LongGeneration, NonEvictingRecipesPrintParseableRows) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  for (const char* recipe : {"f16", "kivi:kbits=2,vbits=2,residual=0"}) {
    std::vector<std::string> args = base_args();
    args.insert(args.end(), {"--recipe", recipe});
    const RunResult r = run(args, " 2>/dev/null");
    ASSERT_EQ(r.status, 0) << recipe << ":\n" << r.out;
    const std::vector<Row> rows = rows_of(r.out);
    ASSERT_EQ(rows.size(), 3u) << r.out;
    const long prompt = rows[0].seen - rows[0].step;
    EXPECT_GE(prompt, 2) << "BOS + at least one prompt token\n" << r.out;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const Row& w = rows[i];
      EXPECT_EQ(w.step, 100 * static_cast<long>(i + 1)) << r.out;
      EXPECT_EQ(w.seen, w.step + prompt) << r.out;
      EXPECT_EQ(w.kept, w.seen) << "no eviction in " << recipe << "\n" << r.out;
      EXPECT_NEAR(w.bytes_per_seen, static_cast<double>(w.bytes) / static_cast<double>(w.seen), 0.051) << r.out;
      // stories260K: 1280 raw f32 bytes per token (5 layers x 4 kv heads x K+V x 8 x 4 B).
      EXPECT_NEAR(w.ratio, 1280.0 / w.bytes_per_seen, 0.006) << r.out;
      if (i > 0) {
        EXPECT_GT(w.bytes, rows[i - 1].bytes) << r.out;
      }
    }
    EXPECT_NE(r.out.find("done: 305 tokens seen"), std::string::npos) << r.out;
  }
}

TEST(LongGeneration, BadArgumentsExitTwo) {
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"--tokens", "0", "--model", "x"},
                                             {"--every", "abc", "--model", "x"},
                                             {"--frobnicate"},
                                             {}}) {
    const RunResult r = run(args);
    EXPECT_EQ(r.status, 2) << r.out;
    EXPECT_NE(r.out.find("usage: kvslim-long-generation"), std::string::npos) << r.out;
  }
  EXPECT_EQ(run({"--help"}).status, 0);
}

TEST(LongGeneration, DefaultEvictingRecipeStaysBounded) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  std::vector<std::string> args = base_args();
  args[3] = "800";  // --tokens: well past the budget
  const RunResult r = run(args);
  if (r.status == 1 && r.out.find("not implemented yet") != std::string::npos)
    GTEST_SKIP() << "the default recipe's eviction stage is not implemented yet:\n" << r.out;
  ASSERT_EQ(r.status, 0) << r.out;
  const std::vector<Row> rows = rows_of(r.out);
  ASSERT_EQ(rows.size(), 8u) << r.out;
  // h2o:budget=256,recent=32: at most 256 + 32 tokens per (layer, kv head), whichever way
  // the budget counts the recent window.
  for (const Row& w : rows) EXPECT_LE(w.kept, 288) << r.out;
  EXPECT_LT(rows.back().kept, rows.back().seen) << r.out;
  EXPECT_LT(rows.back().bytes, 2 * rows[2].bytes) << "bytes must level off\n" << r.out;
}

}  // namespace
}  // namespace kvslim::llama
