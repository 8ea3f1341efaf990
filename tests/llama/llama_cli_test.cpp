// The kvslim-llama executable: `ppl --json` prints one parseable JSON object per recipe with
// the documented keys, `dump` writes a recording the library's loader reads, bad usage and
// bad models exit nonzero with a message instead of crashing, and --help documents how
// KV bytes are measured.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <sys/wait.h>

#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "kvslim/testing/recordings.h"
#include "llama_test_util.h"

namespace kvslim::llama {
namespace {

struct RunResult {
  int status = -1;
  std::string out;  // stdout + stderr
};

std::string quote_arg(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

RunResult run(const std::vector<std::string>& args, bool with_stderr = true) {
  std::string cmd = quote_arg(KVSLIM_LLAMA_EXE);
  for (const auto& a : args) {
    cmd += ' ';
    cmd += quote_arg(a);
  }
  cmd += with_stderr ? " 2>&1" : " 2>/dev/null";
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

TEST(Cli, PplJsonLines) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  KVSLIM_REQUIRE_SHARED(test::kText);
  const RunResult r = run({"ppl", "--model", kvslim::test::shared_path(test::kStories), "--text",
                           kvslim::test::shared_path(test::kText), "--recipe", "f32", "--recipe",
                           "f16", "--windows", "1", "--json"},
                          /*with_stderr=*/false);
  ASSERT_EQ(r.status, 0) << r.out;
  std::istringstream lines(r.out);
  std::string line;
  std::vector<nlohmann::json> rows;
  while (std::getline(lines, line))
    if (!line.empty()) rows.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(rows.size(), 2u) << r.out;
  EXPECT_EQ(rows[0].at("recipe").get<std::string>(), "f32");
  EXPECT_EQ(rows[1].at("recipe").get<std::string>(), "f16");
  for (const nlohmann::json& row : rows) {
    EXPECT_EQ(row.size(), 8u);
    for (const char* key :
         {"ppl", "dppl_rel", "kld_mean", "top1_agree", "kv_bytes", "ratio", "tokens_per_s"})
      EXPECT_TRUE(row.at(key).is_number()) << key;
  }
  EXPECT_EQ(rows[0].at("kld_mean").get<double>(), 0.0);
  EXPECT_GT(rows[1].at("ratio").get<double>(), rows[0].at("ratio").get<double>());
}

TEST(Cli, DumpWritesLoadableRecording) {
  KVSLIM_REQUIRE_SHARED(test::kTinyWeights);
  KVSLIM_REQUIRE_SHARED(test::kText);
  test::ScratchDir dir("cli_dump");
  const std::string out = dir.file("w");
  const RunResult r = run({"dump", "--model", kvslim::test::shared_path(test::kTiny), "--text",
                           kvslim::test::shared_path(test::kText), "--offset", "364", "--out",
                           out});
  ASSERT_EQ(r.status, 0) << r.out;
  const auto rec = testing::load_recording(out);
  EXPECT_EQ(rec.tokens, 512);
  EXPECT_EQ(rec.text_byte_offset, 364);
  EXPECT_EQ(rec.rope, "half");
  EXPECT_EQ(rec.token_ids.front(), 1);
}

TEST(Cli, ErrorsExitNonzeroWithMessage) {
  const RunResult usage = run({"ppl", "--model", "x"});
  EXPECT_EQ(usage.status, 2);
  EXPECT_NE(usage.out.find("--text"), std::string::npos) << usage.out;

  const RunResult unknown = run({"frobnicate"});
  EXPECT_EQ(unknown.status, 2);
  EXPECT_NE(unknown.out.find("frobnicate"), std::string::npos);

  const RunResult missing = run({"generate", "--model", "/nonexistent/model.bin"});
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.out.find("/nonexistent/model.bin"), std::string::npos) << missing.out;

  const RunResult help = run({"--help"});
  EXPECT_EQ(help.status, 0);
  EXPECT_NE(help.out.find("averaged over windows"), std::string::npos);
}

TEST(Cli, BadRecipeIsReported) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  const RunResult r = run({"generate", "--model", kvslim::test::shared_path(test::kStoriesBin),
                           "--tokens", "3", "--recipe", "nosuchcodec:bits=3"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.out.find("nosuchcodec"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace kvslim::llama
