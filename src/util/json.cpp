#include "kvslim/util/json.h"

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "check.h"

namespace kvslim::json {
namespace {

const char* type_name(Value::Type t) {
  switch (t) {
    case Value::Type::kNull: return "null";
    case Value::Type::kBool: return "bool";
    case Value::Type::kNumber: return "number";
    case Value::Type::kString: return "string";
    case Value::Type::kArray: return "array";
    case Value::Type::kObject: return "object";
  }
  return "?";
}

class Parser {
 public:
  explicit Parser(std::string_view s) : s_(s) {}

  Value document() {
    Value v = value(0);
    ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  [[noreturn]] void fail(std::string_view what) const {
    KVSLIM_FAIL(ErrorCode::kFormat, "JSON: {} at byte {}", what, i_);
  }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  bool eat(char c) {
    ws();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!eat(c)) fail(fmt::format("expected '{}'", c));
  }
  bool literal(std::string_view w) {
    if (s_.substr(i_, w.size()) == w) {
      i_ += w.size();
      return true;
    }
    return false;
  }

  Value value(int depth) {
    if (depth > 512) fail("nesting too deep");
    ws();
    if (i_ >= s_.size()) fail("unexpected end of input");
    const char c = s_[i_];
    if (c == '{') return object(depth);
    if (c == '[') return array(depth);
    if (c == '"') return Value::string(string());
    if (literal("true")) return Value::boolean(true);
    if (literal("false")) return Value::boolean(false);
    if (literal("null")) return Value::null();
    if (c == '-' || (c >= '0' && c <= '9')) return number();
    fail(fmt::format("unexpected character '{}'", c));
  }

  Value object(int depth) {
    ++i_;
    std::vector<std::pair<std::string, Value>> members;
    if (eat('}')) return Value::object(std::move(members));
    do {
      ws();
      if (i_ >= s_.size() || s_[i_] != '"') fail("expected a string key");
      std::string key = string();
      expect(':');
      members.emplace_back(std::move(key), value(depth + 1));
    } while (eat(','));
    expect('}');
    return Value::object(std::move(members));
  }

  Value array(int depth) {
    ++i_;
    std::vector<Value> items;
    if (eat(']')) return Value::array(std::move(items));
    do {
      items.push_back(value(depth + 1));
    } while (eat(','));
    expect(']');
    return Value::array(std::move(items));
  }

  Value number() {
    const std::size_t start = i_;
    if (s_[i_] == '-') ++i_;
    auto digits = [&] {
      const std::size_t b = i_;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
      if (i_ == b) fail("malformed number");
    };
    digits();
    if (i_ < s_.size() && s_[i_] == '.') {
      ++i_;
      digits();
    }
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      ++i_;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      digits();
    }
    const std::string tok(s_.substr(start, i_ - start));
    return Value::number(std::strtod(tok.c_str(), nullptr));
  }

  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("truncated \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = s_[i_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f') v |= static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= static_cast<unsigned>(c - 'A' + 10);
      else fail("bad \\u escape");
    }
    return v;
  }

  static void put_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xc0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xe0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    }
  }

  std::string string() {
    ++i_;  // opening quote
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      const char c = s_[i_++];
      if (c == '"') break;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("unterminated escape");
      const char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xd800 && cp < 0xdc00) {  // surrogate pair
            if (!literal("\\u")) fail("lone high surrogate");
            const unsigned lo = hex4();
            if (lo < 0xdc00 || lo >= 0xe000) fail("bad low surrogate");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          }
          put_utf8(out, cp);
          break;
        }
        default: fail(fmt::format("bad escape '\\{}'", e));
      }
    }
    return out;
  }

  std::string_view s_;
  std::size_t i_ = 0;
};

}  // namespace

#define KVSLIM_JSON_EXPECT(T)                                                                 \
  KVSLIM_CHECK(type_ == Type::T, ErrorCode::kFormat, "JSON: {} is a {}, expected {}", what, \
               type_name(type_), type_name(Type::T))

double Value::as_number(std::string_view what) const {
  KVSLIM_JSON_EXPECT(kNumber);
  return num_;
}
std::int64_t Value::as_int(std::string_view what) const {
  KVSLIM_JSON_EXPECT(kNumber);
  KVSLIM_CHECK(std::nearbyint(num_) == num_ && std::fabs(num_) < 9.0e15, ErrorCode::kFormat,
               "JSON: {} = {} is not an integer", what, num_);
  return static_cast<std::int64_t>(num_);
}
bool Value::as_bool(std::string_view what) const {
  KVSLIM_JSON_EXPECT(kBool);
  return b_;
}
const std::string& Value::as_string(std::string_view what) const {
  KVSLIM_JSON_EXPECT(kString);
  return str_;
}
const std::vector<Value>& Value::as_array(std::string_view what) const {
  KVSLIM_JSON_EXPECT(kArray);
  return arr_;
}
const std::vector<std::pair<std::string, Value>>& Value::as_object(std::string_view what) const {
  KVSLIM_JSON_EXPECT(kObject);
  return obj_;
}
#undef KVSLIM_JSON_EXPECT

const Value* Value::find(std::string_view key) const noexcept {
  if (type_ != Type::kObject) return nullptr;
  for (const auto& [k, v] : obj_)
    if (k == key) return &v;
  return nullptr;
}
const Value& Value::at(std::string_view key) const {
  const Value* v = find(key);
  KVSLIM_CHECK(v != nullptr, ErrorCode::kFormat, "JSON: missing key '{}'", key);
  return *v;
}

Value Value::boolean(bool b) {
  Value v;
  v.type_ = Type::kBool;
  v.b_ = b;
  return v;
}
Value Value::number(double d) {
  Value v;
  v.type_ = Type::kNumber;
  v.num_ = d;
  return v;
}
Value Value::string(std::string s) {
  Value v;
  v.type_ = Type::kString;
  v.str_ = std::move(s);
  return v;
}
Value Value::array(std::vector<Value> a) {
  Value v;
  v.type_ = Type::kArray;
  v.arr_ = std::move(a);
  return v;
}
Value Value::object(std::vector<std::pair<std::string, Value>> o) {
  Value v;
  v.type_ = Type::kObject;
  v.obj_ = std::move(o);
  return v;
}

Value parse(std::string_view text) { return Parser(text).document(); }

Value parse_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  KVSLIM_CHECK(f.good(), ErrorCode::kIo, "cannot open JSON file '{}'", path);
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return parse(ss.str());
  } catch (const Error& e) {
    KVSLIM_FAIL(ErrorCode::kFormat, "{}: {}", path, e.what());
  }
}

std::string quote(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) out += fmt::format("\\u{:04x}", static_cast<unsigned>(c));
        else out += c;
    }
  }
  return out + "\"";
}

}  // namespace kvslim::json
