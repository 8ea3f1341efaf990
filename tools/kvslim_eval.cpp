// kvslim-eval: replay real key/value/query recordings through KVCaches built from recipes
// and report memory and attention quality per recipe.
//
//   kvslim-eval --dumps ../shared/data/dumps --recipe f32 --recipe "kivi:kbits=2,vbits=2" [--json]
//   kvslim-eval --dumps ../shared/data/dumps/stories260K --recipe "cq:channels=4,bits=2"
//               --train-codebooks s260k.kvcb --windows 0,1
//   kvslim-eval --dumps ../shared/data/dumps/stories260K --windows 2,3
//               --recipe "cq:channels=4,bits=2,codebooks=s260k.kvcb"
//   kvslim-eval --dumps ../shared/data/dumps/stories260K --layer-similarity --threshold 0.8
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <fmt/format.h>

#include "kvslim/cache/kv_cache.h"
#include "kvslim/cache/recipe.h"
#include "kvslim/error.h"
#include "kvslim/policy/codebook.h"
#include "kvslim/policy/nuq.h"
#include "kvslim/testing/recordings.h"
#include "kvslim/testing/replay.h"
#include "kvslim/testing/similarity.h"
#include "util/json.h"

namespace {

void usage(std::FILE* f) {
  std::fputs(
      "usage: kvslim-eval --dumps DIR --recipe R [--recipe R2 ...] [--windows LIST] [--chunk N] [--tokens N] [--pre-rope] [--json]\n"
      "       kvslim-eval --dumps DIR --recipe \"cq:...\" --train-codebooks OUT [--windows LIST] [--tokens N]\n"
      "                   [--seed S] [--iterations N] [--weight mass|none]\n"
      "       kvslim-eval --dumps DIR --layer-similarity [--threshold C] [--windows LIST] [--json]\n"
      "  Replays every recording directory under DIR (each holds meta.json, k.f32, v.f32, q.f32,\n"
      "  attn_out.f32) token by token through a KVCache per recipe: append k, v then attend q.\n"
      "  Reports bits per value (all metadata included), bytes at the end of each recording (summed),\n"
      "  compression ratio vs an f32 cache of the tokens kept (ratio) and of every token seen\n"
      "  (ratio_seen: eviction counts as saving; both from the summed bytes), the fraction of seen\n"
      "  tokens kept (kept, at each recording's end, mean over recordings; 1 without eviction),\n"
      "  attention-output relative L2 error (mean, p99) and mean cosine\n"
      "  similarity vs the recorded attn_out. Every recipe is checked against every recording's\n"
      "  shape before the first replay starts. --recipe @FILE reads the recipe from FILE ('#'\n"
      "  comments and line breaks allowed, e.g. what kvslim-llama calibrate writes).\n"
      "  --chunk N   tokens per append/attend, N >= 1 (default 1 = decode; >1 = chunked prefill)\n"
      "  --tokens N  use only the first N >= 1 tokens of each recording (default: all)\n"
      "  --pre-rope  append the recorded pre-RoPE keys (k_pre.f32) to caches that apply the\n"
      "              recording's RoPE themselves (CacheConfig::pre_rope_keys)\n"
      "  --windows LIST  use only the recordings whose directory name ends in one of these window\n"
      "              numbers (tsval_w3 is window 3); LIST is comma-separated numbers and ranges A-B\n"
      "              (default: every recording). Train on some windows, evaluate on the others.\n"
      "  --json      one JSON object per recipe: recipe, bits_per_value, bytes, ratio, rel_err_mean,\n"
      "              rel_err_p99, cosine_mean, ratio_seen, kept, codebook_bytes\n"
      "  codebook_bytes (column cb_bytes) is the f32 centroid bytes of the cq codebook files the recipe\n"
      "  names: a fixed per-model cost, not part of bytes or bits_per_value (0 without cq).\n"
      "Training (--train-codebooks OUT): trains the codebooks of the recipe's cq stages, or the\n"
      "  level tables of its nuq stage (per layer, kv head and K/V: 1-D k-means of the rows'\n"
      "  coordinates over their RMS, rotated first if the stage rotates; use them with\n"
      "  nuq:...,levels=OUT). For cq: the codebooks (their\n"
      "  channels/bits; one --recipe) on the keys (post-RoPE, as cached) and values of every selected\n"
      "  recording, all of which must come from one model, and writes the codebook file OUT.\n"
      "  --seed S        k-means++ seed, integer >= 0 (default 1)\n"
      "  --iterations N  maximum Lloyd iterations, N >= 0 (default 25)\n"
      "  --weight W      mass (default): each row weighted by the attention mass its token received\n"
      "                  from the recorded queries, summed over the GQA group; none: every row weighs 1\n"
      "  Then evaluate with --recipe \"cq:...,codebooks=OUT\" (and --windows for held-out windows).\n"
      "Adjacent-layer similarity (--layer-similarity; MiniCache's cross-layer merging): for every layer\n"
      "  pair l-1 -> l, the cosine of the two layers' states of one kv head and token, pooled over kv heads,\n"
      "  tokens and the selected recordings (all of one model; keys post-RoPE, as cached: RoPE rotates\n"
      "  both layers alike at one position, so their cosine is the pre-RoPE one): mean cosine of K and\n"
      "  of V, the fraction of pairs with cosine below the threshold (the tokens MiniCache would retain\n"
      "  unmerged), and the pairs counted. Replays and trains nothing: not with --recipe, --chunk,\n"
      "  --tokens, --pre-rope or training options.\n"
      "  --threshold C   cosine in [-1, 1] (default 0.5)\n"
      "  --json          one JSON object: model_dir, threshold, layer_similarity (one entry per pair:\n"
      "                  lower, upper, k_cos, v_cos, k_below, v_below, pairs)\n"
      "  Exit status: 0 success, 1 error (I/O, bad recipe, bad recording), 2 bad command line.\n",
      f);
}

/// A command-line mistake: exit code 2 with the usage text.
struct UsageError {
  std::string message;
};

int parse_int(std::string_view opt, std::string_view v, int lo) {
  int x = 0;
  const auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec != std::errc() || p != v.data() + v.size() || x < lo)
    throw UsageError{fmt::format("{} expects an integer >= {}, got '{}'", opt, lo, v)};
  return x;
}

