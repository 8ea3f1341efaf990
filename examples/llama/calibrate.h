// `kvslim-llama calibrate`: RazorAttention's retrieval-head calibration on a model.
//
// Feeds BOS + a random sequence of `length / repeats` distinct tokens repeated `repeats`
// times through an f32 cache in one prefill chunk, scores echo and induction attention per
// (layer, query head) from the post-RoPE queries and keys (kvslim::RetrievalScores, exact
// softmax in double), and writes a recipe that keeps the top `retrieval` fraction of kv heads
// in `keep` and compresses the rest with `compress` (docs/retrieval.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvslim/policy/retrieval.h"
#include "model.h"

namespace kvslim::llama {

struct CalibrateOptions {
  int length = 0;          // tokens after BOS; 0 = the largest multiple of repeats that fits the context
  int repeats = 4;
  std::uint64_t seed = 1;
  double retrieval = 0.15;  // fraction of kv heads kept full
  std::string keep = "f32";
  std::string compress;     // empty = razor:sinks=4,window=max(16, context / 8)
};

struct CalibrateResult {
  CalibrateOptions options;  // as run (defaults filled in)
  int period = 0;            // tokens per repeat
  std::vector<int> tokens;   // BOS + the repeated sequence
  std::vector<RetrievalHead> heads;   // every kv head, layer-major
  std::vector<RetrievalHead> chosen;  // the kept-full heads, highest score first
  std::vector<double> q_echo, q_induction;  // [layer * n_heads + q head]
  double uniform_echo = 0.0, uniform_induction = 0.0;  // RetrievalScores::uniform_*
  std::string recipe;        // the recipe file's text
};

/// Throws kvslim::Error (kInvalidArgument) for a length too short for the repeats, a length
/// that does not fit the context, a fraction outside (0, 1), or (kRecipe) chains that do not
/// build for this model.
CalibrateResult calibrate_retrieval(const Model& model, const CalibrateOptions& options);

/// The JSON report (FILE.json): arguments, both scores per kv head and per query head, the
/// chosen heads and the recipe.
std::string calibration_json(const Model& model, const CalibrateResult& r);

}  // namespace kvslim::llama
