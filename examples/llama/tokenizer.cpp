#include "tokenizer.h"

#include <cstdio>
#include <queue>

#include "check.h"
#include "file_io.h"
#include "util/json.h"

namespace kvslim::llama {
namespace {

/// Splits UTF-8 text into code points the way llama2.c does: a lead byte plus at most three
/// continuation bytes. Invalid sequences still yield 1-4 byte units, so byte fallback can
/// represent any input.
std::vector<std::string_view> split_code_points(std::string_view text) {
  std::vector<std::string_view> out;
  std::size_t i = 0;
  while (i < text.size()) {
    std::size_t len = 1;
    while (i + len < text.size() && len < 4 &&
           (static_cast<unsigned char>(text[i + len]) & 0xC0u) == 0x80u)
      ++len;
    out.push_back(text.substr(i, len));
    i += len;
  }
  return out;
}

/// Parses "<0xAB>" into its byte value, or returns -1.
int parse_byte_token(std::string_view s) {
  if (s.size() != 6 || s.substr(0, 3) != "<0x" || s[5] != '>') return -1;
  int v = 0;
  for (std::size_t i = 3; i < 5; ++i) {
    const char c = s[i];
    int d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else return -1;
    v = v * 16 + d;
  }
  return v;
}

std::string byte_token_name(unsigned char b) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "<0x%02X>", static_cast<unsigned>(b));
  return buf;
}

/// Greedy pair merging shared by both encoders: repeatedly merge the adjacent pair with the
/// smallest key (llama2.c: -score of the merged token, HF: merge rank), leftmost pair first
/// on ties. A heap with lazy invalidation makes this O(n log n) instead of the reference
/// implementations' O(n^2) rescans, which matters for whole stories of several KB.
/// `pair(a, b, &key, &merged)` returns false if a and b do not merge.
template <class PairFn>
std::vector<int> merge_greedy(std::vector<int> ids, PairFn pair) {
  const int n = static_cast<int>(ids.size());
  if (n < 2) return ids;
  std::vector<int> prev(ids.size()), next(ids.size());
  std::vector<char> alive(ids.size(), 1);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Entry {
    double key;
    int pos, right, left_id, right_id, merged;
  };
  auto later = [](const Entry& a, const Entry& b) {
    return a.key != b.key ? a.key > b.key : a.pos > b.pos;
  };
  std::priority_queue<Entry, std::vector<Entry>, decltype(later)> heap(later);
  auto push = [&](int i, int j) {
    double key = 0.0;
    int merged = -1;
    if (pair(ids[i], ids[j], &key, &merged)) heap.push({key, i, j, ids[i], ids[j], merged});
  };
  for (int i = 0; i + 1 < n; ++i) push(i, i + 1);
  while (!heap.empty()) {
    const Entry e = heap.top();
    heap.pop();
    // Stale entries: one side was merged away or changed since the entry was pushed.
    if (!alive[e.pos] || !alive[e.right] || next[e.pos] != e.right || ids[e.pos] != e.left_id ||
        ids[e.right] != e.right_id)
      continue;
    ids[e.pos] = e.merged;
    alive[e.right] = 0;
    next[e.pos] = next[e.right];
    if (next[e.pos] >= 0) prev[next[e.pos]] = e.pos;
    if (prev[e.pos] >= 0) push(prev[e.pos], e.pos);
    if (next[e.pos] >= 0) push(e.pos, next[e.pos]);
  }
  std::vector<int> out;
  for (int i = 0; i >= 0; i = next[i]) out.push_back(ids[i]);
  return out;
}

std::string replace_all(std::string s, std::string_view from, std::string_view to) {
  if (from.empty()) return s;
  std::string out;
  std::size_t i = 0;
  while (true) {
    const std::size_t j = s.find(from, i);
    if (j == std::string::npos) break;
    out.append(s, i, j - i);
    out.append(to);
    i = j + from.size();
  }
  out.append(s, i, std::string::npos);
  return out;
}

constexpr std::string_view kSpaceMarker = "\xE2\x96\x81";  // U+2581 '▁'

}  // namespace

std::string Tokenizer::decode(std::span<const int> tokens) const {
  std::string out;
  int prev = -1;
  for (int t : tokens) {
    out += decode(prev, t);
    prev = t;
  }
  return out;
}

// ---------------------------------------------------------------- llama2.c