std::uint64_t parse_u64(std::string_view opt, std::string_view v) {
  std::uint64_t x = 0;
  const auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (v.empty() || ec != std::errc() || p != v.data() + v.size())
    throw UsageError{fmt::format("{} expects an integer >= 0, got '{}'", opt, v)};
  return x;
}

/// A cosine in [-1, 1] (--threshold).
double parse_cosine(std::string_view opt, std::string_view v) {
  double x = 0.0;
  const auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  // The range test also rejects "nan" and "inf", which from_chars accepts.
  if (v.empty() || ec != std::errc() || p != v.data() + v.size() || !(x >= -1.0 && x <= 1.0))
    throw UsageError{fmt::format("{} expects a cosine in [-1, 1], got '{}'", opt, v)};
  return x;
}

/// "0,1" or "0-2,5": the window numbers, sorted and unique.
std::set<int> parse_windows(std::string_view v) {
  std::set<int> w;
  const auto bad = [&] { return UsageError{fmt::format("--windows expects window numbers like 0,1 or 2-3, got '{}'", v)}; };
  std::size_t pos = 0;
  while (pos <= v.size()) {
    const std::size_t comma = std::min(v.find(',', pos), v.size());
    const std::string_view item = v.substr(pos, comma - pos);
    const std::size_t dash = item.find('-');
    int a = 0, b = 0;
    const auto num = [&](std::string_view t, int& x) {
      const auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), x);
      if (t.empty() || ec != std::errc() || p != t.data() + t.size() || x < 0) throw bad();
    };
    if (dash == std::string_view::npos) {
      num(item, a);
      b = a;
    } else {
      num(item.substr(0, dash), a);
      num(item.substr(dash + 1), b);
      if (b < a) throw bad();
    }
    for (int x = a; x <= b; ++x) w.insert(x);
    pos = comma + 1;
  }
  return w;
}

