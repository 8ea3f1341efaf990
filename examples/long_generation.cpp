// Long generation with a bounded KV cache: the real stories260K model (through the example
// llama engine, examples/llama) generates thousands of tokens greedily while its cache is a
// kvslim::KVCache built from an eviction + quantization recipe, and every N steps prints how
// many tokens were seen and kept and what they cost.
//
//   kvslim-long-generation --model ../shared/models/stories260K [--recipe R] [--tokens 2000]
//                          [--every 100] [--prompt TEXT]
//
// With an evicting recipe (default "h2o:budget=256,recent=32 | kivi:kbits=4,vbits=4,
// residual=32") the tokens kept and the bytes level off while the tokens seen keep growing;
// with a non-evicting one (f16, kivi) both grow linearly.
//
// Positions: stories260K was trained with a 512-token context. This example keeps the
// sequence going past it (positions keep increasing, RoPE is extended; Engine's
// max_positions), so after position 511 the text is outside what the model was trained for
// and its quality is not the point: the cache's memory is. When the model produces EOS or
// BOS, BOS is fed and a new story starts in the same sequence (as in the marked text files).
#include <charconv>
#include <cstdio>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "engine.h"
#include "eval.h"
#include "kvslim/error.h"
#include "model.h"

namespace {

constexpr const char* kDefaultRecipe =
    "h2o:budget=256,recent=32 | kivi:kbits=4,vbits=4,residual=32";

constexpr const char* kUsage = R"(usage: kvslim-long-generation --model PATH [options]
  Greedy generation of many tokens (past the model's context: positions keep increasing, so
  after it the text quality is not meaningful; the point is the cache's memory) with the KV
  cache built from a recipe. On EOS/BOS a BOS is fed and a new story starts in the same
  sequence. Every N steps prints one row: step, tokens seen and tokens kept per (layer, kv
  head), cache bytes (stats().total_bytes), bytes per seen token (all layers and kv heads of
  one token), and vs f32 (seen) = stats().ratio_seen, how many times smaller the cache is
  than an f32 cache of every token seen.
  --recipe R    kvslim recipe (default "h2o:budget=256,recent=32 | kivi:kbits=4,vbits=4,residual=32")
  --tokens N    tokens to generate, N >= 1 (default 2000)
  --every N     print a row every N steps, N >= 1 (default 100)
  --prompt TEXT prompt after BOS (default "Once upon a time")
  --text        also print the generated text (stderr)
  Exit status: 0 success, 1 error (model, recipe), 2 bad command line.
)";

struct UsageError {
  std::string message;
};

std::int64_t parse_int(std::string_view opt, std::string_view v, std::int64_t lo) {
  std::int64_t x = 0;
  const auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec != std::errc() || p != v.data() + v.size() || x < lo)
    throw UsageError{fmt::format("{} expects an integer >= {}, got '{}'", opt, lo, v)};
  return x;
}

int argmax(std::span<const float> x) {
  int best = 0;
  for (std::size_t i = 1; i < x.size(); ++i)
    if (x[i] > x[static_cast<std::size_t>(best)]) best = static_cast<int>(i);
  return best;
}

struct Row {
  std::int64_t seen = 0, kept = 0, bytes = 0;
  double bytes_per_seen = 0.0, ratio_seen = 0.0;
};

Row row_of(const kvslim::CacheStats& st) {
  const std::int64_t heads = static_cast<std::int64_t>(st.layers) * st.kv_heads;
  Row r;
  r.seen = heads > 0 ? st.total_seen / heads : 0;
  r.kept = heads > 0 ? st.total_tokens / heads : 0;
  r.bytes = st.total_bytes;
  r.bytes_per_seen = r.seen > 0 ? static_cast<double>(st.total_bytes) / static_cast<double>(r.seen)
                                : 0.0;
  r.ratio_seen = st.ratio_seen;
  return r;
}

