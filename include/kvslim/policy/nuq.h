// The `nuq` codec's level tables: Lloyd-Max quantizers of a unit Gaussian.
//
// `nuq:kbits=B,vbits=B,levels=gaussian` (docs/recipes.md) stores each key and value row as
// one f16 scale and B-bit indices into these levels (docs/formats.md "NUQ page"). The idea is
// TurboQuant's (Zandieh et al., 2025): after a random rotation the coordinates of a vector
// are close to Gaussian, so the MSE-optimal scalar quantizer of N(0, 1), scaled per vector,
// needs no calibration data. Without a rotation the codec is still valid, only less accurate
// on channels that are far from Gaussian.
#pragma once

#include <span>
#include <string_view>

#include "kvslim/policy/codebook.h"
#include "kvslim/policy/rotation.h"

namespace kvslim {

/// The 2^bits levels (bits 1..4) of the Lloyd-Max quantizer of N(0, 1), ascending and
/// symmetric about 0: each level is the mean of the Gaussian over its cell and each cell
/// boundary the midpoint of its two levels. Computed once (thread-safe) by Lloyd iteration
/// in double precision with closed-form cell means, to 1e-12. Throws Error(kInvalidArgument)
/// for other bit widths. 1 bit: +-0.7979 (= sqrt(2/pi)); 2 bits: +-0.4528, +-1.5104; ...
std::span<const double> gaussian_levels(int bits);
/// The same levels rounded to float: the table the kernels index.
std::span<const float> gaussian_levels_f32(int bits);
/// E[(X - Q(X))^2] for X ~ N(0, 1) and those levels (1 bit: 1 - 2/pi = 0.3634; 4 bits: 0.0095).
double gaussian_levels_mse(int bits);

/// Learned levels (`nuq:...,levels=FILE`, KVQuant's non-uniform datatype in the nuq codec's
/// per-row normalization): per (layer, kv head, K/V) a table of 2^bits levels, the weighted
/// 1-D k-means (train_codebooks: k-means++, seeded) of the calibration rows' coordinates
/// divided by their row's sigma = ||x|| / sqrt(head_dim), after `rotation` when the recipe
/// rotates (rows as the codec sees them). Weights are per row (the rows' attention mass, or
/// none). Stored as Codebooks with head_dim 1 and shapes {C=1, B=kbits} / {C=1, B=vbits}:
/// the codebook file format (docs/formats.md). Throws as train_codebooks does.
Codebooks train_levels(const CalibrationKV& data, int kbits, int vbits, const RotationSpec& rotation = {},
                       const TrainOptions& opt = {});

/// kbits, vbits and rotation of the nuq stage(s) of a recipe (all must agree). Throws
/// Error(kInvalidArgument) when the recipe has none or they differ.
struct NuqRecipeShape {
  int kbits = 3, vbits = 3;
  RotationSpec rotation;
};
NuqRecipeShape nuq_recipe_shape(std::string_view recipe);

}  // namespace kvslim