/// The window number of a recording directory: the integer its name ends in (tsval_w3 -> 3),
/// -1 if none.
int window_number(const std::string& dir) {
  const std::string name = std::filesystem::path(dir).filename().string();
  std::size_t i = name.size();
  while (i > 0 && name[i - 1] >= '0' && name[i - 1] <= '9') --i;
  if (i == name.size() || name.size() - i > 9) return -1;
  return std::stoi(name.substr(i));
}

/// Bytes of f32 centroids of every distinct codebooks=FILE a cq stage of the recipe names
/// (base chain and overrides): the per-model cost that is not in the cache's bytes.
std::int64_t codebook_bytes(const std::string& recipe) {
  std::set<std::string> files;
  const kvslim::RecipeSpec spec = kvslim::parse_recipe(recipe);  // outlives the stage pointers
  for (const kvslim::StageSpec* st : spec.stages_named("cq"))
    for (const auto& [k, v] : st->params)
      if (k == "codebooks") files.insert(v);
  std::int64_t bytes = 0;
  for (const auto& f : files)
    bytes += static_cast<std::int64_t>(kvslim::load_codebooks(f).data().size() * sizeof(float));
  return bytes;
}

/// An error that names a value and exits with 1 (not a kvslim::Error: no code to print).
struct RunError {
  std::string message;
};

struct TrainArgs {
  std::string out;
  kvslim::TrainOptions opt;
  bool mass = true;
};

/// Attention mass each key token received: for every query head and query t, the causal
/// softmax(q_t·k_j / sqrt(d)) over j <= t (exact, double), added to the query head's kv head
/// (GQA group). mass: [layers][kv_heads][tokens].
std::vector<float> attention_mass(const kvslim::testing::Recording& r, int T) {
  const int d = r.head_dim, group = r.q_heads / r.kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> m(static_cast<std::size_t>(r.layers) * r.kv_heads * T, 0.0);
  std::vector<double> p(static_cast<std::size_t>(T));
  for (int l = 0; l < r.layers; ++l)
    for (int h = 0; h < r.q_heads; ++h) {
      const int kvh = h / group;
      const float* q = r.q_head(l, h);
      const float* k = r.k_head(l, kvh);
      double* acc = m.data() + (static_cast<std::size_t>(l) * r.kv_heads + kvh) * T;
      for (int t = 0; t < T; ++t) {
        double mx = -1e300;
        for (int j = 0; j <= t; ++j) {
          double s = 0.0;
          for (int c = 0; c < d; ++c) s += static_cast<double>(q[t * d + c]) * k[j * d + c];
          p[j] = s * scale;
          mx = std::max(mx, p[j]);
        }
        double sum = 0.0;
        for (int j = 0; j <= t; ++j) sum += (p[j] = std::exp(p[j] - mx));
        for (int j = 0; j <= t; ++j) acc[j] += p[j] / sum;
      }
    }
  return {m.begin(), m.end()};
}

/// Fails early (before loading and training) when OUT cannot be written.
void check_writable(const std::string& out) {
  namespace fs = std::filesystem;
  const fs::path p(out);
  std::error_code ec;
  if (fs::is_directory(p, ec)) throw RunError{fmt::format("--train-codebooks '{}' is a directory", out)};
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  if (!fs::is_directory(dir, ec))
    throw RunError{fmt::format("--train-codebooks '{}' cannot be written: directory '{}' does not exist", out,
                               dir.string())};
  if (access(dir.c_str(), W_OK) != 0 || (fs::exists(p, ec) && access(p.c_str(), W_OK) != 0))
    throw RunError{fmt::format("--train-codebooks '{}' cannot be written: {}", out, std::strerror(errno))};
}

/// What --train-codebooks trains for a recipe: the codebooks of its cq stages, or the level
/// tables of its nuq stage (levels=FILE); checked before anything is loaded.
bool trains_levels(const std::string& recipe) {
  const kvslim::RecipeSpec spec = kvslim::parse_recipe(recipe);
  const bool cq = !spec.stages_named("cq").empty(), nuq = !spec.stages_named("nuq").empty();
  if (cq && nuq)
    throw RunError{fmt::format("recipe '{}' has cq and nuq stages: train one file per recipe", recipe)};
  if (nuq) {
    kvslim::nuq_recipe_shape(recipe);
    return true;
  }
  kvslim::cq_recipe_shapes(recipe);  // no cq stage or a bad shape: says so
  return false;
}

