// Recipe strings: one line that says how every (layer, kv head) of a cache is compressed.
//
//   recipe   := chain ( sep override )*        sep := ';' | a line break before the '['
//   override := '[' selector ( ' ' selector )* ']' chain
//   selector := ( 'layers' | 'heads' ) '=' range ( ',' range )*      range := N | N '-' M
//   chain    := stage ( '|' stage )*
//   stage    := name ( ':' key '=' value ( ',' key '=' value )* )?
//
// Stages run in the order scorer -> eviction -> merge -> codec; a chain has at most one
// codec, and it comes last (f32 if none is given). Examples:
//
//   "f16"
//   "kivi:kbits=2,vbits=2,group=32,residual=128"
//   "h2o:budget=256,recent=64 | kivi:kbits=4,vbits=2"
//   "kivi:kbits=2,vbits=2 ; [layers=0-1] f16 ; [layers=4 heads=0] f32"
//
// '#' starts a comment to the end of the line; line breaks are whitespace. In an override,
// `heads` are kv heads; a later override wins over an earlier one. Unknown stage names,
// unknown keys, repeated selectors and malformed values throw Error(kRecipe) naming them (and,
// for syntax errors, the line and column). Full grammar and keys: docs/recipes.md.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kvslim {

class Codec;
class Scorer;
class EvictionPolicy;
class MergePolicy;
struct StageContext;

/// One stage as written: name and key=value pairs in order.
struct StageSpec {
  std::string name;
  std::vector<std::pair<std::string, std::string>> params;
  std::string text() const;  // canonical "name:k=v,k=v"
};

/// A chain of stages applied to one head.
struct ChainSpec {
  std::vector<StageSpec> stages;
  std::string text() const;  // canonical "a:... | b:..."
};

/// [layers=... heads=...] chain
struct OverrideSpec {
  std::vector<std::pair<int, int>> layers;  // inclusive ranges; empty = all
  std::vector<std::pair<int, int>> heads;   // inclusive ranges of kv heads; empty = all
  ChainSpec chain;
  bool matches(int layer, int kv_head) const noexcept;
};

/// A parsed recipe.
struct RecipeSpec {
  ChainSpec base;
  std::vector<OverrideSpec> overrides;
  /// The chain in force for (layer, kv_head): the last matching override, else base.
  const ChainSpec& chain_for(int layer, int kv_head) const noexcept;
  /// Every stage called `name`, in the base chain and then the overrides, in order (pointers
  /// into this spec: keep it alive while using them).
  std::vector<const StageSpec*> stages_named(std::string_view name) const;
};

/// Parse a recipe (syntax only; stage names and keys are checked by build_pipeline).
RecipeSpec parse_recipe(std::string_view text);

/// Reads a recipe file (what `kvslim-llama calibrate` writes; '#' comments and line breaks
/// allowed) and checks its syntax. Throws Error(kIo) naming the path if it is missing or
/// unreadable, Error(kRecipe) naming the path, line and column if it is malformed. Stage names
/// and keys are checked when a cache is built from it (they need the head_dim).
std::string load_recipe(const std::string& path);

/// What the tools do with a --recipe argument: "@FILE" is load_recipe(FILE), anything else is
/// the recipe text itself.
std::string resolve_recipe(std::string_view arg);

/// The policy objects built from one chain. Policies are immutable and shared by every head
/// that uses the same chain; per-head state lives in the head's TokenStore.
struct Pipeline {
  std::vector<std::shared_ptr<const Scorer>> scorers;
  std::shared_ptr<const EvictionPolicy> eviction;  // may be null
  std::shared_ptr<const MergePolicy> merge;        // may be null
  std::shared_ptr<const Codec> codec;              // never null
  std::string text;                                // canonical chain text
  bool per_head = false;  // some stage was built for one (layer, kv head): do not share
};

/// Build the policies of a chain for heads of `head_dim` channels. Throws Error(kRecipe)
/// for unknown stages or keys, Error(kInvalidArgument) for values out of range.
Pipeline build_pipeline(const ChainSpec& chain, int head_dim);
/// The same, for the head ctx names (stages with per-head data, such as CQ's codebooks, need
/// one; see StageContext).
Pipeline build_pipeline(const ChainSpec& chain, const StageContext& ctx);

/// Names of every registered stage, by kind ("codec", "scorer", "eviction", "merge").
std::vector<std::pair<std::string, std::string>> registered_stages();

}  // namespace kvslim
