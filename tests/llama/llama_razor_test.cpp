// RazorAttention on the shared models, through the kvslim-llama CLI as users run it:
// `calibrate` writes a per-head recipe and a JSON report, `ppl --recipe @FILE` evaluates it.
//   - the report has both scores for every kv head and query head, the chosen heads, the
//     arguments; the recipe keeps the chosen heads full and gives the rest razor;
//   - at >= 70% memory saved against an f32 cache of every token seen, razor with the
//     compensation token has a lower KLD than razor without it on both models (the paper's
//     ablation; named ceilings below); streaming and H2O at the same memory are printed, not
//     ordered: these models have no retrieval heads (every echo/induction score is at or
//     below the uniform baseline) and attend locally, so giving every head a longer window
//     wins here. The generator with planted retrieval heads shows the order
//     (tests/razor_test.cpp);
//   - command-line and recipe-file errors name the bad value.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "llama_test_util.h"

namespace {

using kvslim::llama::test::read_all;
using kvslim::test::run_command;
using kvslim::test::shared_path;
using json = nlohmann::json;

// Measured with --windows 4 (stories260K / tinystories656K, razor:sinks=4,window=48 on the
// heads calibration does not keep, AVX-512 Zen 5): KLD 0.0454 / 0.387 with the compensation
// token, 0.0464 / 0.416 without (8 windows: 0.0432 / 0.380 and 0.0433 / 0.396). Ceilings leave
// 10-15% for ISA differences.
constexpr double kStoriesRazorKldCeiling = 0.050;
constexpr double kTinyRazorKldCeiling = 0.44;
constexpr double kMinRatioSeen = 1.0 / 0.30;  // >= 70% saved

std::map<std::string, json> ppl_json(const std::string& model, const std::vector<std::string>& recipes) {
  std::vector<std::string> args = {"ppl", "--model", model, "--text", shared_path(kvslim::llama::test::kText),
                                   "--windows", "4", "--json"};
  for (const auto& r : recipes) {
    args.push_back("--recipe");
    args.push_back(r);
  }
  const auto res = run_command(KVSLIM_LLAMA_EXE, args, " 2>/dev/null");
  EXPECT_EQ(res.status, 0) << res.out;
  std::map<std::string, json> out;
  std::istringstream lines(res.out);
  for (std::string line; std::getline(lines, line);) {
    const json j = json::parse(line);
    out[j["recipe"].get<std::string>()] = j;
  }
  return out;
}

struct Case {
  const char* model;
  double ceiling;
};

class RazorModel : public ::testing::TestWithParam<Case> {};

TEST_P(RazorModel, CalibrateThenPplAtSeventyPercentSaved) {
  KVSLIM_REQUIRE_SHARED(GetParam().model);
  KVSLIM_REQUIRE_SHARED(kvslim::llama::test::kText);
  const std::string model = shared_path(GetParam().model);
  kvslim::llama::test::ScratchDir dir("razor");
  const std::string recipe = dir.file("heads.recipe");
  const auto cal = run_command(KVSLIM_LLAMA_EXE,
                               {"calibrate", "--model", model, "--out", recipe, "--compress", "razor:sinks=4,window=48"},
                               " 2>&1");
  ASSERT_EQ(cal.status, 0) << cal.out;
  std::printf("%s", cal.out.c_str());
  EXPECT_NE(cal.out.find("a head attending uniformly would score"), std::string::npos) << cal.out;

  // The report.
  const json rep = json::parse(read_all(recipe + ".json"));
  const int layers = rep["layers"], kv_heads = rep["kv_heads"], q_heads = rep["q_heads"];
  const int total = layers * kv_heads;
  const int chosen = static_cast<int>(std::lround(0.15 * total));
  ASSERT_EQ(rep["heads"].size(), static_cast<std::size_t>(total));
  ASSERT_EQ(rep["chosen"].size(), static_cast<std::size_t>(chosen));
  EXPECT_EQ(rep["arguments"]["repeats"], 4);
  EXPECT_EQ(rep["arguments"]["retrieval"], 0.15);
  EXPECT_EQ(rep["arguments"]["compress"], "razor:sinks=4,window=48");
  EXPECT_EQ(rep["period"].get<int>() * 4 + 1, rep["tokens"].get<int>());
  int flagged = 0;
  double min_chosen = 1e9, max_other = -1.0;
  for (const json& h : rep["heads"]) {
    for (const char* key : {"echo", "induction"}) {
      EXPECT_GE(h[key].get<double>(), 0.0);
      EXPECT_LE(h[key].get<double>(), 1.0);
    }
    EXPECT_EQ(h["q_heads"].size(), static_cast<std::size_t>(q_heads / kv_heads));
    const double s = h["score"];
    if (h["chosen"].get<bool>()) {
      ++flagged;
      min_chosen = std::min(min_chosen, s);
      EXPECT_NE(read_all(recipe).find(fmt::format("[layers={} heads={}] f32", h["layer"].get<int>(),
                                                  h["kv_head"].get<int>())),
                std::string::npos);
    } else {
      max_other = std::max(max_other, s);
    }
  }
  EXPECT_EQ(flagged, chosen);
  EXPECT_GE(min_chosen, max_other);  // the top heads by score

  // The ablation: the same file without the compensation token.
  std::string text = read_all(recipe);
  const std::string base = "\nrazor:sinks=4,window=48\n";
  ASSERT_NE(text.find(base), std::string::npos) << text;
  text.replace(text.find(base), base.size(), "\nrazor:sinks=4,window=48,compensate=0\n");
  const std::string nocomp = dir.file("nocomp.recipe");
  {
    std::ofstream(nocomp) << text;
  }
  // Streaming and H2O holding as many tokens per head (window end, 512 tokens seen).
  const int per_head = (chosen * 512 + (total - chosen) * (4 + 48 + 1)) / total;
  const std::string streaming = fmt::format("streaming:sinks=4,window={}", per_head - 4);
  const std::string h2o = fmt::format("h2o:budget={}", per_head);
  auto r = ppl_json(model, {kvslim::test::at_file(recipe), kvslim::test::at_file(nocomp), streaming, h2o});
  ASSERT_EQ(r.size(), 4u);
  const json& razor = r[kvslim::test::at_file(recipe)];
  const json& razor0 = r[kvslim::test::at_file(nocomp)];
  for (const auto& [name, j] : r)
    std::printf("%-40s KLD %.4e  top1 %.4f  ppl %.4f  vs seen %.2fx\n", name.c_str(), j["kld_mean"].get<double>(),
                j["top1_agree"].get<double>(), j["ppl"].get<double>(), j["ratio_seen"].get<double>());
  EXPECT_GE(razor["ratio_seen"].get<double>(), kMinRatioSeen);
  EXPECT_GE(razor0["ratio_seen"].get<double>(), kMinRatioSeen);
  EXPECT_LT(razor["kld_mean"].get<double>(), razor0["kld_mean"].get<double>());
  EXPECT_LE(razor["kld_mean"].get<double>(), GetParam().ceiling);
}

INSTANTIATE_TEST_SUITE_P(Models, RazorModel,
                         ::testing::Values(Case{kvslim::llama::test::kStories, kStoriesRazorKldCeiling},
                                           Case{kvslim::llama::test::kTiny, kTinyRazorKldCeiling}),
                         [](const ::testing::TestParamInfo<Case>& i) {
                           return kvslim::llama::test::model_label(i.param.model);
                         });

TEST(RazorCli, ErrorsNameTheBadValue) {
  KVSLIM_REQUIRE_SHARED(kvslim::llama::test::kStories);
  const std::string model = shared_path(kvslim::llama::test::kStories);
  kvslim::llama::test::ScratchDir dir("razor_err");
  const std::string out = dir.file("x.recipe");
  struct Bad {
    std::vector<std::string> args;
    int status;
    std::string says;
  };
  const std::vector<Bad> bad = {
      {{"calibrate", "--model", model, "--out", out, "--length", "6"}, 1, "length=6 is too short for repeats=4"},
      {{"calibrate", "--model", model, "--out", out, "--length", "600"}, 1, "--length 600 does not fit the context"},
      {{"calibrate", "--model", model, "--out", out, "--repeats", "1"}, 2, "--repeats expects an integer in [2,"},
      {{"calibrate", "--model", model, "--out", out, "--retrieval", "0"}, 2, "--retrieval expects a fraction in (0, 1), got '0'"},
      {{"calibrate", "--model", model, "--out", out, "--retrieval", "1.5"}, 2, "got '1.5'"},
      {{"calibrate", "--model", model, "--out", out, "--retrieval", "x"}, 2, "--retrieval expects a number, got 'x'"},
      {{"calibrate", "--model", model}, 2, "calibrate needs --out FILE"},
      {{"calibrate", "--model", model, "--out", out, "--compress", "razor:window=0"}, 1, "window=0"},
      {{"ppl", "--model", model, "--text", shared_path(kvslim::llama::test::kText), "--recipe", kvslim::test::at_file(dir.file("none"))},
       1, "none' cannot be opened"},
      {{"generate", "--model", model, "--tokens", "2", "--recipe", "razor:sinks=4,window=0"}, 1, "window=0"},
  };
  for (const Bad& b : bad) {
    const auto r = run_command(KVSLIM_LLAMA_EXE, b.args, " 2>&1");
    EXPECT_EQ(r.status, b.status) << r.out;
    EXPECT_NE(r.out.find(b.says), std::string::npos) << "expected '" << b.says << "' in:\n" << r.out;
  }
  // A malformed recipe file: the file, line and column are named.
  {
    std::ofstream(out) << "# heads\nrazor:sinks=4,window=16\n[layers=0 heads=1 f32\n";
  }
  const auto r = run_command(
      KVSLIM_LLAMA_EXE,
      {"ppl", "--model", model, "--text", shared_path(kvslim::llama::test::kText), "--windows", "1", "--recipe", kvslim::test::at_file(out)},
      " 2>&1");
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find(out), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("line 3, column"), std::string::npos) << r.out;
}

}  // namespace
