// Recipe grammar (see kvslim/cache/recipe.h) and pipeline assembly.
#include "kvslim/cache/recipe.h"

#include <cctype>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "cache/recipe_text.h"
#include "check.h"
#include "kvslim/policy/policy.h"
#include "policy/registry.h"

namespace kvslim {

namespace detail {

std::string clip_recipe(std::string_view text) {
  std::size_t keep = text.size();
  if (text.size() > kRecipeQuoteMax) {
    keep = kRecipeQuoteKeep;
    // Do not cut a UTF-8 sequence in half.
    while (keep > 0 && (static_cast<unsigned char>(text[keep]) & 0xC0) == 0x80) --keep;
  }
  std::string out;
  out.reserve(keep + 24);
  for (char c : text.substr(0, keep)) {
    if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else out += c;
  }
  if (keep < text.size()) out += fmt::format("... ({} chars)", text.size());
  return out;
}

}  // namespace detail

namespace {

using detail::clip_recipe;

// The recipe as given, and a copy of the same length in which comments ('#' to the end of
// the line) and every whitespace character are spaces. All parsing works on views into
// `clean`, so a view's offset is also its offset in `text` and errors can name a position.
struct Source {
  std::string_view text;
  std::string clean;
  std::vector<std::string_view> parts;  // base chain, then one view per override
};

bool is_space(char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; }

Source scan(std::string_view text) {
  Source src{text, std::string(text.size(), ' '), {}};
  std::size_t start = 0;
  bool comment = false, line_start = true, part_has_content = false;
  auto cut = [&](std::size_t end) { src.parts.push_back(std::string_view(src.clean).substr(start, end - start)); };
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '\n') {
      comment = false;
      line_start = true;
      continue;
    }
    if (comment || is_space(c)) continue;
    if (c == '#') {
      comment = true;
      continue;
    }
    if (c == ';') {
      cut(i);
      start = i + 1;
      part_has_content = line_start = false;
      continue;
    }
    // An override may also start on a line of its own, without a ';' before it.
    if (c == '[' && line_start && part_has_content) {
      cut(i);
      start = i;
    }
    src.clean[i] = c;
    part_has_content = true;
    line_start = false;
  }
  cut(text.size());
  return src;
}

// "recipe '...' at column C" (one-line recipes) or "recipe '...' at line L, column C".
std::string where(const Source& src, std::string_view at) {
  const auto off = static_cast<std::size_t>(at.data() - src.clean.data());
  std::size_t line = 1, col = 1;
  for (std::size_t i = 0; i < off && i < src.text.size(); ++i) {
    if (src.text[i] == '\n') {
      ++line;
      col = 1;
    } else {
      ++col;
    }
  }
  if (src.text.find('\n') == std::string_view::npos)
    return fmt::format("recipe '{}' at column {}", clip_recipe(src.text), col);
  return fmt::format("recipe '{}' at line {}, column {}", clip_recipe(src.text), line, col);
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

// Splits at `sep` outside parentheses (a parameter value may be a nested recipe in
// parentheses: mikv:lo=(kivi:kbits=2,vbits=2)).
std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  std::size_t start = 0;
  int depth = 0;
  for (std::size_t i = 0; i <= s.size(); ++i) {
    if (i < s.size() && s[i] == '(') ++depth;
    if (i < s.size() && s[i] == ')') --depth;
    if (i == s.size() || (s[i] == sep && depth <= 0)) {
      out.push_back(s.substr(start, i - start));
      start = i + 1;
    }
  }
  return out;
}

// Checks that parentheses balance in a stage; names the first unbalanced one.
void check_parens(std::string_view s, const Source& src) {
  int depth = 0;
  std::size_t open = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '(' && depth++ == 0) open = i;
    if (s[i] == ')') {
      KVSLIM_CHECK(depth > 0, ErrorCode::kRecipe, "{}: ')' without a matching '('", where(src, s.substr(i)));
      --depth;
    }
  }
  KVSLIM_CHECK(depth == 0, ErrorCode::kRecipe, "{}: '(' is never closed", where(src, s.substr(open)));
}

