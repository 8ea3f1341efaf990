// The JSON reader used for meta.json / config.json / tokenizer.json: values, escapes
// (including surrogate pairs), and errors that name the byte offset.
#include <gtest/gtest.h>

#include "kvslim/error.h"
#include "kvslim/util/json.h"

using namespace kvslim;

TEST(Json, ParsesDocuments) {
  const auto v = json::parse(R"({"a": [1, 2.5, -3e2], "b": {"c": "x\"y\u00e9\ud83d\ude00"}, "t": true, "n": null})");
  ASSERT_TRUE(v.is_object());
  EXPECT_EQ(v.at("a").as_array().size(), 3u);
  EXPECT_EQ(v.at("a").as_array()[2].as_number(), -300.0);
  EXPECT_EQ(v.at("a").as_array()[0].as_int(), 1);
  EXPECT_EQ(v.at("b").at("c").as_string(), "x\"y\xc3\xa9\xf0\x9f\x98\x80");
  EXPECT_TRUE(v.at("t").as_bool());
  EXPECT_TRUE(v.at("n").is_null());
  EXPECT_EQ(v.find("zz"), nullptr);
  EXPECT_EQ(json::quote("a\"b\n"), "\"a\\\"b\\n\"");
}

TEST(Json, ErrorsNameTheProblem) {
  auto msg = [](const char* text) {
    try {
      json::parse(text);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kFormat);
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(msg(R"({"a": 1,})").find("at byte"), std::string::npos);
  EXPECT_NE(msg(R"([1, 2)").find("expected ']'"), std::string::npos);
  EXPECT_NE(msg(R"("abc)").find("unterminated string"), std::string::npos);
  EXPECT_NE(msg("{} x").find("trailing"), std::string::npos);
  const auto v = json::parse(R"({"a": "s", "f": 1.5})");
  try {
    (void)v.at("a").as_number("a");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("a is a string, expected number"), std::string::npos) << e.what();
  }
  EXPECT_THROW((void)v.at("f").as_int("f"), Error);
  EXPECT_THROW((void)v.at("missing"), Error);
}
