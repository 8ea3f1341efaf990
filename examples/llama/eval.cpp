#include "eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <limits>
#include <memory>
#include <span>
#include <sstream>

#include "check.h"
#include "engine.h"
#include "file_io.h"
#include "kvslim/policy/codebook.h"
#include "util/json.h"

namespace kvslim::llama {
namespace {

using Clock = std::chrono::steady_clock;

std::string_view strip(std::string_view s) {
  constexpr std::string_view kSpace = " \t\n\r\v\f";
  const std::size_t b = s.find_first_not_of(kSpace);
  if (b == std::string_view::npos) return {};
  const std::size_t e = s.find_last_not_of(kSpace);
  return s.substr(b, e - b + 1);
}

/// lp[v] = logits[v] - logsumexp(logits); returns the argmax (first on ties). The sum runs
/// in double so that a 2048-way softmax loses no digits.
int log_softmax(const float* logits, int vocab, float* lp) {
  int best = 0;
  for (int i = 1; i < vocab; ++i)
    if (logits[i] > logits[best]) best = i;
  const float mx = logits[best];
  double sum = 0.0;
  for (int i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i] - mx));
  const float lse = mx + static_cast<float>(std::log(sum));
  for (int i = 0; i < vocab; ++i) lp[i] = logits[i] - lse;
  return best;
}

int argmax(std::span<const float> x) {
  int best = 0;
  for (std::size_t i = 1; i < x.size(); ++i)
    if (x[i] > x[static_cast<std::size_t>(best)]) best = static_cast<int>(i);
  return best;
}

/// Gathers per-chunk [n][heads][hd] activations into recording layout [L][heads][T][hd].
class DumpObserver final : public ForwardObserver {
 public:
  DumpObserver(const ModelConfig& c, int tokens) : c_(c), t_(tokens) {
    const std::size_t qn = static_cast<std::size_t>(c.n_layers) * c.n_heads * tokens * c.head_dim;
    const std::size_t kn =
        static_cast<std::size_t>(c.n_layers) * c.n_kv_heads * tokens * c.head_dim;
    q.resize(qn);
    attn_out.resize(qn);
    k.resize(kn);
    k_pre.resize(kn);
    v.resize(kn);
  }
  void on_layer(const LayerActivations& a) override {
    scatter(a, a.q, c_.n_heads, q);
    scatter(a, a.attn_out, c_.n_heads, attn_out);
    scatter(a, a.k, c_.n_kv_heads, k);
    scatter(a, a.k_pre, c_.n_kv_heads, k_pre);
    scatter(a, a.v, c_.n_kv_heads, v);
  }
  std::vector<float> q, k, k_pre, v, attn_out;

 private:
  void scatter(const LayerActivations& a, const float* src, int heads, std::vector<float>& dst) {
    const std::size_t hd = static_cast<std::size_t>(c_.head_dim);
    for (int t = 0; t < a.n; ++t)
      for (int h = 0; h < heads; ++h) {
        const std::size_t pos = static_cast<std::size_t>(a.first_position + t);
        const std::size_t d = ((static_cast<std::size_t>(a.layer) * heads + h) * t_ + pos) * hd;
        std::copy_n(src + (static_cast<std::size_t>(t) * heads + h) * hd, hd, dst.data() + d);
      }
  }
  const ModelConfig& c_;
  int t_;
};

std::string tensor_meta(std::string_view file, std::initializer_list<int> shape,
                        std::string_view dims, std::string_view what) {
  std::string s = fmt::format("    \"{}\": {{\"shape\": [", file);
  bool first = true;
  for (int d : shape) {
    s += fmt::format("{}{}", first ? "" : ", ", d);
    first = false;
  }
  return s + fmt::format("], \"dims\": {}, \"what\": {}}}", dims, json::quote(what));
}

}  // namespace

std::string read_text(const std::string& path) { return read_file(path, "text file"); }

double bytes_per_token(const CacheStats& stats) {
  const std::int64_t heads = static_cast<std::int64_t>(stats.layers) * stats.kv_heads;
  if (stats.total_tokens <= 0 || heads <= 0) return 0.0;
  return static_cast<double>(stats.total_bytes) * static_cast<double>(heads) /
         static_cast<double>(stats.total_tokens);
}

std::int64_t f32_bytes_per_token(const ModelConfig& c) {
  return static_cast<std::int64_t>(c.n_layers) * c.n_kv_heads * c.head_dim * 2 *
         static_cast<std::int64_t>(sizeof(float));
}

