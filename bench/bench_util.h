// Shared helpers for kvslim_bench: big pre-touched buffers, fast pseudo-random fill, and
// the registration entry points of each benchmark file (called from main in a fixed order).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvslim::bench {

/// Fills x[0, n) with pseudo-random floats in [-2, 2) (xorshift: fast enough for GiBs).
void fill_random(float* x, std::size_t n, std::uint64_t seed);

/// A 512 MiB float buffer of random values, allocated and filled on first use; shared by
/// the memcpy roofline and the codec benchmarks (as their f32 input).
const std::vector<float>& big_input();

void register_roofline();  // BM_read_bandwidth, BM_memcpy
void register_codecs();    // BM_encode, BM_decode
void register_attend();    // BM_attend, BM_evict
void register_prefill();   // BM_prefill, BM_prefill_gemm

}  // namespace kvslim::bench
