// Retrieval-head calibration for RazorAttention (Tang et al., 2024). A few heads ("retrieval
// heads") attend across the whole context; the rest look at sinks and recent tokens. The
// paper finds them without training: feed a random token sequence repeated R times and
// measure, for every head, how much attention a query gives to
//   echo       the earlier occurrences of its own token, and
//   induction  the tokens that followed those occurrences (what an induction head copies).
// Heads with high scores keep their full cache; every other head gets `razor:sinks,window`
// (a compensation token stands for what leaves the window). docs/retrieval.md explains the
// scores and how to edit the recipe this writes.
//
// Engine side:
//   std::vector<int> ids = kvslim::retrieval_calibration_tokens(508, 4, seed, 3, vocab);
//   kvslim::RetrievalScores rs(layers, q_heads, kv_heads, ids);
//   // run the model on ids (BOS first if the model wants one: pass tokens from position 0),
//   // then per layer either rs.add(layer, q_head, t, probs) with the attention probabilities
//   // the engine computed, or rs.add_chunk(layer, ...) with post-RoPE q and k.
//   auto heads = rs.select(0.15);
//   std::string recipe = kvslim::retrieval_recipe(heads, "f32", "razor:sinks=4,window=64");
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace kvslim {

/// `repeats` copies of one random sequence of length / repeats distinct tokens drawn from
/// [first_token, vocab) (seeded, the same on every platform); length % repeats tokens are
/// not used. Throws Error(kInvalidArgument) when repeats < 2, when the length is too short for
/// the repeats (fewer than 4 tokens per repeat), or when the vocabulary range has fewer
/// distinct tokens than one repeat needs.
std::vector<int> retrieval_calibration_tokens(int length, int repeats, std::uint64_t seed, int first_token, int vocab);

/// The scores of one kv head. A kv head serves a GQA group of query heads that share its
/// cache, and one retrieving query head is enough to need the whole cache, so a kv head's
/// scores are the maximum over its group (echo and induction separately; score = the maximum
/// of echo + induction, the attention mass a query head puts on the earlier occurrence and
/// its successor).
struct RetrievalHead {
  int layer = 0, kv_head = 0;
  double echo = 0.0, induction = 0.0, score = 0.0;
  int q_head = 0;  // the query head that gave `score`
};

class RetrievalScores {
 public:
  /// tokens[t] is the token at position t of the observed sequence. Throws
  /// Error(kInvalidArgument) for non-positive shapes or q_heads not a multiple of kv_heads.
  RetrievalScores(int layers, int q_heads, int kv_heads, std::vector<int> tokens);

  int layers() const noexcept { return layers_; }
  int q_heads() const noexcept { return q_heads_; }
  int kv_heads() const noexcept { return kv_heads_; }
  const std::vector<int>& tokens() const noexcept { return tokens_; }

  /// The attention probabilities query t (a position) of (layer, q_head) gave to positions
  /// 0..t: probs.size() must be t + 1. Queries whose token has not occurred before add
  /// nothing. Throws Error(kOutOfRange) / Error(kShapeMismatch) / Error(kNonFinite).
  void add(int layer, int q_head, std::int64_t t, std::span<const float> probs);

  /// Computes the causal softmax attention itself, in double, and adds it:
  ///   q [n][q_heads][head_dim]       post-RoPE queries of positions first .. first + n - 1
  ///   k [first + n][kv_heads][head_dim]  post-RoPE keys of positions 0 .. first + n - 1
  ///   scale                          the softmax scale (1 / sqrt(head_dim) for llama)
  void add_chunk(int layer, std::int64_t first, int n, int head_dim, const float* q, const float* k, float scale);

  /// Mean over the counted queries of (layer, q_head): echo and induction mass.
  double echo(int layer, int q_head) const;
  double induction(int layer, int q_head) const;
  /// Queries counted for (layer, q_head).
  std::int64_t queries(int layer, int q_head) const;
  /// What a head attending uniformly to every visible token would score, over the queries
  /// that count (each query t with an earlier occurrence: |targets| / (t + 1)); the baseline a
  /// retrieval head must stand out from.
  double uniform_echo() const noexcept { return uniform_echo_; }
  double uniform_induction() const noexcept { return uniform_ind_; }

  /// One entry per kv head (layer-major).
  std::vector<RetrievalHead> heads() const;
  /// Every kv head, by score, highest first (ties: lower layer, then lower head).
  std::vector<RetrievalHead> ranked() const;
  /// The top `fraction` of kv heads by score: max(1, round(fraction * layers * kv_heads)).
  /// Throws Error(kInvalidArgument) unless 0 < fraction < 1.
  std::vector<RetrievalHead> select(double fraction) const;

 private:
  std::size_t at(int layer, int q_head) const;
  int layers_, q_heads_, kv_heads_;
  std::vector<int> tokens_;
  // Per position: earlier positions holding the same token (echo targets) and the positions
  // right after them (induction targets), CSR-style.
  std::vector<std::int64_t> first_, echo_, ind_first_, ind_;
  std::vector<double> echo_sum_, ind_sum_;
  std::vector<std::int64_t> count_;
  double uniform_echo_ = 0.0, uniform_ind_ = 0.0;
};

/// The recipe text of a calibration: `compress` for every head, then one override per chosen
/// head, `[layers=L heads=H] keep`, each with a comment giving its scores. `header` lines (if
/// any) are written first as '#' comments. The result parses with parse_recipe().
std::string retrieval_recipe(std::span<const RetrievalHead> chosen, const std::string& keep,
                             const std::string& compress, const std::vector<std::string>& header = {});

}  // namespace kvslim
