// kvslim-llama: a small llama-family inference engine whose KV cache is a kvslim::KVCache.
// Subcommands: generate (greedy text), ppl (perplexity, KLD, top-1 agreement and memory per
// recipe against the f32 cache), dump (a recording in the data/dumps format), calibrate
// (RazorAttention retrieval heads: a per-head recipe file and a JSON report),
// calibrate-codebooks (CQ codebooks from the model's post-RoPE keys and values), sweep (the
// equal-memory frontier: candidate recipes probed for memory, the ones near the targets
// evaluated, the best per target and the Pareto frontier).
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include "calibrate.h"
#include "calibrate_codebooks.h"
#include "eval.h"
#include "file_io.h"
#include "kvslim/cache/recipe.h"
#include "kvslim/error.h"
#include "util/json.h"
#include "model.h"
#include "sweep.h"

namespace {

using namespace kvslim::llama;

constexpr const char* kUsage = R"(usage: kvslim-llama <command> [options]

commands:
  generate --model PATH [--prompt TEXT] [--tokens N] [--recipe R] [--pre-rope]
      [--save-cache FILE] [--load-cache FILE]
      Greedy generation from BOS + prompt (default: empty prompt, 256 tokens, recipe f32).
      Prints the text on stdout; then on stderr the tokens generated, why generation stopped
      (EOS token, token limit or full context), the decode speed, the KV cache's bytes,
      bytes per token and compression ratio vs f32.
      --save-cache FILE writes the session when generation ends (with --tokens 0: right
      after the prefill): the model's fingerprint, the recipe, the tokens and last logits,
      and the compressed KV cache (docs/formats.md). --load-cache FILE resumes one instead
      of a prompt (no --prompt; the recipe is the session's, a --recipe must match it): it
      prints the same text the saving run's prompt with more --tokens would have printed.

  ppl --model PATH --text FILE --recipe R [--recipe R2 ...] [--windows N] [--prefill N]
      [--pre-rope] [--json] [--no-progress]
      Splits FILE at <|endoftext|> (BOS + encoding per stripped, non-empty piece), cuts the
      token stream into consecutive windows of the model's context length and decodes each
      window token by token from an empty cache, once with an f32 reference cache and once per
      recipe. Per recipe: perplexity over all predicted tokens; dPPL = ppl/ppl_f32 - 1;
      KLD = mean KL(p_f32 || p_recipe) of the next-token distributions (nats); top-1
      agreement with the f32 run; KV bytes = cache.stats().total_bytes at the end of each
      window, averaged over windows (a full window holds the whole context); B/token = KV
      bytes / tokens kept (all layers and kv heads of one token); bits/val =
      stats().bits_per_value (metadata included); vs f32 = stats().ratio_vs_f32 (f32 cache
      bytes / this cache's bytes, same tokens) and vs f16 = half of it; vs seen =
      stats().ratio_seen (bytes of an f32 cache of every token seen / this cache's bytes:
      eviction counts as saving); kept = stats().kept (tokens kept / tokens seen, 1 without
      eviction); all at the same points, averaged; tok/s = decode forward passes (one token
      each) per second of forward() time.
      --windows N evaluates the first N windows (default all).
      --prefill N (1 <= N < context length): prompt-then-decode protocol. Each window's first
      N tokens go through the cache as one prefill chunk (one append + attend per layer),
      the rest are decoded token by token; the f32 reference uses the same protocol. ppl,
      dPPL, KLD and top-1 are then measured on the tokens after the prefill only (tokens
      N .. end of each window; windows of N tokens or fewer are skipped), and tok/s counts
      the decode steps only. Default: token by token from the first token (= --prefill 1).
      --pre-rope: the recipes' caches take the keys before RoPE and apply the model's RoPE
      in attention (CacheConfig::pre_rope_keys, KVQuant); the f32 reference does not.
      Also for generate and sweep.
      --json prints one JSON object per recipe per line with keys recipe, ppl, dppl_rel,
      kld_mean, top1_agree, kv_bytes, ratio (vs f32), tokens_per_s, bytes_per_token,
      bits_per_value, ratio_vs_f16, ratio_seen (vs f32 of every token seen), kept (tokens
      kept / tokens seen). A progress bar goes to stderr when it is a terminal
      (--no-progress: never).

  dump --model PATH --text FILE --offset BYTES --out DIR
      Records the window of up to the context length of tokens starting at byte BYTES of
      FILE (same token stream rule) in the format of data/dumps: q.f32, k.f32, k_pre.f32,
      v.f32, attn_out.f32 (computed by an f32 KVCache), nll.f32 and meta.json.

  calibrate --model PATH --out FILE [--length N] [--repeats R] [--seed S] [--retrieval P]
      [--keep CHAIN] [--compress CHAIN]
      RazorAttention's retrieval-head calibration. Feeds BOS + a random sequence of N / R
      distinct tokens repeated R times (default R 4, N the largest multiple of R that fits the
      context, seed 1) through an f32 cache, scores every (layer, query head): echo = mean
      attention a query gives to the earlier occurrences of its own token, induction = to the
      tokens that followed them; a kv head takes the maximum over its query heads. Keeps the
      top P (default 0.15, in (0, 1)) of kv heads by echo + induction in CHAIN --keep (default
      f32) and gives every other head --compress (default razor:sinks=4,window=max(16,
      context/8)). Writes the recipe to FILE ('#' comments name each head's scores; use it as
      --recipe @FILE) and a JSON report to FILE.json (arguments, both scores per kv head and
      per query head, the chosen heads, the recipe). Prints the score table.

  calibrate-codebooks --model PATH --text FILE --out OUT --recipe "cq:..." [--tokens N]
      [--skip-bytes B] [--seed S] [--iterations N] [--weight mass|none]
      Trains the CQ codebooks of the recipe's cq stages (their channels/bits) on the model's
      own post-RoPE keys and values (docs/cq.md) and writes the codebook file OUT; use it as
      --recipe "cq:...,codebooks=OUT". The token stream of FILE from byte B on (default: the
      first <|endoftext|> at or after the middle of FILE, so that ppl, which reads FILE from
      byte 0, is disjoint from it while its windows stay in the first half) is cut into
      windows of the context length, each run from position 0 through an f32 cache, so every
      position is seen; N tokens in all (default 16 windows). Rows are weighted by the
      attention mass the token received (mass, default; summed over the GQA group) or not
      (none). k-means++ seed S (default 1), at most N Lloyd iterations (default 25).

  sweep --model PATH --text FILE --target T[,T2...] [--family F ...] [--windows N]
      [--prefill N] [--json] [--plot FILE.svg] [--no-progress]
      The equal-memory frontier (docs/sweep.md). A target is a memory goal: 8 or 8x = 8 times
      smaller than an f32 cache of every token seen (ratio_seen, "vs seen" of ppl); 300B =
      300 bytes per token seen, all layers and kv heads (ratio = f32 bytes per token / 300).
      Ratios must be above 1, byte counts positive. Candidates come from families: the
      codecs f16 and kivi (K and V bits each in {2,3,4,8}, residual 0 and 32), alone and
      after each h2o budget (1/2, 1/4, 1/8, 1/16 of the context); --family F (repeatable)
      keeps only the named families, at least one codec family among them. A probe feeds
      each candidate a context of seeded random keys and values through a cache of the
      model's shape (same protocol) and reads ratio_seen; only candidates whose probe lies
      in [smallest target / 1.3, largest target * 1.5] are evaluated (one whose probe computed
      exactly what an earlier one's did is skipped), in one ppl run (same --windows, default
      all, and --prefill). Prints every evaluated recipe sorted by
      ratio_seen with KLD, top-1, ppl, bytes per seen token, the probe and a mark for the
      Pareto frontier (no other recipe has a ratio_seen >= and a KLD <=, one strictly);
      then per target the recipe with the lowest KLD whose measured ratio_seen meets it,
      or "none meets it". --json prints one line per evaluated recipe with the keys of
      ppl --json plus target (the largest target it meets, as a ratio, or null) and pareto
      (true/false). --plot FILE.svg writes KLD against ratio_seen (both log scale): every
      recipe, the frontier, a line per target and the best recipe per target.

--recipe @FILE (ppl, generate) reads the recipe from FILE; '#' comments and line breaks are
allowed. The label printed is @FILE.

PATH is a llama2.c checkpoint (.bin, with tok*.bin beside it), a directory holding one, or a
Hugging Face directory with config.json, model.safetensors and tokenizer.json.
Recipes: f32, f16, bf16, kivi:kbits=K,vbits=V[,group=G,residual=R], ... (see docs/recipes.md).
)";

/// Thrown for command-line mistakes (exit code 2, usage hint).
struct UsageError {
  std::string message;
};

/// One --target value as typed: a ratio (8, 8x) or bytes per token seen (300B).
struct TargetArg {
  std::string text;
  double value = 0.0;
  bool bytes = false;
};

struct Args {
  std::string command;
  std::string model, prompt, text, out, plot;
  std::vector<std::string> recipes, families;
  std::vector<TargetArg> targets;
  std::int64_t tokens = 256, windows = 0, offset = -1, prefill = 0;
  bool json = false, progress = true;
  bool pre_rope = false;  // --pre-rope: the caches take keys before RoPE
  bool prompt_given = false;
  kvslim::llama::SessionFiles session;  // generate --save-cache / --load-cache
  kvslim::llama::CalibrateOptions calibrate;
  kvslim::llama::CodebookCalibrationOptions codebooks;
};

std::int64_t parse_int(std::string_view opt, std::string_view v, std::int64_t lo,
                       std::int64_t hi = INT64_MAX) {
  std::int64_t x = 0;
  const auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec != std::errc() || p != v.data() + v.size() || x < lo || x > hi)
    throw UsageError{hi == INT64_MAX
                         ? fmt::format("{} expects an integer >= {}, got '{}'", opt, lo, v)
                         : fmt::format("{} expects an integer in [{}, {}], got '{}'", opt, lo, hi, v)};
  return x;
}

double parse_double(std::string_view opt, std::string_view v) {
  double x = 0.0;
  const auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec != std::errc() || p != v.data() + v.size() || !std::isfinite(x))
    throw UsageError{fmt::format("{} expects a number, got '{}'", opt, v)};
  return x;
}