Llama2cTokenizer::Llama2cTokenizer(const std::string& path, int vocab_size) {
  const std::string data = read_file(path, "llama2.c tokenizer");
  ByteReader r(data, path);
  const std::int32_t max_len = r.i32("max_token_length");
  KVSLIM_CHECK(max_len > 0 && max_len <= 4096, ErrorCode::kFormat,
               "tokenizer '{}': max_token_length {} is not in [1, 4096]", path, max_len);
  vocab_.reserve(static_cast<std::size_t>(vocab_size));
  scores_.reserve(static_cast<std::size_t>(vocab_size));
  for (int i = 0; i < vocab_size; ++i) {
    scores_.push_back(r.f32("token score"));
    const std::int32_t len = r.i32("token length");
    KVSLIM_CHECK(len >= 0 && len <= max_len, ErrorCode::kFormat,
                 "tokenizer '{}': token {} has length {}, expected 0..{} (max_token_length)",
                 path, i, len, max_len);
    vocab_.emplace_back(r.bytes(static_cast<std::size_t>(len), "token bytes"));
    ids_.emplace(vocab_.back(), i);  // first id wins for duplicate strings
  }
  KVSLIM_CHECK(r.remaining() == 0, ErrorCode::kFormat,
               "tokenizer '{}' has {} bytes after its {} tokens: it does not match the "
               "model's vocab_size {}",
               path, r.remaining(), vocab_size, vocab_size);
  if (vocab_size > 258 && vocab_[3] == "<0x00>" && vocab_[258] == "<0xFF>") byte_base_ = 3;
  KVSLIM_CHECK(bos_id_ < vocab_size && eos_id_ < vocab_size, ErrorCode::kFormat,
               "tokenizer '{}': vocabulary of {} tokens has no BOS/EOS ids 1 and 2", path,
               vocab_size);
}

int Llama2cTokenizer::lookup(std::string_view s) const {
  const auto it = ids_.find(std::string(s));
  return it == ids_.end() ? -1 : it->second;
}

std::vector<int> Llama2cTokenizer::encode(std::string_view text) const {
  if (text.empty()) return {};
  // llama2.c prepends a dummy space token, then encodes code point by code point.
  std::string padded;
  padded.reserve(text.size() + 1);
  padded.push_back(' ');
  padded.append(text);
  std::vector<int> ids;
  ids.reserve(padded.size());
  for (std::string_view cp : split_code_points(padded)) {
    const int id = lookup(cp);
    if (id >= 0) {
      ids.push_back(id);
    } else if (byte_base_ >= 0) {
      for (unsigned char b : cp) ids.push_back(byte_base_ + b);
    } else {
      ids.push_back(0);  // <unk>
      count_unknown(cp.size());
    }
  }
  std::string buf;
  return merge_greedy(std::move(ids), [&](int a, int b, double* key, int* merged) {
    buf.assign(vocab_[a]);
    buf.append(vocab_[b]);
    const auto it = ids_.find(buf);
    if (it == ids_.end()) return false;
    *key = -static_cast<double>(scores_[it->second]);  // highest score merges first
    *merged = it->second;
    return true;
  });
}

std::string Llama2cTokenizer::decode(int prev, int token) const {
  if (token < 0 || token >= vocab_size() || token == bos_id_ || token == eos_id_) return {};
  std::string_view p = vocab_[token];
  if ((prev < 0 || prev == bos_id_) && !p.empty() && p[0] == ' ') p.remove_prefix(1);
  const int byte = parse_byte_token(p);
  if (byte >= 0) return std::string(1, static_cast<char>(byte));
  return std::string(p);
}

std::string Llama2cTokenizer::piece(int token) const {
  return token >= 0 && token < vocab_size() ? vocab_[token] : std::string();
}

// ---------------------------------------------------------------- Hugging Face BPE

