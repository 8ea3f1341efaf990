// Loader errors: every bad model file must throw kvslim::Error with the right code and a
// message that names the file and the bad value, never crash (this suite also runs under
// ASan/UBSan). Bad files are made from the shared models in a scratch directory: truncated
// checkpoints and tokenizers, implausible headers, broken safetensors headers, unknown
// dtypes, shapes that contradict config.json, missing tokenizers and missing files.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>

#include "file_io.h"
#include "kvslim/error.h"
#include "llama_test_util.h"

namespace kvslim::llama {
namespace {

namespace fs = std::filesystem;

std::string shared_bytes(const std::string& rel) {
  return read_file(kvslim::test::shared_path(rel), "test input");
}

void put(const std::string& path, const std::string& bytes) {
  write_file(path, bytes.data(), bytes.size());
}

/// Runs `f`, expects an Error with `code` whose message contains every string in `parts`.
template <class F>
void expect_error(F&& f, ErrorCode code, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << "message: " << e.what();
    for (const std::string& p : parts)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos)
          << "message '" << e.what() << "' does not mention '" << p << "'";
  }
}

class Llama2cErrors : public ::testing::Test {
 protected:
  void SetUp() override { KVSLIM_REQUIRE_SHARED(test::kStoriesBin); }
  std::string checkpoint() const { return shared_bytes(test::kStoriesBin); }
  std::string tokenizer() const { return shared_bytes("models/stories260K/tok512.bin"); }
};

TEST_F(Llama2cErrors, TruncatedCheckpoint) {
  test::ScratchDir dir("trunc");
  const std::string ckpt = checkpoint();
  put(dir.file("model.bin"), ckpt.substr(0, 500000));
  put(dir.file("tok512.bin"), tokenizer());
  expect_error([&] { load_model(dir.file("model.bin")); }, ErrorCode::kFormat,
               {dir.file("model.bin"), "500000", std::to_string(ckpt.size()), "truncated"});
  // Directory form, and a file that ends inside the header.
  put(dir.file("model.bin"), ckpt.substr(0, 10));
  expect_error([&] { load_model(dir.str()); }, ErrorCode::kFormat,
               {dir.file("model.bin"), "truncated", "n_layers"});
}

TEST_F(Llama2cErrors, ImplausibleHeader) {
  test::ScratchDir dir("header");
  put(dir.file("tok512.bin"), tokenizer());
  auto with_field = [&](int index, std::int32_t value) {
    std::string c = checkpoint();
    std::memcpy(c.data() + 4 * index, &value, 4);
    put(dir.file("m.bin"), c);
  };
  with_field(3, 0);  // n_heads
  expect_error([&] { load_model(dir.file("m.bin")); }, ErrorCode::kFormat,
               {dir.file("m.bin"), "n_heads = 0"});
  with_field(3, 7);  // 64 is not a multiple of 7
  expect_error([&] { load_model(dir.file("m.bin")); }, ErrorCode::kFormat, {"n_heads 7"});
  with_field(0, -5);  // dim
  expect_error([&] { load_model(dir.file("m.bin")); }, ErrorCode::kFormat, {"dim = -5"});
  with_field(2, 6);  // n_layers 6: the file is now too short for its header
  expect_error([&] { load_model(dir.file("m.bin")); }, ErrorCode::kFormat,
               {"n_layers=6", "truncated"});
}

TEST_F(Llama2cErrors, BadOrMissingTokenizer) {
  test::ScratchDir dir("tok");
  put(dir.file("stories260K.bin"), checkpoint());
  expect_error([&] { load_model(dir.file("stories260K.bin")); }, ErrorCode::kIo,
               {"tok*.bin", dir.str()});
  const std::string tok = tokenizer();
  put(dir.file("tok512.bin"), tok.substr(0, tok.size() / 2));
  expect_error([&] { load_model(dir.str()); }, ErrorCode::kFormat,
               {dir.file("tok512.bin"), "truncated"});
  put(dir.file("tok512.bin"), tok + "xx");
  expect_error([&] { load_model(dir.str()); }, ErrorCode::kFormat,
               {dir.file("tok512.bin"), "2 bytes after"});
}

class HfErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    KVSLIM_REQUIRE_SHARED(test::kTinyWeights);
    for (const char* f : {"config.json", "tokenizer.json"})
      put(dir_.file(f), shared_bytes(std::string(test::kTiny) + "/" + f));
    weights_ = shared_bytes(test::kTinyWeights);
  }
  std::string weights_path() const { return dir_.file("model.safetensors"); }
  test::ScratchDir dir_{"hf"};
  std::string weights_;
};

TEST_F(HfErrors, CopyLoads) {
  put(weights_path(), weights_);
  EXPECT_NO_THROW(load_model(dir_.str()));
}