/// --target's comma-separated list; a bad item is a usage error naming it.
std::vector<TargetArg> parse_targets(std::string_view v) {
  std::vector<TargetArg> out;
  for (std::size_t pos = 0;;) {
    const std::size_t comma = v.find(',', pos);
    const std::string_view item = v.substr(pos, comma == std::string_view::npos ? comma : comma - pos);
    TargetArg t{std::string(item)};
    std::string_view number = item;
    if (!number.empty() && (number.back() == 'x' || number.back() == 'B')) {
      t.bytes = number.back() == 'B';
      number.remove_suffix(1);
    }
    const auto [p, ec] = std::from_chars(number.data(), number.data() + number.size(), t.value);
    if (ec != std::errc() || p != number.data() + number.size() || !std::isfinite(t.value) ||
        !(t.bytes ? t.value > 0.0 : t.value > 1.0))
      throw UsageError{fmt::format(
          "--target expects comma-separated ratios above 1 (8 or 8x) or positive bytes per token "
          "seen (300B), got '{}'",
          item)};
    out.push_back(std::move(t));
    if (comma == std::string_view::npos) return out;
    pos = comma + 1;
  }
}

Args parse_args(int argc, char** argv) {
  Args a;
  if (argc < 2) throw UsageError{"missing command"};
  a.command = argv[1];
  if (a.command == "--help" || a.command == "-h" || a.command == "help") {
    a.command = "help";
    return a;
  }
  if (a.command != "generate" && a.command != "ppl" && a.command != "dump" &&
      a.command != "calibrate" && a.command != "sweep" && a.command != "calibrate-codebooks")
    throw UsageError{fmt::format("unknown command '{}'", a.command)};
  const bool evaluates = a.command == "ppl" || a.command == "sweep";
  for (int i = 2; i < argc; ++i) {
    const std::string_view opt = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError{fmt::format("{} needs a value", opt)};
      return argv[++i];
    };
    if (opt == "--help" || opt == "-h") {
      a.command = "help";
      return a;
    } else if (opt == "--model") {
      a.model = value();
    } else if (opt == "--prompt" && a.command == "generate") {
      a.prompt = value();
      a.prompt_given = true;
    } else if (opt == "--save-cache" && a.command == "generate") {
      a.session.save = value();
    } else if (opt == "--load-cache" && a.command == "generate") {
      a.session.load = value();
    } else if (opt == "--tokens" && a.command == "calibrate-codebooks") {
      a.codebooks.tokens = parse_int(opt, value(), 2);
    } else if (opt == "--skip-bytes" && a.command == "calibrate-codebooks") {
      a.codebooks.skip_bytes = parse_int(opt, value(), 0);
    } else if (opt == "--seed" && a.command == "calibrate-codebooks") {
      a.codebooks.train.seed = static_cast<std::uint64_t>(parse_int(opt, value(), 0));
    } else if (opt == "--iterations" && a.command == "calibrate-codebooks") {
      a.codebooks.train.iterations = static_cast<int>(parse_int(opt, value(), 0, 1 << 20));
    } else if (opt == "--weight" && a.command == "calibrate-codebooks") {
      const std::string w = value();
      if (w != "mass" && w != "none") throw UsageError{fmt::format("--weight expects mass or none, got '{}'", w)};
      a.codebooks.mass = w == "mass";
    } else if (opt == "--tokens" && a.command == "generate") {
      a.tokens = parse_int(opt, value(), 0);
    } else if (opt == "--recipe" && (a.command == "generate" || a.command == "ppl" ||
                                     a.command == "calibrate-codebooks")) {
      a.recipes.push_back(value());
    } else if (opt == "--text" && a.command != "generate") {
      a.text = value();
    } else if (opt == "--windows" && evaluates) {
      a.windows = parse_int(opt, value(), 1);
    } else if (opt == "--prefill" && evaluates) {
      a.prefill = parse_int(opt, value(), 1);  // the upper bound needs the model: perplexity_options
    } else if (opt == "--pre-rope" && (evaluates || a.command == "generate")) {
      a.pre_rope = true;
    } else if (opt == "--json" && evaluates) {
      a.json = true;
    } else if (opt == "--no-progress" && evaluates) {
      a.progress = false;
    } else if (opt == "--target" && a.command == "sweep") {
      for (TargetArg& t : parse_targets(value())) a.targets.push_back(std::move(t));
    } else if (opt == "--family" && a.command == "sweep") {
      a.families.push_back(value());
      if (!find_sweep_family(a.families.back()))
        throw UsageError{fmt::format("--family expects one of {}, got '{}'", sweep_family_names(),
                                     a.families.back())};
    } else if (opt == "--plot" && a.command == "sweep") {
      a.plot = value();
    } else if (opt == "--offset" && a.command == "dump") {
      a.offset = parse_int(opt, value(), 0);
    } else if (opt == "--out" && (a.command == "dump" || a.command == "calibrate" ||
                                  a.command == "calibrate-codebooks")) {
      a.out = value();
    } else if (opt == "--length" && a.command == "calibrate") {
      a.calibrate.length = static_cast<int>(parse_int(opt, value(), 1, 1 << 20));
    } else if (opt == "--repeats" && a.command == "calibrate") {
      a.calibrate.repeats = static_cast<int>(parse_int(opt, value(), 2, 1 << 20));
    } else if (opt == "--seed" && a.command == "calibrate") {
      a.calibrate.seed = static_cast<std::uint64_t>(parse_int(opt, value(), 0));
    } else if (opt == "--retrieval" && a.command == "calibrate") {
      a.calibrate.retrieval = parse_double(opt, value());
      if (!(a.calibrate.retrieval > 0.0 && a.calibrate.retrieval < 1.0))
        throw UsageError{fmt::format("--retrieval expects a fraction in (0, 1), got '{}'", argv[i])};
    } else if (opt == "--keep" && a.command == "calibrate") {
      a.calibrate.keep = value();
    } else if (opt == "--compress" && a.command == "calibrate") {
      a.calibrate.compress = value();
    } else {
      throw UsageError{fmt::format("unknown option '{}' for '{}'", opt, a.command)};
    }
  }
  if (a.model.empty()) throw UsageError{"--model is required"};
  if (a.command == "ppl") {
    if (a.text.empty()) throw UsageError{"ppl needs --text FILE"};
    if (a.recipes.empty()) throw UsageError{"ppl needs at least one --recipe"};
  }
  if (a.command == "sweep") {
    if (a.text.empty()) throw UsageError{"sweep needs --text FILE"};
    if (a.targets.empty()) throw UsageError{"sweep needs --target (e.g. --target 8,12,16)"};
    if (!a.families.empty() &&
        std::none_of(a.families.begin(), a.families.end(), [](const std::string& f) {
          return find_sweep_family(f)->kind == SweepFamily::Kind::kCodec;
        }))
      throw UsageError{"--family selects no codec family; add --family f16 or --family kivi"};
  }
  if (a.command == "dump") {
    if (a.text.empty() || a.out.empty() || a.offset < 0)
      throw UsageError{"dump needs --text FILE, --offset BYTES and --out DIR"};
  }
  if (a.command == "calibrate" && a.out.empty()) throw UsageError{"calibrate needs --out FILE"};
  if (a.command == "calibrate-codebooks") {
    if (a.text.empty() || a.out.empty() || a.recipes.size() != 1)
      throw UsageError{"calibrate-codebooks needs --text FILE, --out OUT and one --recipe \"cq:...\""};
  }
  if (a.command == "generate" && a.recipes.size() > 1)
    throw UsageError{"generate takes one --recipe"};
  if (!a.session.load.empty() && a.prompt_given)
    throw UsageError{"--load-cache resumes the prompt saved in the session; it takes no --prompt"};
  return a;
}