const char* stop_reason_name(StopReason r) noexcept {
  switch (r) {
    case StopReason::kEndOfText: return "EOS token";
    case StopReason::kTokenLimit: return "token limit";
    case StopReason::kContextFull: return "context full";
  }
  return "?";
}

std::vector<int> token_stream(const Tokenizer& tokenizer, std::string_view text,
                              std::size_t max_tokens) {
  std::vector<int> out;
  std::size_t pos = 0;
  while (true) {
    const std::size_t j = text.find(kStoryMarker, pos);
    const std::string_view piece =
        strip(text.substr(pos, j == std::string_view::npos ? std::string_view::npos : j - pos));
    if (!piece.empty()) {
      out.push_back(tokenizer.bos_id());
      const std::vector<int> ids = tokenizer.encode(piece);
      out.insert(out.end(), ids.begin(), ids.end());
      if (max_tokens && out.size() >= max_tokens) {
        out.resize(max_tokens);
        break;
      }
    }
    if (j == std::string_view::npos) break;
    pos = j + kStoryMarker.size();
  }
  return out;
}

std::vector<std::pair<std::size_t, std::size_t>> windows_of(std::size_t stream_size,
                                                            std::size_t window,
                                                            std::size_t max_windows) {
  KVSLIM_CHECK(window > 0, ErrorCode::kInvalidArgument, "window length must be positive");
  std::vector<std::pair<std::size_t, std::size_t>> out;
  for (std::size_t b = 0; b + 2 <= stream_size; b += window) {
    if (max_windows && out.size() >= max_windows) break;
    out.emplace_back(b, std::min(stream_size, b + window));
  }
  return out;
}