TEST_F(HfErrors, BadSafetensorsHeader) {
  std::string w = weights_;
  const std::uint64_t huge = std::uint64_t{1} << 40;
  std::memcpy(w.data(), &huge, 8);
  put(weights_path(), w);
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kFormat,
               {weights_path(), "header length", std::to_string(huge)});

  w = weights_;
  w[8] = '[';  // the header must be a JSON object
  w[9] = '!';
  put(weights_path(), w);
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kFormat,
               {weights_path(), "bad JSON header"});

  put(weights_path(), weights_.substr(0, 5));
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kFormat,
               {weights_path(), "truncated"});
}

TEST_F(HfErrors, UnknownDtype) {
  std::string w = weights_;
  std::uint64_t header_len = 0;
  std::memcpy(&header_len, w.data(), 8);
  const std::size_t at = w.find("\"F32\"");
  ASSERT_LT(at, 8 + header_len);
  w.replace(at, 5, "\"F16\"");  // same length: offsets stay valid, only the dtype changes
  put(weights_path(), w);
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kFormat,
               {weights_path(), "F16", "only F32"});
}

TEST_F(HfErrors, DataOutsideFile) {
  put(weights_path(), weights_.substr(0, weights_.size() - 4096));
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kFormat,
               {weights_path(), "outside"});
}

TEST_F(HfErrors, ShapeContradictsConfig) {
  put(weights_path(), weights_);
  std::string cfg = shared_bytes(std::string(test::kTiny) + "/config.json");
  const std::size_t at = cfg.find("\"intermediate_size\": 384");
  ASSERT_NE(at, std::string::npos);
  cfg.replace(at, 24, "\"intermediate_size\": 256");
  put(dir_.file("config.json"), cfg);
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kFormat,
               {"mlp.gate_proj.weight", "[384, 128]", "[256, 128]", "config.json implies"});
}

TEST_F(HfErrors, MissingFiles) {
  put(weights_path(), weights_);
  fs::remove(dir_.file("tokenizer.json"));
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kIo, {dir_.file("tokenizer.json")});
  fs::remove(dir_.file("config.json"));
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kIo, {dir_.file("config.json")});
  put(dir_.file("tokenizer.json"), "{\"model\": ");
  put(dir_.file("config.json"), shared_bytes(std::string(test::kTiny) + "/config.json"));
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kFormat, {dir_.file("tokenizer.json")});
}

// Malformed JSON (truncated files) and well-formed JSON with a value of the wrong type, in
// each of the three JSON files a Hugging Face directory holds: always Error(kFormat) naming
// the file and what was wrong (a byte offset for syntax, the key for a type), never a
// nlohmann exception.
TEST_F(HfErrors, MalformedJson) {
  put(weights_path(), weights_);
  const std::string cfg = shared_bytes(std::string(test::kTiny) + "/config.json");
  const std::string tok = shared_bytes(std::string(test::kTiny) + "/tokenizer.json");
  auto replaced = [](std::string s, const std::string& from, const std::string& to) {
    const std::size_t at = s.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return at == std::string::npos ? s : s.replace(at, from.size(), to);
  };

  put(dir_.file("config.json"), cfg.substr(0, cfg.size() / 2));
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kFormat,
               {dir_.file("config.json"), "parse error at byte"});
  put(dir_.file("config.json"),
      replaced(cfg, "\"hidden_size\": 128", "\"hidden_size\": \"128\""));
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kFormat,
               {dir_.file("config.json"), "hidden_size is a string, expected number"});
  put(dir_.file("config.json"), cfg);

  put(dir_.file("tokenizer.json"), tok.substr(0, tok.size() / 2));
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kFormat,
               {dir_.file("tokenizer.json"), "parse error at byte"});
  put(dir_.file("tokenizer.json"),
      replaced(tok, "\"byte_fallback\": true", "\"byte_fallback\": 1"));
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kFormat,
               {dir_.file("tokenizer.json"), "byte_fallback is a number, expected boolean"});
  put(dir_.file("tokenizer.json"), tok);

  // Same length, so the header length and data offsets stay valid.
  std::string w = replaced(weights_, "\"F32\"", "12345");
  put(weights_path(), w);
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kFormat,
               {weights_path(), "dtype is a number, expected string"});
  std::uint64_t header_len = 0;
  std::memcpy(&header_len, weights_.data(), 8);
  w = weights_;
  w[w.rfind('}', 8 + header_len - 1)] = ',';  // the header's closing brace (spaces follow)
  put(weights_path(), w);
  expect_error([&] { load_model(dir_.str()); }, ErrorCode::kFormat,
               {weights_path(), "bad JSON header", "parse error at byte"});
}

TEST(ModelPath, MissingOrUnrecognised) {
  test::ScratchDir dir("path");
  expect_error([&] { load_model(dir.file("nope")); }, ErrorCode::kIo,
               {dir.file("nope"), "does not exist"});
  expect_error([&] { load_model(dir.str()); }, ErrorCode::kIo, {dir.str(), "no model"});
  put(dir.file("weights.gguf"), "GGUF");
  expect_error([&] { load_model(dir.file("weights.gguf")); }, ErrorCode::kFormat,
               {dir.file("weights.gguf")});
}

}  // namespace
}  // namespace kvslim::llama