/// JSON number, or null for NaN/Inf (which JSON cannot represent).
std::string num(double x) { return std::isfinite(x) ? fmt::format("{}", x) : "null"; }

/// One warning on stderr if the tokenizer turned characters of `what` into <unk> (or
/// dropped them) since `before`.
void warn_unknown(const Model& model, const Tokenizer::UnknownCount& before,
                  std::string_view what) {
  const Tokenizer::UnknownCount now = model.tokenizer->unknown();
  const std::int64_t chars = now.chars - before.chars, bytes = now.bytes - before.bytes;
  if (chars == 0) return;
  fmt::print(stderr,
             "kvslim-llama: warning: {} character{} ({} bytes) of {} {} not in the vocabulary "
             "of {}, which has no byte tokens; {}\n",
             chars, chars == 1 ? "" : "s", bytes, what, chars == 1 ? "is" : "are", model.name,
             model.tokenizer->unknown_dropped() ? "they were dropped" : "they became <unk>");
}

int run_generate(const Args& a) {
  const Model model = load_model(a.model);
  // A resumed session brings its recipe (a --recipe given too must be the same).
  const bool resume = !a.session.load.empty();
  const std::string label = a.recipes.empty() ? (resume ? "of the session" : "f32") : a.recipes[0];
  const std::string recipe = a.recipes.empty() && resume ? std::string() : kvslim::resolve_recipe(label);
  const Tokenizer::UnknownCount before = model.tokenizer->unknown();
  bool warned = false;
  const GenerateResult r =
      generate(model, recipe, a.prompt, static_cast<int>(a.tokens), [&](std::string_view s) {
        if (!warned) {  // the prompt is encoded before the first piece arrives
          warned = true;
          warn_unknown(model, before, "the prompt");
        }
        std::fwrite(s.data(), 1, s.size(), stdout);
        std::fflush(stdout);
      }, a.pre_rope, a.session);
  if (!warned) warn_unknown(model, before, "the prompt");
  std::fputc('\n', stdout);
  std::fflush(stdout);
  const ModelConfig& c = model.config;
  const std::int64_t kept =
      r.bytes_per_token > 0.0
          ? std::llround(static_cast<double>(r.kv_bytes) / r.bytes_per_token)
          : 0;
  fmt::print(stderr,
             "[{} tokens generated, stopped by {}, {:.1f} tokens/s decode, recipe {}]\n"
             "[KV cache: {} bytes for {} tokens = {:.0f} bytes per token (raw f32: {}), "
             "{:.2f}x vs f32]\n",
             r.generated, stop_reason_name(r.stop), r.tokens_per_s, label, r.kv_bytes, kept,
             r.bytes_per_token, f32_bytes_per_token(c), r.ratio_vs_f32);
  return 0;
}