int run(int argc, char** argv) {
  std::string model_path, recipe = kDefaultRecipe, prompt = "Once upon a time";
  std::int64_t tokens = 2000, every = 100;
  bool show_text = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view opt = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError{fmt::format("{} needs a value", opt)};
      return argv[++i];
    };
    if (opt == "--help" || opt == "-h") {
      fmt::print("{}", kUsage);
      return 0;
    } else if (opt == "--model") {
      model_path = value();
    } else if (opt == "--recipe") {
      recipe = value();
    } else if (opt == "--tokens") {
      tokens = parse_int(opt, value(), 1);
    } else if (opt == "--every") {
      every = parse_int(opt, value(), 1);
    } else if (opt == "--prompt") {
      prompt = value();
    } else if (opt == "--text") {
      show_text = true;
    } else {
      throw UsageError{fmt::format("unknown option '{}'", opt)};
    }
  }
  if (model_path.empty()) throw UsageError{"--model PATH is required"};

  using namespace kvslim::llama;
  const Model model = load_model(model_path);
  const ModelConfig& c = model.config;
  const Tokenizer& tok = *model.tokenizer;
  std::vector<int> ids{tok.bos_id()};
  const std::vector<int> p = tok.encode(prompt);
  ids.insert(ids.end(), p.begin(), p.end());
  const std::int64_t positions = static_cast<std::int64_t>(ids.size()) + tokens;
  Engine engine(model, recipe, positions);

  fmt::print("model {} (context {} tokens), recipe {}\n", model.name, c.seq_len, recipe);
  fmt::print("prompt {} tokens, generating {} tokens greedily; positions past {} are beyond the "
             "model's context\n",
             ids.size(), tokens, c.seq_len - 1);
  fmt::print("raw f32 per token: {} B (all {} layers x {} kv heads)\n",
             c.n_layers * c.n_kv_heads * c.head_dim * 2 * 4, c.n_layers, c.n_kv_heads);
  fmt::print("{:>7} {:>8} {:>8} {:>10} {:>8} {:>9}\n", "step", "seen", "kept", "bytes",
             "B/seen", "vs f32");
  auto print_row = [](std::int64_t step, const Row& r) {
    fmt::print("{:>7} {:>8} {:>8} {:>10} {:>8.1f} {:>8.2f}x\n", step, r.seen, r.kept, r.bytes,
               r.bytes_per_seen, r.ratio_seen);
    std::fflush(stdout);
  };

  std::span<const float> logits = engine.forward(ids, Logits::kLast);
  int prev = ids.back();
  std::int64_t stories = 1, max_kept = 0, max_bytes = 0;
  for (std::int64_t step = 1; step <= tokens; ++step) {
    int next = argmax(logits);
    if (next == tok.eos_id() || next == tok.bos_id()) {
      next = tok.bos_id();  // a new story in the same sequence
      ++stories;
    }
    if (show_text) {
      const std::string piece = next == tok.bos_id() ? "\n\n" : tok.decode(prev, next);
      std::fwrite(piece.data(), 1, piece.size(), stderr);
    }
    logits = engine.forward(std::span<const int>(&next, 1), Logits::kLast);
    prev = next;
    const Row r = row_of(engine.cache().stats());
    max_kept = std::max(max_kept, r.kept);
    max_bytes = std::max(max_bytes, r.bytes);
    if (step % every == 0 || step == tokens) print_row(step, r);
  }
  if (show_text) std::fputc('\n', stderr);
  const Row last = row_of(engine.cache().stats());
  fmt::print("done: {} tokens seen, {} kept at the end (at most {}), {} bytes at the end (at "
             "most {}), {} stories\n",
             last.seen, last.kept, max_kept, last.bytes, max_bytes, stories);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    fmt::print(stderr, "kvslim-long-generation: {}\n\n{}", e.message, kUsage);
    return 2;
  } catch (const kvslim::Error& e) {
    fmt::print(stderr, "kvslim-long-generation: error ({}): {}\n",
               kvslim::error_code_name(e.code()), e.what());
    return 1;
  }
}
