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

}  // namespace kvslim