/// The token stream of --text FILE, with one warning for characters outside the vocabulary.
std::vector<int> load_stream(const Model& model, const std::string& path) {
  const std::string text = read_text(path);
  const Tokenizer::UnknownCount before = model.tokenizer->unknown();
  std::vector<int> stream = token_stream(*model.tokenizer, text);
  warn_unknown(model, before, fmt::format("'{}'", path));
  return stream;
}

/// What ppl and sweep pass to evaluate_perplexity: --windows, --prefill (checked against the
/// model's context) and the progress bar.
PerplexityOptions perplexity_options(const Args& a, const Model& model) {
  if (a.prefill >= model.config.seq_len)
    throw UsageError{fmt::format(
        "--prefill expects an integer >= 1 and smaller than the window length ({} tokens, the "
        "context of {}), got '{}'",
        model.config.seq_len, model.name, a.prefill)};
  PerplexityOptions opt;
  opt.max_windows = static_cast<std::size_t>(a.windows);
  opt.prefill = static_cast<std::size_t>(a.prefill);
  opt.pre_rope = a.pre_rope;
  // The bar redraws itself with \r, which only makes sense on a terminal; a log gets nothing.
  if (a.progress && isatty(2)) {
    opt.progress = [](std::size_t done, std::size_t total) {
      constexpr int kWidth = 40;
      const int filled = static_cast<int>(kWidth * done / total);
      fmt::print(stderr, "\r[{}{}] {}/{} window runs", std::string(filled, '#'),
                 std::string(kWidth - filled, '.'), done, total);
      if (done == total) fmt::print(stderr, "\n");
      std::fflush(stderr);
    };
  }
  return opt;
}

