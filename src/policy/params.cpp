#include <charconv>
#include <cmath>

#include "cache/recipe_text.h"
#include "check.h"
#include "kvslim/policy/policy.h"

namespace kvslim {

StageParams::StageParams(std::string stage, std::vector<std::pair<std::string, std::string>> kv)
    : stage_(std::move(stage)), kv_(std::move(kv)), used_(kv_.size(), false) {
  for (std::size_t i = 0; i < kv_.size(); ++i)
    for (std::size_t j = 0; j < i; ++j)
      KVSLIM_CHECK(kv_[i].first != kv_[j].first, ErrorCode::kRecipe,
                   "recipe stage '{}': key '{}' is given twice", detail::clip_recipe(stage_),
                   detail::clip_recipe(kv_[i].first));
}

const std::string* StageParams::find(std::string_view key) {
  for (std::size_t i = 0; i < kv_.size(); ++i)
    if (kv_[i].first == key) {
      used_[i] = true;
      return &kv_[i].second;
    }
  return nullptr;
}

bool StageParams::has(std::string_view key) const {
  for (const auto& [k, v] : kv_)
    if (k == key) return true;
  return false;
}

int StageParams::get_int(std::string_view key, int def, int lo, int hi) {
  const std::string* s = find(key);
  if (!s) return def;
  long long v = 0;
  const auto [ptr, ec] = std::from_chars(s->data(), s->data() + s->size(), v);
  KVSLIM_CHECK(ec == std::errc() && ptr == s->data() + s->size(), ErrorCode::kRecipe,
               "recipe stage '{}': {}='{}' is not an integer", detail::clip_recipe(stage_), key,
               detail::clip_recipe(*s));
  KVSLIM_CHECK(v >= lo && v <= hi, ErrorCode::kInvalidArgument,
               "recipe stage '{}': {}={} is out of range [{}, {}]", stage_, key, v, lo, hi);
  return static_cast<int>(v);
}

double StageParams::get_double(std::string_view key, double def, double lo, double hi) {
  const std::string* s = find(key);
  if (!s) return def;
  char* end = nullptr;
  const double v = std::strtod(s->c_str(), &end);
  KVSLIM_CHECK(!s->empty() && end == s->c_str() + s->size() && std::isfinite(v), ErrorCode::kRecipe,
               "recipe stage '{}': {}='{}' is not a number", detail::clip_recipe(stage_), key,
               detail::clip_recipe(*s));
  KVSLIM_CHECK(v >= lo && v <= hi, ErrorCode::kInvalidArgument,
               "recipe stage '{}': {}={} is out of range [{}, {}]", stage_, key, v, lo, hi);
  return v;
}

std::string StageParams::get_string(std::string_view key, std::string def) {
  const std::string* s = find(key);
  return s ? *s : def;
}

void StageParams::check_all_used(const std::vector<std::string>& known) const {
  for (std::size_t i = 0; i < kv_.size(); ++i) {
    if (used_[i]) continue;
    std::string list;
    for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
    KVSLIM_FAIL(ErrorCode::kRecipe, "recipe stage '{}': unknown key '{}' (known keys: {})",
                detail::clip_recipe(stage_), detail::clip_recipe(kv_[i].first), list.empty() ? "none" : list);
  }
}

const char* stage_kind_name(StageKind k) noexcept {
  switch (k) {
    case StageKind::kScorer: return "scorer";
    case StageKind::kEviction: return "eviction";
    case StageKind::kMerge: return "merge";
    case StageKind::kCodec: return "codec";
  }
  return "?";
}

}  // namespace kvslim
