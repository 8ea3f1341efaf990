// The parts of the fused block kernels (kernel_table.h, "fused block attention") that are
// the same for every ISA: applying a BlockMask and the order of the steps. Plain C++ with
// no ISA assumptions; included by every kernel translation unit inside its own namespace
// (scalar, avx2, avx512), after kvslim/kernels/kernel_table.h.

// Dead slots, then biases, then the causal rule (kernel_table.h, BlockMask).
inline void mask_block_impl(float* s, int nq, int ntok, const BlockMask& mk) noexcept {
  const float ninf = -__builtin_inff();
  const int words = (ntok + 63) / 64;
  if (mk.dead)
    for (int w = 0; w < words; ++w)
      for (std::uint64_t bits = mk.dead[w]; bits; bits &= bits - 1) {
        const int j = w * 64 + __builtin_ctzll(bits);
        for (int r = 0; r < nq; ++r) s[static_cast<std::ptrdiff_t>(r) * ntok + j] = ninf;
      }
  if (mk.bias)
    for (int r = 0; r < nq; ++r)
      for (int j = 0; j < ntok; ++j) s[static_cast<std::ptrdiff_t>(r) * ntok + j] += mk.bias[j];
  // The block's live slots have indices below first + ntok: when that is within the first
  // row's limit, every row sees all of them (decode: always).
  if (mk.first + ntok <= mk.limit0) return;
  for (int r = 0; r < nq; ++r) {
    const std::int64_t limit = mk.limit0 + (r % mk.nquery);
    std::int64_t index = mk.first;
    float* sr = s + static_cast<std::ptrdiff_t>(r) * ntok;
    for (int j = 0; j < ntok; ++j) {
      if (mk.dead && ((mk.dead[j >> 6] >> (j & 63)) & 1u)) continue;
      if (index++ >= limit) sr[j] = ninf;
    }
  }
}

// OnlineState::prefetch issued in kParts bursts of cache lines, one before each step of a
// fused kernel: a page's worth at once (83 lines for a KIVI-4 page at head_dim 128, 256 for
// f16) would wait on the core's 16 L1 fill buffers while no arithmetic runs.
struct PrefetchBursts {
  static constexpr int kParts = 4;
  const char* p;
  const char* end;
  std::size_t part;
  explicit PrefetchBursts(const OnlineState& st) noexcept
      : p(static_cast<const char*>(st.prefetch)),
        end(p ? p + st.prefetch_bytes : nullptr),
        part((st.prefetch_bytes / kParts + 63) & ~std::size_t{63}) {}
  void next() noexcept {
    const char* e = p + part < end ? p + part : end;
    for (; p < e; p += 64) __builtin_prefetch(p, 0, 3);
  }
};

// scores(s) -> mask -> softmax(s, m, l, o) -> probs copy -> accum(p = s, o): the contract of
// every fused kernel. Each step is an ISA kernel passed in by the translation unit.
template <class Scores, class Softmax, class Accum>
inline void fused_block(int nq, int ntok, const BlockMask& mk, OnlineState& st, Scores&& scores, Softmax&& softmax,
                        Accum&& accum) noexcept {
  PrefetchBursts pf(st);
  pf.next();
  scores(st.s);
  pf.next();
  mask_block_impl(st.s, nq, ntok, mk);
  softmax(st.s, st.m, st.l, st.o);
  if (st.probs)
    for (int r = 0; r < nq; ++r)
      __builtin_memcpy(st.probs + r * st.probs_stride, st.s + static_cast<std::ptrdiff_t>(r) * ntok,
                       static_cast<std::size_t>(ntok) * sizeof(float));
  pf.next();
  accum(st.s, st.o);
  pf.next();
}
