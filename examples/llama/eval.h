// What kvslim-llama does with an Engine: the token stream of a marked text, perplexity and
// compression metrics per recipe, recordings in the shared dumps format, greedy generation.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvslim/cache/kv_cache.h"
#include "model.h"

namespace kvslim::llama {

/// Story separator of the marked text files (data/README.md).
inline constexpr std::string_view kStoryMarker = "<|endoftext|>";

/// The token stream rule of data/README.md: split `text` at every <|endoftext|>, strip
/// whitespace at both ends of each piece, skip empty pieces, emit BOS + encode(piece) per
/// piece, and stop after `max_tokens` tokens (0 = no limit).
std::vector<int> token_stream(const Tokenizer& tokenizer, std::string_view text,
                              std::size_t max_tokens = 0);

/// Consecutive windows [begin, end) of at most `window` tokens covering `stream`; windows
/// shorter than 2 tokens (nothing to predict) are dropped; at most `max_windows` (0 = all).
std::vector<std::pair<std::size_t, std::size_t>> windows_of(std::size_t stream_size,
                                                            std::size_t window,
                                                            std::size_t max_windows);

/// Quality and cost of one recipe against the full-precision (f32) cache.
struct RecipeMetrics {
  std::string recipe;
  double ppl = 0.0;          // exp(mean NLL) over every predicted token
  double dppl_rel = 0.0;     // ppl / ppl_f32 - 1
  double kld_mean = 0.0;     // mean over predicted tokens of KL(p_f32 || p_recipe), nats
  double top1_agree = 0.0;   // fraction of tokens whose argmax matches the f32 run's
  double kv_bytes = 0.0;     // stats().total_bytes at each window's end, mean over windows
  double ratio = 0.0;        // stats().ratio_vs_f32 at each window's end, mean over windows
  double ratio_seen = 0.0;   // stats().ratio_seen (vs an f32 cache of every token seen), same
  double kept = 0.0;         // stats().kept (tokens kept / tokens seen), same points
  double bytes_per_token = 0.0;  // total_bytes / tokens kept per (layer, kv head), same points
  double bits_per_value = 0.0;   // stats().bits_per_value, same points
  double tokens_per_s = 0.0; // decode throughput (forward calls only, metrics excluded)
  std::int64_t tokens = 0;   // predicted tokens
};

struct PerplexityOptions {
  std::size_t max_windows = 0;  // 0 = all windows
  /// 0: decode every window token by token (append 1, attend, next). N >= 1: send the first
  /// N tokens of each window as one prefill chunk (one append + attend per layer), then
  /// decode the rest token by token; only tokens N .. end of the window are scored (their
  /// predictions come from the prefill's last row and the decode steps). N = 1 scores and
  /// computes exactly what 0 does. Must be smaller than the model's context length; windows
  /// of N tokens or fewer (a short last window) are skipped.
  std::size_t prefill = 0;
  /// The recipes' caches take pre-RoPE keys (Engine's pre_rope); the f32 reference does not.
  bool pre_rope = false;
  /// Called after each (window, run) with the number of runs done and the total.
  std::function<void(std::size_t done, std::size_t total)> progress;
};

/// Result of evaluate_perplexity(): the f32 reference and one entry per recipe.
struct PerplexityReport {
  double ppl_f32 = 0.0;
  std::size_t windows = 0;
  std::size_t prefill = 0;  // PerplexityOptions::prefill of the run
  std::int64_t tokens = 0;  // predicted (scored) tokens per recipe
  std::vector<RecipeMetrics> recipes;
};

/// Cuts `stream` into windows of the model's context length; in each window, from an empty
/// cache, decodes token by token (append 1, attend, next; or prefill then decode, see
/// PerplexityOptions::prefill) with an f32 reference cache and with each recipe's cache, both
/// under the same protocol, and compares their next-token distributions. Every recipe,
/// "f32" included, runs on its own cache, so a nonzero f32 KLD would expose nondeterminism.
/// Throws Error(kInvalidArgument) for a prefill not smaller than the context length.
PerplexityReport evaluate_perplexity(const Model& model, std::span<const int> stream,
                                     std::span<const std::string> recipes,
                                     const PerplexityOptions& options = {});

/// Runs the window of up to seq_len tokens starting at byte `offset` of `text` (token stream
/// rule) as one prefill chunk through an f32 cache and writes q.f32, k.f32, k_pre.f32,
/// v.f32, attn_out.f32, nll.f32 and meta.json to `out_dir` (created if needed), in the
/// format of data/dumps. Returns the window's perplexity.
double write_dump(const Model& model, std::string_view text, std::int64_t offset,
                  const std::string& out_dir, const std::string& text_file_name);

/// Why generate() stopped.
enum class StopReason {
  kEndOfText,    // the model produced BOS or EOS
  kTokenLimit,   // `max_new` tokens were generated
  kContextFull,  // the model's context length (seq_len) was reached
};

/// "EOS token" / "token limit" / "context full".
const char* stop_reason_name(StopReason r) noexcept;

struct GenerateResult {
  std::vector<int> tokens;  // prompt (with BOS) followed by the generated tokens
  std::string text;         // decoded prompt + continuation
  int generated = 0;
  double tokens_per_s = 0.0;  // decode steps (forward of 1 token) per second, prefill excluded
  StopReason stop = StopReason::kTokenLimit;
  // The cache at the end: stats().total_bytes, divided by the tokens kept per (layer,
  // kv head), and stats().ratio_vs_f32.
  std::int64_t kv_bytes = 0;
  double bytes_per_token = 0.0;
  double ratio_vs_f32 = 0.0;
};

/// Saved generation sessions (docs/formats.md, "kvslim-llama session"): the model's
/// fingerprint, the recipe, the tokens forwarded and the logits of the last one, then the
/// KV cache as KVCache::save writes it.
struct SessionFiles {
  std::string save;  // write the session here when generation ends (after prefill for max_new 0)
  std::string load;  // resume from this session instead of encoding a prompt
};

/// Greedy generation: BOS + encode(prompt), prefill, then up to `max_new` tokens (stops at
/// BOS/EOS or the context end). `on_text` receives each piece as it is produced.
/// With files.load, the prompt must be empty and the session's tokens, logits and cache take
/// the prefill's place: the text and tokens produced are exactly those of the run that saved
/// it, continued (on the same ISA). recipe "" then means the session's; another recipe, a
/// different model (weights or tokenizer) or pre_rope setting is Error(kMismatch).
GenerateResult generate(const Model& model, const std::string& recipe, std::string_view prompt,
                        int max_new,
                        const std::function<void(std::string_view)>& on_text = nullptr, bool pre_rope = false,
                        const SessionFiles& files = {});

/// total_bytes / (total_tokens / (layers * kv_heads)): cache bytes per token of the
/// sequence, all layers and kv heads together; 0 for an empty cache.
double bytes_per_token(const CacheStats& stats);

/// Bytes of one token in an f32 cache of the model: all layers and kv heads, K and V.
std::int64_t f32_bytes_per_token(const ModelConfig& config);

/// Reads a text file; Error(kIo) naming the path if it cannot be read.
std::string read_text(const std::string& path);

}  // namespace kvslim::llama