bool is_name(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.')) return false;
  return true;
}

// One number of a selector range; `item` is the whole range it belongs to (for messages).
int parse_index(std::string_view s, std::string_view item, std::string_view what, const Source& src) {
  s = trim(s);
  KVSLIM_CHECK(!s.empty(), ErrorCode::kRecipe, "{}: {} range '{}' is missing a number (expected N or N-M)",
               where(src, item), what, clip_recipe(item));
  int v = -1;
  const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  KVSLIM_CHECK(ec != std::errc::result_out_of_range, ErrorCode::kRecipe, "{}: {} '{}' is too large", where(src, s),
               what, clip_recipe(s));
  KVSLIM_CHECK(ec == std::errc() && p == s.data() + s.size() && v >= 0, ErrorCode::kRecipe,
               "{}: {} '{}' must be a non-negative integer", where(src, s), what, clip_recipe(s));
  return v;
}

StageSpec parse_stage(std::string_view s, const Source& src) {
  s = trim(s);
  KVSLIM_CHECK(!s.empty(), ErrorCode::kRecipe, "{}: empty stage", where(src, s));
  StageSpec st;
  const auto colon = s.find(':');
  const std::string_view name = trim(s.substr(0, colon));
  st.name = std::string(name);
  KVSLIM_CHECK(is_name(name), ErrorCode::kRecipe, "{}: '{}' is not a stage name", where(src, name),
               clip_recipe(name));
  if (colon == std::string_view::npos) return st;
  check_parens(s, src);
  const std::string qname = clip_recipe(name);
  const std::string_view rest = trim(s.substr(colon + 1));
  KVSLIM_CHECK(!rest.empty(), ErrorCode::kRecipe, "{}: stage '{}' has ':' but no parameters",
               where(src, s.substr(colon)), qname);
  for (std::string_view kv : split(rest, ',')) {
    kv = trim(kv);
    const auto eq = kv.find('=');
    KVSLIM_CHECK(eq != std::string_view::npos, ErrorCode::kRecipe, "{}: stage '{}': parameter '{}' is not key=value",
                 where(src, kv), qname, clip_recipe(kv));
    const std::string_view key = trim(kv.substr(0, eq));
    std::string_view val = trim(kv.substr(eq + 1));
    // (nested recipe): stored without the parentheses, written back with them.
    const bool nested = val.size() >= 2 && val.front() == '(' && val.back() == ')';
    if (nested) val = trim(val.substr(1, val.size() - 2));
    KVSLIM_CHECK(is_name(key) && !val.empty(), ErrorCode::kRecipe, "{}: stage '{}': malformed parameter '{}'",
                 where(src, kv), qname, clip_recipe(kv));
    KVSLIM_CHECK(nested || val.find(' ') == std::string_view::npos, ErrorCode::kRecipe,
                 "{}: stage '{}': value '{}' of '{}' contains a space (missing '|' between stages, or ';' before "
                 "an override?)",
                 where(src, val), qname, clip_recipe(val), clip_recipe(key));
    st.params.emplace_back(std::string(key), std::string(val));
  }
  return st;
}

ChainSpec parse_chain(std::string_view s, const Source& src) {
  check_parens(s, src);
  ChainSpec c;
  for (std::string_view st : split(s, '|')) c.stages.push_back(parse_stage(st, src));
  return c;
}

std::vector<std::pair<int, int>> parse_ranges(std::string_view s, std::string_view what, const Source& src) {
  std::vector<std::pair<int, int>> out;
  for (std::string_view item : split(s, ',')) {
    item = trim(item);
    KVSLIM_CHECK(!item.empty(), ErrorCode::kRecipe, "{}: empty {} in '{}' (expected N or N-M)", where(src, item),
                 what, clip_recipe(trim(s)));
    // A leading '-' is a negative number, not a range with its first number missing.
    KVSLIM_CHECK(item.front() != '-', ErrorCode::kRecipe, "{}: {} '{}' must be a non-negative integer",
                 where(src, item), what, clip_recipe(item));
    const auto dash = item.find('-');
    if (dash == std::string_view::npos) {
      const int v = parse_index(item, item, what, src);
      out.emplace_back(v, v);
    } else {
      const int a = parse_index(item.substr(0, dash), item, what, src);
      const int b = parse_index(item.substr(dash + 1), item, what, src);
      KVSLIM_CHECK(a <= b, ErrorCode::kRecipe, "{}: {} range '{}' is empty", where(src, item), what,
                   clip_recipe(item));
      out.emplace_back(a, b);
    }
  }
  return out;
}