PerplexityReport evaluate_perplexity(const Model& model, std::span<const int> stream,
                                     std::span<const std::string> recipes,
                                     const PerplexityOptions& options) {
  const ModelConfig& c = model.config;
  const int V = c.vocab_size;
  const std::size_t W = static_cast<std::size_t>(c.seq_len);
  KVSLIM_CHECK(options.prefill < W, ErrorCode::kInvalidArgument,
               "prefill of {} tokens must be smaller than the window length ({} tokens, the "
               "model's context)",
               options.prefill, W);
  // Tokens fed before the first scored prediction: the prefill chunk, or the first token
  // alone when decoding token by token (prefill 1 computes exactly the same thing).
  const std::size_t head = std::max<std::size_t>(options.prefill, 1);
  auto windows = windows_of(stream.size(), W, 0);
  std::erase_if(windows, [&](const auto& w) { return w.second - w.first <= head; });
  if (options.max_windows && windows.size() > options.max_windows)
    windows.resize(options.max_windows);
  KVSLIM_CHECK(!windows.empty(), ErrorCode::kInvalidArgument,
               "the text has {} tokens: nothing to evaluate (need at least {})", stream.size(),
               head + 1);

  // Build every cache first so that a bad recipe fails before any long run.
  Engine ref(model, "f32");
  std::vector<std::unique_ptr<Engine>> engines;
  for (const std::string& r : recipes)
    engines.push_back(std::make_unique<Engine>(model, r, model.config.seq_len, options.pre_rope));

  struct Acc {
    double nll = 0.0, kl = 0.0, bytes = 0.0, ratio = 0.0, ratio_seen = 0.0, kept = 0.0,
           per_token = 0.0, bits = 0.0, seconds = 0.0;
    std::int64_t agree = 0, decoded = 0;
  };
  std::vector<Acc> acc(recipes.size());
  double ref_nll = 0.0;
  std::int64_t predicted = 0;

  std::vector<float> ref_lp(W * V), ref_p(W * V), lp(static_cast<std::size_t>(V));
  std::vector<int> ref_top(W);
  const std::size_t total_runs = windows.size() * (1 + recipes.size());
  std::size_t done = 0;

  // One window through `eng` under the protocol: the first `head` tokens in one forward
  // call, then one token per call up to the window's last token (so that the cache ends
  // holding the whole window). score(i, logits) receives the prediction of token
  // b + head + i. Forward calls of one token are timed into `seconds` / counted in `calls`
  // (with prefill, the chunk is not: tok/s stays a decode speed).
  auto run_window = [&](Engine& eng, std::size_t b, std::size_t n, auto&& score,
                        double& seconds, std::int64_t& calls) {
    eng.reset();
    const auto t0 = Clock::now();
    std::span<const float> logits = eng.forward(stream.subspan(b, head), Logits::kLast);
    if (head == 1) {
      seconds += std::chrono::duration<double>(Clock::now() - t0).count();
      ++calls;
    }
    for (std::size_t t = head;; ++t) {
      score(t - head, logits);
      if (t + 1 == n) break;  // the last token's logits predict nothing in this window
      const auto t1 = Clock::now();
      logits = eng.forward(stream.subspan(b + t, 1), Logits::kLast);
      seconds += std::chrono::duration<double>(Clock::now() - t1).count();
      ++calls;
    }
    // Feed the last token too: a full window's cache holds the whole context.
    const auto t2 = Clock::now();
    eng.forward(stream.subspan(b + n - 1, 1), Logits::kLast);
    seconds += std::chrono::duration<double>(Clock::now() - t2).count();
    ++calls;
  };

  double ref_seconds = 0.0;
  std::int64_t ref_calls = 0;
  for (const auto& [b, e] : windows) {
    const std::size_t n = e - b;
    run_window(
        ref, b, n,
        [&](std::size_t i, std::span<const float> logits) {
          float* row = ref_lp.data() + i * V;
          ref_top[i] = log_softmax(logits.data(), V, row);
          ref_nll -= row[stream[b + head + i]];
          float* prow = ref_p.data() + i * V;
          for (int v = 0; v < V; ++v) prow[v] = std::exp(row[v]);
        },
        ref_seconds, ref_calls);
    predicted += static_cast<std::int64_t>(n - head);
    if (options.progress) options.progress(++done, total_runs);

    for (std::size_t r = 0; r < recipes.size(); ++r) {
      Engine& eng = *engines[r];
      Acc& a = acc[r];
      run_window(
          eng, b, n,
          [&](std::size_t i, std::span<const float> logits) {
            const int top = log_softmax(logits.data(), V, lp.data());
            a.nll -= lp[static_cast<std::size_t>(stream[b + head + i])];
            a.agree += top == ref_top[i];
            const float* rrow = ref_lp.data() + i * V;
            const float* prow = ref_p.data() + i * V;
            double kl = 0.0;
            for (int v = 0; v < V; ++v)
              kl += static_cast<double>(prow[v]) * static_cast<double>(rrow[v] - lp[v]);
            a.kl += kl;
          },
          a.seconds, a.decoded);
      const CacheStats st = eng.cache().stats();
      a.bytes += static_cast<double>(st.total_bytes);
      a.ratio += st.ratio_vs_f32;
      a.ratio_seen += st.ratio_seen;
      a.kept += st.kept;
      a.per_token += bytes_per_token(st);
      a.bits += st.bits_per_value;
      if (options.progress) options.progress(++done, total_runs);
    }
  }

  PerplexityReport rep;
  rep.windows = windows.size();
  rep.prefill = options.prefill;
  rep.tokens = predicted;
  const double count = static_cast<double>(predicted);
  const double nw = static_cast<double>(windows.size());
  rep.ppl_f32 = std::exp(ref_nll / count);
  for (std::size_t r = 0; r < recipes.size(); ++r) {
    const Acc& a = acc[r];
    RecipeMetrics m;
    m.recipe = recipes[r];
    m.ppl = std::exp(a.nll / count);
    m.dppl_rel = m.ppl / rep.ppl_f32 - 1.0;
    m.kld_mean = a.kl / count;
    m.top1_agree = static_cast<double>(a.agree) / count;
    m.kv_bytes = a.bytes / nw;
    m.ratio = a.ratio / nw;
    m.ratio_seen = a.ratio_seen / nw;
    m.kept = a.kept / nw;
    m.bytes_per_token = a.per_token / nw;
    m.bits_per_value = a.bits / nw;
    m.tokens_per_s = a.seconds > 0.0 ? static_cast<double>(a.decoded) / a.seconds : 0.0;
    m.tokens = predicted;
    rep.recipes.push_back(std::move(m));
  }
  return rep;
}