/// Modes that pool recordings (training, --layer-similarity) need them all from one model;
/// `flag` names the mode in the message.
void check_one_model(const std::vector<kvslim::testing::Recording>& recs, std::string_view flag) {
  const auto& r0 = recs.front();
  for (const auto& r : recs)
    if (r.layers != r0.layers || r.kv_heads != r0.kv_heads || r.head_dim != r0.head_dim || r.q_heads != r0.q_heads)
      throw RunError{fmt::format(
          "{} needs recordings of one model: '{}' has {} layers, {}/{} heads, head_dim {} but '{}' has "
          "{} layers, {}/{} heads, head_dim {} (point --dumps at one model's directory or pick --windows)",
          flag, r0.dir, r0.layers, r0.q_heads, r0.kv_heads, r0.head_dim, r.dir, r.layers, r.q_heads, r.kv_heads,
          r.head_dim)};
}

int train(const std::vector<kvslim::testing::Recording>& recs, const std::string& recipe_arg,
          const std::string& recipe, const TrainArgs& a, int max_tokens) {
  const bool levels = trains_levels(recipe);
  const kvslim::NuqRecipeShape nshape = levels ? kvslim::nuq_recipe_shape(recipe) : kvslim::NuqRecipeShape{};
  const auto [kshape, vshape] = levels ? std::pair{kvslim::CodebookShape{1, nshape.kbits}, kvslim::CodebookShape{1, nshape.vbits}}
                                       : kvslim::cq_recipe_shapes(recipe);
  check_one_model(recs, "--train-codebooks");
  const auto& r0 = recs.front();
  const int L = r0.layers, H = r0.kv_heads, d = r0.head_dim;
  const auto t0 = std::chrono::steady_clock::now();
  // Rows of every selected recording, concatenated per (layer, kv head).
  std::int64_t rows = 0;
  std::vector<int> used(recs.size());
  for (std::size_t i = 0; i < recs.size(); ++i) {
    used[i] = max_tokens > 0 ? std::min(max_tokens, recs[i].tokens) : recs[i].tokens;
    rows += used[i];
  }
  const std::size_t heads = static_cast<std::size_t>(L) * H;
  std::vector<std::vector<float>> k(heads), v(heads), w(heads);
  for (std::size_t i = 0; i < recs.size(); ++i) {
    const auto& r = recs[i];
    const int T = used[i];
    const std::vector<float> mass = a.mass ? attention_mass(r, T) : std::vector<float>{};
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < H; ++h) {
        const std::size_t hi = static_cast<std::size_t>(l) * H + h;
        k[hi].insert(k[hi].end(), r.k_head(l, h), r.k_head(l, h) + static_cast<std::size_t>(T) * d);
        v[hi].insert(v[hi].end(), r.v_head(l, h), r.v_head(l, h) + static_cast<std::size_t>(T) * d);
        if (a.mass) w[hi].insert(w[hi].end(), mass.begin() + hi * T, mass.begin() + (hi + 1) * T);
      }
  }
  kvslim::CalibrationKV cal(L, H, d);
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      const std::size_t hi = static_cast<std::size_t>(l) * H + h;
      const float* wp = a.mass ? w[hi].data() : nullptr;
      cal.set(l, h, {k[hi].data(), v[hi].data(), rows, wp, wp});
    }
  const kvslim::Codebooks cb = levels ? kvslim::train_levels(cal, nshape.kbits, nshape.vbits, nshape.rotation, a.opt)
                                      : kvslim::train_codebooks(cal, kshape, vshape, a.opt);
  kvslim::save_codebooks(cb, a.out);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (levels) {
    fmt::print("trained nuq levels for '{}' -> {}\n", recipe_arg, a.out);
    fmt::print("  model: {} layers, {} kv heads, head_dim {}; {} recordings, {} rows per (layer, kv head)\n", L, H, d,
               recs.size(), rows);
    fmt::print("  key {} levels, value {} levels per (layer, kv head){}; weight {}, seed {}, {:.2f} s\n",
               1 << nshape.kbits, 1 << nshape.vbits, nshape.rotation.hadamard ? ", rotated rows" : "",
               a.mass ? "mass (attention-weighted)" : "none", a.opt.seed, secs);
    fmt::print("  use it with --recipe \"nuq:kbits={},vbits={},levels={}...\"\n", nshape.kbits, nshape.vbits, a.out);
    return 0;
  }
  fmt::print("trained codebooks for '{}' -> {}\n", recipe_arg, a.out);
  fmt::print("  model: {} layers, {} kv heads, head_dim {}; {} recordings, {} rows per (layer, kv head)\n", L, H, d,
             recs.size(), rows);
  fmt::print("  key C={} B={} ({} centroids x {} groups), value C={} B={} ({} centroids x {} groups)\n",
             kshape.channels, kshape.bits, kshape.centroids(), d / kshape.channels, vshape.channels, vshape.bits,
             vshape.centroids(), d / vshape.channels);
  fmt::print("  weight {}, seed {}, iterations {}, {:.2f} s; {} codebook bytes (f32 centroids), fingerprint {:016x}\n",
             a.mass ? "mass (attention-weighted)" : "none", a.opt.seed, a.opt.iterations, secs,
             cb.data().size() * sizeof(float), cb.fingerprint());
  return 0;
}

