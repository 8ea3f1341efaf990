// Codec's default attention path: the two halves every codec provides, composed with the
// kernel table's mask and softmax kernels (the contract of kernel_table.h's fused kernels).
#include <cstring>

#include "kvslim/kernels/kernel_table.h"
#include "kvslim/policy/policy.h"

namespace kvslim {

std::size_t Codec::prepared_bytes(int /*nq*/, int /*d*/) const { return 0; }

void Codec::prepare(const kernels::KernelTable& /*kt*/, const float* /*q*/, int /*nq*/, int /*d*/,
                    std::byte* /*prepared*/) const {}

void Codec::attend_page(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* q,
                        std::byte* /*prepared*/, int nq, const kernels::BlockMask& mask,
                        kernels::OnlineState& st) const {
  const char* pf = static_cast<const char*>(st.prefetch);
  for (std::size_t o = 0; pf && o < st.prefetch_bytes; o += 64) __builtin_prefetch(pf + o, 0, 3);
  scores(kt, page, ntok, d, q, nq, st.s);
  kt.mask_block(st.s, nq, ntok, mask);
  kt.softmax_block(st.s, nq, ntok, st.m, st.l, st.o, d);
  if (st.probs)
    for (int r = 0; r < nq; ++r)
      std::memcpy(st.probs + r * st.probs_stride, st.s + static_cast<std::size_t>(r) * ntok,
                  static_cast<std::size_t>(ntok) * sizeof(float));
  accumulate(kt, page, ntok, d, st.s, nq, st.o);
}

void Codec::finish(const kernels::KernelTable& /*kt*/, std::byte* /*prepared*/, int /*nq*/, int /*d*/,
                   kernels::OnlineState& /*st*/) const {}

}  // namespace kvslim
