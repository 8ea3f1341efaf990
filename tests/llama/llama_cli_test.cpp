// The kvslim-llama executable: `ppl --json` prints one parseable JSON object per recipe with
// the documented keys (the original eight unchanged, new ones only added; without eviction
// kept is 1 and ratio_seen equals ratio), `ppl --prefill N` (prompt then decode) scores the
// decoded tokens with the same keys, an f32 cache still giving KLD exactly 0, and rejects N
// outside [1, context) with exit code 2, the `ppl` table
// shows memory per token, bits per value and ratios labeled vs f32 / vs f16 / vs seen and
// the kept fraction with a legend,
// no progress bar is drawn into a non-terminal stderr, `generate` reports why it stopped and
// what the cache costs, characters the vocabulary cannot represent produce one warning,
// `dump` writes a recording the library's loader reads, bad usage and bad models exit
// nonzero with a message instead of crashing, the ../shared hint appears only when a model
// or text path is missing, and --help documents how KV bytes are measured.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "kvslim/testing/recordings.h"
#include "llama_test_util.h"

namespace kvslim::llama {
namespace {

using kvslim::test::RunResult;

/// Runs kvslim-llama with `redirect` appended to the shell command (see run_command).
RunResult run_redirect(const std::vector<std::string>& args, const char* redirect) {
  return kvslim::test::run_command(KVSLIM_LLAMA_EXE, args, redirect);
}

RunResult run(const std::vector<std::string>& args, bool with_stderr = true) {
  return run_redirect(args, with_stderr ? " 2>&1" : " 2>/dev/null");
}

bool has(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

std::vector<nlohmann::json> json_rows(const std::string& out) {
  std::istringstream lines(out);
  std::string line;
  std::vector<nlohmann::json> rows;
  while (std::getline(lines, line))
    if (!line.empty()) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

std::vector<std::string> keys_of(const nlohmann::json& row) {
  std::vector<std::string> k;
  for (const auto& [key, value] : row.items()) k.push_back(key);
  return k;
}

TEST(Cli, PplJsonLines) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  KVSLIM_REQUIRE_SHARED(test::kText);
  const RunResult r = run({"ppl", "--model", kvslim::test::shared_path(test::kStories), "--text",
                           kvslim::test::shared_path(test::kText), "--recipe", "f32", "--recipe",
                           "f16", "--recipe", "kivi:kbits=2,vbits=2", "--windows", "1", "--json"},
                          /*with_stderr=*/false);
  ASSERT_EQ(r.status, 0) << r.out;
  const std::vector<nlohmann::json> rows = json_rows(r.out);
  ASSERT_EQ(rows.size(), 3u) << r.out;
  EXPECT_EQ(rows[0].at("recipe").get<std::string>(), "f32");
  EXPECT_EQ(rows[1].at("recipe").get<std::string>(), "f16");
  for (const nlohmann::json& row : rows) {
    // The original eight keys keep their names; bytes_per_token, bits_per_value and
    // ratio_vs_f16 were added after them, then ratio_seen and kept (issue 8).
    EXPECT_EQ(row.size(), 13u);
    for (const char* key : {"ppl", "dppl_rel", "kld_mean", "top1_agree", "kv_bytes", "ratio",
                            "tokens_per_s", "bytes_per_token", "bits_per_value", "ratio_vs_f16",
                            "ratio_seen", "kept"})
      EXPECT_TRUE(row.at(key).is_number()) << key;
    EXPECT_DOUBLE_EQ(row.at("ratio_vs_f16").get<double>(), row.at("ratio").get<double>() / 2.0);
    EXPECT_NEAR(row.at("bits_per_value").get<double>() * row.at("ratio").get<double>(), 32.0, 0.5);
    // No eviction: every token seen is kept, so both ratios are the same number (up to the
    // last printed digit of two divisions done in a different order).
    EXPECT_EQ(row.at("kept").get<double>(), 1.0) << row.dump();
    EXPECT_NEAR(row.at("ratio_seen").get<double>(), row.at("ratio").get<double>(),
                1e-9 * row.at("ratio").get<double>())
        << row.dump();
  }
  EXPECT_EQ(rows[0].at("kld_mean").get<double>(), 0.0);
  EXPECT_GT(rows[1].at("ratio").get<double>(), rows[0].at("ratio").get<double>());
  // stories260K: 5 layers x 4 kv heads x (K + V) x head_dim 8 x 4 bytes = 1280 raw f32 bytes
  // per token; the measured f32 cache adds a little bookkeeping, f16 is about half.
  const double f32_bpt = rows[0].at("bytes_per_token").get<double>();
  EXPECT_GE(f32_bpt, 1280.0);
  EXPECT_LT(f32_bpt, 1280.0 * 1.1);
  EXPECT_LT(rows[1].at("bytes_per_token").get<double>(), 0.6 * f32_bpt);
}

TEST(Cli, PplTableLabelsMemoryAndExplainsIt) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  KVSLIM_REQUIRE_SHARED(test::kText);
  const std::vector<std::string> args = {
      "ppl", "--model", kvslim::test::shared_path(test::kStories), "--text",
      kvslim::test::shared_path(test::kText), "--recipe", "f32", "--recipe",
      "kivi:kbits=2,vbits=2,residual=0", "--windows", "1"};
  const RunResult out = run_redirect(args, " 2>/dev/null");
  ASSERT_EQ(out.status, 0) << out.out;
  for (const char* col : {"B/token", "bits/val", "vs f32", "vs f16", "vs seen", "kept", "tok/s"})
    EXPECT_TRUE(has(out.out, col)) << col << "\n" << out.out;
  EXPECT_TRUE(has(out.out, "protocol: token by token")) << out.out;
  EXPECT_TRUE(has(out.out, "vs seen: times smaller than an f32 cache of every token seen"))
      << out.out;
  EXPECT_TRUE(has(out.out, "kept: tokens kept / tokens seen")) << out.out;
  EXPECT_TRUE(has(out.out, " 100.0%  ")) << "kept without eviction:\n" << out.out;
  EXPECT_TRUE(has(out.out, "raw f32: 1280 B, f16: 640 B")) << out.out;
  EXPECT_TRUE(has(out.out, "f32 is slightly below 1.00x")) << out.out;
  EXPECT_TRUE(has(out.out, "At head_dim 8")) << out.out;
  // stderr is a pipe here: no progress bar redrawn with carriage returns, nothing at all.
  const RunResult err = run_redirect(args, " 2>&1 >/dev/null");
  EXPECT_EQ(err.status, 0);
  EXPECT_EQ(err.out, "") << err.out;
}

// Prompt then decode: the f32 reference and the recipes run the same protocol, so an f32
// recipe's KLD is exactly 0 (same arithmetic, bit for bit); a recipe that quantizes every
// token (KIVI-2, no full-precision window) differs on the decoded tokens.
TEST(Cli, PplPrefillScoresTheDecodedTokens) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  KVSLIM_REQUIRE_SHARED(test::kText);
  const std::vector<std::string> base = {
      "ppl", "--model", kvslim::test::shared_path(test::kStories), "--text",
      kvslim::test::shared_path(test::kText), "--recipe", "f32", "--recipe",
      "kivi:kbits=2,vbits=2,residual=0", "--windows", "1"};
  std::vector<std::string> args = base;
  args.insert(args.end(), {"--prefill", "256", "--json"});
  const RunResult r = run(args, /*with_stderr=*/false);
  ASSERT_EQ(r.status, 0) << r.out;
  const std::vector<nlohmann::json> rows = json_rows(r.out);
  ASSERT_EQ(rows.size(), 2u) << r.out;
  EXPECT_EQ(rows[0].at("kld_mean").get<double>(), 0.0) << rows[0].dump();
  EXPECT_EQ(rows[0].at("top1_agree").get<double>(), 1.0) << rows[0].dump();
  EXPECT_EQ(rows[0].at("dppl_rel").get<double>(), 0.0) << rows[0].dump();
  ASSERT_TRUE(rows[1].at("kld_mean").is_number()) << rows[1].dump();  // null = NaN/Inf
  const double kld = rows[1].at("kld_mean").get<double>();
  EXPECT_TRUE(std::isfinite(kld) && kld > 0.0) << rows[1].dump();