BpeTokenizer::BpeTokenizer(const std::string& path, int model_vocab_size, int bos_id,
                           int eos_id) {
  bos_id_ = bos_id;
  eos_id_ = eos_id;
  const std::string text = read_file(path, "tokenizer");
  json::Value root;
  try {
    root = json::parse(text);
  } catch (const Error& e) {
    KVSLIM_FAIL(ErrorCode::kFormat, "tokenizer '{}': {}", path, e.what());
  }
  try {
    const json::Value& model = json::at(root, "model");
    const std::string& type = json::as_string(json::at(model, "type"), "model.type");
    KVSLIM_CHECK(type == "BPE", ErrorCode::kFormat, "model type '{}' is not supported (BPE only)",
                 type);
    if (const json::Value* p = json::find(root, "pre_tokenizer"); p && !p->is_null())
      KVSLIM_FAIL(ErrorCode::kFormat, "pre_tokenizer '{}' is not supported (only none)",
                  json::find(*p, "type") ? json::as_string(json::at(*p, "type"), "type") : "?");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      const json::Value* p = json::find(model, key);
      KVSLIM_CHECK(!p || p->is_null() || json::as_string(*p, key).empty(), ErrorCode::kFormat,
                   "model.{} is not supported", key);
    }

    vocab_.assign(static_cast<std::size_t>(model_vocab_size), std::string());
    special_.assign(static_cast<std::size_t>(model_vocab_size), false);
    auto add_token = [&](const std::string& s, std::int64_t id) {
      KVSLIM_CHECK(id >= 0 && id < model_vocab_size, ErrorCode::kFormat,
                   "token '{}' has id {}, outside the model's vocabulary of {}", s, id,
                   model_vocab_size);
      vocab_[id] = s;
      ids_.emplace(s, static_cast<int>(id));
    };
    for (const auto& [s, id] : json::as_object(json::at(model, "vocab"), "model.vocab"))
      add_token(s, json::as_int(id, "vocab id"));
    if (const json::Value* added = json::find(root, "added_tokens"); added && added->is_array()) {
      for (const json::Value& t : json::as_array(*added)) {
        const std::int64_t id = json::as_int(json::at(t, "id"), "added token id");
        add_token(json::as_string(json::at(t, "content"), "added token content"), id);
        if (const json::Value* sp = json::find(t, "special"); sp && json::as_bool(*sp, "special"))
          special_[id] = true;
      }
    }
    for (int id : {bos_id_, eos_id_})
      KVSLIM_CHECK(id >= 0 && id < model_vocab_size, ErrorCode::kFormat,
                   "BOS/EOS id {} outside the vocabulary of {}", id, model_vocab_size);
    special_[bos_id_] = special_[eos_id_] = true;

    if (const json::Value* u = json::find(model, "unk_token"); u && u->is_string()) {
      const auto it = ids_.find(json::as_string(*u));
      KVSLIM_CHECK(it != ids_.end(), ErrorCode::kFormat, "unk_token '{}' is not in the vocabulary",
                   json::as_string(*u));
      unk_id_ = it->second;
    }
    unknown_dropped_ = unk_id_ < 0;
    if (const json::Value* b = json::find(model, "byte_fallback"); b && !b->is_null())
      byte_fallback_ = json::as_bool(*b, "byte_fallback");
    if (const json::Value* f = json::find(model, "fuse_unk"); f && !f->is_null())
      fuse_unk_ = json::as_bool(*f, "fuse_unk");

    const auto& merges = json::as_array(json::at(model, "merges"), "model.merges");
    for (std::size_t rank = 0; rank < merges.size(); ++rank) {
      std::string a, b;
      if (merges[rank].is_string()) {
        const std::string& m = json::as_string(merges[rank]);
        const std::size_t sp = m.find(' ');
        KVSLIM_CHECK(sp != std::string::npos && m.find(' ', sp + 1) == std::string::npos,
                     ErrorCode::kFormat, "merge {} '{}' is not two tokens separated by a space",
                     rank, m);
        a = m.substr(0, sp);
        b = m.substr(sp + 1);
      } else {
        const auto& pair = json::as_array(merges[rank], "merge");
        KVSLIM_CHECK(pair.size() == 2, ErrorCode::kFormat, "merge {} is not a pair", rank);
        a = json::as_string(pair[0], "merge token");
        b = json::as_string(pair[1], "merge token");
      }
      const auto ia = ids_.find(a), ib = ids_.find(b), ic = ids_.find(a + b);
      KVSLIM_CHECK(ia != ids_.end() && ib != ids_.end() && ic != ids_.end(), ErrorCode::kFormat,
                   "merge {} '{} {}' uses or produces a token missing from the vocabulary", rank,
                   a, b);
      merges_.emplace(pair_key(ia->second, ib->second),
                      Merge{static_cast<int>(rank), ic->second});  // first (lowest) rank wins
    }

    // Normalizer: flatten a Sequence of Prepend / Replace(String) steps.
    std::vector<const json::Value*> todo;
    if (const json::Value* n = json::find(root, "normalizer"); n && !n->is_null())
      todo.push_back(n);
    for (std::size_t i = 0; i < todo.size(); ++i) {
      const json::Value& n = *todo[i];
      const std::string& nt = json::as_string(json::at(n, "type"), "normalizer type");
      if (nt == "Sequence") {
        std::vector<const json::Value*> inner;
        for (const json::Value& s : json::as_array(json::at(n, "normalizers"), "normalizers"))
          inner.push_back(&s);
        todo.insert(todo.begin() + static_cast<std::ptrdiff_t>(i) + 1, inner.begin(), inner.end());
      } else if (nt == "Prepend") {
        normalizer_.push_back({true, {}, json::as_string(json::at(n, "prepend"), "prepend")});
      } else if (nt == "Replace") {
        const json::Value* s = json::find(json::at(n, "pattern"), "String");
        KVSLIM_CHECK(s != nullptr, ErrorCode::kFormat,
                     "normalizer Replace with a regex pattern is not supported");
        normalizer_.push_back({false, json::as_string(*s, "pattern"),
                               json::as_string(json::at(n, "content"), "content")});
      } else {
        KVSLIM_FAIL(ErrorCode::kFormat, "normalizer '{}' is not supported", nt);
      }
    }
  } catch (const Error& e) {
    if (e.what() && std::string_view(e.what()).find(path) != std::string_view::npos) throw;
    KVSLIM_FAIL(e.code() == ErrorCode::kIo ? ErrorCode::kIo : ErrorCode::kFormat,
                "tokenizer '{}': {}", path, e.what());
  } catch (const nlohmann::json::exception& e) {  // not expected: json:: helpers check types
    KVSLIM_FAIL(ErrorCode::kFormat, "tokenizer '{}': {}", path, e.what());
  }
}