double write_dump(const Model& model, std::string_view text, std::int64_t offset,
                  const std::string& out_dir, const std::string& text_file_name) {
  const ModelConfig& c = model.config;
  KVSLIM_CHECK(offset >= 0 && static_cast<std::size_t>(offset) < text.size(),
               ErrorCode::kInvalidArgument, "offset {} is outside the text of {} bytes", offset,
               text.size());
  const std::vector<int> tokens = token_stream(*model.tokenizer,
                                               text.substr(static_cast<std::size_t>(offset)),
                                               static_cast<std::size_t>(c.seq_len));
  KVSLIM_CHECK(tokens.size() >= 2, ErrorCode::kInvalidArgument,
               "the text from byte {} yields {} tokens; a recording needs at least 2", offset,
               tokens.size());
  const int T = static_cast<int>(tokens.size());

  Engine engine(model, "f32");
  DumpObserver obs(c, T);
  const std::span<const float> logits = engine.forward(tokens, Logits::kAll, &obs);
  std::vector<float> nll(static_cast<std::size_t>(T), std::numeric_limits<float>::quiet_NaN());
  std::vector<float> lp(static_cast<std::size_t>(c.vocab_size));
  double nll_sum = 0.0;
  for (int t = 0; t + 1 < T; ++t) {
    log_softmax(logits.data() + static_cast<std::size_t>(t) * c.vocab_size, c.vocab_size,
                lp.data());
    nll[static_cast<std::size_t>(t)] = -lp[static_cast<std::size_t>(tokens[t + 1])];
    nll_sum += nll[static_cast<std::size_t>(t)];
  }
  const double mean_nll = nll_sum / (T - 1);

  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  KVSLIM_CHECK(!ec && is_directory(out_dir), ErrorCode::kIo, "cannot create directory '{}': {}",
               out_dir, ec.message());
  const std::filesystem::path dir(out_dir);
  auto put = [&](const char* name, const std::vector<float>& v) {
    write_file((dir / name).string(), v.data(), v.size() * sizeof(float));
  };
  put("q.f32", obs.q);
  put("k.f32", obs.k);
  put("k_pre.f32", obs.k_pre);
  put("v.f32", obs.v);
  put("attn_out.f32", obs.attn_out);
  put("nll.f32", nll);

  const int L = c.n_layers, Hq = c.n_heads, Hk = c.n_kv_heads, hd = c.head_dim;
  const std::string qdims = R"(["layer", "q_head", "token", "head_dim"])";
  const std::string kdims = R"(["layer", "kv_head", "token", "head_dim"])";
  std::string ids, pieces;
  for (int t = 0; t < T; ++t) {
    ids += fmt::format("{}{}", t ? ", " : "", tokens[t]);
    pieces += (t ? ", " : "") + json::quote(model.tokenizer->piece(tokens[t]));
  }
  const std::string meta = fmt::format(
      "{{\n"
      "  \"name\": {},\n"
      "  \"generator\": \"kvslim-llama dump (f32 KVCache, one prefill chunk)\",\n"
      "  \"model_file\": {},\n"
      "  \"tokenizer_file\": {},\n"
      "  \"text_file\": {},\n"
      "  \"text_byte_offset\": {},\n"
      "  \"config\": {{\"dim\": {}, \"hidden_dim\": {}, \"n_layers\": {}, \"n_heads\": {}, "
      "\"n_kv_heads\": {}, \"head_dim\": {}, \"vocab_size\": {}, \"seq_len\": {}, \"rope\": "
      "\"{}\", \"rope_theta\": {}, \"rms_eps\": {}, \"attn_scale\": \"1/sqrt(head_dim)\"}},\n"
      "  \"n_tokens\": {},\n"
      "  \"dtype\": \"float32\",\n"
      "  \"byte_order\": \"little\",\n"
      "  \"tensors\": {{\n{},\n{},\n{},\n{},\n{},\n"
      "    \"nll.f32\": {{\"shape\": [{}], \"what\": \"-ln p(token[t+1] | tokens[0..t]); last is "
      "NaN\"}}\n  }},\n"
      "  \"q_head_to_kv_head\": \"kv = q_head / {}\",\n"
      "  \"mean_nll\": {},\n"
      "  \"ppl\": {},\n"
      "  \"token_ids\": [{}],\n"
      "  \"token_pieces\": [{}]\n"
      "}}\n",
      json::quote(fmt::format("{} window at byte {}", model.name, offset)),
      json::quote(std::filesystem::path(model.weights_path).filename().string()),
      json::quote(std::filesystem::path(model.tokenizer_path).filename().string()),
      json::quote(fmt::format("{} (byte offset text_byte_offset; BOS at the window start and in "
                              "place of each <|endoftext|>)",
                              text_file_name)),
      offset, c.dim, c.hidden_dim, L, Hq, Hk, hd, c.vocab_size, c.seq_len,
      rope_style_name(c.rope), c.rope_theta, c.rms_eps, T,
      tensor_meta("q.f32", {L, Hq, T, hd}, qdims, "query after RoPE"),
      tensor_meta("k_pre.f32", {L, Hk, T, hd}, kdims, "key before RoPE"),
      tensor_meta("k.f32", {L, Hk, T, hd}, kdims, "key after RoPE (cached)"),
      tensor_meta("v.f32", {L, Hk, T, hd}, kdims, "value"),
      tensor_meta("attn_out.f32", {L, Hq, T, hd}, qdims,
                  "per-head causal softmax(q.k/sqrt(hd)) @ v, before wo"),
      T, Hq / Hk, mean_nll, std::exp(mean_nll), ids, pieces);
  write_file((dir / "meta.json").string(), meta.data(), meta.size());
  return std::exp(mean_nll);
}

