// Recipe grammar (see kvslim/cache/recipe.h) and pipeline assembly.
#include "kvslim/cache/recipe.h"

#include <cctype>
#include <charconv>

#include "check.h"
#include "kvslim/policy/policy.h"
#include "policy/registry.h"

namespace kvslim {
namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  std::size_t start = 0;
  for (std::size_t i = 0; i <= s.size(); ++i)
    if (i == s.size() || s[i] == sep) {
      out.push_back(s.substr(start, i - start));
      start = i + 1;
    }
  return out;
}

bool is_name(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.')) return false;
  return true;
}

int parse_index(std::string_view s, std::string_view what, std::string_view text) {
  int v = -1;
  s = trim(s);
  const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  KVSLIM_CHECK(ec == std::errc() && p == s.data() + s.size() && v >= 0, ErrorCode::kRecipe,
               "recipe '{}': {} '{}' is not a non-negative integer", text, what, s);
  return v;
}

StageSpec parse_stage(std::string_view s, std::string_view text) {
  s = trim(s);
  KVSLIM_CHECK(!s.empty(), ErrorCode::kRecipe, "recipe '{}': empty stage", text);
  StageSpec st;
  const auto colon = s.find(':');
  st.name = std::string(trim(s.substr(0, colon)));
  KVSLIM_CHECK(is_name(st.name), ErrorCode::kRecipe, "recipe '{}': '{}' is not a stage name", text, st.name);
  if (colon == std::string_view::npos) return st;
  const std::string_view rest = trim(s.substr(colon + 1));
  KVSLIM_CHECK(!rest.empty(), ErrorCode::kRecipe, "recipe '{}': stage '{}' has ':' but no parameters", text,
               st.name);
  for (std::string_view kv : split(rest, ',')) {
    kv = trim(kv);
    const auto eq = kv.find('=');
    KVSLIM_CHECK(eq != std::string_view::npos, ErrorCode::kRecipe,
                 "recipe '{}': stage '{}': parameter '{}' is not key=value", text, st.name, kv);
    const std::string key(trim(kv.substr(0, eq)));
    const std::string val(trim(kv.substr(eq + 1)));
    KVSLIM_CHECK(is_name(key) && !val.empty(), ErrorCode::kRecipe,
                 "recipe '{}': stage '{}': malformed parameter '{}'", text, st.name, kv);
    st.params.emplace_back(key, val);
  }
  return st;
}

ChainSpec parse_chain(std::string_view s, std::string_view text) {
  ChainSpec c;
  for (std::string_view st : split(s, '|')) c.stages.push_back(parse_stage(st, text));
  return c;
}

std::vector<std::pair<int, int>> parse_ranges(std::string_view s, std::string_view what, std::string_view text) {
  std::vector<std::pair<int, int>> out;
  for (std::string_view item : split(s, ',')) {
    const auto dash = item.find('-');
    if (dash == std::string_view::npos) {
      const int v = parse_index(item, what, text);
      out.emplace_back(v, v);
    } else {
      const int a = parse_index(item.substr(0, dash), what, text);
      const int b = parse_index(item.substr(dash + 1), what, text);
      KVSLIM_CHECK(a <= b, ErrorCode::kRecipe, "recipe '{}': {} range '{}' is empty", text, what, trim(item));
      out.emplace_back(a, b);
    }
  }
  return out;
}

