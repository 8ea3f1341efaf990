// Internal: built-in codecs and their factories.
#pragma once

#include "kvslim/policy/codebook.h"
#include "kvslim/policy/policy.h"
#include "kvslim/tensor/dtype.h"

#include <memory>
#include <string>
#include <string_view>

namespace kvslim::detail {

/// Options every codec accepts: group (tokens per page), residual, sinks; and the rotation,
/// for the codecs that take rotate=hadamard[,seed=S] (read_rotation).
struct PagingOptions {
  int group = 32;
  int residual = 0;
  int sinks = 0;
  RotationSpec rotation{};
};
/// Reads group/residual/sinks from params with the given defaults.
PagingOptions read_paging(StageParams& p, PagingOptions defaults);
/// Reads rotate=none|hadamard, and seed= and rotated=kv|k|v (which need rotate=hadamard).
RotationSpec read_rotation(StageParams& p);
/// ",group=G,residual=R,sinks=S" plus rotation_text(): the canonical tail of the float
/// codecs' describe().
std::string paging_text(const PagingOptions& o);
/// ",rotate=hadamard,seed=N[,rotated=k|v]" when rotated, else "".
std::string rotation_text(const RotationSpec& r);

BuiltStage make_float_codec(DType dtype, StageParams& p, int head_dim);
BuiltStage make_kivi_codec(StageParams& p, int head_dim);
BuiltStage make_nuq_codec(StageParams& p, const StageContext& ctx);  // src/policy/nuq_codec.cpp
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
// Merge stages (src/policy/merge.cpp).
BuiltStage make_kvmerger(StageParams& p, int head_dim);
BuiltStage make_minicache(StageParams& p, int head_dim);

/// Codebooks (cq) or level tables (nuq) read from `path`, once per cache: through
/// ctx.loaded, where the cache keeps them and counts their bytes. A read error keeps its code
/// and becomes "<what><path>: <error><hint>".
std::shared_ptr<const Codebooks> codebook_file(const std::string& path, const StageContext& ctx, std::string_view what,
                                               std::string_view hint);

/// Throws Error(kInvalidArgument) if any |x| > 65504 (not representable in f16).
void check_f16_range(const char* codec, const float* x, int ntok, int d, const char* what);

}  // namespace kvslim::detail