/// One line of ppl --json: the object of `m`'s keys, then `extra` (", \"key\": value" pairs
/// that sweep adds) before the closing brace.
std::string metrics_json(const RecipeMetrics& m, std::string_view extra = {}) {
  return fmt::format(
      "{{\"recipe\": {}, \"ppl\": {}, \"dppl_rel\": {}, \"kld_mean\": {}, \"top1_agree\": {}, "
      "\"kv_bytes\": {}, \"ratio\": {}, \"tokens_per_s\": {}, \"bytes_per_token\": {}, "
      "\"bits_per_value\": {}, \"ratio_vs_f16\": {}, \"ratio_seen\": {}, \"kept\": {}{}}}\n",
      kvslim::json::quote(m.recipe), num(m.ppl), num(m.dppl_rel), num(m.kld_mean),
      num(m.top1_agree), num(m.kv_bytes), num(m.ratio), num(m.tokens_per_s),
      num(m.bytes_per_token), num(m.bits_per_value), num(m.ratio / 2.0), num(m.ratio_seen),
      num(m.kept), extra);
}

/// The first lines of the ppl and sweep tables: model, windows, protocol, f32 perplexity.
void print_run_header(const Model& model, const PerplexityReport& rep) {
  fmt::print("model {} ({}), {} windows of up to {} tokens, {} predicted tokens per recipe\n",
             model.name, model.kind, rep.windows, model.config.seq_len, rep.tokens);
  if (rep.prefill > 0)
    fmt::print("protocol: prefill {} tokens in one chunk, then decode token by token; scored: "
               "the tokens after the prefill\n",
               rep.prefill);
  else
    fmt::print("protocol: token by token from the first token\n");
  fmt::print("f32 reference perplexity {:.4f}\n", rep.ppl_f32);
}

