// A small JSON reader (DOM) for the files kvslim and its tools read: recording meta.json,
// Hugging Face config.json / tokenizer.json, safetensors headers. Strict RFC 8259 syntax;
// errors throw kvslim::Error(kFormat) with the byte offset.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace kvslim::json {

class Value {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  Type type() const noexcept { return type_; }
  bool is_null() const noexcept { return type_ == Type::kNull; }
  bool is_number() const noexcept { return type_ == Type::kNumber; }
  bool is_string() const noexcept { return type_ == Type::kString; }
  bool is_array() const noexcept { return type_ == Type::kArray; }
  bool is_object() const noexcept { return type_ == Type::kObject; }
  bool is_bool() const noexcept { return type_ == Type::kBool; }

  /// Typed access; throws Error(kFormat) naming `what` if the type differs.
  double as_number(std::string_view what = "value") const;
  std::int64_t as_int(std::string_view what = "value") const;
  bool as_bool(std::string_view what = "value") const;
  const std::string& as_string(std::string_view what = "value") const;
  const std::vector<Value>& as_array(std::string_view what = "value") const;
  const std::vector<std::pair<std::string, Value>>& as_object(std::string_view what = "value") const;

  /// Object member or nullptr.
  const Value* find(std::string_view key) const noexcept;
  /// Object member; throws Error(kFormat) "missing key 'x'" if absent.
  const Value& at(std::string_view key) const;

  static Value null() { return Value(); }
  static Value boolean(bool b);
  static Value number(double d);
  static Value string(std::string s);
  static Value array(std::vector<Value> a);
  static Value object(std::vector<std::pair<std::string, Value>> o);

 private:
  Type type_ = Type::kNull;
  bool b_ = false;
  double num_ = 0.0;
  std::string str_;
  std::vector<Value> arr_;
  std::vector<std::pair<std::string, Value>> obj_;  // insertion order kept
};

/// Parse a whole document; throws Error(kFormat) with offset on bad syntax.
Value parse(std::string_view text);
/// Read and parse a file; throws Error(kIo) if unreadable.
Value parse_file(const std::string& path);
/// Quote and escape a string for JSON output.
std::string quote(std::string_view s);

}  // namespace kvslim::json
