// `kvslim-llama calibrate-codebooks`: CQ codebooks (kvslim/policy/codebook.h) learnt from a
// model's own keys and values on a text.
//
// The text's token stream (data/README.md rule) from byte `skip_bytes` on is cut into windows
// of the model's context length; each window runs through an f32 cache as one prefill chunk
// from position 0, so every position 0 .. seq_len-1 is seen (the keys are post-RoPE, as the
// cache stores them, and codebooks learnt on some positions do not carry over to others). Per
// (layer, kv head) the post-RoPE keys and the values of every token are collected with the
// attention mass the token received (causal softmax of the chunk's queries, exact in double,
// summed over the query heads of the GQA group): the "attention-weighted" stand-in for the
// Fisher weights of the CQ paper. Then weighted k-means (train_codebooks) for the shapes of
// the recipe's cq stages (cq_recipe_shapes).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvslim/policy/codebook.h"
#include "model.h"

namespace kvslim::llama {

struct CodebookCalibrationOptions {
  std::string recipe;                 // holds the cq stage(s) whose shapes are trained
  std::int64_t skip_bytes = -1;       // -1: default_calibration_offset(text)
  std::int64_t tokens = 0;            // tokens of the stream used; 0: 16 windows of seq_len
  TrainOptions train;                 // seed, iterations
  bool mass = true;                   // false: every row weighs 1
};

struct CodebookCalibrationResult {
  Codebooks codebooks;
  std::int64_t skip_bytes = 0;   // as used (the default resolved)
  std::int64_t rows = 0;         // rows per (layer, kv head)
  int windows = 0;               // windows run
  int full_windows = 0;          // of those, windows of the full context length
  double seconds_forward = 0.0, seconds_train = 0.0;
};

/// Where calibration starts by default: the first story marker at or after the middle of
/// the text (its second half), so that `kvslim-llama ppl`, which reads the text from byte 0,
/// is disjoint from it for every --windows that stays in the first half.
std::int64_t default_calibration_offset(std::string_view text);

/// Throws kvslim::Error: kInvalidArgument for a recipe without a cq stage or a bad shape
/// (cq_recipe_shapes), a skip_bytes past the end of the text or a text too short to train
/// 2^(C·B) centroids (naming the rows and the codebook size).
CodebookCalibrationResult calibrate_codebooks(const Model& model, std::string_view text,
                                              const CodebookCalibrationOptions& options);

}  // namespace kvslim::llama
