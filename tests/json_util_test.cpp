// src/util/json.h, the private wrapper over nlohmann_json used for meta.json, config.json,
// tokenizer.json and safetensors headers: syntax errors, missing keys and type mismatches all
// become kvslim::Error(kFormat) with a byte offset or the key's name (never a nlohmann
// exception), and the recordings reader names the meta.json it could not read. quote() is
// what the tools print JSON strings with: it must escape and never throw.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "kvslim/error.h"
#include "kvslim/testing/recordings.h"
#include "util/json.h"

namespace kvslim {
namespace {

/// The message of the kvslim::Error that `f` throws (fails the test if it throws none, or a
/// different code; any other exception escapes and fails the test too).
template <class F>
std::string format_error(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kFormat) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no error thrown";
  return {};
}

TEST(JsonUtil, ParseErrorsGiveTheByteOffset) {
  EXPECT_EQ(json::as_int(json::at(json::parse(R"({"a": 3})"), "a")), 3);
  const std::string m = format_error([] { json::parse(R"({"a": 1,)"); });
  EXPECT_NE(m.find("parse error at byte 9"), std::string::npos) << m;
  EXPECT_EQ(m.find("[json.exception"), std::string::npos) << m;
  EXPECT_NE(format_error([] { json::parse("{} x"); }).find("parse error at byte"),
            std::string::npos);
  EXPECT_NE(format_error([] { json::parse("\"\xff\""); }).find("parse error"), std::string::npos);
}

TEST(JsonUtil, TypeMismatchesAndMissingKeysNameTheKey) {
  const json::Value v = json::parse(R"({"s": "x", "f": 1.5, "i": 7, "big": 18446744073709551615,
                                        "b": true, "a": [1], "o": {}, "fi": 4.0})");
  EXPECT_NE(format_error([&] { json::as_number(json::at(v, "s"), "s"); })
                .find("s is a string, expected number"),
            std::string::npos);
  EXPECT_NE(format_error([&] { json::as_int(json::at(v, "f"), "f"); })
                .find("f = 1.5 is not an integer"),
            std::string::npos);
  EXPECT_NE(format_error([&] { json::as_int(json::at(v, "big"), "big"); }).find("int64"),
            std::string::npos);
  EXPECT_NE(format_error([&] { json::as_string(json::at(v, "o"), "o"); })
                .find("o is an object, expected string"),
            std::string::npos);
  EXPECT_NE(format_error([&] { json::as_bool(json::at(v, "i"), "i"); })
                .find("i is a number, expected boolean"),
            std::string::npos);
  EXPECT_NE(format_error([&] { json::as_array(json::at(v, "b"), "b"); }).find("b is a boolean"),
            std::string::npos);
  EXPECT_NE(format_error([&] { json::at(v, "zz"); }).find("missing key 'zz'"), std::string::npos);
  EXPECT_NE(format_error([&] { json::at(json::at(v, "a"), "k"); }).find("missing key 'k'"),
            std::string::npos);  // not an object: no nlohmann type_error
  EXPECT_EQ(json::as_int(json::at(v, "i")), 7);
  EXPECT_EQ(json::as_int(json::at(v, "fi")), 4);
  EXPECT_EQ(json::find(json::at(v, "a"), "x"), nullptr);
}

TEST(JsonUtil, QuoteEscapesAndNeverThrows) {
  EXPECT_EQ(json::quote("a\"b\\c\n\t\x01"), "\"a\\\"b\\\\c\\n\\t\\u0001\"");
  EXPECT_EQ(json::quote("\xc3\xa9"), "\"\xc3\xa9\"");
  EXPECT_EQ(json::quote("a\xff"), "\"a\xef\xbf\xbd\"");  // invalid UTF-8 -> U+FFFD
  EXPECT_EQ(json::as_string(json::parse(json::quote("x\"\n\x1f"))), "x\"\n\x1f");
}

TEST(JsonUtil, RecordingMetaErrorsNameTheFile) {
  namespace fs = std::filesystem;
  const fs::path dir =
      fs::temp_directory_path() / ("kvslim_json_util_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string meta = (dir / "meta.json").string();
  auto put = [&](const std::string& text) { std::ofstream(meta, std::ios::binary) << text; };

  put(R"({"name": "w0", "config": {"n_layers": 2,)");  // truncated
  std::string m = format_error([&] { testing::load_recording(dir.string()); });
  EXPECT_NE(m.find(meta), std::string::npos) << m;
  EXPECT_NE(m.find("parse error at byte"), std::string::npos) << m;

  put(R"({"name": "w0", "config": {"n_layers": "2"}})");
  m = format_error([&] { testing::load_recording(dir.string()); });
  EXPECT_NE(m.find(meta), std::string::npos) << m;
  EXPECT_NE(m.find("n_layers is a string, expected number"), std::string::npos) << m;

  put(R"({"name": "w0"})");
  m = format_error([&] { testing::load_recording(dir.string()); });
  EXPECT_NE(m.find(meta), std::string::npos) << m;
  EXPECT_NE(m.find("missing key 'config'"), std::string::npos) << m;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace kvslim