  // Same keys as a token-by-token run.
  std::vector<std::string> plain = base;
  plain.push_back("--json");
  const RunResult p = run(plain, /*with_stderr=*/false);
  ASSERT_EQ(p.status, 0) << p.out;
  const std::vector<nlohmann::json> prow = json_rows(p.out);
  ASSERT_EQ(prow.size(), 2u) << p.out;
  EXPECT_EQ(keys_of(rows[0]), keys_of(prow[0]));
  EXPECT_EQ(keys_of(rows[1]), keys_of(prow[1]));
  // The prefill run scores 512 - 256 tokens of the window, the default 511: different numbers.
  EXPECT_NE(rows[1].at("kld_mean").get<double>(), prow[1].at("kld_mean").get<double>());

  // The table names the protocol.
  std::vector<std::string> table = base;
  table.insert(table.end(), {"--prefill", "256"});
  const RunResult t = run(table, /*with_stderr=*/false);
  ASSERT_EQ(t.status, 0) << t.out;
  EXPECT_TRUE(has(t.out, "protocol: prefill 256 tokens in one chunk")) << t.out;
  EXPECT_TRUE(has(t.out, "256 predicted tokens per recipe")) << t.out;
}

TEST(Cli, PplPrefillMustBeInRange) {
  for (const char* bad : {"0", "abc", "-3", "12x"}) {
    const RunResult r = run({"ppl", "--model", "/nonexistent/model.bin", "--text", "x",
                             "--recipe", "f32", "--prefill", bad});
    EXPECT_EQ(r.status, 2) << bad << ": " << r.out;
    EXPECT_TRUE(has(r.out, std::string("--prefill expects an integer >= 1, got '") + bad + "'"))
        << r.out;
  }
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  KVSLIM_REQUIRE_SHARED(test::kText);
  // stories260K's context (= the window length) is 512 tokens.
  const RunResult big = run({"ppl", "--model", kvslim::test::shared_path(test::kStories),
                             "--text", kvslim::test::shared_path(test::kText), "--recipe", "f32",
                             "--prefill", "512"});
  EXPECT_EQ(big.status, 2) << big.out;
  EXPECT_TRUE(has(big.out, "smaller than the window length (512 tokens")) << big.out;
  EXPECT_TRUE(has(big.out, "got '512'")) << big.out;
}

TEST(Cli, GenerateReportsStopReasonAndMemory) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  const RunResult r = run_redirect({"generate", "--model",
                                    kvslim::test::shared_path(test::kStoriesBin), "--tokens", "3",
                                    "--recipe", "f16"},
                                   " 2>&1 >/dev/null");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_TRUE(has(r.out, "3 tokens generated, stopped by token limit")) << r.out;
  EXPECT_TRUE(has(r.out, "bytes per token (raw f32: 1280)")) << r.out;
  EXPECT_TRUE(has(r.out, "x vs f32]")) << r.out;
  // Left alone, stories260K ends its story with EOS well before its 512-token context.
  const RunResult eos = run_redirect(
      {"generate", "--model", kvslim::test::shared_path(test::kStoriesBin), "--tokens", "500"},
      " 2>&1 >/dev/null");
  ASSERT_EQ(eos.status, 0) << eos.out;
  EXPECT_TRUE(has(eos.out, "stopped by EOS token")) << eos.out;
}

