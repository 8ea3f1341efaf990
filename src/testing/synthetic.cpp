// How the generator produces LLM-like structure:
// - keys: per-channel mean and scale (what makes per-channel key quantization win), a few
//   outlier channel pairs placed on the lowest RoPE frequencies (where real models have
//   them, so rotation does not smear them; outliers_low_frequency = false puts them on the
//   fastest pairs instead), and a shared "sink direction" that the first
//   tokens carry strongly;
// - queries: post-RoPE mixtures of the keys of a few heavy-hitter targets, chosen with
//   Zipf-distributed popularity among visible tokens, plus the sink direction — so attention
//   concentrates on the sinks and on a heavy tail of popular tokens;
// - values: Gaussian with mild per-channel scale, no outliers.
#include "kvslim/testing/synthetic.h"

#include <algorithm>
#include <cmath>

#include "check.h"

namespace kvslim::testing {
namespace {

// splitmix64: tiny, seedable, identical everywhere.
struct Rng {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  float normal() {  // Box-Muller
    const double u1 = std::max(uniform(), 1e-300), u2 = uniform();
    return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
};

void rope_half(float* x, int d, int pos, float theta) {
  const int half = d / 2;
  for (int i = 0; i < half; ++i) {
    const double freq = std::pow(static_cast<double>(theta), -2.0 * i / d);
    const double a = pos * freq;
    const float c = static_cast<float>(std::cos(a)), s = static_cast<float>(std::sin(a));
    const float x0 = x[i], x1 = x[i + half];
    x[i] = x0 * c - x1 * s;
    x[i + half] = x0 * s + x1 * c;
  }
}

}  // namespace

SyntheticLayer generate_layer(const SyntheticOptions& o, int layer) {
  KVSLIM_CHECK(o.kv_heads >= 1 && o.q_heads % o.kv_heads == 0, ErrorCode::kInvalidArgument,
               "synthetic: q_heads {} must be a multiple of kv_heads {}", o.q_heads, o.kv_heads);
  KVSLIM_CHECK(o.head_dim >= 4 && o.head_dim % 2 == 0, ErrorCode::kInvalidArgument,
               "synthetic: head_dim {} must be even and >= 4", o.head_dim);
  KVSLIM_CHECK(o.tokens >= 1 && o.outlier_channels >= 0 && 2 * ((o.outlier_channels + 1) / 2) <= o.head_dim / 2,
               ErrorCode::kInvalidArgument, "synthetic: tokens {} / outlier_channels {} out of range", o.tokens,
               o.outlier_channels);
  const int d = o.head_dim, T = o.tokens, half = d / 2;
  Rng rng{o.seed * 0x2545f4914f6cdd1dull + static_cast<std::uint64_t>(layer) * 0x9e3779b97f4a7c15ull + 1};
  SyntheticLayer L;
  L.q_heads = o.q_heads;
  L.kv_heads = o.kv_heads;
  L.head_dim = d;
  L.tokens = T;
  L.k.resize(static_cast<std::size_t>(o.kv_heads) * T * d);
  L.v.resize(L.k.size());
  L.q.resize(static_cast<std::size_t>(o.q_heads) * T * d);

  // Outliers sit on the lowest-frequency RoPE pairs (i, i + d/2) for large i.
  const int pairs = (o.outlier_channels + 1) / 2;
  for (int p = 0; p < pairs; ++p) {
    const int i = o.outliers_low_frequency ? half - 1 - 2 * p : 1 + 2 * p;
    L.outlier_channels.push_back(i);
    L.outlier_channels.push_back(i + half);
  }
  L.outlier_channels.resize(static_cast<std::size_t>(o.outlier_channels));

  // Token ids: the same for every layer of a seed. Without a period every token is distinct.
  KVSLIM_CHECK(o.period >= 0 && o.period <= 1 << 20, ErrorCode::kInvalidArgument, "synthetic: period {} out of range",
               o.period);
  L.token_ids.resize(static_cast<std::size_t>(T));
  if (o.period == 0) {
    for (int t = 0; t < T; ++t) L.token_ids[t] = t;
  } else {
    Rng ids{o.seed * 0x9e3779b97f4a7c15ull + 12345};
    std::vector<int> perm(static_cast<std::size_t>(o.period) * 4);
    for (std::size_t i = 0; i < perm.size(); ++i) perm[i] = static_cast<int>(i);
    for (int i = 0; i < o.period; ++i)
      std::swap(perm[i], perm[i + static_cast<std::size_t>(ids.next() % (perm.size() - i))]);
    for (int t = 0; t < T; ++t) L.token_ids[t] = perm[t % o.period];
  }
  std::vector<char> retrieval_layer_head(static_cast<std::size_t>(o.kv_heads), 0);
  for (const auto& [l, h] : o.retrieval_heads) {
    KVSLIM_CHECK(h >= 0 && h < o.kv_heads, ErrorCode::kInvalidArgument,
                 "synthetic: retrieval head ({}, {}) is outside {} kv heads", l, h, o.kv_heads);
    if (l == layer) retrieval_layer_head[h] = true;
  }

  // Token popularity shared by all heads of the layer: Zipf over a random ranking.
  std::vector<double> pop(static_cast<std::size_t>(T));
  {
    std::vector<int> rank(static_cast<std::size_t>(T));
    for (int j = 0; j < T; ++j) rank[j] = j;
    for (int j = T - 1; j > 0; --j) std::swap(rank[j], rank[static_cast<int>(rng.next() % (j + 1))]);
    for (int j = 0; j < T; ++j) pop[j] = 1.0 / std::pow(1.0 + rank[j], static_cast<double>(o.zipf_exponent));
  }
  std::vector<double> cum(static_cast<std::size_t>(T) + 1, 0.0);
  for (int j = 0; j < T; ++j) cum[j + 1] = cum[j] + (j < o.sink_tokens ? 0.0 : pop[j]);

  // Value outlier channels and massive activations, from a stream of their own.
  KVSLIM_CHECK(o.value_outlier_channels >= 0 && o.value_outlier_channels <= d && o.massive_tokens >= 0 &&
                   o.massive_tokens <= T,
               ErrorCode::kInvalidArgument, "synthetic: value_outlier_channels {} / massive_tokens {} out of range",
               o.value_outlier_channels, o.massive_tokens);
  Rng extra{o.seed * 0xd1342543de82ef95ull + static_cast<std::uint64_t>(layer) * 0x9e3779b97f4a7c15ull + 7};
  {
    std::vector<int> ch(static_cast<std::size_t>(d));
    for (int c = 0; c < d; ++c) ch[c] = c;
    for (int i = 0; i < o.value_outlier_channels; ++i)
      std::swap(ch[i], ch[i + static_cast<int>(extra.next() % static_cast<std::uint64_t>(d - i))]);
    L.value_outlier_channels.assign(ch.begin(), ch.begin() + o.value_outlier_channels);
    std::vector<int> tok(static_cast<std::size_t>(T));
    for (int t = 0; t < T; ++t) tok[t] = t;
    for (int i = 1; i < o.massive_tokens; ++i)
      std::swap(tok[i], tok[i + static_cast<int>(extra.next() % static_cast<std::uint64_t>(T - i))]);
    L.massive_tokens.assign(tok.begin(), tok.begin() + o.massive_tokens);
    std::sort(L.massive_tokens.begin(), L.massive_tokens.end());
  }
  std::vector<float> noise(static_cast<std::size_t>(T) * d), mean(d), scale(d), inv_var(d), sink_dir(d), u(d);
  for (int h = 0; h < o.kv_heads; ++h) {
    // Per-channel statistics: scales log-normal around 1, outliers o.outlier_scale x.
    for (int c = 0; c < d; ++c) {
      scale[c] = std::exp(0.25f * rng.normal());
      mean[c] = 0.5f * rng.normal() * scale[c];
    }
    for (int c : L.outlier_channels) {
      if (o.outliers_consistent) {
        mean[c] = (mean[c] < 0.0f ? -1.0f : 1.0f) * o.outlier_scale * scale[c];
      } else {
        scale[c] *= o.outlier_scale;
        mean[c] *= o.outlier_scale;
      }
    }
    // RoPE mixes the two channels of a pair, so whiten with the pair's mean variance.
    for (int i = 0; i < half; ++i) {
      const float var = 0.5f * (scale[i] * scale[i] + scale[i + half] * scale[i + half]);
      inv_var[i] = inv_var[i + half] = 1.0f / var;
    }
    float norm = 0.0f;
    for (int c = 0; c < d; ++c) {
      sink_dir[c] = rng.normal();
      norm += sink_dir[c] * sink_dir[c];
    }
    for (int c = 0; c < d; ++c) sink_dir[c] /= std::sqrt(norm);

    float* K = L.k.data() + static_cast<std::size_t>(h) * T * d;
    float* V = L.v.data() + static_cast<std::size_t>(h) * T * d;
    for (int t = 0; t < T; ++t) {
      float* z = noise.data() + static_cast<std::size_t>(t) * d;
      float* kr = K + static_cast<std::size_t>(t) * d;
      for (int c = 0; c < d; ++c) {
        z[c] = scale[c] * rng.normal();
        kr[c] = mean[c] + z[c];
      }
      if (t < o.sink_tokens)
        for (int c = 0; c < d; ++c) kr[c] += 4.0f * std::sqrt(static_cast<float>(d)) * sink_dir[c];
      rope_half(kr, d, t, o.rope_theta);
      for (int c = 0; c < d; ++c)
        V[static_cast<std::size_t>(t) * d + c] = (0.8f + 0.4f * static_cast<float>(c % 5) / 4.0f) * rng.normal();
      for (int c : L.value_outlier_channels) V[static_cast<std::size_t>(t) * d + c] *= o.value_outlier_scale;
    }
    // Massive activations: two channels per head (not outlier channels), a random sign each.
    if (!L.massive_tokens.empty()) {
      std::vector<float> mag(scale.begin(), scale.end());
      std::nth_element(mag.begin(), mag.begin() + d / 2, mag.end());
      const float big = o.massive_scale * mag[static_cast<std::size_t>(d / 2)];
      const int c0 = static_cast<int>(extra.next() % static_cast<std::uint64_t>(half / 2));
      const int chans[2] = {c0, c0 + half / 2};
      for (int t : L.massive_tokens)
        for (int c : chans) {
          const float sign = (extra.next() >> 63) ? -1.0f : 1.0f;
          K[static_cast<std::size_t>(t) * d + c] += sign * big;
          V[static_cast<std::size_t>(t) * d + c] += sign * o.massive_scale;
        }
    }

    // A target j adds the whitened, rotated noise of key j to the query: its logit then rises
    // by about `focus` while unrelated keys (independent noise) move by only focus/sqrt(d).
    const float a = o.focus / std::sqrt(static_cast<float>(d));
    std::vector<int> picked;
    const int group = o.q_heads / o.kv_heads;
    for (int g = 0; g < group; ++g) {
      float* Q = L.q.data() + static_cast<std::size_t>(h * group + g) * T * d;
      for (int t = 0; t < T; ++t) {
        float* qr = Q + static_cast<std::size_t>(t) * d;
        for (int c = 0; c < d; ++c) qr[c] = 0.3f * rng.normal();
        // Adds key j's whitened noise with weight w: its logit rises by about w * sqrt(d)
        // (w = a gives `focus`).
        auto target = [&](int j, float w) {
          const float* z = noise.data() + static_cast<std::size_t>(j) * d;
          for (int c = 0; c < d; ++c) u[c] = z[c] * inv_var[c];
          rope_half(u.data(), d, j, o.rope_theta);
          // Keep targets orthogonal to the sink direction: the sink key is large along
          // it, and a random projection would make the sink logit noisy.
          float proj = 0.0f;
          for (int c = 0; c < d; ++c) proj += u[c] * sink_dir[c];
          for (int c = 0; c < d; ++c) qr[c] += w * (u[c] - proj * sink_dir[c]);
        };
        if (retrieval_layer_head[h] && o.period > 0 && t >= o.period) {
          const float ar = o.retrieval_focus / std::sqrt(static_cast<float>(d));
          target(t - o.period + 1, ar);
          target(t - o.period, 0.5f * ar);
        } else if (const int lo = o.local_window > 0 ? std::max(0, t - o.local_window + 1) : 0;
                   t >= o.sink_tokens && cum[t + 1] - cum[lo] > 0.0) {
          // Distinct targets (a repeated pick would stack its logit to 2x focus and more).
          picked.clear();
          for (int m = 0, tries = 0; m < o.targets_per_query && tries < 8 * o.targets_per_query; ++tries) {
            const double r = cum[lo] + rng.uniform() * (cum[t + 1] - cum[lo]);
            int j = static_cast<int>(std::upper_bound(cum.begin() + lo, cum.begin() + t + 2, r) - cum.begin()) - 1;
            j = std::clamp(j, std::max(lo, o.sink_tokens), t);
            if (std::find(picked.begin(), picked.end(), j) != picked.end()) continue;
            picked.push_back(j);
            ++m;
            target(j, a);
          }
        }
        // The sink: first tokens carry sink_dir strongly; q . k0 / sqrt(d) ~ sink_strength.
        for (int c = 0; c < d; ++c) qr[c] += o.sink_strength / 4.0f * sink_dir[c];
      }
    }
  }
  return L;
}

}  // namespace kvslim::testing