int run_ppl(const Args& a) {
  const Model model = load_model(a.model);
  const std::vector<int> stream = load_stream(model, a.text);
  const PerplexityOptions opt = perplexity_options(a, model);
  // Recipes from files run as their text and are labelled as given (@FILE).
  std::vector<std::string> texts;
  for (const std::string& r : a.recipes) texts.push_back(kvslim::resolve_recipe(r));
  PerplexityReport rep = evaluate_perplexity(model, stream, texts, opt);
  for (std::size_t i = 0; i < rep.recipes.size(); ++i) rep.recipes[i].recipe = a.recipes[i];
  if (a.json) {
    for (const RecipeMetrics& m : rep.recipes) fmt::print("{}", metrics_json(m));
    return 0;
  }
  print_run_header(model, rep);
  std::size_t w = 6;
  for (const RecipeMetrics& m : rep.recipes) w = std::max(w, m.recipe.size());
  fmt::print(
      "{:<{}}  {:>9}  {:>9}  {:>9}  {:>7}  {:>9}  {:>8}  {:>7}  {:>7}  {:>7}  {:>7}  {:>7}\n",
      "recipe", w, "ppl", "dPPL", "KLD", "top1", "B/token", "bits/val", "vs f32", "vs f16",
      "vs seen", "kept", "tok/s");
  for (const RecipeMetrics& m : rep.recipes)
    fmt::print(
        "{:<{}}  {:>9.4f}  {:>+8.3f}%  {:>9.2e}  {:>6.2f}%  {:>9.1f}  {:>8.2f}  {:>6.2f}x  "
        "{:>6.2f}x  {:>6.2f}x  {:>6.1f}%  {:>7.0f}\n",
        m.recipe, w, m.ppl, 100.0 * m.dppl_rel, m.kld_mean, 100.0 * m.top1_agree,
        m.bytes_per_token, m.bits_per_value, m.ratio, m.ratio / 2.0, m.ratio_seen,
        100.0 * m.kept, m.tokens_per_s);
  const ModelConfig& c = model.config;
  const std::int64_t f32_per_token = f32_bytes_per_token(c);
  fmt::print(
      "B/token: KV bytes / tokens kept, all {} layers x {} kv heads (raw f32: {} B, f16: {} B).\n"
      "bits/val: bits per stored K or V value, metadata included. vs f32, vs f16: times smaller\n"
      "  than an f32 / f16 cache holding the same tokens (above 1x = memory saved).\n"
      "vs seen: times smaller than an f32 cache of every token seen (evicted ones included:\n"
      "  eviction counts as saving). kept: tokens kept / tokens seen (100% without eviction).\n"
      "f32 is slightly below 1.00x: every allocated byte is counted (the page index, positions,\n"
      "  the f32 window of tokens not yet sealed into a page; eviction adds scores and masks).\n",
      c.n_layers, c.n_kv_heads, f32_per_token, f32_per_token / 2);
  if (c.head_dim < 64)
    fmt::print(
        "At head_dim {} KIVI's per-token value scale+zero costs {} bits per V value and its\n"
        "  residual window (default 128 tokens) stays f32, so kivi 8/8 can be larger than f16;\n"
        "  residual=0 shows the quantized pages alone.\n",
        c.head_dim, 32 / std::max(1, std::min(c.head_dim, 32)));
  else
    fmt::print("KIVI's residual window (default 128 tokens) stays f32.\n");
  return 0;
}