TEST(Cli, CharactersOutsideTheVocabularyWarnOnce) {
  KVSLIM_REQUIRE_SHARED(test::kTinyWeights);
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  // tinystories656K's tokenizer.json has byte_fallback but no <0xXX> tokens: 'é' (2 bytes)
  // and '日' (3 bytes) become <unk>.
  const RunResult r = run_redirect({"generate", "--model", kvslim::test::shared_path(test::kTiny),
                                    "--prompt", "the caf\xC3\xA9 \xE6\x97\xA5", "--tokens", "2"},
                                   " 2>&1 >/dev/null");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_TRUE(has(r.out, "warning: 2 characters (5 bytes) of the prompt are not in the "
                         "vocabulary of tinystories656K"))
      << r.out;
  EXPECT_TRUE(has(r.out, "<unk>")) << r.out;
  const std::size_t first = r.out.find("warning");
  EXPECT_EQ(r.out.find("warning", first + 1), std::string::npos) << r.out;
  // stories260K falls back to byte tokens: nothing to warn about.
  const RunResult bytes = run_redirect({"generate", "--model",
                                        kvslim::test::shared_path(test::kStoriesBin), "--prompt",
                                        "the caf\xC3\xA9", "--tokens", "2"},
                                       " 2>&1 >/dev/null");
  ASSERT_EQ(bytes.status, 0) << bytes.out;
  EXPECT_FALSE(has(bytes.out, "warning")) << bytes.out;
}

