// Quickstart: a KIVI-compressed cache for a GQA model, one prefill chunk and a few decode
// steps, then what it costs — and the error handling an engine should copy: every bad input
// throws kvslim::Error (code + message naming the bad value), the library never aborts or
// prints. Build: part of the kvslim build (target `quickstart`).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <kvslim/kvslim.h>

namespace {

int run() {
  const int layers = 2, q_heads = 8, kv_heads = 2, head_dim = 64, prompt = 300, steps = 20;
  kvslim::CacheConfig cfg;
  cfg.layers = layers;
  cfg.q_heads = q_heads;
  cfg.kv_heads = kv_heads;
  cfg.head_dim = head_dim;
  cfg.max_tokens = prompt + steps;
  cfg.recipe = "kivi:kbits=2,vbits=2,group=32,residual=64 ; [layers=0] f16";  // protect layer 0

  // A deliberate mistake, caught: a recipe typo is reported when the cache is built, with
  // an error code to branch on and a message naming the bad key.
  {
    kvslim::CacheConfig bad = cfg;
    bad.recipe = "kivi:kbitz=2";
    try {
      kvslim::KVCache rejected(bad);
      std::fprintf(stderr, "quickstart: the bad recipe '%s' was accepted\n", bad.recipe.c_str());
      return 1;
    } catch (const kvslim::Error& e) {
      std::printf("caught as expected: %s: %s\n", kvslim::error_code_name(e.code()), e.what());
    }
  }

  kvslim::KVCache cache(cfg);

  std::mt19937 rng(1);
  std::normal_distribution<float> n;
  auto fill = [&](std::vector<float>& v) {
    for (auto& x : v) x = n(rng);
  };
  // Engine buffers in [tokens][heads][head_dim] order, passed as strided views.
  std::vector<float> k(static_cast<std::size_t>(prompt) * kv_heads * head_dim), v(k.size());
  std::vector<float> q(static_cast<std::size_t>(prompt) * q_heads * head_dim), out(q.size());
  for (int step = 0; step <= steps; ++step) {
    const int t = step == 0 ? prompt : 1;  // prefill chunk, then one token per step
    for (int l = 0; l < layers; ++l) {
      fill(k);
      fill(v);
      fill(q);
      using View = kvslim::TensorView<const float>;
      cache.append(l, View::tokens_heads_dim(k.data(), t, kv_heads, head_dim),
                   View::tokens_heads_dim(v.data(), t, kv_heads, head_dim));
      cache.attend(l, View::tokens_heads_dim(q.data(), t, q_heads, head_dim),
                   kvslim::TensorView<float>::tokens_heads_dim(out.data(), t, q_heads, head_dim));
    }
  }
  const kvslim::CacheStats st = cache.stats();
  std::printf("tokens per head: %lld, bytes: %lld, bits/value: %.2f, ratio vs f32: %.2fx\n",
              static_cast<long long>(st.head(1, 0).tokens), static_cast<long long>(st.total_bytes),
              st.bits_per_value, st.ratio_vs_f32);
  std::printf("layer 0: %s\nlayer 1: %s\n", cache.recipe_for(0, 0).c_str(), cache.recipe_for(1, 0).c_str());
  return 0;
}

}  // namespace

int main() {
  // Everything kvslim throws is a kvslim::Error (a std::runtime_error); catch it at the
  // engine's boundary, report code and message, and fail instead of aborting.
  try {
    return run();
  } catch (const kvslim::Error& e) {
    std::fprintf(stderr, "quickstart: kvslim error (%s): %s\n", kvslim::error_code_name(e.code()),
                 e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quickstart: %s\n", e.what());
    return 1;
  }
}
