// `kvslim-llama sweep` (the equal-memory frontier) and KV-AdaQuant's "more bits for keys" on
// the shared models:
//   - sweep --json --plot on stories260K (kivi only, 2 windows, targets in all three forms):
//     every line has exactly the keys of ppl --json plus target and pareto; the pareto flags
//     match the definition (no flagged point is dominated, every other one is); target is
//     the largest target met by the measured ratio_seen (null if none); without eviction the
//     probe's ratio_seen is the measured one exactly (both count the same bytes after the same
//     tokens); the SVG is a balanced XML document with the frontier polyline;
//   - the pieces without a model: pareto_front and best_meeting on ties and NaN, candidate
//     families, XML escaping of recipe text inside the SVG;
//   - command-line mistakes exit with 2 and name the value;
//   - K4V2 against K2V4 at the same bytes (kivi, residual 0) on 4 windows: keys at 4 bits
//     and values at 2 give the lower KLD on both models, by the named margins below.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "eval.h"
#include "kvslim/error.h"
#include "llama_test_util.h"
#include "sweep.h"

namespace {

using kvslim::llama::RecipeMetrics;
using kvslim::llama::test::read_all;
using kvslim::test::run_command;
using kvslim::test::shared_path;
using json = nlohmann::json;

// KLD(K2V4) / KLD(K4V2), both kivi residual=0 (same bytes), 4 windows, token by token,
// measured on AVX-512 (Zen 5): stories260K 0.261 / 0.00835 = 31x; tinystories656K
// 0.0542 / 0.0285 = 1.91x (8 windows: 39.7x and 1.96x). The margins leave about half (stories) and a quarter (tiny) of it
// for ISA and rounding differences.
constexpr double kStoriesK4V2Margin = 20.0;
constexpr double kTinyK4V2Margin = 1.5;

const std::vector<std::string> kPplKeys = {
    "recipe",          "ppl",  "dppl_rel",  "kld_mean",       "top1_agree",   "kv_bytes", "ratio",
    "tokens_per_s", "bytes_per_token", "bits_per_value", "ratio_vs_f16", "ratio_seen", "kept"};

/// True if `a` dominates `b`: ratio_seen >= and KLD <=, one strictly.
bool dominates(const json& a, const json& b) {
  const double ra = a["ratio_seen"], rb = b["ratio_seen"], ka = a["kld_mean"], kb = b["kld_mean"];
  return ra >= rb && ka <= kb && (ra > rb || ka < kb);
}

/// One root element <svg>, and element names open and close in order (self-closing tags and
/// <?...?> declarations skipped); `why` says what is wrong otherwise.
bool balanced_xml(const std::string& s, std::string* why) {
  std::vector<std::string> stack;
  bool root_closed = false, root_seen = false;
  for (std::size_t p = s.find('<'); p != std::string::npos; p = s.find('<', p + 1)) {
    const std::size_t e = s.find('>', p);
    if (e == std::string::npos) return *why = "unterminated tag", false;
    const std::string tag = s.substr(p + 1, e - p - 1);
    if (tag.empty() || tag[0] == '?') continue;
    if (root_closed) return *why = "content after </svg>", false;
    const bool closing = tag[0] == '/';
    const std::string body = closing ? tag.substr(1) : tag;
    const std::string name = body.substr(0, body.find_first_of(" /\n"));
    if (!root_seen && name != "svg") return *why = "first element is " + name, false;
    root_seen = true;
    if (closing) {
      if (stack.empty() || stack.back() != name) return *why = "unbalanced </" + name + ">", false;
      stack.pop_back();
      root_closed = stack.empty();
    } else if (tag.back() != '/') {
      stack.push_back(name);
    }
  }
  if (!stack.empty()) return *why = "<" + stack.back() + "> not closed", false;
  if (!root_seen) return *why = "no <svg> element", false;
  return true;
}

TEST(Sweep, JsonPlotAndFrontierOnStories) {
  KVSLIM_REQUIRE_SHARED(kvslim::llama::test::kStories);
  KVSLIM_REQUIRE_SHARED(kvslim::llama::test::kText);
  const std::string model = shared_path(kvslim::llama::test::kStories);
  kvslim::llama::test::ScratchDir dir("sweep");
  const std::string svg_path = dir.file("frontier.svg");
  // 150B = 1280 / 150 = 8.53x: above what kivi alone reaches here, so no recipe meets it.
  const auto res = run_command(KVSLIM_LLAMA_EXE,
                               {"sweep", "--model", model, "--text", shared_path(kvslim::llama::test::kText),
                                "--windows", "2", "--family", "kivi", "--target", "4.5,5x,150B", "--json",
                                "--plot", svg_path},
                               " 2>/dev/null");
  ASSERT_EQ(res.status, 0) << res.out;
  std::vector<json> rows;
  std::istringstream lines(res.out);
  for (std::string line; std::getline(lines, line);) rows.push_back(json::parse(line));
  ASSERT_GE(rows.size(), 5u) << res.out;

  const std::vector<double> targets = {4.5, 5.0, 1280.0 / 150.0};
  std::set<std::string> keys_expected(kPplKeys.begin(), kPplKeys.end());
  keys_expected.insert({"target", "pareto"});
  const kvslim::llama::Model& m = kvslim::llama::test::shared_model(kvslim::llama::test::kStories);
  const kvslim::llama::MemoryProbe probe(m.config);
  int on_front = 0, met = 0;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const json& r = rows[i];
    std::set<std::string> keys;
    for (const auto& [k, v] : r.items()) keys.insert(k);
    EXPECT_EQ(keys, keys_expected) << r.dump();
    EXPECT_NE(r["recipe"].get<std::string>().find("kivi:"), std::string::npos) << r.dump();
    if (i > 0) {
      EXPECT_GE(r["ratio_seen"].get<double>(), rows[i - 1]["ratio_seen"].get<double>());
    }
    // pareto is the definition.
    bool dominated = false;
    for (const json& o : rows) dominated = dominated || dominates(o, r);
    EXPECT_EQ(r["pareto"].get<bool>(), !dominated) << r.dump();
    on_front += r["pareto"].get<bool>();
    // target: the largest target met, as a ratio.
    const double ratio_seen = r["ratio_seen"];
    double largest = 0.0;
    for (double t : targets)
      if (ratio_seen >= t) largest = std::max(largest, t);
    if (largest == 0.0) {
      EXPECT_TRUE(r["target"].is_null()) << r.dump();
    } else {
      ++met;
      ASSERT_TRUE(r["target"].is_number()) << r.dump();
      EXPECT_DOUBLE_EQ(r["target"].get<double>(), largest) << r.dump();
    }
    // No eviction: the probe counts exactly the bytes the model's cache ends each window with.
    EXPECT_DOUBLE_EQ(probe.run(r["recipe"].get<std::string>()).ratio_seen, ratio_seen) << r.dump();
    // The probe rule: evaluated recipes lie within [4.5 / 1.3, 8.53 * 1.5].
    EXPECT_GE(ratio_seen, 4.5 / kvslim::llama::kSweepProbeBelow);
    EXPECT_LE(ratio_seen, targets[2] * kvslim::llama::kSweepProbeAbove);
  }
  EXPECT_GE(on_front, 2);
  EXPECT_LT(on_front, static_cast<int>(rows.size()));
  EXPECT_GE(met, 1);