OverrideSpec parse_override(std::string_view s, const Source& src) {
  s = trim(s);
  KVSLIM_CHECK(!s.empty() && s.front() == '[', ErrorCode::kRecipe,
               "{}: override '{}' must start with [layers=...] or [heads=...]", where(src, s), clip_recipe(s));
  const auto close = s.find(']');
  KVSLIM_CHECK(close != std::string_view::npos, ErrorCode::kRecipe, "{}: missing ']' in '{}'", where(src, s),
               clip_recipe(s));
  OverrideSpec o;
  const std::string_view head = s.substr(0, close + 1);
  const std::string_view sel = trim(s.substr(1, close - 1));
  KVSLIM_CHECK(!sel.empty(), ErrorCode::kRecipe, "{}: empty selector in '{}'", where(src, head), clip_recipe(head));
  bool seen_layers = false, seen_heads = false;
  for (std::string_view part : split(sel, ' ')) {
    part = trim(part);
    if (part.empty()) continue;
    const auto eq = part.find('=');
    KVSLIM_CHECK(eq != std::string_view::npos, ErrorCode::kRecipe,
                 "{}: selector '{}' is not layers=... or heads=...", where(src, part), clip_recipe(part));
    const std::string_view key = part.substr(0, eq);
    KVSLIM_CHECK(key == "layers" || key == "heads", ErrorCode::kRecipe,
                 "{}: unknown selector '{}' (expected layers or heads)", where(src, part), clip_recipe(key));
    bool& seen = key == "layers" ? seen_layers : seen_heads;
    KVSLIM_CHECK(!seen, ErrorCode::kRecipe,
                 "{}: selector '{}' is given twice in '{}' (list several ranges in one: {}=0,2-3)", where(src, part),
                 key, clip_recipe(head), key);
    seen = true;
    if (key == "layers") o.layers = parse_ranges(part.substr(eq + 1), "layer", src);
    else o.heads = parse_ranges(part.substr(eq + 1), "head", src);
  }
  o.chain = parse_chain(s.substr(close + 1), src);
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
  for (std::size_t i = 0; i < params.size(); ++i) {
    const std::string& v = params[i].second;
    const bool nested = v.find_first_of(":,|=() ") != std::string::npos;
    s += (i ? "," : ":") + params[i].first + "=" + (nested ? "(" + v + ")" : v);
  }
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

std::vector<const StageSpec*> RecipeSpec::stages_named(std::string_view name) const {
  std::vector<const StageSpec*> out;
  auto take = [&](const ChainSpec& c) {
    for (const StageSpec& st : c.stages)
      if (st.name == name) out.push_back(&st);
  };
  take(base);
  for (const OverrideSpec& o : overrides) take(o.chain);
  return out;
}

RecipeSpec parse_recipe(std::string_view text) {
  const Source src = scan(text);
  KVSLIM_CHECK(!trim(src.clean).empty(), ErrorCode::kRecipe, "recipe is empty{} (try \"f32\")",
               trim(text).empty() ? "" : ": it has only comments");
  const std::string_view base = trim(src.parts[0]);
  KVSLIM_CHECK(base.empty() || base.front() != '[', ErrorCode::kRecipe,
               "{}: a recipe starts with its base chain (e.g. \"f32\"); overrides like '[layers=0] f16' come after "
               "it, after ';' or on a line of their own",
               where(src, base));
  RecipeSpec r;
  r.base = parse_chain(src.parts[0], src);
  for (std::size_t i = 1; i < src.parts.size(); ++i) r.overrides.push_back(parse_override(src.parts[i], src));
  return r;
}

Pipeline build_pipeline(const ChainSpec& chain, int head_dim) {
  StageContext ctx;
  ctx.head_dim = head_dim;
  return build_pipeline(chain, ctx);
}

Pipeline build_pipeline(const ChainSpec& chain, const StageContext& ctx) {
  const int head_dim = ctx.head_dim;
  KVSLIM_CHECK(head_dim >= 1, ErrorCode::kInvalidArgument, "recipe '{}': head_dim {} must be at least 1",
               clip_recipe(chain.text()), head_dim);
  Pipeline p;
  int last_kind = -1;
  std::string last_name;
  for (const StageSpec& spec : chain.stages) {
    BuiltStage b = detail::build_stage(spec, ctx);
    p.per_head = p.per_head || b.per_head;
    const int kind = static_cast<int>(b.kind);
    KVSLIM_CHECK(kind >= last_kind && !(kind == last_kind && b.kind != StageKind::kScorer), ErrorCode::kRecipe,
                 "recipe '{}': stage '{}' ({}) cannot follow '{}' (order is scorer | eviction | merge | codec, "
                 "one of each except scorers)",
                 clip_recipe(chain.text()), spec.name, stage_kind_name(b.kind), last_name);
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
    p.codec = detail::build_stage(f32, ctx).codec;
  }
  if (p.eviction && p.eviction->demote_codec()) {
    // Demotion must save memory: compare bytes per token of full pages.
    const Codec& lo = *p.eviction->demote_codec();
    const double lo_b = static_cast<double>(lo.page_bytes(lo.page_tokens(), head_dim)) / lo.page_tokens();
    const double hi_b = static_cast<double>(p.codec->page_bytes(p.codec->page_tokens(), head_dim)) / p.codec->page_tokens();
    KVSLIM_CHECK(lo_b < hi_b, ErrorCode::kInvalidArgument,
                 "recipe '{}': the demotion codec '{}' ({:.1f} bytes per token at head_dim {}) is not cheaper than the "
                 "chain's codec '{}' ({:.1f} bytes per token)",
                 clip_recipe(chain.text()), lo.describe(), lo_b, head_dim, p.codec->describe(), hi_b);
  }
  std::string text;
  for (const auto& s : p.scorers) text += s->describe() + " | ";
  if (p.eviction) text += p.eviction->describe() + " | ";
  if (p.merge) text += p.merge->describe() + " | ";
  p.text = text + p.codec->describe();
  // A policy that reads scores brings its scorer when the chain names none (not printed:
  // the canonical text re-parses to the same pipeline).
  if (p.eviction && p.scorers.empty())
    if (auto sc = p.eviction->implied_scorer()) p.scorers.push_back(std::move(sc));
  if (p.merge && p.scorers.empty())
    if (auto sc = p.merge->implied_scorer()) p.scorers.push_back(std::move(sc));
  return p;
}

std::string load_recipe(const std::string& path) {
  KVSLIM_CHECK(!path.empty(), ErrorCode::kIo, "recipe file: the path is empty (write --recipe @FILE)");
  std::error_code ec;
  KVSLIM_CHECK(!std::filesystem::is_directory(path, ec), ErrorCode::kIo,
               "recipe file '{}' is a directory, not a file", path);
  std::ifstream in(path, std::ios::binary);
  KVSLIM_CHECK(in.is_open(), ErrorCode::kIo, "recipe file '{}' cannot be opened: {}", path, std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  // A directory opens on some systems and then fails to read.
  KVSLIM_CHECK(!in.bad(), ErrorCode::kIo, "recipe file '{}' cannot be read", path);
  std::string text = ss.str();
  KVSLIM_CHECK(text.find('\0') == std::string::npos, ErrorCode::kRecipe,
               "recipe file '{}' holds a NUL byte: it is not a text file", path);
  try {
    (void)parse_recipe(text);
  } catch (const Error& e) {
    throw Error(e.code(), fmt::format("recipe file '{}': {}", path, e.what()));
  }
  return text;
}

std::string resolve_recipe(std::string_view arg) {
  if (!arg.empty() && arg.front() == '@') return load_recipe(std::string(arg.substr(1)));
  return std::string(arg);
}

}  // namespace kvslim
