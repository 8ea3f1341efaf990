// The stage registry: recipe names -> factories. Built-in stages are registered on first use;
// engines add their own with register_stage().
#include <map>
#include <mutex>

#include "cache/recipe_text.h"
#include "check.h"
#include "policy/codecs.h"
#include "policy/registry.h"

namespace kvslim {
namespace {

struct Entry {
  StageKind kind;
  ContextStageFactory factory;
};

// Most factories need only head_dim.
ContextStageFactory with_context(StageFactory f) {
  return [f = std::move(f)](StageParams& p, const StageContext& ctx) { return f(p, ctx.head_dim); };
}

struct Registry {
  std::mutex mu;
  std::map<std::string, Entry> entries;

  Registry() {
    using detail::make_float_codec;
    entries["f32"] = {StageKind::kCodec, with_context([](StageParams& p, int d) { return make_float_codec(DType::kF32, p, d); })};
    entries["f16"] = {StageKind::kCodec, with_context([](StageParams& p, int d) { return make_float_codec(DType::kF16, p, d); })};
    entries["bf16"] = {StageKind::kCodec, with_context([](StageParams& p, int d) { return make_float_codec(DType::kBF16, p, d); })};
    entries["kivi"] = {StageKind::kCodec, with_context(detail::make_kivi_codec)};
    entries["cq"] = {StageKind::kCodec, detail::make_cq_codec};
    entries["nuq"] = {StageKind::kCodec, detail::make_nuq_codec};
    entries["h2o"] = {StageKind::kEviction, with_context(detail::make_h2o)};
    entries["streaming"] = {StageKind::kEviction, with_context(detail::make_streaming)};
    entries["l2norm"] = {StageKind::kEviction, with_context(detail::make_l2norm)};
    entries["snapkv"] = {StageKind::kEviction, with_context(detail::make_snapkv)};
    entries["random"] = {StageKind::kEviction, with_context(detail::make_random)};
    entries["razor"] = {StageKind::kEviction, with_context(detail::make_razor)};
    entries["mikv"] = {StageKind::kEviction, detail::make_mikv};
    entries["zipcache"] = {StageKind::kScorer, with_context(detail::make_zipcache)};
    entries["kvmerger"] = {StageKind::kMerge, with_context(detail::make_kvmerger)};
    entries["minicache"] = {StageKind::kMerge, with_context(detail::make_minicache)};
  }
};

// Names the planned methods will take. Until one is registered (by the library, when its issue
// lands, or by an engine through register_stage) a recipe naming it is told so, rather than
// that the name is unknown.
struct Reserved {
  const char* name;
  const char* planned;
};
constexpr Reserved kReserved[] = {
    {"cq", "codec family, CQ coupled quantization with codebooks"},
    {"ems", "eviction + merge family, EMS evict-then-merge"},
    {"h2o", "eviction family, H2O heavy hitters"},
    {"kvmerger", "merge family, KVMerger merging of similar adjacent keys"},
    {"l2norm", "eviction family, keep tokens with low key L2 norm"},
    {"mikv", "eviction family, MiKV demotion to low precision"},
    {"minicache", "merge family, MiniCache cross-layer merging"},
    {"random", "eviction family, random-eviction baseline"},
    {"razor", "eviction family, RazorAttention retrieval heads + compensation token"},
    {"snapkv", "eviction family, SnapKV observation-window selection"},
    {"streaming", "eviction family, StreamingLLM sinks + recent window"},
    {"zipcache", "codec family, ZipCache saliency-based mixed precision"},
};

const Reserved* find_reserved(const std::string& name) {
  for (const Reserved& r : kReserved)
    if (name == r.name) return &r;
  return nullptr;
}

Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

void register_stage(const std::string& name, StageKind kind, StageFactory factory) {
  KVSLIM_CHECK(static_cast<bool>(factory), ErrorCode::kInvalidArgument, "register_stage: '{}' has no factory", name);
  register_stage(name, kind, with_context(std::move(factory)));
}

void register_stage(const std::string& name, StageKind kind, ContextStageFactory factory) {
  KVSLIM_CHECK(!name.empty() && name.find_first_of(":|;[]=, ") == std::string::npos, ErrorCode::kInvalidArgument,
               "register_stage: '{}' is not a valid stage name", name);
  KVSLIM_CHECK(static_cast<bool>(factory), ErrorCode::kInvalidArgument, "register_stage: '{}' has no factory", name);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.entries[name] = {kind, std::move(factory)};
}

std::vector<std::pair<std::string, std::string>> registered_stages() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [name, e] : r.entries) out.emplace_back(name, stage_kind_name(e.kind));
  return out;
}

namespace detail {

BuiltStage build_stage(const StageSpec& spec, const StageContext& ctx) {
  Registry& r = registry();
  ContextStageFactory factory;
  StageKind kind;
  {
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.entries.find(spec.name);
    if (it == r.entries.end()) {
      if (const Reserved* res = find_reserved(spec.name))
        KVSLIM_FAIL(ErrorCode::kRecipe, "recipe stage '{}' is reserved but not implemented yet (planned: {})",
                    spec.name, res->planned);  // a reserved name is short
      std::string known, reserved;
      for (const auto& [name, e] : r.entries) known += (known.empty() ? "" : ", ") + name;
      for (const Reserved& res : kReserved)
        if (!r.entries.count(res.name)) reserved += (reserved.empty() ? "" : ", ") + std::string(res.name);
      KVSLIM_FAIL(ErrorCode::kRecipe, "unknown recipe stage '{}' (known stages: {}; reserved, not implemented yet: {})",
                  detail::clip_recipe(spec.name), known, reserved);
    }
    factory = it->second.factory;
    kind = it->second.kind;
  }
  StageParams params(spec.name, spec.params);
  BuiltStage b = factory(params, ctx);
  KVSLIM_CHECK(b.kind == kind, ErrorCode::kInvalidArgument, "stage '{}' registered as {} but built a {}",
               spec.name, stage_kind_name(kind), stage_kind_name(b.kind));
  const bool ok = (kind == StageKind::kCodec && b.codec) || (kind == StageKind::kScorer && b.scorer) ||
                  (kind == StageKind::kEviction && b.eviction) || (kind == StageKind::kMerge && b.merge);
  KVSLIM_CHECK(ok, ErrorCode::kInvalidArgument, "stage '{}': factory returned no {}", spec.name,
               stage_kind_name(kind));
  return b;
}

}  // namespace detail
}  // namespace kvslim