int run_sweep(const Args& a) {
  const Model model = load_model(a.model);
  const std::vector<int> stream = load_stream(model, a.text);
  const PerplexityOptions opt = perplexity_options(a, model);
  const ModelConfig& c = model.config;
  const double f32_token = static_cast<double>(f32_bytes_per_token(c));
  std::vector<SweepTarget> targets;
  for (const TargetArg& t : a.targets)
    targets.push_back({t.text, t.bytes ? f32_token / t.value : t.value});
  const auto [lo_t, hi_t] = std::minmax_element(
      targets.begin(), targets.end(),
      [](const SweepTarget& x, const SweepTarget& y) { return x.ratio < y.ratio; });
  const double lo = lo_t->ratio / kSweepProbeBelow, hi = hi_t->ratio * kSweepProbeAbove;

  // Probe every candidate's memory, keep the ones near the targets.
  const std::vector<std::string> candidates = sweep_candidates(c, a.families);
  const MemoryProbe probe(c, opt.prefill);
  std::vector<std::string> selected;
  std::vector<double> probed;
  std::vector<std::uint64_t> seen;  // fingerprints: a recipe equal to an earlier one is skipped
  std::size_t same = 0;
  double probe_min = std::numeric_limits<double>::infinity(), probe_max = 0.0;
  for (const std::string& r : candidates) {
    const ProbeResult p = probe.run(r);
    probe_min = std::min(probe_min, p.ratio_seen);
    probe_max = std::max(probe_max, p.ratio_seen);
    if (p.ratio_seen < lo || p.ratio_seen > hi) continue;
    if (std::find(seen.begin(), seen.end(), p.fingerprint) != seen.end()) {
      ++same;
      continue;
    }
    seen.push_back(p.fingerprint);
    selected.push_back(r);
    probed.push_back(p.ratio_seen);
  }
  if (selected.empty())
    throw kvslim::Error(kvslim::ErrorCode::kInvalidArgument,
                        fmt::format("none of the {} candidates has a probed ratio_seen in "
                                    "[{:.2f}x, {:.2f}x] (they range from {:.2f}x to {:.2f}x)",
                                    candidates.size(), lo, hi, probe_min, probe_max));

  const PerplexityReport rep = evaluate_perplexity(model, stream, selected, opt);
  const std::vector<RecipeMetrics>& m = rep.recipes;
  const std::vector<bool> pareto = pareto_front(m);
  std::vector<std::size_t> order(m.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) {
    return m[x].ratio_seen < m[y].ratio_seen;
  });
  if (!a.plot.empty()) {
    const std::string svg = frontier_svg(
        m, pareto, targets,
        fmt::format("{}: KLD against memory, {} windows, {} recipes", model.name, rep.windows, m.size()));
    write_file(a.plot, svg.data(), svg.size());
  }
  if (a.json) {
    for (std::size_t i : order) {
      const SweepTarget* met = nullptr;  // the largest target this recipe meets
      for (const SweepTarget& t : targets)
        if (m[i].ratio_seen >= t.ratio && (!met || t.ratio > met->ratio)) met = &t;
      fmt::print("{}", metrics_json(m[i], fmt::format(", \"target\": {}, \"pareto\": {}",
                                                      met ? num(met->ratio) : "null",
                                                      pareto[i] ? "true" : "false")));
    }
    return 0;
  }

  print_run_header(model, rep);
  std::string names;
  for (const SweepTarget& t : targets)
    names += fmt::format("{}{} ({:.2f}x)", names.empty() ? "" : ", ", t.text, t.ratio);
  fmt::print("targets: {}; an f32 cache takes {} B per token\n", names, f32_bytes_per_token(c));
  fmt::print("{} candidates ({}), probed on {} random tokens; {} with a probe in [{:.2f}x, {:.2f}x] "
             "evaluated ({} more in range skipped: same cache as an earlier one)\n",
             candidates.size(),
             a.families.empty() ? sweep_family_names() : fmt::format("{}", fmt::join(a.families, ", ")),
             c.seq_len, selected.size(), lo, hi, same);
  std::size_t w = 6;
  for (const RecipeMetrics& r : m) w = std::max(w, r.recipe.size());
  fmt::print("{:<{}}  {:>9}  {:>7}  {:>9}  {:>7}  {:>9}  {:>7}  {}\n", "recipe", w, "KLD", "top1",
             "ppl", "vs seen", "B/seen", "probe", "frontier");
  for (std::size_t i : order)
    fmt::print("{:<{}}  {:>9.2e}  {:>6.2f}%  {:>9.4f}  {:>6.2f}x  {:>9.1f}  {:>6.2f}x  {}\n", m[i].recipe, w,
               m[i].kld_mean, 100.0 * m[i].top1_agree, m[i].ppl, m[i].ratio_seen,
               f32_token / m[i].ratio_seen, probed[i], pareto[i] ? "*" : "");
  fmt::print("vs seen: f32 bytes of every token seen / cache bytes at each window's end (mean);\n"
             "  B/seen: bytes per token seen, all layers and kv heads; probe: vs seen of the probe.\n"
             "frontier *: no other recipe has a vs seen >= and a KLD <=, one of them strictly.\n"
             "best per target (lowest KLD with a measured vs seen >= the target):\n");
  std::size_t tw = 0;
  for (const SweepTarget& t : targets) tw = std::max(tw, t.text.size());
  for (const SweepTarget& t : targets) {
    const int b = best_meeting(m, t.ratio);
    if (b < 0) {
      fmt::print("  {:<{}}  none meets it\n", t.text, tw);
      continue;
    }
    const RecipeMetrics& r = m[static_cast<std::size_t>(b)];
    fmt::print("  {:<{}}  {}  KLD {:.2e}  top1 {:.2f}%  vs seen {:.2f}x\n", t.text, tw, r.recipe,
               r.kld_mean, 100.0 * r.top1_agree, r.ratio_seen);
  }
  if (!a.plot.empty()) fmt::print("wrote {}\n", a.plot);
  return 0;
}

int run_dump(const Args& a) {
  const Model model = load_model(a.model);
  const std::string text = read_text(a.text);
  const Tokenizer::UnknownCount before = model.tokenizer->unknown();
  const double ppl = write_dump(model, text, a.offset, a.out,
                                std::filesystem::path(a.text).filename().string());
  warn_unknown(model, before, fmt::format("'{}'", a.text));
  fmt::print("wrote {} (window perplexity {:.4f})\n", a.out, ppl);
  return 0;
}

