// Replay real recordings through a KVCache and measure attention quality and memory: the
// engine behind kvslim-eval, the demo and the quality tests.
//
// For each recording, tokens are appended in chunks (default 1: decode) — k, v of every kv
// head — and the chunk's recorded queries attend; outputs are compared with the recorded
// attn_out (the exact softmax attention of the original model).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kvslim/testing/recordings.h"

namespace kvslim::testing {

struct ReplayOptions {
  int chunk = 1;          // tokens per append/attend (1 = token-by-token decode)
  int max_tokens = 0;     // stop after this many tokens per recording (0 = all)
  /// Append the recorded pre-RoPE keys (k_pre.f32) to a cache configured with
  /// pre_rope_keys and the recording's RoPE (meta.json), instead of the post-RoPE keys.
  bool pre_rope = false;
};

struct ReplayResult {
  std::string recipe;
  double bits_per_value = 0.0;  // at the end of each recording, metadata included
  std::int64_t bytes = 0;       // cache bytes at the end of a recording, summed over recordings
  double ratio = 0.0;           // vs an f32 cache of the same tokens (summed bytes)
  /// vs an f32 cache of every token seen (evicted ones included), from the summed bytes like
  /// `ratio`: equal to it without eviction.
  double ratio_seen = 0.0;
  double kept = 0.0;            // stats().kept (tokens kept / seen) at each recording's end, mean
  double rel_err_mean = 0.0;    // ||out - ref|| / ||ref|| over (recording, layer, q head, token)
  double rel_err_p99 = 0.0;
  double cosine_mean = 0.0;
  std::int64_t samples = 0;     // number of (layer, head, token) outputs compared
};

/// Progress callback: (recordings done, recordings total).
using ReplayProgress = std::function<void(int, int)>;

ReplayResult replay(const std::vector<Recording>& recordings, const std::string& recipe,
                    const ReplayOptions& options = {}, const ReplayProgress& progress = {});

}  // namespace kvslim::testing
