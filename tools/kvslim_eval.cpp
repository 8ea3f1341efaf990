// kvslim-eval: replay real key/value/query recordings through KVCaches built from recipes
// and report memory and attention quality per recipe.
//
//   kvslim-eval --dumps ../shared/data/dumps --recipe f32 --recipe "kivi:kbits=2,vbits=2" [--json]
#include <charconv>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <fmt/format.h>
#include <unistd.h>

#include "kvslim/cache/kv_cache.h"
#include "kvslim/cache/recipe.h"
#include "kvslim/error.h"
#include "kvslim/testing/recordings.h"
#include "kvslim/testing/replay.h"
#include "util/json.h"

namespace {

void usage(std::FILE* f) {
  std::fputs(
      "usage: kvslim-eval --dumps DIR --recipe R [--recipe R2 ...] [--chunk N] [--tokens N] [--json]\n"
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
      "  --json      one JSON object per recipe: recipe, bits_per_value, bytes, ratio, rel_err_mean,\n"
      "              rel_err_p99, cosine_mean, ratio_seen, kept\n"
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

}  // namespace

int main(int argc, char** argv) {
  std::string dumps;
  std::vector<std::string> recipes;
  bool json = false;
  kvslim::testing::ReplayOptions opt;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw UsageError{fmt::format("{} needs a value", a)};
        return argv[++i];
      };
      if (a == "--dumps") dumps = value();
      else if (a == "--recipe") recipes.push_back(value());
      else if (a == "--json") json = true;
      else if (a == "--chunk") opt.chunk = parse_int(a, value(), 1);
      else if (a == "--tokens") opt.max_tokens = parse_int(a, value(), 1);
      else if (a == "--help" || a == "-h") {
        usage(stdout);
        return 0;
      } else throw UsageError{fmt::format("unknown argument '{}'", a)};
    }
    if (dumps.empty()) throw UsageError{"--dumps DIR is required"};
    if (recipes.empty()) throw UsageError{"at least one --recipe is required"};
    for (const auto& r : recipes)
      if (r.empty()) throw UsageError{"--recipe needs a non-empty recipe"};
  } catch (const UsageError& e) {
    std::fprintf(stderr, "kvslim-eval: %s\n\n", e.message.c_str());
    usage(stderr);
    return 2;
  }

  try {
    // "--recipe @FILE" reads the recipe from FILE; the label printed stays what was given.
    std::vector<std::string> texts;
    for (const auto& r : recipes) texts.push_back(kvslim::resolve_recipe(r));
    const auto dirs = kvslim::testing::find_recordings(dumps);
    if (dirs.empty()) {
      std::fprintf(stderr, "kvslim-eval: no recordings (directories with meta.json) under '%s'\n", dumps.c_str());
      return 1;
    }
    std::vector<kvslim::testing::Recording> recs;
    for (const auto& d : dirs) recs.push_back(kvslim::testing::load_recording(d));
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
        try {
          const kvslim::KVCache probe(cfg);
        } catch (const kvslim::Error& e) {
          std::fprintf(stderr, "kvslim-eval: recipe '%s' is invalid for recordings with %d layers, %d/%d heads, head_dim %d: %s\n",
                       r.c_str(), layers, q_heads, kv_heads, head_dim, e.what());
          return 1;
        }
      }
    }
    if (!json) {
      fmt::print("{} recordings under {}\n", recs.size(), dumps);
      fmt::print("{:<48} {:>8} {:>11} {:>7} {:>10} {:>7} {:>11} {:>11} {:>9}\n", "recipe", "bits/val", "bytes",
                 "ratio", "ratio_seen", "kept", "rel_err", "rel_err_p99", "cosine");
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
                   "\"ratio_seen\": {:.4f}, \"kept\": {:.6f}}}\n",
                   kvslim::json::quote(r), res.bits_per_value, res.bytes, res.ratio, res.rel_err_mean,
                   res.rel_err_p99, res.cosine_mean, res.ratio_seen, res.kept);
      } else {
        fmt::print("{:<48} {:>8.3f} {:>11} {:>7.2f} {:>10.2f} {:>6.1f}% {:>11.3e} {:>11.3e} {:>9.6f}\n", r,
                   res.bits_per_value, res.bytes, res.ratio, res.ratio_seen, 100.0 * res.kept, res.rel_err_mean,
                   res.rel_err_p99, res.cosine_mean);
      }
      std::fflush(stdout);
    }
  } catch (const kvslim::Error& e) {
    std::fprintf(stderr, "kvslim-eval: error (%s): %s\n", kvslim::error_code_name(e.code()), e.what());
    return 1;
  }
  return 0;
}
