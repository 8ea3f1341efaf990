#pragma once
#include "kvslim/cache/recipe.h"
#include "kvslim/policy/policy.h"

namespace kvslim::detail {
/// Look up and run the factory of one stage; throws Error(kRecipe) for unknown names/keys.
BuiltStage build_stage(const StageSpec& spec, const StageContext& ctx);
}  // namespace kvslim::detail
