// Internal: built-in codecs and their factories.
#pragma once

#include "kvslim/policy/policy.h"
#include "kvslim/tensor/dtype.h"

namespace kvslim::detail {

/// Options every codec accepts: group (tokens per page), residual, sinks.
struct PagingOptions {
  int group = 32;
  int residual = 0;
  int sinks = 0;
};
/// Reads group/residual/sinks from params with the given defaults.
PagingOptions read_paging(StageParams& p, PagingOptions defaults);

BuiltStage make_float_codec(DType dtype, StageParams& p, int head_dim);
BuiltStage make_kivi_codec(StageParams& p, int head_dim);
BuiltStage make_nuq_codec(StageParams& p, int head_dim);  // src/policy/nuq_codec.cpp
BuiltStage make_cq_codec(StageParams& p, const StageContext& ctx);  // src/policy/cq_codec.cpp

// Eviction stages (src/policy/eviction.cpp).
BuiltStage make_h2o(StageParams& p, int head_dim);
BuiltStage make_streaming(StageParams& p, int head_dim);
BuiltStage make_l2norm(StageParams& p, int head_dim);
BuiltStage make_snapkv(StageParams& p, int head_dim);
BuiltStage make_random(StageParams& p, int head_dim);
BuiltStage make_razor(StageParams& p, int head_dim);
BuiltStage make_mikv(StageParams& p, const StageContext& ctx);
BuiltStage make_zipcache(StageParams& p, int head_dim);

/// Throws Error(kInvalidArgument) if any |x| > 65504 (not representable in f16).
void check_f16_range(const char* codec, const float* x, int ntok, int d, const char* what);

}  // namespace kvslim::detail
