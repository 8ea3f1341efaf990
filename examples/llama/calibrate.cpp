#include "calibrate.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "check.h"
#include "engine.h"
#include "util/json.h"

namespace kvslim::llama {
namespace {

// Hands every layer's post-RoPE q and k of the one prefill chunk to the scores.
class ScoreObserver final : public ForwardObserver {
 public:
  ScoreObserver(RetrievalScores& s, int head_dim) : s_(s), d_(head_dim) {}
  void on_layer(const LayerActivations& a) override {
    s_.add_chunk(a.layer, a.first_position, a.n, d_, a.q, a.k, 1.0f / std::sqrt(static_cast<float>(d_)));
  }

 private:
  RetrievalScores& s_;
  int d_;
};

}  // namespace

CalibrateResult calibrate_retrieval(const Model& model, const CalibrateOptions& options) {
  const ModelConfig& c = model.config;
  CalibrateResult r;
  r.options = options;
  CalibrateOptions& o = r.options;
  KVSLIM_CHECK(o.repeats >= 2, ErrorCode::kInvalidArgument,
               "calibrate: --repeats {} must be at least 2 (echo and induction need an earlier occurrence)", o.repeats);
  const int room = c.seq_len - 1;  // BOS comes first
  if (o.length == 0) o.length = room / o.repeats * o.repeats;
  KVSLIM_CHECK(o.length >= 1 && o.length <= room, ErrorCode::kInvalidArgument,
               "calibrate: --length {} does not fit the context of {}: at most {} tokens after BOS", o.length,
               model.name, room);
  KVSLIM_CHECK(o.retrieval > 0.0 && o.retrieval < 1.0, ErrorCode::kInvalidArgument,
               "calibrate: --retrieval {} must be in (0, 1): the fraction of kv heads kept full", o.retrieval);
  if (o.compress.empty()) o.compress = fmt::format("razor:sinks=4,window={}", std::max(16, c.seq_len / 8));
  const Tokenizer& tok = *model.tokenizer;
  const int first_token = std::max(tok.bos_id(), tok.eos_id()) + 1;
  const std::vector<int> seq = retrieval_calibration_tokens(o.length, o.repeats, o.seed, first_token, c.vocab_size);
  r.period = o.length / o.repeats;
  r.tokens.push_back(tok.bos_id());
  r.tokens.insert(r.tokens.end(), seq.begin(), seq.end());

  RetrievalScores scores(c.n_layers, c.n_heads, c.n_kv_heads, r.tokens);
  Engine engine(model, "f32");
  ScoreObserver obs(scores, c.head_dim);
  (void)engine.forward(r.tokens, Logits::kLast, &obs);

  r.heads = scores.heads();
  r.uniform_echo = scores.uniform_echo();
  r.uniform_induction = scores.uniform_induction();
  r.chosen = scores.select(o.retrieval);
  for (int l = 0; l < c.n_layers; ++l)
    for (int h = 0; h < c.n_heads; ++h) {
      r.q_echo.push_back(scores.echo(l, h));
      r.q_induction.push_back(scores.induction(l, h));
    }
  std::vector<std::string> header = {
      fmt::format("RazorAttention retrieval heads of {} ({} layers x {} kv heads), written by kvslim-llama calibrate",
                  model.name, c.n_layers, c.n_kv_heads),
      fmt::format("calibration: BOS + {} random tokens repeated {} times (seed {}); {} of {} kv heads ({}%) kept full",
                  r.period, o.repeats, o.seed, r.chosen.size(), r.heads.size(),
                  fmt::format("{:.0f}", 100.0 * static_cast<double>(r.chosen.size()) / static_cast<double>(r.heads.size()))),
      "echo / induction: mean attention a query gives to the earlier occurrences of its own token / to the",
      "tokens that followed them; a kv head takes the maximum over its query heads (docs/retrieval.md)",
      "line 1 below: every other head; then one override per retrieval head (edit freely)"};
  r.recipe = retrieval_recipe(r.chosen, o.keep, o.compress, header);
  // Fail now, not at the first ppl run, if a chain does not build for this model.
  CacheConfig cfg;
  cfg.layers = c.n_layers;
  cfg.q_heads = c.n_heads;
  cfg.kv_heads = c.n_kv_heads;
  cfg.head_dim = c.head_dim;
  cfg.max_tokens = c.seq_len;
  cfg.recipe = r.recipe;
  const KVCache probe(cfg);
  return r;
}

std::string calibration_json(const Model& model, const CalibrateResult& r) {
  const ModelConfig& c = model.config;
  json::Value j;
  j["model"] = model.path;
  j["model_name"] = model.name;
  j["layers"] = c.n_layers;
  j["q_heads"] = c.n_heads;
  j["kv_heads"] = c.n_kv_heads;
  j["arguments"] = {{"length", r.options.length},       {"repeats", r.options.repeats},
                    {"seed", r.options.seed},           {"retrieval", r.options.retrieval},
                    {"keep", r.options.keep},           {"compress", r.options.compress}};
  j["period"] = r.period;
  j["tokens"] = r.tokens.size();
  j["uniform"] = {{"echo", r.uniform_echo}, {"induction", r.uniform_induction}};
  j["aggregation"] = "kv head = max over its query heads; score = max of echo + induction";
  json::Value heads = json::Value::array();
  const int group = c.n_heads / c.n_kv_heads;
  for (const RetrievalHead& h : r.heads) {
    const bool chosen = std::any_of(r.chosen.begin(), r.chosen.end(), [&](const RetrievalHead& x) {
      return x.layer == h.layer && x.kv_head == h.kv_head;
    });
    json::Value qs = json::Value::array();
    for (int g = 0; g < group; ++g) {
      const int q = h.kv_head * group + g;
      const std::size_t i = static_cast<std::size_t>(h.layer) * c.n_heads + q;
      qs.push_back({{"q_head", q}, {"echo", r.q_echo[i]}, {"induction", r.q_induction[i]}});
    }
    heads.push_back({{"layer", h.layer},
                     {"kv_head", h.kv_head},
                     {"echo", h.echo},
                     {"induction", h.induction},
                     {"score", h.score},
                     {"chosen", chosen},
                     {"q_heads", qs}});
  }
  j["heads"] = heads;
  json::Value chosen = json::Value::array();
  for (const RetrievalHead& h : r.chosen) chosen.push_back({{"layer", h.layer}, {"kv_head", h.kv_head}, {"score", h.score}});
  j["chosen"] = chosen;
  j["recipe"] = r.recipe;
  return j.dump(2) + "\n";
}

}  // namespace kvslim::llama