namespace {

constexpr char kSessionMagic[8] = {'K', 'V', 'S', 'L', 'L', 'M', 'S', '1'};

// The model's identity: xxHash64 of its weights file and its tokenizer file.
std::uint64_t model_fingerprint(const Model& model) {
  const std::string w = read_file(model.weights_path, "weights");
  const std::string t = read_file(model.tokenizer_path, "tokenizer");
  return xxhash64(t.data(), t.size(), xxhash64(w.data(), w.size()));
}

struct Session {
  std::uint64_t model = 0;
  std::string model_name, recipe;
  bool pre_rope = false;
  std::vector<int> tokens;   // forwarded: the cache saw exactly these
  std::vector<float> logits;  // of the last of them
  std::string cache;          // KVCache::save's bytes
};

void put_u64(std::string& s, std::uint64_t v) { s.append(reinterpret_cast<const char*>(&v), 8); }
void put_str(std::string& s, std::string_view x) {
  put_u64(s, x.size());
  s.append(x);
}

void write_session(const std::string& path, const Model& model, const std::string& recipe, bool pre_rope,
                   std::span<const int> tokens, std::span<const float> logits, KVCache& cache) {
  std::string s(kSessionMagic, sizeof(kSessionMagic));
  put_u64(s, model_fingerprint(model));
  put_str(s, model.name);
  put_str(s, recipe);
  s.push_back(pre_rope ? 1 : 0);
  put_u64(s, tokens.size());
  s.append(reinterpret_cast<const char*>(tokens.data()), tokens.size_bytes());
  put_u64(s, logits.size());
  s.append(reinterpret_cast<const char*>(logits.data()), logits.size_bytes());
  put_u64(s, xxhash64(s.data(), s.size()));
  std::ostringstream os(std::ios::binary);
  cache.save(os);
  s += os.str();
  write_file(path, s.data(), s.size());
}

Session read_session(const std::string& path, const Model& model) {
  const std::string file = read_file(path, "session");
  ByteReader r(file, path);
  KVSLIM_CHECK(file.size() >= sizeof(kSessionMagic) && file.compare(0, 8, kSessionMagic, 8) == 0, ErrorCode::kFormat,
               "'{}' is not a kvslim-llama session (no magic \"KVSLLMS1\"; written by generate --save-cache)", path);
  r.bytes(8, "magic");
  Session s;
  s.model = r.u64("model fingerprint");
  s.model_name = std::string(r.bytes(r.u64("model name length"), "model name"));
  s.recipe = std::string(r.bytes(r.u64("recipe length"), "recipe"));
  const std::string_view flag = r.bytes(1, "pre_rope");
  KVSLIM_CHECK(flag[0] == 0 || flag[0] == 1, ErrorCode::kFormat, "'{}': pre_rope flag {} is not 0 or 1", path,
               static_cast<int>(flag[0]));
  s.pre_rope = flag[0] == 1;
  const std::uint64_t nt = r.u64("token count");
  KVSLIM_CHECK(nt >= 1 && nt <= r.remaining() / 4, ErrorCode::kFormat, "'{}': {} tokens do not fit in the file", path, nt);
  s.tokens.resize(nt);
  for (auto& t : s.tokens) t = r.i32("token");
  const std::uint64_t nl = r.u64("logit count");
  KVSLIM_CHECK(nl <= r.remaining() / 4, ErrorCode::kFormat, "'{}': {} logits do not fit in the file", path, nl);
  s.logits.resize(nl);
  for (auto& x : s.logits) x = r.f32("logit");
  const std::size_t body = r.offset();
  const std::uint64_t sum = r.u64("checksum");
  KVSLIM_CHECK(sum == xxhash64(file.data(), body), ErrorCode::kFormat,
               "'{}': the session header fails its checksum (the file is corrupted)", path);
  const std::uint64_t here = model_fingerprint(model);
  KVSLIM_CHECK(s.model == here, ErrorCode::kMismatch,
               "'{}' was saved with model '{}' (fingerprint {:016x}), but this is '{}' ({:016x}): different weights or "
               "tokenizer",
               path, s.model_name, s.model, model.name, here);
  KVSLIM_CHECK(nl == static_cast<std::uint64_t>(model.config.vocab_size), ErrorCode::kFormat,
               "'{}' holds {} logits; the model's vocabulary has {} tokens", path, nl, model.config.vocab_size);
  for (int t : s.tokens)
    KVSLIM_CHECK(t >= 0 && t < model.config.vocab_size, ErrorCode::kFormat, "'{}': token id {} is outside the vocabulary",
                 path, t);
  s.cache = file.substr(r.offset());
  return s;
}

}  // namespace