/// --layer-similarity: the table (or one JSON object) of adjacent-layer cosines.
int layer_similarity(const std::vector<kvslim::testing::Recording>& recs, const std::string& dumps, double threshold,
                     bool json) {
  check_one_model(recs, "--layer-similarity");
  const auto pairs = kvslim::testing::layer_similarity(recs, threshold);
  if (json) {
    std::string rows;
    for (const auto& p : pairs)
      rows += fmt::format("{}{{\"lower\": {}, \"upper\": {}, \"k_cos\": {:.8f}, \"v_cos\": {:.8f}, "
                          "\"k_below\": {:.8f}, \"v_below\": {:.8f}, \"pairs\": {}}}",
                          rows.empty() ? "" : ", ", p.lower, p.upper, p.k_cos, p.v_cos, p.k_below, p.v_below, p.pairs);
    fmt::print("{{\"model_dir\": {}, \"threshold\": {}, \"layer_similarity\": [{}]}}\n", kvslim::json::quote(dumps),
               threshold, rows);
    return 0;
  }
  const auto& r0 = recs.front();
  fmt::print("{} recordings under {} ({} layers, {} kv heads, head_dim {}); threshold {}\n", recs.size(), dumps,
             r0.layers, r0.kv_heads, r0.head_dim, threshold);
  const std::string kb = fmt::format("K<{}", threshold), vb = fmt::format("V<{}", threshold);
  fmt::print("{:<6} {:>9} {:>9} {:>8} {:>8} {:>9}\n", "pair", "cos_K", "cos_V", kb, vb, "pairs");
  for (const auto& p : pairs)
    fmt::print("{:<6} {:>9.4f} {:>9.4f} {:>7.2f}% {:>7.2f}% {:>9}\n", fmt::format("{}\u2192{}", p.lower, p.upper),
               p.k_cos, p.v_cos, 100.0 * p.k_below, 100.0 * p.v_below, p.pairs);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dumps;
  std::vector<std::string> recipes;
  bool json = false;
  kvslim::testing::ReplayOptions opt;
  std::set<int> windows;
  bool training = false;
  bool train_opts = false;
  TrainArgs targs;
  bool similarity = false;
  double threshold = 0.5;
  bool threshold_given = false;
  // Options of the replay and training modes, as given: --layer-similarity names them when
  // it rejects them.
  std::vector<std::string> replay_opts;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw UsageError{fmt::format("{} needs a value", a)};
        return argv[++i];
      };
      if (a == "--recipe" || a == "--chunk" || a == "--tokens" || a == "--pre-rope" || a == "--train-codebooks" ||
          a == "--seed" || a == "--iterations" || a == "--weight")
        if (std::find(replay_opts.begin(), replay_opts.end(), a) == replay_opts.end()) replay_opts.push_back(a);
      if (a == "--dumps") dumps = value();
      else if (a == "--recipe") recipes.push_back(value());
      else if (a == "--json") json = true;
      else if (a == "--chunk") opt.chunk = parse_int(a, value(), 1);
      else if (a == "--tokens") opt.max_tokens = parse_int(a, value(), 1);
      else if (a == "--pre-rope") opt.pre_rope = true;
      else if (a == "--windows") windows = parse_windows(value());
      else if (a == "--layer-similarity") similarity = true;
      else if (a == "--threshold") {
        threshold = parse_cosine(a, value());
        threshold_given = true;
      } else if (a == "--train-codebooks") {
        targs.out = value();
        if (targs.out.empty()) throw UsageError{"--train-codebooks needs a non-empty path"};
        training = true;
      } else if (a == "--seed") {
        targs.opt.seed = parse_u64(a, value());
        train_opts = true;
      } else if (a == "--iterations") {
        targs.opt.iterations = parse_int(a, value(), 0);
        train_opts = true;
      } else if (a == "--weight") {
        const std::string w = value();
        if (w != "mass" && w != "none") throw UsageError{fmt::format("--weight expects mass or none, got '{}'", w)};
        targs.mass = w == "mass";
        train_opts = true;
      } else if (a == "--help" || a == "-h") {
        usage(stdout);
        return 0;
      } else throw UsageError{fmt::format("unknown argument '{}'", a)};
    }
    if (dumps.empty()) throw UsageError{"--dumps DIR is required"};
    if (threshold_given && !similarity) throw UsageError{"--threshold needs --layer-similarity"};
    if (similarity && !replay_opts.empty()) {
      std::string names;
      for (const auto& o : replay_opts) names += (names.empty() ? "" : ", ") + o;
      throw UsageError{fmt::format(
          "--layer-similarity does not take {}: it reads the recorded states, it replays and trains nothing", names)};
    }
    // Past this point --layer-similarity has no --recipe and no training options.
    if (!similarity && recipes.empty()) throw UsageError{"at least one --recipe is required"};
    for (const auto& r : recipes)
      if (r.empty()) throw UsageError{"--recipe needs a non-empty recipe"};
    if (train_opts && !training) throw UsageError{"--seed, --iterations and --weight need --train-codebooks OUT"};
    if (training && recipes.size() != 1)
      throw UsageError{fmt::format("--train-codebooks trains one recipe's codebooks, got {} --recipe", recipes.size())};
    if (training && (json || opt.chunk != 1 || opt.pre_rope))
      throw UsageError{"--json, --chunk and --pre-rope do not apply to --train-codebooks"};
  } catch (const UsageError& e) {
    std::fprintf(stderr, "kvslim-eval: %s\n\n", e.message.c_str());
    usage(stderr);
    return 2;
  }

  try {
    // "--recipe @FILE" reads the recipe from FILE; the label printed stays what was given.
    std::vector<std::string> texts;
    for (const auto& r : recipes) texts.push_back(kvslim::resolve_recipe(r));
    if (training) {
      trains_levels(texts[0]);  // no cq or nuq stage, or a bad shape: fail before loading anything
      check_writable(targs.out);
    }
    auto dirs = kvslim::testing::find_recordings(dumps);
    if (dirs.empty()) {
      std::fprintf(stderr, "kvslim-eval: no recordings (directories with meta.json) under '%s'\n", dumps.c_str());
      return 1;
    }
    if (!windows.empty()) {
      std::vector<std::string> keep;
      std::set<int> found;
      for (const auto& d : dirs) {
        const int w = window_number(d);
        if (w >= 0 && windows.count(w)) {
          keep.push_back(d);
          found.insert(w);
        }
      }
      for (int w : windows)
        if (!found.count(w))
          throw RunError{fmt::format("--windows: no recording under '{}' is window {} (a directory name ending in {})",
                                     dumps, w, w)};
      dirs = std::move(keep);
    }
    std::vector<kvslim::testing::Recording> recs;
    for (const auto& d : dirs) recs.push_back(kvslim::testing::load_recording(d));
    if (training) return train(recs, recipes[0], texts[0], targs, opt.max_tokens);
    if (similarity) return layer_similarity(recs, dumps, threshold, json);
    // Build a cache of every recipe for every distinct recording shape before replaying
    // anything, so that a typo in the last recipe fails now and not after the first rows.
    std::set<std::tuple<int, int, int, int, int>> shapes;
    for (const auto& rec : recs)
      shapes.emplace(rec.layers, rec.q_heads, rec.kv_heads, rec.head_dim, rec.tokens);
    for (std::size_t ri = 0; ri < recipes.size(); ++ri) {
      const std::string& r = recipes[ri];
      for (const auto& [layers, q_heads, kv_heads, head_dim, tokens] : shapes) {
        kvslim::CacheConfig cfg;
        cfg.layers = layers;
        cfg.q_heads = q_heads;
        cfg.kv_heads = kv_heads;
        cfg.head_dim = head_dim;
        cfg.max_tokens = tokens;
        cfg.recipe = texts[ri];
        if (opt.pre_rope) {  // the recipe must accept pre-RoPE keys (no cq, no key rotation, ...)
          cfg.pre_rope_keys = true;
          cfg.rope = kvslim::RopeSpec{};
        }
        try {
          const kvslim::KVCache probe(cfg);
        } catch (const kvslim::Error& e) {
          std::fprintf(stderr, "kvslim-eval: recipe '%s' is invalid for recordings with %d layers, %d/%d heads, head_dim %d: %s\n",
                       r.c_str(), layers, q_heads, kv_heads, head_dim, e.what());
          return 1;
        }
      }
    }
    std::vector<std::int64_t> cb_bytes;
    for (const auto& t : texts) cb_bytes.push_back(codebook_bytes(t));
    if (!json) {
      fmt::print("{} recordings under {}\n", recs.size(), dumps);
      fmt::print("{:<48} {:>8} {:>11} {:>7} {:>10} {:>7} {:>11} {:>11} {:>9} {:>9}\n", "recipe", "bits/val", "bytes",
                 "ratio", "ratio_seen", "kept", "rel_err", "rel_err_p99", "cosine", "cb_bytes");
    }
    for (std::size_t ri = 0; ri < recipes.size(); ++ri) {
      const std::string& r = recipes[ri];
      // Progress on stderr: redrawn in place on a terminal, one line per recipe otherwise.
      const bool tty = isatty(2) != 0;
      const auto res = kvslim::testing::replay(recs, texts[ri], opt, [&](int done, int total) {
        if (tty) std::fprintf(stderr, "\r[%s] %d/%d recordings%s", r.c_str(), done, total, done == total ? "\n" : "");
        else if (done == total) std::fprintf(stderr, "[%s] %d recordings replayed\n", r.c_str(), total);
      });
      if (json) {
        fmt::print("{{\"recipe\": {}, \"bits_per_value\": {:.4f}, \"bytes\": {}, \"ratio\": {:.4f}, "
                   "\"rel_err_mean\": {:.6g}, \"rel_err_p99\": {:.6g}, \"cosine_mean\": {:.8f}, "
                   "\"ratio_seen\": {:.4f}, \"kept\": {:.6f}, \"codebook_bytes\": {}}}\n",
                   kvslim::json::quote(r), res.bits_per_value, res.bytes, res.ratio, res.rel_err_mean,
                   res.rel_err_p99, res.cosine_mean, res.ratio_seen, res.kept, cb_bytes[ri]);
      } else {
        fmt::print("{:<48} {:>8.3f} {:>11} {:>7.2f} {:>10.2f} {:>6.1f}% {:>11.3e} {:>11.3e} {:>9.6f} {:>9}\n", r,
                   res.bits_per_value, res.bytes, res.ratio, res.ratio_seen, 100.0 * res.kept, res.rel_err_mean,
                   res.rel_err_p99, res.cosine_mean, cb_bytes[ri]);
      }
      std::fflush(stdout);
    }
  } catch (const kvslim::Error& e) {
    std::fprintf(stderr, "kvslim-eval: error (%s): %s\n", kvslim::error_code_name(e.code()), e.what());
    return 1;
  } catch (const RunError& e) {
    std::fprintf(stderr, "kvslim-eval: error: %s\n", e.message.c_str());
    return 1;
  }
  return 0;
}