  ASSERT_TRUE(kvslim::test::exists(svg_path));
  const std::string svg = read_all(svg_path);
  EXPECT_TRUE(svg.starts_with("<?xml") || svg.starts_with("<svg")) << svg.substr(0, 80);
  EXPECT_NE(svg.find("<polyline"), std::string::npos);
  EXPECT_NE(svg.find("stroke-dasharray"), std::string::npos);  // the target lines
  EXPECT_NE(svg.find("best at 4.5"), std::string::npos);
  std::string why;
  EXPECT_TRUE(balanced_xml(svg, &why)) << why;
  EXPECT_NE(svg.rfind("</svg>"), std::string::npos);
}

TEST(Sweep, FrontierAndBestWithoutAModel) {
  auto metric = [](const char* recipe, double ratio, double kld) {
    RecipeMetrics m;
    m.recipe = recipe;
    m.ratio_seen = ratio;
    m.kld_mean = kld;
    return m;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<RecipeMetrics> m = {
      metric("a", 4.0, 0.01),  metric("b", 4.0, 0.02),   // b: same ratio, worse KLD
      metric("c", 6.0, 0.05),  metric("d", 6.0, 0.05),   // c, d: equal, neither dominates
      metric("e", 5.0, 0.06),  metric("f", 8.0, 0.5),    // e: dominated by c
      metric("g", nan, 0.001), metric("h<&>\"", 9.0, nan)};
  const std::vector<bool> front = kvslim::llama::pareto_front(m);
  EXPECT_EQ(front, (std::vector<bool>{true, false, true, true, false, true, false, false}));
  EXPECT_EQ(kvslim::llama::best_meeting(m, 4.0), 0);
  EXPECT_EQ(kvslim::llama::best_meeting(m, 4.5), 2);  // c and d tie: the first
  EXPECT_EQ(kvslim::llama::best_meeting(m, 7.0), 5);
  EXPECT_EQ(kvslim::llama::best_meeting(m, 10.0), -1);

  EXPECT_EQ(kvslim::llama::xml_escape("h2o:budget=1 | x<&>\"'"),
            "h2o:budget=1 | x&lt;&amp;&gt;&quot;&apos;");
  std::vector<RecipeMetrics> odd = m;
  odd[5].recipe = "f & <g>";  // labelled: the best at 7x
  const std::vector<kvslim::llama::SweepTarget> targets = {{"7x", 7.0}, {"300B", 1280.0 / 300.0}};
  const std::string svg = kvslim::llama::frontier_svg(odd, front, targets, "t <&>");
  std::string why;
  EXPECT_TRUE(balanced_xml(svg, &why)) << why << "\n" << svg;
  EXPECT_NE(svg.find("f &amp; &lt;g&gt;"), std::string::npos);
  EXPECT_EQ(svg.find("f & <g>"), std::string::npos);
  EXPECT_NE(svg.find("t &lt;&amp;&gt;"), std::string::npos);
}

TEST(Sweep, CandidatesComeFromFamilies) {
  kvslim::llama::ModelConfig c;
  c.seq_len = 512;
  c.head_dim = 16;
  const std::vector<std::string> kivi = kvslim::llama::sweep_candidates(c, std::vector<std::string>{"kivi"});
  EXPECT_EQ(kivi.size(), 32u);  // K, V in {2,3,4,8}, residual 0 and 32
  EXPECT_NE(std::find(kivi.begin(), kivi.end(), "kivi:kbits=4,vbits=2,residual=0"), kivi.end());
  EXPECT_NE(std::find(kivi.begin(), kivi.end(), "kivi:kbits=2,vbits=4,residual=32"), kivi.end());
  const std::vector<std::string> all = kvslim::llama::sweep_candidates(c);
  const auto n_mikv = std::count_if(all.begin(), all.end(), [](const std::string& r) { return r.rfind("mikv", 0) == 0; });
  EXPECT_EQ(all.size() - static_cast<std::size_t>(n_mikv), 33u * 5u);  // (f16 + 32 kivi) x (no eviction + 4 h2o budgets)
  // mikv only in front of codecs its tier is cheaper than.
  EXPECT_NE(std::find(all.begin(), all.end(), "mikv:budget=128,lo=(kivi:kbits=2,vbits=2) | f16"), all.end());
  EXPECT_EQ(std::find(all.begin(), all.end(), "mikv:budget=128,lo=(kivi:kbits=4,vbits=4) | kivi:kbits=2,vbits=2,residual=0"),
            all.end());
  EXPECT_GT(n_mikv, 0);
  EXPECT_NE(std::find(all.begin(), all.end(), "h2o:budget=32 | f16"), all.end());
  EXPECT_NE(std::find(all.begin(), all.end(), "h2o:budget=256 | kivi:kbits=8,vbits=4,residual=0"), all.end());
  EXPECT_THROW(kvslim::llama::sweep_candidates(c, std::vector<std::string>{"h2o"}), kvslim::Error);
  EXPECT_THROW(kvslim::llama::sweep_candidates(c, std::vector<std::string>{"nosuch"}), kvslim::Error);
}

TEST(Sweep, BadArgumentsAreUsageErrors) {
  KVSLIM_REQUIRE_SHARED(kvslim::llama::test::kStories);
  const std::string model = shared_path(kvslim::llama::test::kStories);
  const std::string text = shared_path(kvslim::llama::test::kText);
  struct Bad {
    std::vector<std::string> extra;
    std::string says;
  };
  const std::vector<Bad> bad = {
      {{"--target", "8,abc"}, "got 'abc'"},
      {{"--target", "0.5"}, "got '0.5'"},
      {{"--target", "1x"}, "got '1x'"},
      {{"--target", "0B"}, "got '0B'"},
      {{"--target", "8,,12"}, "got ''"},
      {{}, "sweep needs --target"},
      {{"--target", "8", "--family", "nosuch"}, "--family expects one of f16, kivi, h2o, mikv, got 'nosuch'"},
      {{"--target", "8", "--family", "h2o"}, "no codec family"},
      {{"--target", "8", "--recipe", "f16"}, "unknown option '--recipe' for 'sweep'"},
  };
  for (const Bad& b : bad) {
    std::vector<std::string> args = {"sweep", "--model", model, "--text", text};
    args.insert(args.end(), b.extra.begin(), b.extra.end());
    const auto r = run_command(KVSLIM_LLAMA_EXE, args, " 2>&1");
    EXPECT_EQ(r.status, 2) << r.out;
    EXPECT_NE(r.out.find(b.says), std::string::npos) << "expected '" << b.says << "' in:\n" << r.out;
  }
}

struct AdaQuantCase {
  const char* model;
  double margin;
};

class KeyBits : public ::testing::TestWithParam<AdaQuantCase> {};

TEST_P(KeyBits, K4V2BeatsK2V4AtTheSameBytes) {
  KVSLIM_REQUIRE_SHARED(GetParam().model);
  KVSLIM_REQUIRE_SHARED(kvslim::llama::test::kText);
  const kvslim::llama::Model& model = kvslim::llama::test::shared_model(GetParam().model);
  const std::vector<int> stream = kvslim::llama::token_stream(
      *model.tokenizer, kvslim::llama::read_text(shared_path(kvslim::llama::test::kText)));
  const std::vector<std::string> recipes = {"kivi:kbits=4,vbits=2,residual=0",
                                            "kivi:kbits=2,vbits=4,residual=0"};
  kvslim::llama::PerplexityOptions opt;
  opt.max_windows = 4;
  const auto rep = kvslim::llama::evaluate_perplexity(model, stream, recipes, opt);
  const RecipeMetrics& k4v2 = rep.recipes[0];
  const RecipeMetrics& k2v4 = rep.recipes[1];
  std::printf("%s: K4V2 KLD %.4e top1 %.4f | K2V4 KLD %.4e top1 %.4f | ratio %.2f (%.2fx memory)\n",
              model.name.c_str(), k4v2.kld_mean, k4v2.top1_agree, k2v4.kld_mean, k2v4.top1_agree,
              k2v4.kld_mean / k4v2.kld_mean, k4v2.ratio_seen);
  EXPECT_EQ(k4v2.kv_bytes, k2v4.kv_bytes);  // the same bits in total: a fair comparison
  EXPECT_GT(k2v4.kld_mean, GetParam().margin * k4v2.kld_mean);
  EXPECT_GT(k4v2.top1_agree, k2v4.top1_agree);
}

INSTANTIATE_TEST_SUITE_P(Models, KeyBits,
                         ::testing::Values(AdaQuantCase{kvslim::llama::test::kStories, kStoriesK4V2Margin},
                                           AdaQuantCase{kvslim::llama::test::kTiny, kTinyK4V2Margin}),
                         [](const ::testing::TestParamInfo<AdaQuantCase>& i) {
                           return kvslim::llama::test::model_label(i.param.model);
                         });

}  // namespace
