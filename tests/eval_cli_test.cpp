// The kvslim-eval executable: every option is validated before anything runs, with a message
// naming the bad value and exit code 2 (bad numbers used to print just "stoi", and --tokens
// 0 / -1 silently meant "all"); every recipe is checked against the recordings' shapes before
// the first replay, so a typo in the last recipe prints no rows at all; a good run prints one
// row per recipe, whose JSON has the documented keys (ratio_seen and kept added by issue 8;
// without eviction kept is 1 and ratio_seen equals ratio).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "test_support.h"

namespace kvslim {
namespace {

constexpr const char* kDumps = "data/dumps/stories260K";

using test::RunResult;

RunResult run(const std::vector<std::string>& args, const char* redirect = " 2>&1") {
  return test::run_command(KVSLIM_EVAL_EXE, args, redirect);
}

bool has(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

TEST(EvalCli, BadNumbersNameTheValue) {
  const struct {
    const char* opt;
    const char* value;
  } cases[] = {{"--chunk", "abc"}, {"--chunk", "0"}, {"--chunk", "4x"}, {"--tokens", "0"},
               {"--tokens", "-1"}, {"--tokens", "99999999999"}};
  for (const auto& c : cases) {
    const RunResult r = run({"--dumps", "/nonexistent", "--recipe", "f32", c.opt, c.value});
    EXPECT_EQ(r.status, 2) << c.opt << ' ' << c.value << ": " << r.out;
    EXPECT_TRUE(has(r.out, std::string(c.opt) + " expects an integer >= 1, got '" + c.value + "'"))
        << r.out;
    EXPECT_FALSE(has(r.out, "stoi")) << r.out;
  }
}

TEST(EvalCli, MissingArgumentsAreUsageErrors) {
  EXPECT_EQ(run({"--recipe", "f32"}).status, 2);
  EXPECT_EQ(run({"--dumps", "x"}).status, 2);
  EXPECT_EQ(run({"--dumps", "x", "--recipe"}).status, 2);
  const RunResult unknown = run({"--frobnicate"});
  EXPECT_EQ(unknown.status, 2);
  EXPECT_TRUE(has(unknown.out, "--frobnicate")) << unknown.out;
  EXPECT_EQ(run({"--help"}).status, 0);
}

TEST(EvalCli, EveryRecipeIsValidatedBeforeTheFirstRow) {
  KVSLIM_REQUIRE_SHARED(kDumps);
  const RunResult r = run({"--dumps", test::shared_path(kDumps), "--recipe", "f32", "--recipe",
                           "kivi:kbits=2,nosuchkey=1", "--tokens", "8"},
                          " 2>/dev/null");
  EXPECT_EQ(r.status, 1);
  EXPECT_FALSE(has(r.out, "\nf32 ")) << "a row ran before the bad recipe was noticed:\n" << r.out;
  const RunResult e = run({"--dumps", test::shared_path(kDumps), "--recipe", "f32", "--recipe",
                           "kivi:kbits=2,nosuchkey=1", "--tokens", "8"},
                          " 2>&1 >/dev/null");
  EXPECT_TRUE(has(e.out, "nosuchkey")) << e.out;
}

TEST(EvalCli, RecipeFromAFile) {
  KVSLIM_REQUIRE_SHARED(kDumps);
  const std::string path = (std::filesystem::temp_directory_path() / "kvslim_eval_cli_heads.recipe").string();
  {
    std::ofstream(path) << "# per-head recipe\nrazor:sinks=4,window=8\n[layers=0 heads=1] f32  # kept full\n";
  }
  const RunResult r = run({"--dumps", test::shared_path(kDumps), "--recipe", test::at_file(path), "--tokens", "40",
                           "--json"},
                          " 2>/dev/null");
  ASSERT_EQ(r.status, 0) << r.out;
  const nlohmann::json row = nlohmann::json::parse(r.out.substr(0, r.out.find('\n')));
  EXPECT_EQ(row.at("recipe"), test::at_file(path));  // labelled as given
  EXPECT_LT(row.at("kept").get<double>(), 1.0);      // razor ran
  std::filesystem::remove(path);
  const RunResult missing = run({"--dumps", test::shared_path(kDumps), "--recipe", test::at_file(path)}, " 2>&1");
  EXPECT_EQ(missing.status, 1);
  EXPECT_TRUE(has(missing.out, path + "' cannot be opened")) << missing.out;
}

TEST(EvalCli, GoodRunPrintsOneRowPerRecipe) {
  KVSLIM_REQUIRE_SHARED(kDumps);
  const RunResult r = run({"--dumps", test::shared_path(kDumps), "--recipe", "f32", "--recipe",
                           "f16", "--tokens", "40", "--chunk", "8", "--json"},
                          " 2>/dev/null");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_TRUE(has(r.out, "{\"recipe\": \"f32\"")) << r.out;
  EXPECT_TRUE(has(r.out, "{\"recipe\": \"f16\"")) << r.out;
  std::istringstream lines(r.out);
  std::string line;
  int rows = 0;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    ++rows;
    const nlohmann::json row = nlohmann::json::parse(line);
    EXPECT_EQ(row.size(), 9u) << line;
    for (const char* key : {"bits_per_value", "bytes", "ratio", "rel_err_mean", "rel_err_p99",
                            "cosine_mean", "ratio_seen", "kept"})
      EXPECT_TRUE(row.at(key).is_number()) << key << ": " << line;
    EXPECT_EQ(row.at("kept").get<double>(), 1.0) << line;
    // Both printed with 4 decimals from the same summed bytes.
    EXPECT_NEAR(row.at("ratio_seen").get<double>(), row.at("ratio").get<double>(), 1.5e-4) << line;
  }
  EXPECT_EQ(rows, 2) << r.out;
}

TEST(EvalCli, TableShowsBothRatiosAndKept) {
  KVSLIM_REQUIRE_SHARED(kDumps);
  const RunResult r = run({"--dumps", test::shared_path(kDumps), "--recipe",
                           "kivi:kbits=4,vbits=4", "--tokens", "40"},
                          " 2>/dev/null");
  ASSERT_EQ(r.status, 0) << r.out;
  for (const char* col : {"ratio", "ratio_seen", "kept"}) EXPECT_TRUE(has(r.out, col)) << r.out;
  EXPECT_TRUE(has(r.out, " 100.0% ")) << r.out;
}

}  // namespace
}  // namespace kvslim