std::string BpeTokenizer::normalize(std::string_view text) const {
  std::string s(text);
  for (const NormalizerStep& step : normalizer_) {
    if (step.prepend) {
      if (!s.empty()) s = step.text + s;
    } else {
      s = replace_all(std::move(s), step.pattern, step.text);
    }
  }
  return s;
}

std::vector<int> BpeTokenizer::encode(std::string_view text) const {
  if (text.empty()) return {};
  const std::string norm = normalize(text);
  std::vector<int> ids;
  ids.reserve(norm.size());
  bool last_unk = false;
  for (std::string_view ch : split_code_points(norm)) {
    if (const auto it = ids_.find(std::string(ch)); it != ids_.end()) {
      ids.push_back(it->second);
      last_unk = false;
      continue;
    }
    if (byte_fallback_) {
      std::vector<int> bytes;
      for (unsigned char b : ch) {
        const auto it = ids_.find(byte_token_name(b));
        if (it == ids_.end()) break;
        bytes.push_back(it->second);
      }
      if (bytes.size() == ch.size()) {
        ids.insert(ids.end(), bytes.begin(), bytes.end());
        last_unk = false;
        continue;
      }
    }
    // Hugging Face drops the character when there is no unk token, and with fuse_unk
    // runs of unknown characters become one <unk>.
    count_unknown(ch.size());
    if (unk_id_ < 0) continue;
    if (!(fuse_unk_ && last_unk)) ids.push_back(unk_id_);
    last_unk = true;
  }
  return merge_greedy(std::move(ids), [&](int a, int b, double* key, int* merged) {
    const auto it = merges_.find(pair_key(a, b));
    if (it == merges_.end()) return false;
    *key = it->second.rank;
    *merged = it->second.id;
    return true;
  });
}

std::string BpeTokenizer::decode(int prev, int token) const {
  if (token < 0 || token >= vocab_size() || special_[token]) return {};
  const std::string& p = vocab_[token];
  const int byte = parse_byte_token(p);
  if (byte >= 0) return std::string(1, static_cast<char>(byte));
  std::string s = replace_all(p, kSpaceMarker, " ");
  // The decoder's Strip step removes the space the normalizer prepended.
  if ((prev < 0 || (prev < vocab_size() && special_[prev])) && !s.empty() && s[0] == ' ')
    s.erase(0, 1);
  return s;
}

std::string BpeTokenizer::piece(int token) const {
  if (token < 0 || token >= vocab_size()) return {};
  return replace_all(vocab_[token], kSpaceMarker, " ");
}

}  // namespace kvslim::llama