GenerateResult generate(const Model& model, const std::string& recipe, std::string_view prompt,
                        int max_new, const std::function<void(std::string_view)>& on_text, bool pre_rope,
                        const SessionFiles& files) {
  const Tokenizer& tok = *model.tokenizer;
  const int ctx = model.config.seq_len;
  GenerateResult res;
  std::string rec = recipe;
  Session session;
  if (!files.load.empty()) {
    KVSLIM_CHECK(prompt.empty(), ErrorCode::kInvalidArgument,
                 "a resumed session continues its own prompt; no other prompt can be given");
    session = read_session(files.load, model);
    KVSLIM_CHECK(rec.empty() || rec == session.recipe, ErrorCode::kMismatch,
                 "'{}' was saved with the recipe '{}', not '{}'", files.load, session.recipe, rec);
    KVSLIM_CHECK(!pre_rope || session.pre_rope, ErrorCode::kMismatch,
                 "'{}' was saved without pre-RoPE keys; --pre-rope cannot resume it", files.load);
    rec = session.recipe;
    pre_rope = session.pre_rope;
    res.tokens = session.tokens;
  } else {
    res.tokens.push_back(tok.bos_id());
    const std::vector<int> p = tok.encode(prompt);
    res.tokens.insert(res.tokens.end(), p.begin(), p.end());
  }
  KVSLIM_CHECK(static_cast<int>(res.tokens.size()) < ctx, ErrorCode::kInvalidArgument,
               "the prompt has {} tokens with BOS; the model's context is {} tokens",
               res.tokens.size(), ctx);

  Engine engine(model, rec, ctx, pre_rope);
  std::span<const float> logits;
  if (!files.load.empty()) {
    std::istringstream is(session.cache, std::ios::binary);
    engine.cache().load(is);
    engine.resume(static_cast<std::int64_t>(res.tokens.size()));
    logits = session.logits;
  } else {
    logits = engine.forward(res.tokens, Logits::kLast);
  }
  res.text = tok.decode(res.tokens);
  if (on_text && !res.text.empty()) on_text(res.text);

  double secs = 0.0;
  int steps = 0;
  res.stop = StopReason::kTokenLimit;
  for (int i = 0; i < max_new; ++i) {
    const int next = argmax(logits);
    if (next == tok.bos_id() || next == tok.eos_id()) {
      res.stop = StopReason::kEndOfText;
      break;
    }
    const std::string piece = tok.decode(res.tokens.back(), next);
    res.tokens.push_back(next);
    ++res.generated;
    res.text += piece;
    if (on_text && !piece.empty()) on_text(piece);
    if (i + 1 == max_new) break;
    if (engine.position() >= ctx) {
      res.stop = StopReason::kContextFull;
      break;
    }
    const auto t0 = Clock::now();
    logits = engine.forward(std::span<const int>(&res.tokens.back(), 1), Logits::kLast);
    secs += std::chrono::duration<double>(Clock::now() - t0).count();
    ++steps;
  }
  res.tokens_per_s = secs > 0.0 ? steps / secs : 0.0;
  // The session holds the tokens the cache saw and the logits of the last: the token they
  // pick (generated above if max_new allowed, not yet forwarded) is picked again on resume.
  if (!files.save.empty())
    write_session(files.save, model, rec, pre_rope,
                  std::span<const int>(res.tokens.data(), static_cast<std::size_t>(engine.position())), logits,
                  engine.cache());
  const CacheStats st = engine.cache().stats();
  res.kv_bytes = st.total_bytes;
  res.bytes_per_token = bytes_per_token(st);
  res.ratio_vs_f32 = st.ratio_vs_f32;
  return res;
}

}  // namespace kvslim::llama