TEST(Cli, SharedHintOnlyWhenAPathIsMissing) {
  const RunResult missing = run({"generate", "--model", "/nonexistent/model.bin"});
  EXPECT_EQ(missing.status, 1);
  EXPECT_TRUE(has(missing.out, "../shared")) << missing.out;

  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  KVSLIM_REQUIRE_SHARED(test::kText);
  // An I/O error unrelated to the shared files: the output directory cannot be created.
  const RunResult out = run({"dump", "--model", kvslim::test::shared_path(test::kStories),
                             "--text", kvslim::test::shared_path(test::kText), "--offset", "0",
                             "--out", "/dev/null/sub"});
  EXPECT_EQ(out.status, 1);
  EXPECT_TRUE(has(out.out, "/dev/null/sub")) << out.out;
  EXPECT_FALSE(has(out.out, "../shared")) << out.out;
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


// generate --save-cache / --load-cache (issue 15): a prompt prefilled and saved, then resumed
// for N tokens, prints exactly what one run of the prompt for N tokens prints, on both models
// and for compressed recipes with eviction; a session saved mid-generation resumes where it
// stopped; a different recipe, model, a truncated or flipped file fails with a message.
TEST(Cli, GenerateSaveAndResumeIsExact) {
  KVSLIM_REQUIRE_SHARED(test::kStoriesBin);
  KVSLIM_REQUIRE_SHARED(test::kTinyWeights);
  const std::string dir = ::testing::TempDir();
  for (const char* model : {test::kStories, test::kTiny})
    for (const char* recipe : {"h2o:budget=48 | kivi:kbits=4,vbits=2,residual=16", "kivi:kbits=2,vbits=2",
                               "mikv:budget=32,lo=(kivi:kbits=2,vbits=2) | f16"}) {
      SCOPED_TRACE(std::string(model) + " " + recipe);
      const std::string m = kvslim::test::shared_path(model), f = dir + "cli_session.kvs";
      const RunResult full = run({"generate", "--model", m, "--prompt", "Once upon a time", "--tokens", "80",
                                  "--recipe", recipe},
                                 false);
      ASSERT_EQ(full.status, 0) << full.out;
      const RunResult saved = run({"generate", "--model", m, "--prompt", "Once upon a time", "--tokens", "0",
                                   "--recipe", recipe, "--save-cache", f},
                                  false);
      ASSERT_EQ(saved.status, 0) << saved.out;
      const RunResult resumed = run({"generate", "--model", m, "--load-cache", f, "--tokens", "80"}, false);
      ASSERT_EQ(resumed.status, 0) << resumed.out;
      EXPECT_EQ(resumed.out, full.out);
      // Saved after 50 generated tokens, resumed for 31 more: the 50th is picked again.
      const RunResult mid = run({"generate", "--model", m, "--prompt", "Once upon a time", "--tokens", "50",
                                 "--recipe", recipe, "--save-cache", f},
                                false);
      ASSERT_EQ(mid.status, 0) << mid.out;
      const RunResult rest = run({"generate", "--model", m, "--load-cache", f, "--tokens", "31", "--recipe", recipe},
                                 false);
      ASSERT_EQ(rest.status, 0) << rest.out;
      EXPECT_EQ(rest.out, full.out);
      std::remove(f.c_str());
    }
  const std::string m = kvslim::test::shared_path(test::kStories), f = dir + "cli_session2.kvs";
  ASSERT_EQ(run({"generate", "--model", m, "--prompt", "Once", "--tokens", "0", "--recipe", "kivi:kbits=4,vbits=4",
                 "--save-cache", f})
                .status,
            0);
  RunResult r = run({"generate", "--model", m, "--load-cache", f, "--recipe", "f16"});
  EXPECT_NE(r.status, 0);
  EXPECT_TRUE(has(r.out, "was saved with the recipe 'kivi:kbits=4,vbits=4', not 'f16'")) << r.out;
  r = run({"generate", "--model", kvslim::test::shared_path(test::kTiny), "--load-cache", f});
  EXPECT_NE(r.status, 0);
  EXPECT_TRUE(has(r.out, "was saved with model 'stories260K'")) << r.out;
  r = run({"generate", "--model", m, "--load-cache", f, "--prompt", "x"});
  EXPECT_NE(r.status, 0);
  EXPECT_TRUE(has(r.out, "takes no --prompt")) << r.out;
  std::string bytes;
  {
    std::FILE* in = std::fopen(f.c_str(), "rb");
    ASSERT_NE(in, nullptr);
    char buf[4096];
    for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, in)) > 0;) bytes.append(buf, n);
    std::fclose(in);
  }
  for (const std::size_t cut : {bytes.size() / 3, bytes.size() - 1}) {
    const std::string t = dir + "cli_session_cut.kvs";
    std::FILE* out = std::fopen(t.c_str(), "wb");
    ASSERT_NE(out, nullptr);
    std::fwrite(bytes.data(), 1, cut, out);
    std::fclose(out);
    r = run({"generate", "--model", m, "--load-cache", t});
    EXPECT_NE(r.status, 0);
    EXPECT_TRUE(has(r.out, "error (format)")) << r.out;
    std::remove(t.c_str());
  }
  std::remove(f.c_str());
}

}  // namespace
}  // namespace kvslim::llama
