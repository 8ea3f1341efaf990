// The kvslim-eval executable: every option is validated before anything runs, with a message
// naming the bad value and exit code 2 (bad numbers used to print just "stoi", and --tokens
// 0 / -1 silently meant "all"); every recipe is checked against the recordings' shapes before
// the first replay, so a typo in the last recipe prints no rows at all; a good run prints one
// row per recipe, whose JSON has the documented keys (ratio_seen and kept added by issue 8;
// without eviction kept is 1 and ratio_seen equals ratio; codebook_bytes added with CQ).
//
// --train-codebooks (CQ codebooks from the recordings): the file it writes loads and has the
// recipe's shapes, the same seed gives the same bytes, a cq recipe naming it evaluates with
// codebook_bytes = the f32 centroids (not counted in bits_per_value), --windows selects
// recordings, and every mistake (recordings of two models, no cq stage, an unwritable OUT, a
// window that is not there, training options without training) exits with a message naming it.
//
// --layer-similarity (adjacent-layer cosines): one JSON entry per adjacent layer pair, in range
// and equal to the library's layer_similarity; the options it does not take, a bad
// --threshold and recordings of two models are named.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "kvslim/policy/codebook.h"
#include "kvslim/testing/recordings.h"
#include "kvslim/testing/similarity.h"
#include "test_support.h"

