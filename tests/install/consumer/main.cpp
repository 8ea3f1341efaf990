// A consumer built against an installed kvslim: appends and attends through a KIVI cache.
#include <cmath>
#include <cstdio>
#include <vector>

#include <kvslim/kvslim.h>

int main() {
  kvslim::KVCache cache(kvslim::CacheConfig{1, 2, 1, 16, 64, "kivi:kbits=4,vbits=4,residual=0"});
  std::vector<float> k(40 * 16), v(40 * 16), q(2 * 16, 0.1f), out(2 * 16);
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = std::sin(static_cast<float>(i));
    v[i] = std::cos(static_cast<float>(i));
  }
  cache.append(0, kvslim::TensorView<const float>(k.data(), {1, 40, 16}),
               kvslim::TensorView<const float>(v.data(), {1, 40, 16}));
  cache.append(0, kvslim::TensorView<const float>(k.data(), {1, 1, 16}),
               kvslim::TensorView<const float>(v.data(), {1, 1, 16}));
  cache.attend(0, kvslim::TensorView<const float>(q.data(), {2, 1, 16}), kvslim::TensorView<float>(out.data(), {2, 1, 16}));
  const auto st = cache.stats();
  if (st.total_tokens != 41 || !std::isfinite(out[0])) return 1;
  std::printf("kvslim consumer ok (%s, %.2f bits/value)\n", kvslim::kVersion, st.bits_per_value);
  return 0;
}