OverrideSpec parse_override(std::string_view s, std::string_view text) {
  s = trim(s);
  KVSLIM_CHECK(!s.empty() && s.front() == '[', ErrorCode::kRecipe,
               "recipe '{}': override '{}' must start with [layers=...] or [heads=...]", text, s);
  const auto close = s.find(']');
  KVSLIM_CHECK(close != std::string_view::npos, ErrorCode::kRecipe, "recipe '{}': missing ']' in '{}'", text, s);
  OverrideSpec o;
  std::string_view sel = trim(s.substr(1, close - 1));
  KVSLIM_CHECK(!sel.empty(), ErrorCode::kRecipe, "recipe '{}': empty selector in '{}'", text, s);
  for (std::string_view part : split(sel, ' ')) {
    part = trim(part);
    if (part.empty()) continue;
    const auto eq = part.find('=');
    KVSLIM_CHECK(eq != std::string_view::npos, ErrorCode::kRecipe,
                 "recipe '{}': selector '{}' is not layers=... or heads=...", text, part);
    const std::string_view key = part.substr(0, eq);
    if (key == "layers") o.layers = parse_ranges(part.substr(eq + 1), "layer", text);
    else if (key == "heads") o.heads = parse_ranges(part.substr(eq + 1), "head", text);
    else KVSLIM_FAIL(ErrorCode::kRecipe, "recipe '{}': unknown selector '{}' (expected layers or heads)", text, key);
  }
  o.chain = parse_chain(s.substr(close + 1), text);
  return o;
}

bool in_ranges(const std::vector<std::pair<int, int>>& r, int v) {
  if (r.empty()) return true;
  for (const auto& [a, b] : r)
    if (v >= a && v <= b) return true;
  return false;
}

}  // namespace

std::string StageSpec::text() const {
  std::string s = name;
  for (std::size_t i = 0; i < params.size(); ++i)
    s += (i ? "," : ":") + params[i].first + "=" + params[i].second;
  return s;
}

std::string ChainSpec::text() const {
  std::string s;
  for (std::size_t i = 0; i < stages.size(); ++i) s += (i ? " | " : "") + stages[i].text();
  return s;
}

bool OverrideSpec::matches(int layer, int kv_head) const noexcept {
  return in_ranges(layers, layer) && in_ranges(heads, kv_head);
}

const ChainSpec& RecipeSpec::chain_for(int layer, int kv_head) const noexcept {
  for (auto it = overrides.rbegin(); it != overrides.rend(); ++it)
    if (it->matches(layer, kv_head)) return it->chain;
  return base;
}

RecipeSpec parse_recipe(std::string_view text) {
  KVSLIM_CHECK(!trim(text).empty(), ErrorCode::kRecipe, "recipe is empty (try \"f32\")");
  const auto parts = split(text, ';');
  RecipeSpec r;
  r.base = parse_chain(parts[0], text);
  for (std::size_t i = 1; i < parts.size(); ++i) r.overrides.push_back(parse_override(parts[i], text));
  return r;
}

Pipeline build_pipeline(const ChainSpec& chain, int head_dim) {
  Pipeline p;
  int last_kind = -1;
  std::string last_name;
  for (const StageSpec& spec : chain.stages) {
    BuiltStage b = detail::build_stage(spec, head_dim);
    const int kind = static_cast<int>(b.kind);
    KVSLIM_CHECK(kind >= last_kind && !(kind == last_kind && b.kind != StageKind::kScorer), ErrorCode::kRecipe,
                 "recipe '{}': stage '{}' ({}) cannot follow '{}' (order is scorer | eviction | merge | codec, "
                 "one of each except scorers)",
                 chain.text(), spec.name, stage_kind_name(b.kind), last_name);
    last_kind = kind;
    last_name = spec.name;
    switch (b.kind) {
      case StageKind::kScorer: p.scorers.push_back(b.scorer); break;
      case StageKind::kEviction: p.eviction = b.eviction; break;
      case StageKind::kMerge: p.merge = b.merge; break;
      case StageKind::kCodec: p.codec = b.codec; break;
    }
  }
  if (!p.codec) {
    StageSpec f32{"f32", {}};
    p.codec = detail::build_stage(f32, head_dim).codec;
  }
  std::string text;
  for (const auto& s : p.scorers) text += s->describe() + " | ";
  if (p.eviction) text += p.eviction->describe() + " | ";
  if (p.merge) text += p.merge->describe() + " | ";
  p.text = text + p.codec->describe();
  return p;
}

}  // namespace kvslim
