// CQ against KIVI on the real recordings of both models, through kvslim-eval as a user runs
// it: codebooks trained (--train-codebooks, attention-weighted) on windows 0 and 1 only, every
// recipe evaluated on the held-out windows 2 and 3 only (token-by-token decode, attention
// output vs the recorded one).
//
// Claims, each with the same group (32) and residual for CQ and KIVI, at residual=0 (the
// quantizers alone) and at the default residual=128 (the f32 window dilutes both):
// - 2 bits per channel: CQ channels=4,bits=2 has a lower mean attention error than
//   kivi:kbits=2,vbits=2 at fewer bits per value (metadata included; cq pages carry none, the
//   codebook is a per-model cost reported as codebook_bytes). channels=8 at 2 bits does not
//   exist (C·B <= 8, a code is one byte).
// - channels=2,bits=2 does NOT beat KIVI 2-bit on this data (stories260K 0.506 vs 0.362 at
//   residual=0, 0.0276 vs 0.0214 at residual=128; tinystories656K 0.1937 vs 0.1936 at
//   residual=0): the claim of the issue fails for C=2 and is not asserted. What holds is that
//   coupling more channels helps: channels=4 beats channels=2 at the same bits.
// - 1 bit per channel: CQ channels=8,bits=1 has at most half the mean attention error of
//   kivi:kbits=1,vbits=1.
// The measured numbers are printed; the bounds are the claims, not fitted margins.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "test_support.h"

namespace kvslim {
namespace {

using test::RunResult;

struct Row {
  double bpv = 0.0, err = 0.0;
};

class CqQuality : public ::testing::TestWithParam<const char*> {};

std::string dumps(const char* model) { return std::string("data/dumps/") + model; }

TEST_P(CqQuality, BeatsKiviOnHeldOutWindows) {
  const char* model = GetParam();
  KVSLIM_REQUIRE_SHARED(dumps(model));
  const std::string dir = test::shared_path(dumps(model));
  const std::string tmp = (std::filesystem::temp_directory_path() /
                           ("kvslim_cq_quality_" + std::to_string(::getpid()) + "_" + model))
                              .string();
  std::filesystem::create_directories(tmp);
  // channels, bits -> codebook file trained on windows 0,1
  const std::vector<std::pair<int, int>> shapes = {{4, 2}, {2, 2}, {8, 1}};
  std::map<std::pair<int, int>, std::string> file;
  for (const auto& [c, b] : shapes) {
    const std::string out = tmp + "/c" + std::to_string(c) + "b" + std::to_string(b) + ".kvcb";
    const std::string recipe = "cq:channels=" + std::to_string(c) + ",bits=" + std::to_string(b);
    const RunResult r = test::run_command(KVSLIM_EVAL_EXE,
                                          {"--dumps", dir, "--recipe", recipe, "--train-codebooks", out,
                                           "--windows", "0,1", "--seed", "1"},
                                          " 2>&1");
    ASSERT_EQ(r.status, 0) << r.out;
    std::printf("%s", r.out.c_str());
    file[{c, b}] = out;
  }
  std::vector<std::string> recipes;
  for (const char* res : {"residual=0", "residual=128"}) {
    recipes.push_back(std::string("kivi:kbits=2,vbits=2,group=32,") + res);
    recipes.push_back(std::string("kivi:kbits=1,vbits=1,group=32,") + res);
    for (const auto& [c, b] : shapes)
      recipes.push_back("cq:channels=" + std::to_string(c) + ",bits=" + std::to_string(b) + ",group=32," + res +
                        ",codebooks=" + file[{c, b}]);
  }
  std::vector<std::string> args = {"--dumps", dir, "--windows", "2,3", "--json"};
  for (const auto& r : recipes) {
    args.push_back("--recipe");
    args.push_back(r);
  }
  const RunResult e = test::run_command(KVSLIM_EVAL_EXE, args, " 2>/dev/null");
  ASSERT_EQ(e.status, 0) << e.out;
  std::map<std::string, Row> rows;
  std::istringstream lines(e.out);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    const nlohmann::json j = nlohmann::json::parse(line);
    rows[j.at("recipe").get<std::string>()] = {j.at("bits_per_value").get<double>(), j.at("rel_err_mean").get<double>()};
    std::printf("%-16s %-90s bits/value %.3f  attention rel_err %.4f  codebook_bytes %lld\n", model,
                j.at("recipe").get<std::string>().c_str(), j.at("bits_per_value").get<double>(),
                j.at("rel_err_mean").get<double>(), static_cast<long long>(j.at("codebook_bytes").get<std::int64_t>()));
  }
  ASSERT_EQ(rows.size(), recipes.size()) << e.out;
  for (const char* res : {"residual=0", "residual=128"}) {
    SCOPED_TRACE(res);
    const auto cq = [&](int c, int b) {
      return rows.at("cq:channels=" + std::to_string(c) + ",bits=" + std::to_string(b) + ",group=32," + res +
                     ",codebooks=" + file[{c, b}]);
    };
    const Row k2 = rows.at(std::string("kivi:kbits=2,vbits=2,group=32,") + res);
    const Row k1 = rows.at(std::string("kivi:kbits=1,vbits=1,group=32,") + res);
    const Row q4 = cq(4, 2), q2 = cq(2, 2);
    EXPECT_LT(q4.bpv, k2.bpv);
    EXPECT_LT(q4.err, k2.err) << "cq C=4 B=2 vs kivi 2-bit";
    EXPECT_LT(q2.bpv, k2.bpv);
    EXPECT_LT(q4.err, q2.err) << "cq C=4 vs C=2 at 2 bits per channel";
    std::printf("%s %s: cq C=2 B=2 %.4f vs kivi 2-bit %.4f (not asserted, see the header)\n", model, res, q2.err,
                k2.err);
    const Row q1 = cq(8, 1);
    EXPECT_LE(q1.bpv, k1.bpv);
    EXPECT_LE(2.0 * q1.err, k1.err) << "cq C=8 B=1 " << q1.err << " vs kivi 1-bit " << k1.err;
  }
  std::filesystem::remove_all(tmp);
}

INSTANTIATE_TEST_SUITE_P(Recordings, CqQuality, ::testing::Values("stories260K", "tinystories656K"),
                         [](const ::testing::TestParamInfo<const char*>& i) { return std::string(i.param); });

}  // namespace
}  // namespace kvslim
