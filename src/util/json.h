// Internal: reading and writing JSON through nlohmann_json (recording meta.json, Hugging Face
// config.json / tokenizer.json, safetensors headers; quoting strings in tool output). Not a
// public header: the library, its tools, examples and tests include it from src/.
//
// Every syntax error, missing key and type mismatch throws kvslim::Error(kFormat); callers add
// the file name (parse_file does it itself). nlohmann exceptions never escape these helpers:
// parse errors are caught and reworded with their byte offset, and typed access checks the
// type before nlohmann's own (throwing) accessors are reached.
#pragma once

#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <string_view>

#include "check.h"

namespace kvslim::json {

using Value = nlohmann::json;

namespace detail {
inline std::string_view reason(const nlohmann::json::exception& e) {
  // "[json.exception.parse_error.101] parse error at line 1, column 9: ..." -> after "] ".
  std::string_view s = e.what();
  const std::size_t p = s.find("] ");
  return p == std::string_view::npos ? s : s.substr(p + 2);
}
}  // namespace detail

/// Parses a whole document; bad syntax throws Error(kFormat) "JSON parse error at byte N: ...".
inline Value parse(std::string_view text) {
  try {
    return Value::parse(text.begin(), text.end());
  } catch (const nlohmann::json::parse_error& e) {
    // nlohmann: "parse error at line 3, column 7: syntax error while parsing ...".
    std::string_view r = detail::reason(e), where;
    constexpr std::string_view kAt = "parse error at ";
    if (const std::size_t colon = r.find(": "); r.starts_with(kAt) && colon != r.npos) {
      where = r.substr(kAt.size(), colon - kAt.size());
      r.remove_prefix(colon + 2);
    }
    KVSLIM_FAIL(ErrorCode::kFormat, "JSON parse error at byte {}{}{}{}: {}", e.byte,
                where.empty() ? "" : " (", where, where.empty() ? "" : ")", r);
  } catch (const nlohmann::json::exception& e) {
    KVSLIM_FAIL(ErrorCode::kFormat, "JSON: {}", detail::reason(e));
  }
}

/// Reads and parses `path`: Error(kIo) if unreadable, Error(kFormat) "'path': ..." if malformed.
inline Value parse_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  KVSLIM_CHECK(f.good(), ErrorCode::kIo, "cannot open JSON file '{}'", path);
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return parse(ss.str());
  } catch (const Error& e) {
    KVSLIM_FAIL(ErrorCode::kFormat, "'{}': {}", path, e.what());
  }
}

/// Object member or nullptr (also nullptr if `obj` is not an object).
inline const Value* find(const Value& obj, std::string_view key) noexcept {
  if (!obj.is_object()) return nullptr;
  const auto it = obj.find(key);
  return it == obj.end() ? nullptr : &*it;
}

/// Object member; Error(kFormat) "JSON: missing key 'x'" if absent.
inline const Value& at(const Value& obj, std::string_view key) {
  const Value* v = find(obj, key);
  KVSLIM_CHECK(v != nullptr, ErrorCode::kFormat, "JSON: missing key '{}'", key);
  return *v;
}

// Typed access: Error(kFormat) "JSON: <what> is a <type>, expected <type>" on a mismatch.
#define KVSLIM_JSON_EXPECT(cond, expected)                                                      \
  KVSLIM_CHECK(cond, ErrorCode::kFormat, "JSON: {} is a{} {}, expected {}", what,              \
               v.is_object() || v.is_array() ? "n" : "", v.type_name(), expected)

inline double as_number(const Value& v, std::string_view what = "value") {
  KVSLIM_JSON_EXPECT(v.is_number(), "number");
  return v.get<double>();
}
/// An integer, or a float with an integral value below 2^53 (as the old reader accepted).
inline std::int64_t as_int(const Value& v, std::string_view what = "value") {
  KVSLIM_JSON_EXPECT(v.is_number(), "number");
  if (v.is_number_unsigned()) {
    const std::uint64_t u = v.get<std::uint64_t>();
    KVSLIM_CHECK(u <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                 ErrorCode::kFormat, "JSON: {} = {} does not fit in int64", what, u);
    return static_cast<std::int64_t>(u);
  }
  if (v.is_number_integer()) return v.get<std::int64_t>();
  const double d = v.get<double>();
  KVSLIM_CHECK(std::nearbyint(d) == d && std::fabs(d) < 9.0e15, ErrorCode::kFormat,
               "JSON: {} = {} is not an integer", what, d);
  return static_cast<std::int64_t>(d);
}
inline bool as_bool(const Value& v, std::string_view what = "value") {
  KVSLIM_JSON_EXPECT(v.is_boolean(), "boolean");
  return v.get<bool>();
}
inline const std::string& as_string(const Value& v, std::string_view what = "value") {
  KVSLIM_JSON_EXPECT(v.is_string(), "string");
  return v.get_ref<const std::string&>();
}
inline const Value::array_t& as_array(const Value& v, std::string_view what = "value") {
  KVSLIM_JSON_EXPECT(v.is_array(), "array");
  return v.get_ref<const Value::array_t&>();
}
/// Members sorted by key (nlohmann_json's std::map), not in file order.
inline const Value::object_t& as_object(const Value& v, std::string_view what = "value") {
  KVSLIM_JSON_EXPECT(v.is_object(), "object");
  return v.get_ref<const Value::object_t&>();
}
#undef KVSLIM_JSON_EXPECT

/// Quotes and escapes `s` as a JSON string; invalid UTF-8 becomes U+FFFD (never throws).
inline std::string quote(std::string_view s) {
  return Value(std::string(s)).dump(-1, ' ', false, Value::error_handler_t::replace);
}

}  // namespace kvslim::json