int run_calibrate(const Args& a) {
  const Model model = load_model(a.model);
  const CalibrateResult r = calibrate_retrieval(model, a.calibrate);
  write_file(a.out, r.recipe.data(), r.recipe.size());
  const std::string report = calibration_json(model, r);
  write_file(a.out + ".json", report.data(), report.size());
  const ModelConfig& c = model.config;
  fmt::print("model {} ({} layers, {} query heads, {} kv heads); BOS + {} tokens repeated {} times\n",
             model.name, c.n_layers, c.n_heads, c.n_kv_heads, r.period, r.options.repeats);
  fmt::print("a head attending uniformly would score echo {:.4f}, induction {:.4f}\n",
             r.uniform_echo, r.uniform_induction);
  fmt::print("{:>5}  {:>7}  {:>8}  {:>9}  {:>8}  {}\n", "layer", "kv head", "echo", "induction",
             "score", "kept full");
  for (const kvslim::RetrievalHead& h : r.heads) {
    const bool chosen = std::any_of(r.chosen.begin(), r.chosen.end(), [&](const kvslim::RetrievalHead& x) {
      return x.layer == h.layer && x.kv_head == h.kv_head;
    });
    fmt::print("{:>5}  {:>7}  {:>8.4f}  {:>9.4f}  {:>8.4f}  {}\n", h.layer, h.kv_head, h.echo,
               h.induction, h.score, chosen ? "yes" : "");
  }
  fmt::print("{} of {} kv heads kept as '{}', the rest '{}'\nwrote {} and {}.json (use: --recipe @{})\n",
             r.chosen.size(), r.heads.size(), r.options.keep, r.options.compress, a.out, a.out, a.out);
  return 0;
}

int run_calibrate_codebooks(const Args& a) {
  const std::string recipe = kvslim::resolve_recipe(a.recipes[0]);
  kvslim::cq_recipe_shapes(recipe);  // no cq stage: fail before loading the model
  const Model model = load_model(a.model);
  const std::string text = read_text(a.text);
  CodebookCalibrationOptions o = a.codebooks;
  o.recipe = recipe;
  const Tokenizer::UnknownCount before = model.tokenizer->unknown();
  const CodebookCalibrationResult r = calibrate_codebooks(model, text, o);
  warn_unknown(model, before, fmt::format("'{}'", a.text));
  kvslim::save_codebooks(r.codebooks, a.out);
  const ModelConfig& c = model.config;
  const kvslim::CodebookShape k = r.codebooks.key_shape(), v = r.codebooks.value_shape();
  fmt::print("model {} ({} layers, {} kv heads, head_dim {}); text {} from byte {}: {} windows ({} of the full {} "
             "tokens), {} rows per (layer, kv head)\n",
             model.name, c.n_layers, c.n_kv_heads, c.head_dim, a.text, r.skip_bytes, r.windows, r.full_windows,
             c.seq_len, r.rows);
  fmt::print("key C={} B={}, value C={} B={}; weight {}, seed {}, iterations {}; forward {:.2f} s, k-means {:.2f} s\n",
             k.channels, k.bits, v.channels, v.bits, o.mass ? "mass (attention-weighted)" : "none", o.train.seed,
             o.train.iterations, r.seconds_forward, r.seconds_train);
  if (r.full_windows == 0)
    fmt::print(stderr, "kvslim-llama: warning: no window of the full context length: positions {} .. {} were not "
                       "seen, and post-RoPE key codebooks do not carry over to unseen positions\n",
               r.rows, c.seq_len - 1);
  fmt::print("wrote {} ({} bytes of f32 centroids; use: --recipe \"{},codebooks={}\")\n", a.out,
             r.codebooks.data().size() * sizeof(float), a.recipes[0], a.out);
  return 0;
}

/// --model / --text paths that do not exist (what a missing ../shared looks like).
std::vector<std::string> missing_paths(const Args& a) {
  std::vector<std::string> out;
  for (const std::string* p : {&a.model, &a.text}) {
    std::error_code ec;
    if (!p->empty() && !std::filesystem::exists(*p, ec)) out.push_back(*p);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  try {
    a = parse_args(argc, argv);
    if (a.command == "help") {
      fmt::print("{}", kUsage);
      return 0;
    }
    if (a.command == "generate") return run_generate(a);
    if (a.command == "ppl") return run_ppl(a);
    if (a.command == "calibrate") return run_calibrate(a);
    if (a.command == "calibrate-codebooks") return run_calibrate_codebooks(a);
    if (a.command == "sweep") return run_sweep(a);
    return run_dump(a);
  } catch (const UsageError& e) {
    fmt::print(stderr, "kvslim-llama: {}\n\n{}", e.message, kUsage);
    return 2;
  } catch (const kvslim::Error& e) {
    fmt::print(stderr, "kvslim-llama: error ({}): {}\n", kvslim::error_code_name(e.code()),
               e.what());
    // The ../shared hint only helps when a model or text path is missing, not for e.g. an
    // unwritable --out directory.
    if (e.code() == kvslim::ErrorCode::kIo && !missing_paths(a).empty())
      fmt::print(stderr,
                 "kvslim-llama: '{}' does not exist; the shared models and text are expected in "
                 "../shared next to the checkout (models/, data/text/); pass --model and --text "
                 "to point elsewhere\n",
                 missing_paths(a).front());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "kvslim-llama: error: {}\n", e.what());
    return 1;
  }
}
