// `kvslim-llama calibrate-codebooks` on stories260K, run as a user runs it: the codebook file
// it writes is what `ppl --recipe "cq:...,codebooks=FILE"` accepts, and at 1 bit per channel
// CQ (channels=8, bits=1) has a finite perplexity below the uniform 1-bit KIVI baseline's on
// the first ppl windows, which the default calibration text (the second half of the file) does
// not overlap. Also: the mistakes exit with a message naming them.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "calibrate_codebooks.h"
#include "kvslim/policy/codebook.h"
#include "llama_test_util.h"

namespace kvslim::llama {
namespace {

using kvslim::test::RunResult;
using kvslim::test::shared_path;

RunResult llama(const std::vector<std::string>& args, const char* redirect = " 2>&1") {
  return kvslim::test::run_command(KVSLIM_LLAMA_EXE, args, redirect);
}

bool has(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

TEST(LlamaCq, CalibratedCodebooksBeatOneBitKivi) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  KVSLIM_REQUIRE_SHARED(test::kText);
  test::ScratchDir dir("cq");
  const std::string cb = dir.file("s260k_c8b1.kvcb");
  const RunResult c = llama({"calibrate-codebooks", "--model", shared_path(test::kStories), "--text",
                             shared_path(test::kText), "--out", cb, "--recipe", "cq:channels=8,bits=1", "--tokens",
                             "4096", "--iterations", "10"});
  ASSERT_EQ(c.status, 0) << c.out;
  std::printf("%s", c.out.c_str());
  EXPECT_TRUE(has(c.out, "8 windows (8 of the full 512 tokens), 4096 rows per (layer, kv head)")) << c.out;
  const Codebooks books = load_codebooks(cb);
  EXPECT_NO_THROW(check_codebooks_match(books, 5, 4, 8, {8, 1}, {8, 1}));

  // The default calibration text starts in the second half of the file; ppl's first two
  // windows (1024 tokens) end well before it.
  const std::string text = test::read_all(shared_path(test::kText));
  EXPECT_GE(default_calibration_offset(text), static_cast<std::int64_t>(text.size() / 2));
  EXPECT_TRUE(has(c.out, "from byte " + std::to_string(default_calibration_offset(text)))) << c.out;

  const std::vector<std::string> recipes = {
      "kivi:kbits=1,vbits=1",           "cq:channels=8,bits=1,codebooks=" + cb,
      "kivi:kbits=1,vbits=1,residual=0", "cq:channels=8,bits=1,residual=0,codebooks=" + cb};
  std::vector<std::string> args = {"ppl", "--model", shared_path(test::kStories), "--text", shared_path(test::kText),
                                   "--windows", "2", "--json", "--no-progress"};
  for (const auto& r : recipes) {
    args.push_back("--recipe");
    args.push_back(r);
  }
  const RunResult p = llama(args, " 2>/dev/null");
  ASSERT_EQ(p.status, 0) << p.out;
  std::map<std::string, nlohmann::json> rows;
  std::istringstream lines(p.out);
  std::string line;
  while (std::getline(lines, line))
    if (!line.empty() && line[0] == '{') {
      const nlohmann::json j = nlohmann::json::parse(line);
      rows[j.at("recipe").get<std::string>()] = j;
      std::printf("%s\n", line.c_str());
    }
  ASSERT_EQ(rows.size(), recipes.size()) << p.out;
  for (int i = 0; i < 4; i += 2) {
    const auto& kivi = rows.at(recipes[i]);
    const auto& cq = rows.at(recipes[i + 1]);
    ASSERT_TRUE(cq.at("ppl").is_number()) << cq;
    const double cq_ppl = cq.at("ppl").get<double>(), kivi_ppl = kivi.at("ppl").get<double>();
    EXPECT_TRUE(std::isfinite(cq_ppl)) << cq;
    EXPECT_LT(cq_ppl, kivi_ppl) << recipes[i + 1] << " vs " << recipes[i];
    EXPECT_LT(cq.at("kld_mean").get<double>(), kivi.at("kld_mean").get<double>()) << recipes[i + 1];
    EXPECT_LE(cq.at("bits_per_value").get<double>(), kivi.at("bits_per_value").get<double>()) << recipes[i + 1];
  }
}

TEST(LlamaCq, MistakesAreNamed) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  KVSLIM_REQUIRE_SHARED(test::kText);
  test::ScratchDir dir("cq_err");
  const std::string model = shared_path(test::kStories), text = shared_path(test::kText);
  const RunResult nocq = llama({"calibrate-codebooks", "--model", model, "--text", text, "--out", dir.file("x"),
                                "--recipe", "kivi:kbits=2,vbits=2"});
  EXPECT_EQ(nocq.status, 1) << nocq.out;
  EXPECT_TRUE(has(nocq.out, "has no cq stage")) << nocq.out;
  const RunResult noout = llama({"calibrate-codebooks", "--model", model, "--text", text, "--recipe", "cq:bits=1"});
  EXPECT_EQ(noout.status, 2) << noout.out;
  EXPECT_TRUE(has(noout.out, "calibrate-codebooks needs --text FILE, --out OUT")) << noout.out;
  const RunResult past = llama({"calibrate-codebooks", "--model", model, "--text", text, "--out", dir.file("x"),
                                "--recipe", "cq:channels=4,bits=2", "--skip-bytes", "999999999"});
  EXPECT_EQ(past.status, 1) << past.out;
  EXPECT_TRUE(has(past.out, "--skip-bytes 999999999 is not inside the text")) << past.out;
  // Too few rows for 256 centroids: named by train_codebooks.
  const RunResult few = llama({"calibrate-codebooks", "--model", model, "--text", text, "--out", dir.file("x"),
                               "--recipe", "cq:channels=4,bits=2", "--tokens", "100"});
  EXPECT_EQ(few.status, 1) << few.out;
  EXPECT_TRUE(has(few.out, "256")) << few.out;
  const RunResult weight = llama({"calibrate-codebooks", "--model", model, "--text", text, "--out", dir.file("x"),
                                  "--recipe", "cq:bits=1", "--weight", "fisher"});
  EXPECT_EQ(weight.status, 2) << weight.out;
}

}  // namespace
}  // namespace kvslim::llama