namespace kvslim {
namespace {

constexpr const char* kDumps = "data/dumps/stories260K";
constexpr const char* kWindow0 = "data/dumps/stories260K/tsval_w0";

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
    EXPECT_EQ(row.size(), 10u) << line;
    for (const char* key : {"bits_per_value", "bytes", "ratio", "rel_err_mean", "rel_err_p99",
                            "cosine_mean", "ratio_seen", "kept", "codebook_bytes"})
      EXPECT_TRUE(row.at(key).is_number()) << key << ": " << line;
    EXPECT_EQ(row.at("kept").get<double>(), 1.0) << line;
    EXPECT_EQ(row.at("codebook_bytes").get<std::int64_t>(), 0) << line;
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

std::string temp_file(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("kvslim_eval_cli_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// stories260K: 5 layers, 4 kv heads, head_dim 8. Window 0 alone gives 512 rows per head,
// enough for 256 centroids; few iterations keep the test short.
TEST(EvalCliTrain, WritesALoadableFileWithTheRecipesShapes) {
  KVSLIM_REQUIRE_SHARED(kDumps);
  const std::string out = temp_file("s260k_42.kvcb");
  const RunResult r = run({"--dumps", test::shared_path(kDumps), "--recipe", "cq:kchannels=4,kbits=2,vchannels=2,vbits=2",
                           "--train-codebooks", out, "--windows", "0", "--iterations", "4", "--seed", "7"});
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_TRUE(has(r.out, "512 rows per (layer, kv head)")) << r.out;
  EXPECT_TRUE(has(r.out, "seed 7")) << r.out;
  const Codebooks cb = load_codebooks(out);
  EXPECT_NO_THROW(check_codebooks_match(cb, 5, 4, 8, {4, 2}, {2, 2}));
  EXPECT_EQ(cb.options().seed, 7u);
  EXPECT_EQ(cb.options().iterations, 4);
  // A cq recipe naming the file evaluates (held-out window 1); the centroids are reported as
  // codebook_bytes and are not in bytes: 5 layers x 4 heads x 8 x (2^8 + 2^4) f32.
  const RunResult e = run({"--dumps", test::shared_path(kDumps), "--windows", "1", "--tokens", "64", "--json",
                           "--recipe", "cq:kchannels=4,kbits=2,vchannels=2,vbits=2,codebooks=" + out},
                          " 2>/dev/null");
  ASSERT_EQ(e.status, 0) << e.out;
  const nlohmann::json row = nlohmann::json::parse(e.out.substr(0, e.out.find('\n')));
  EXPECT_EQ(row.at("codebook_bytes").get<std::int64_t>(), 5 * 4 * 8 * (256 + 16) * 4);
  EXPECT_EQ(row.at("codebook_bytes").get<std::int64_t>(), static_cast<std::int64_t>(cb.data().size() * 4));
  EXPECT_GT(row.at("bits_per_value").get<double>(), 0.0);
  EXPECT_LT(row.at("rel_err_mean").get<double>(), 1.0);
  std::filesystem::remove(out);
}

TEST(EvalCliTrain, SameSeedSameBytes) {
  KVSLIM_REQUIRE_SHARED(kDumps);
  const std::string a = temp_file("seed_a.kvcb"), b = temp_file("seed_b.kvcb"), c = temp_file("seed_c.kvcb");
  const auto train = [&](const std::string& out, const char* seed) {
    return run({"--dumps", test::shared_path(kDumps), "--recipe", "cq:channels=4,bits=2", "--train-codebooks", out,
                "--windows", "0-1", "--iterations", "6", "--seed", seed});
  };
  ASSERT_EQ(train(a, "3").status, 0);
  ASSERT_EQ(train(b, "3").status, 0);
  ASSERT_EQ(train(c, "4").status, 0);
  const std::string ba = read_bytes(a);
  EXPECT_GT(ba.size(), 80u);
  EXPECT_TRUE(ba == read_bytes(b)) << "two runs with seed 3 wrote different files";
  EXPECT_FALSE(ba == read_bytes(c)) << "seeds 3 and 4 wrote the same file";
  for (const auto& f : {a, b, c}) std::filesystem::remove(f);
}

TEST(EvalCliTrain, MistakesAreNamed) {
  KVSLIM_REQUIRE_SHARED(kDumps);
  const std::string out = temp_file("mistake.kvcb");
  // Recordings of both models under data/dumps.
  const RunResult two = run({"--dumps", test::shared_path("data/dumps"), "--recipe", "cq:channels=4,bits=2",
                             "--train-codebooks", out, "--windows", "0"});
  EXPECT_EQ(two.status, 1) << two.out;
  EXPECT_TRUE(has(two.out, "one model")) << two.out;
  EXPECT_TRUE(has(two.out, "stories260K/tsval_w0") && has(two.out, "tinystories656K/tsval_w0")) << two.out;
  EXPECT_TRUE(has(two.out, "head_dim 8") && has(two.out, "head_dim 16")) << two.out;
  // No cq stage.
  const RunResult nocq = run({"--dumps", test::shared_path(kDumps), "--recipe", "kivi:kbits=2,vbits=2",
                              "--train-codebooks", out});
  EXPECT_EQ(nocq.status, 1) << nocq.out;
  EXPECT_TRUE(has(nocq.out, "has no cq stage")) << nocq.out;
  // Unwritable OUT, found before training.
  const RunResult nodir = run({"--dumps", test::shared_path(kDumps), "--recipe", "cq:channels=4,bits=2",
                               "--train-codebooks", "/nonexistent_kvslim_dir/x.kvcb"});
  EXPECT_EQ(nodir.status, 1) << nodir.out;
  EXPECT_TRUE(has(nodir.out, "'/nonexistent_kvslim_dir/x.kvcb' cannot be written: directory "
                             "'/nonexistent_kvslim_dir' does not exist"))
      << nodir.out;
  const RunResult isdir = run({"--dumps", test::shared_path(kDumps), "--recipe", "cq:channels=4,bits=2",
                               "--train-codebooks", std::filesystem::temp_directory_path().string()});
  EXPECT_EQ(isdir.status, 1) << isdir.out;
  EXPECT_TRUE(has(isdir.out, "is a directory")) << isdir.out;
  EXPECT_FALSE(test::exists(out));
  // A window that is not there; a cq recipe without codebooks.
  const RunResult w9 = run({"--dumps", test::shared_path(kDumps), "--recipe", "f32", "--windows", "1,9"});
  EXPECT_EQ(w9.status, 1) << w9.out;
  EXPECT_TRUE(has(w9.out, "window 9")) << w9.out;
  const RunResult nocb = run({"--dumps", test::shared_path(kDumps), "--recipe", "cq:channels=4,bits=2"});
  EXPECT_EQ(nocb.status, 1) << nocb.out;
  EXPECT_TRUE(has(nocb.out, "--train-codebooks")) << nocb.out;
  // Level tables (nuq): one shape per file, and not together with cq codebooks.
  const RunResult both = run({"--dumps", test::shared_path(kDumps), "--recipe",
                              "cq:channels=4,bits=2 ; [layers=1] nuq:kbits=3,vbits=3", "--train-codebooks", out});
  EXPECT_EQ(both.status, 1) << both.out;
  EXPECT_TRUE(has(both.out, "has cq and nuq stages")) << both.out;
  const RunResult mixed = run({"--dumps", test::shared_path(kDumps), "--recipe",
                               "nuq:kbits=2,vbits=2 ; [layers=1] nuq:kbits=3,vbits=3", "--train-codebooks", out});
  EXPECT_EQ(mixed.status, 1) << mixed.out;
  EXPECT_TRUE(has(mixed.out, "nuq stages use different bits or rotations")) << mixed.out;
  const RunResult nuq5 = run({"--dumps", test::shared_path(kDumps), "--recipe", "nuq:kbits=5", "--train-codebooks", out});
  EXPECT_EQ(nuq5.status, 1) << nuq5.out;
  EXPECT_TRUE(has(nuq5.out, "kbits=5 is not a supported bit width")) << nuq5.out;
  EXPECT_FALSE(test::exists(out));
  // --pre-rope checks every recipe against pre-RoPE keys before replaying.
  const RunResult prerope = run({"--dumps", test::shared_path(kDumps), "--recipe", "kivi:kbits=2,vbits=2,rotate=hadamard",
                                 "--pre-rope"});
  EXPECT_EQ(prerope.status, 1) << prerope.out;
  EXPECT_TRUE(has(prerope.out, "does not commute with RoPE")) << prerope.out;
}

TEST(EvalCliTrain, UsageMistakes) {
  const struct {
    std::vector<std::string> args;
    const char* message;
  } cases[] = {
      {{"--seed", "3"}, "need --train-codebooks"},
      {{"--train-codebooks", "x", "--recipe", "cq:bits=1"}, "got 2 --recipe"},
      {{"--train-codebooks", "x", "--weight", "fisher"}, "--weight expects mass or none, got 'fisher'"},
      {{"--train-codebooks", "x", "--seed", "-1"}, "--seed expects an integer >= 0, got '-1'"},
      {{"--windows", "2-1"}, "--windows expects window numbers"},
      {{"--windows", "1,,2"}, "--windows expects window numbers"},
      {{"--train-codebooks", "x", "--json"}, "do not apply"},
      {{"--train-codebooks", "x", "--pre-rope"}, "--pre-rope do not apply"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> args = {"--dumps", "/nonexistent", "--recipe", "cq:channels=4,bits=2"};
    args.insert(args.end(), c.args.begin(), c.args.end());
    const RunResult r = run(args);
    EXPECT_EQ(r.status, 2) << r.out;
    EXPECT_TRUE(has(r.out, c.message)) << r.out;
  }
}

// --layer-similarity (adjacent-layer cosines for MiniCache): one JSON object with one entry
// per adjacent layer pair, the library's numbers; mistakes are usage errors naming the value.
TEST(EvalCliSimilarity, OneEntryPerAdjacentLayerPair) {
  KVSLIM_REQUIRE_SHARED(kDumps);
  const std::string dir = test::shared_path(kDumps);
  const RunResult r = run({"--dumps", dir, "--layer-similarity", "--windows", "0", "--threshold", "0.8", "--json"},
                          " 2>/dev/null");
  ASSERT_EQ(r.status, 0) << r.out;
  const nlohmann::json o = nlohmann::json::parse(r.out);
  EXPECT_EQ(o.size(), 3u) << r.out;
  EXPECT_EQ(o.at("model_dir"), dir);
  EXPECT_EQ(o.at("threshold").get<double>(), 0.8);
  // stories260K: 5 layers, 4 kv heads, 512 tokens per window.
  const nlohmann::json& pairs = o.at("layer_similarity");
  ASSERT_EQ(pairs.size(), 4u) << r.out;
  const auto lib = testing::layer_similarity(testing::load_recording(test::shared_path(kWindow0)), 0.8);
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    const nlohmann::json& p = pairs[i];
    EXPECT_EQ(p.size(), 7u) << p;
    EXPECT_EQ(p.at("lower").get<int>(), static_cast<int>(i)) << p;
    EXPECT_EQ(p.at("upper").get<int>(), static_cast<int>(i) + 1) << p;
    EXPECT_EQ(p.at("pairs").get<std::int64_t>(), 4 * 512) << p;
    for (const char* key : {"k_cos", "v_cos"}) {
      EXPECT_GE(p.at(key).get<double>(), -1.0) << key << ": " << p;
      EXPECT_LE(p.at(key).get<double>(), 1.0) << key << ": " << p;
    }
    for (const char* key : {"k_below", "v_below"}) {
      EXPECT_GE(p.at(key).get<double>(), 0.0) << key << ": " << p;
      EXPECT_LE(p.at(key).get<double>(), 1.0) << key << ": " << p;
    }
    // Printed with 8 decimals.
    EXPECT_NEAR(p.at("k_cos").get<double>(), lib[i].k_cos, 1e-8) << p;
    EXPECT_NEAR(p.at("v_below").get<double>(), lib[i].v_below, 1e-8) << p;
  }
  // Default threshold 0.5; the table has one row per pair, labelled l-1→l.
  const RunResult d = run({"--dumps", dir, "--layer-similarity", "--windows", "0", "--json"}, " 2>/dev/null");
  ASSERT_EQ(d.status, 0) << d.out;
  EXPECT_EQ(nlohmann::json::parse(d.out).at("threshold").get<double>(), 0.5);
  const RunResult t = run({"--dumps", dir, "--layer-similarity", "--windows", "0-1"}, " 2>/dev/null");
  ASSERT_EQ(t.status, 0) << t.out;
  EXPECT_TRUE(has(t.out, "2 recordings under")) << t.out;
  EXPECT_TRUE(has(t.out, "K<0.5") && has(t.out, "V<0.5")) << t.out;
  for (const char* label : {"\n0\u21921 ", "\n3\u21924 "}) EXPECT_TRUE(has(t.out, label)) << label << t.out;
  EXPECT_FALSE(has(t.out, "4\u21925")) << t.out;
}

TEST(EvalCliSimilarity, RecordingsOfTwoModelsAreNamed) {
  KVSLIM_REQUIRE_SHARED(kDumps);
  const RunResult r = run({"--dumps", test::shared_path("data/dumps"), "--layer-similarity", "--windows", "0"});
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_TRUE(has(r.out, "--layer-similarity needs recordings of one model")) << r.out;
  EXPECT_TRUE(has(r.out, "stories260K/tsval_w0") && has(r.out, "tinystories656K/tsval_w0")) << r.out;
}

TEST(EvalCliSimilarity, UsageMistakes) {
  const struct {
    std::vector<std::string> args;
    const char* message;
  } cases[] = {
      {{"--recipe", "f32"}, "--layer-similarity does not take --recipe:"},
      {{"--chunk", "4"}, "--layer-similarity does not take --chunk:"},
      {{"--pre-rope"}, "--layer-similarity does not take --pre-rope:"},
      {{"--train-codebooks", "x.kvcb"}, "--layer-similarity does not take --train-codebooks:"},
      {{"--tokens", "8"}, "--layer-similarity does not take --tokens:"},
      {{"--recipe", "f32", "--chunk", "2", "--recipe", "f16"}, "does not take --recipe, --chunk:"},
      {{"--threshold", "1.5"}, "--threshold expects a cosine in [-1, 1], got '1.5'"},
      {{"--threshold", "-1.01"}, "--threshold expects a cosine in [-1, 1], got '-1.01'"},
      {{"--threshold", "abc"}, "--threshold expects a cosine in [-1, 1], got 'abc'"},
      {{"--threshold", "0.5x"}, "--threshold expects a cosine in [-1, 1], got '0.5x'"},
      {{"--threshold", "nan"}, "--threshold expects a cosine in [-1, 1], got 'nan'"},
      {{"--threshold", ""}, "--threshold expects a cosine in [-1, 1], got ''"},
      {{"--threshold"}, "--threshold needs a value"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> args = {"--dumps", "/nonexistent", "--layer-similarity"};
    args.insert(args.end(), c.args.begin(), c.args.end());
    const RunResult r = run(args);
    EXPECT_EQ(r.status, 2) << r.out;
    EXPECT_TRUE(has(r.out, c.message)) << r.out;
  }
  // --threshold belongs to --layer-similarity.
  const RunResult r = run({"--dumps", "/nonexistent", "--recipe", "f32", "--threshold", "0.5"});
  EXPECT_EQ(r.status, 2) << r.out;
  EXPECT_TRUE(has(r.out, "--threshold needs --layer-similarity")) << r.out;
}

TEST(EvalCli, WindowsSelectsRecordings) {
  KVSLIM_REQUIRE_SHARED(kDumps);
  const RunResult r = run({"--dumps", test::shared_path(kDumps), "--recipe", "f32", "--windows", "2-3", "--tokens",
                           "8"},
                          " 2>/dev/null");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_TRUE(has(r.out, "2 recordings under")) << r.out;
}

}  // namespace
}  // namespace kvslim
