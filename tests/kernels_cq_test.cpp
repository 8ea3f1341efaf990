// CQ kernels (kernel_table.h, "CQ"): every kernel table built and supported here (only the
// forced one when KVSLIM_ISA is set) against the scalar table and against attention in double
// precision over the decoded rows (decode = centroid lookup).
// Shapes (C, B): (4,2), (8,1) [256 centroids], (2,2), (4,1) [16], (1,2), (1,1); head_dim
// {8, 16, 64, 128}; rows nq {1, 2, 3, 4, 8}; tokens 1..70 per page (tails of every vector and
// token block); 3 pages carrying the online state and the weight tables, with a bias that
// rises page by page (the running max grows, so cq_accum rescales weights to a new max) or
// falls; dead slots, biases, causal limits that cut a page, a fully dead first page.
// Tolerances (written in kernel_table.h, "CQ"):
//   cq_scores, cq_accum   bit-identical to the scalar table (same additions in the same order)
//   cq_tables, cq_finish  |x - scalar| <= 1e-6 * (sum of |terms|)
//   attend (m)            bit-identical logits, so m is identical
//   attend (l, output)    relative 2e-6 against scalar (the vector exp, a few ulp of its
//                         argument, and float sums in another order); probabilities p within
//                         2e-6 * p * (1 + |ln p|)
//   vs double             logits |s - ref| <= 2e-6 * sum_c |q_c k_c|; the output o / l of the
//                         whole pipeline (cq_tables, attend_cq per page, cq_finish) within
//                         1e-5 relative L2 of exact softmax attention over the decoded rows.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "kvslim/cpu/isa.h"
#include "kvslim/kernels/kernel_table.h"
#include "kvslim/policy/codebook.h"

namespace kvslim {
void PrintTo(Isa isa, std::ostream* os) { *os << isa_name(isa); }
}  // namespace kvslim

using namespace kvslim;
using kernels::BlockMask;
using kernels::CqPage;
using kernels::CqTables;
using kernels::KernelTable;
using kernels::OnlineState;

namespace {

const KernelTable& ref() { return kernels::scalar::kTable; }
constexpr float kNinf = -std::numeric_limits<float>::infinity();

std::vector<Isa> isas() {
  if (const char* env = std::getenv("KVSLIM_ISA"); env && *env) return {active_isa()};
  return available_isas();
}

struct Shape {
  int C, B;
};
const Shape kShapes[] = {{4, 2}, {8, 1}, {2, 2}, {4, 1}, {1, 2}, {1, 1}};
const int kDims[] = {8, 16, 64, 128};
const int kRows[] = {1, 2, 3, 4, 8};
constexpr int kPages = 3;

std::vector<float> randn(std::size_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (auto& x : v) x = scale * nd(rng);
  return v;
}

unsigned code_of(const std::uint8_t* row, int g, int cbits) {
  const int bit = g * cbits;
  return (static_cast<unsigned>(row[bit >> 3]) >> (bit & 7)) & ((1u << cbits) - 1u);
}

// One run: codebooks, queries, kPages pages of codes and masks.
struct Case {
  int d, nq, ntok, C, cb, groups, count, rb;
  int trend;  // +1: the bias rises page by page; -1: falls; 0: none
  std::vector<float> kcen, vcen, q;  // centroids [groups][count][C]; q [nq][d]
  std::vector<std::vector<std::uint8_t>> kc, vc;
  std::vector<std::vector<std::uint64_t>> dead;
  std::vector<std::vector<float>> bias;
  std::vector<BlockMask> masks;
  std::string name;

  Case(Shape s, int d_, int nq_, int ntok_, unsigned seed)
      : d(d_), nq(nq_), ntok(ntok_), C(s.C), cb(s.C * s.B), groups(d_ / s.C), count(1 << (s.C * s.B)),
        rb(kernels::row_bytes(d_ / s.C, s.C * s.B)) {
    std::mt19937 rng(seed);
    trend = static_cast<int>(seed % 3) - 1;
    const int kind = static_cast<int>(seed / 3 % 4);  // 0 none, 1 dead + bias, 2 causal, 3 all of them
    kcen = randn(static_cast<std::size_t>(groups) * count * C, rng, 1.0f);
    vcen = randn(kcen.size(), rng, 1.0f);
    q = randn(static_cast<std::size_t>(nq) * d, rng, 2.0f / std::sqrt(static_cast<float>(d)));
    std::int64_t first = 0;
    for (int p = 0; p < kPages; ++p) {
      kc.emplace_back(static_cast<std::size_t>(ntok) * rb);
      vc.emplace_back(static_cast<std::size_t>(ntok) * rb);
      for (auto& b : kc.back()) b = static_cast<std::uint8_t>(rng());
      for (auto& b : vc.back()) b = static_cast<std::uint8_t>(rng());
      dead.emplace_back((ntok + 63) / 64, 0);
      bias.emplace_back(ntok, 0.0f);
      const bool all_dead = kind == 3 && p == 0;
      for (int j = 0; j < ntok; ++j) {
        if (all_dead || ((kind & 1) && rng() % 5 == 0)) dead[p][j >> 6] |= std::uint64_t{1} << (j & 63);
        bias[p][j] = static_cast<float>(trend * 1.5 * p) + ((kind & 1) ? 0.3f * static_cast<float>(rng() % 7) - 0.9f : 0.0f);
      }
      BlockMask m;
      m.dead = (kind & 1) ? dead[p].data() : nullptr;
      m.bias = trend != 0 || (kind & 1) ? bias[p].data() : nullptr;
      if (kind >= 2) {
        m.first = first;
        m.nquery = nq > 1 ? nq / 2 + 1 : 1;
        m.limit0 = first + ntok / 2;  // cuts this page for some rows
      }
      int live = 0;
      for (int j = 0; j < ntok; ++j) live += !((dead[p][j >> 6] >> (j & 63)) & 1u) || !m.dead;
      first += live;
      masks.push_back(m);
    }
    name = fmt::format("C {} B {} d {} nq {} ntok {} trend {} mask {}", C, s.B, d, nq, ntok, trend, kind);
  }
  CqPage page(int p) const { return {kc[p].data(), vc[p].data(), groups, cb, groups, cb}; }
  // Decoded key or value row j of page p.
  const float* cen(bool value, int p, int j, int g) const {
    const auto& codes = value ? vc[p] : kc[p];
    const unsigned k = code_of(codes.data() + static_cast<std::size_t>(j) * rb, g, cb);
    return (value ? vcen : kcen).data() + (static_cast<std::size_t>(g) * count + k) * C;
  }
  bool visible(int p, int j, int r) const {
    const BlockMask& m = masks[p];
    if (m.dead && ((m.dead[j >> 6] >> (j & 63)) & 1u)) return false;
    if (m.limit0 == BlockMask::kNoLimit) return true;
    std::int64_t index = m.first;
    for (int i = 0; i < j; ++i) index += !(m.dead && ((m.dead[i >> 6] >> (i & 63)) & 1u));
    return index < m.limit0 + r % m.nquery;
  }
  double logit(int p, int j, int r) const {  // double, bias included
    double s = 0.0;
    for (int g = 0; g < groups; ++g) {
      const float* c = cen(false, p, j, g);
      for (int i = 0; i < C; ++i) s += static_cast<double>(q[static_cast<std::size_t>(r) * d + g * C + i]) * c[i];
    }
    return s + (masks[p].bias ? masks[p].bias[j] : 0.0f);
  }
  double logit_abs(int p, int j, int r) const {  // sum_c |q_c k_c|
    double s = 0.0;
    for (int g = 0; g < groups; ++g) {
      const float* c = cen(false, p, j, g);
      for (int i = 0; i < C; ++i) s += std::fabs(static_cast<double>(q[static_cast<std::size_t>(r) * d + g * C + i]) * c[i]);
    }
    return s;
  }
};

// The outputs of one pipeline run on a table.
struct Run {
  std::vector<float> score, m, l, o;               // tables after cq_tables; final state
  std::vector<std::vector<float>> s, probs, wpage, mpage;  // per page: raw logits (cq_scores), probs, weights, running max
};

// with_vcen: the tables name the value centroids, so attend_cq may add the value side straight
// into o (kernel_table.h); without them it must use the weights.
Run run(const KernelTable& kt, const Case& c, bool with_vcen = false) {
  Run out;
  const std::size_t entries = static_cast<std::size_t>(c.groups) * c.count * c.nq;
  out.score.resize(entries);
  kt.cq_tables(c.q.data(), c.nq, c.kcen.data(), c.groups, c.count, c.C, out.score.data());
  std::vector<float> weight(entries, 0.0f), wmax(c.nq, kNinf), scratch(static_cast<std::size_t>(c.nq) * c.ntok);
  out.m.assign(c.nq, kNinf);
  out.l.assign(c.nq, 0.0f);
  out.o.assign(static_cast<std::size_t>(c.nq) * c.d, 0.0f);
  const CqTables t{out.score.data(), weight.data(), wmax.data(), with_vcen ? c.vcen.data() : nullptr, with_vcen ? c.C : 0};
  for (int p = 0; p < kPages; ++p) {
    out.s.emplace_back(static_cast<std::size_t>(c.nq) * c.ntok);
    kt.cq_scores(c.nq, c.page(p), t, c.ntok, out.s.back().data());
    out.probs.emplace_back(static_cast<std::size_t>(c.nq) * c.ntok, -1.0f);
    OnlineState st{out.m.data(), out.l.data(), out.o.data(), scratch.data()};
    st.probs = out.probs.back().data();
    st.probs_stride = c.ntok;
    kt.attend_cq(c.nq, c.page(p), t, c.ntok, c.d, c.masks[p], st);
    out.wpage.push_back(weight);
    out.mpage.push_back(out.m);
  }
  kt.cq_finish(weight.data(), wmax.data(), out.m.data(), c.nq, c.vcen.data(), c.groups, c.count, c.C, out.o.data(), c.d);
  for (std::size_t i = 0; i < weight.size(); ++i) EXPECT_EQ(weight[i], 0.0f) << "cq_finish clears the weights";
  for (int r = 0; r < c.nq; ++r) EXPECT_EQ(wmax[r], kNinf) << "cq_finish resets wmax";
  return out;
}

double rel_l2(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / (den > 0.0 ? den : 1.0));
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

class Cq : public ::testing::TestWithParam<Isa> {
 protected:
  const KernelTable& kt() const { return *kernels::table_for(static_cast<int>(GetParam())); }
};

// One case on the table under test: against the scalar table and the double reference.
void check_case(const KernelTable& kt, const Case& c) {
  SCOPED_TRACE(c.name);
  const Run a = run(kt, c), b = run(ref(), c), av = run(kt, c, true);
  // cq_tables: against scalar and double.
  for (int g = 0; g < c.groups; ++g)
    for (int k = 0; k < c.count; ++k)
      for (int r = 0; r < c.nq; ++r) {
        const std::size_t e = (static_cast<std::size_t>(g) * c.count + k) * c.nq + r;
        double exact = 0.0, mag = 0.0;
        for (int i = 0; i < c.C; ++i) {
          const double t = static_cast<double>(c.q[static_cast<std::size_t>(r) * c.d + g * c.C + i]) *
                           c.kcen[(static_cast<std::size_t>(g) * c.count + k) * c.C + i];
          exact += t;
          mag += std::fabs(t);
        }
        ASSERT_LE(std::fabs(a.score[e] - b.score[e]), 1e-6 * mag + 1e-30) << "cq_tables vs scalar, entry " << e;
        ASSERT_LE(std::fabs(a.score[e] - exact), 1e-6 * mag + 1e-30) << "cq_tables vs double, entry " << e;
      }
  const bool same_tables = a.score == b.score;
  for (int p = 0; p < kPages; ++p)
    for (int r = 0; r < c.nq; ++r)
      for (int j = 0; j < c.ntok; ++j) {
        const std::size_t i = static_cast<std::size_t>(r) * c.ntok + j;
        if (same_tables) {
          ASSERT_TRUE(same_bits(a.s[p][i], b.s[p][i]))
              << "cq_scores vs scalar, page " << p << " row " << r << " token " << j << ": " << a.s[p][i] << " vs " << b.s[p][i];
        }
        const double exact = c.logit(p, j, r) - (c.masks[p].bias ? c.masks[p].bias[j] : 0.0f);
        ASSERT_LE(std::fabs(a.s[p][i] - exact), 2e-6 * c.logit_abs(p, j, r) + 1e-30)
            << "cq_scores vs double, page " << p << " row " << r << " token " << j;
        // p = exp(s - m): the exp is good to a few ulp of its argument (relative error grows with
        // |s - m| = |ln p|), and a logit or running max that differs by e moves p by a factor of
        // about 1 + e. Logits differ when the tables do (FMA vs multiply-add), by an ulp of the
        // logit's size, which can exceed the ulp of p.
        const double pb = b.probs[p][i];
        const auto gap = [](float x, float y) { return x == y ? 0.0 : std::fabs(static_cast<double>(x) - y); };  // -inf == -inf
        const double shift = gap(a.s[p][i], b.s[p][i]) + gap(a.mpage[p][r], b.mpage[p][r]);
        ASSERT_LE(std::fabs(a.probs[p][i] - pb),
                  pb * (2e-6 * (1.0 + std::fabs(std::log(pb > 0 ? pb : 1.0))) + 1.01 * shift) + 1e-30)
            << "probs copy vs scalar, page " << p << " row " << r << " token " << j;
      }
  for (int r = 0; r < c.nq; ++r) {
    if (same_tables) {
      ASSERT_TRUE(same_bits(a.m[r], b.m[r])) << "m row " << r;
    }
    // l sums p over the row: the same allowance as p for logits and maxima that differ when
    // the tables do (here the largest gap of the row over all pages).
    double shift = 0.0;
    for (int p = 0; p < kPages; ++p) {
      double sg = 0.0;
      for (int j = 0; j < c.ntok; ++j) {
        const std::size_t i = static_cast<std::size_t>(r) * c.ntok + j;
        if (a.s[p][i] != b.s[p][i]) sg = std::max(sg, std::fabs(static_cast<double>(a.s[p][i]) - b.s[p][i]));
      }
      const double mg = a.mpage[p][r] == b.mpage[p][r] ? 0.0 : std::fabs(static_cast<double>(a.mpage[p][r]) - b.mpage[p][r]);
      shift = std::max(shift, sg + mg);
    }
    ASSERT_LE(std::fabs(a.l[r] - b.l[r]), std::fabs(b.l[r]) * (2e-6 + 1.01 * shift))
        << "l row " << r << " (m " << a.m[r] << " vs " << b.m[r] << ")";
  }
  // Weights after each page against the scalar table (the exp of the softmax differs by a few
  // ulp, so not bit-identical here; the standalone cq_accum test below is).
  for (int p = 0; p < kPages; ++p) {
    double num = 0.0, den = 0.0;
    for (std::size_t i = 0; i < a.wpage[p].size(); ++i) {
      num += (a.wpage[p][i] - b.wpage[p][i]) * static_cast<double>(a.wpage[p][i] - b.wpage[p][i]);
      den += static_cast<double>(b.wpage[p][i]) * b.wpage[p][i];
    }
    ASSERT_LE(std::sqrt(num), 2e-6 * std::sqrt(den) + 1e-30) << "weights after page " << p;
  }
  // Normalized output: against scalar and exact attention over the decoded rows.
  for (int r = 0; r < c.nq; ++r) {
    std::vector<double> oa(c.d), ob(c.d), oe(c.d, 0.0);
    for (int i = 0; i < c.d; ++i) {
      oa[i] = b.l[r] > 0 ? a.o[static_cast<std::size_t>(r) * c.d + i] / static_cast<double>(a.l[r]) : a.o[static_cast<std::size_t>(r) * c.d + i];
      ob[i] = b.l[r] > 0 ? b.o[static_cast<std::size_t>(r) * c.d + i] / static_cast<double>(b.l[r]) : b.o[static_cast<std::size_t>(r) * c.d + i];
    }
    double mx = -std::numeric_limits<double>::infinity(), sum = 0.0;
    for (int p = 0; p < kPages; ++p)
      for (int j = 0; j < c.ntok; ++j)
        if (c.visible(p, j, r)) mx = std::max(mx, c.logit(p, j, r));
    for (int p = 0; p < kPages; ++p)
      for (int j = 0; j < c.ntok; ++j) {
        if (!c.visible(p, j, r)) continue;
        const double w = std::exp(c.logit(p, j, r) - mx);
        sum += w;
        for (int g = 0; g < c.groups; ++g) {
          const float* v = c.cen(true, p, j, g);
          for (int i = 0; i < c.C; ++i) oe[g * c.C + i] += w * v[i];
        }
      }
    if (sum == 0.0) {  // the row saw nothing: o stays 0, l 0, m -inf
      EXPECT_EQ(a.l[r], 0.0f);
      EXPECT_EQ(a.m[r], kNinf);
      for (int i = 0; i < c.d; ++i) ASSERT_EQ(a.o[static_cast<std::size_t>(r) * c.d + i], 0.0f);
      continue;
    }
    for (auto& x : oe) x /= sum;
    ASSERT_NEAR(a.l[r] * std::exp(static_cast<double>(a.m[r]) - mx), sum, 1e-5 * sum) << "l row " << r;
    ASSERT_LE(rel_l2(oa, ob), 2e-6) << "output vs scalar, row " << r;
    ASSERT_LE(rel_l2(oa, oe), 1e-5) << "output vs double, row " << r;
    // With the value centroids in the tables: the same softmax, and the same output.
    ASSERT_TRUE(same_bits(av.m[r], a.m[r]) && same_bits(av.l[r], a.l[r])) << "m, l with vcen, row " << r;
    std::vector<double> ov(c.d);
    for (int i = 0; i < c.d; ++i) ov[i] = av.o[static_cast<std::size_t>(r) * c.d + i] / static_cast<double>(av.l[r]);
    ASSERT_LE(rel_l2(ov, ob), 2e-6) << "output with vcen vs scalar, row " << r;
    ASSERT_LE(rel_l2(ov, oe), 1e-5) << "output with vcen vs double, row " << r;
  }
  // Standalone cq_scores on the scalar tables and cq_accum on the scalar run's probabilities
  // (same inputs): bit-identical logits and weights.
  {
    std::vector<float> sa(static_cast<std::size_t>(c.nq) * c.ntok), sb(sa.size());
    const CqTables t{b.score.data(), nullptr, nullptr};
    for (int p = 0; p < kPages; ++p) {
      kt.cq_scores(c.nq, c.page(p), t, c.ntok, sa.data());
      ref().cq_scores(c.nq, c.page(p), t, c.ntok, sb.data());
      for (std::size_t i = 0; i < sa.size(); ++i)
        ASSERT_TRUE(same_bits(sa[i], sb[i])) << "cq_scores vs scalar, page " << p << " row " << i / c.ntok << " token " << i % c.ntok << ": " << sa[i] << " vs " << sb[i];
    }
  }
  {
    const std::size_t entries = static_cast<std::size_t>(c.groups) * c.count * c.nq;
    std::vector<float> wa(entries, 0.0f), wb(entries, 0.0f), ma(c.nq, kNinf), mb(c.nq, kNinf), m(c.nq);
    const CqTables ta{b.score.data(), wa.data(), ma.data()}, tb{b.score.data(), wb.data(), mb.data()};
    for (int p = 0; p < kPages; ++p) {
      for (int r = 0; r < c.nq; ++r) m[r] = (r == 1 && p == 0) ? kNinf : static_cast<float>(c.trend * p) + 0.25f * static_cast<float>(r);
      kt.cq_accum(b.probs[p].data(), c.nq, c.page(p), ta, m.data(), c.ntok);
      ref().cq_accum(b.probs[p].data(), c.nq, c.page(p), tb, m.data(), c.ntok);
      for (std::size_t i = 0; i < entries; ++i)
        ASSERT_TRUE(same_bits(wa[i], wb[i])) << "cq_accum vs scalar, page " << p << " entry " << i << ": " << wa[i] << " vs " << wb[i];
      for (int r = 0; r < c.nq; ++r) ASSERT_TRUE(same_bits(ma[r], mb[r])) << "cq_accum wmax row " << r;
    }
  }
}

}  // namespace

TEST(CqTable, EveryTableHasTheEntries) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    const KernelTable* t = kernels::table_for(static_cast<int>(isa));
    if (!t) continue;  // not built into this library
    EXPECT_NE(t->cq_tables, nullptr) << isa_name(isa);
    EXPECT_NE(t->cq_scores, nullptr) << isa_name(isa);
    EXPECT_NE(t->cq_accum, nullptr) << isa_name(isa);
    EXPECT_NE(t->attend_cq, nullptr) << isa_name(isa);
    EXPECT_NE(t->cq_finish, nullptr) << isa_name(isa);
    EXPECT_NE(t->cq_encode, nullptr) << isa_name(isa);
  }
}

TEST_P(Cq, MatchesScalarAndDoubleReference) {
  int cases = 0;
  unsigned seed = 1;
  for (const Shape& s : kShapes)
    for (int d : kDims) {
      if (d % s.C) continue;
      for (int nq : kRows)
        for (int ntok = 1; ntok <= 70; ++ntok) {
          // Every ntok for the decode shape, a spread of tails elsewhere (test time).
          if (!(d == 128 && nq == 4) && ntok % 7 != 1 && ntok != 32 && ntok != 64 && ntok != 70) continue;
          const Case c(s, d, nq, ntok, seed++);
          check_case(kt(), c);
          ++cases;
          if (HasFailure()) FAIL() << "stopping at the first failing case";
        }
    }
  // Long pages: 8-bit codes switch to the group-major walk at 128 tokens and tile it by 256
  // (cq_simd-inl.h); d = 40 gives 10 and 5 groups, i.e. a pass of fewer than 4 groups.
  for (const Shape& s : kShapes)
    for (int d : {40, 128}) {
      if (d % s.C) continue;
      for (int nq : kRows)
        for (int ntok : {127, 128, 257, 600}) {
          const Case c(s, d, nq, ntok, seed++);
          check_case(kt(), c);
          ++cases;
          if (HasFailure()) FAIL() << "stopping at the first failing case";
        }
    }
  std::printf("%s: %d cases\n", isa_name(GetParam()), cases);
}

// cq_encode: per group the code kvslim::nearest gives (the same float distance, lowest index
// on ties), packed LSB-first, for every shape; with duplicated centroids (ties), rows equal to
// a centroid, and a far outlier.
TEST_P(Cq, EncodeWritesTheNearestCentroidCodes) {
  const int shapes[][2] = {{1, 1}, {1, 2}, {1, 4}, {2, 1}, {2, 2}, {2, 4}, {4, 1}, {4, 2}, {8, 1}};
  std::mt19937 rng(5);
  int rows = 0;
  for (const auto& sh : shapes) {
    const int C = sh[0], cb = C * sh[1], count = 1 << cb;
    for (int d : {8, 40, 128}) {
      if (d % C) continue;
      const int groups = d / C, rb = kernels::row_bytes(groups, cb);
      auto cen = randn(static_cast<std::size_t>(groups) * count * C, rng, 1.0f);
      for (int g = 0; g < groups; ++g)  // ties: centroid count-1 repeats centroid 1 (if distinct)
        if (count > 2)
          std::memcpy(&cen[(static_cast<std::size_t>(g) * count + count - 1) * C], &cen[(static_cast<std::size_t>(g) * count + 1) * C],
                      sizeof(float) * C);
      for (int j = 0; j < 40; ++j) {
        auto x = randn(static_cast<std::size_t>(d), rng, 1.2f);
        if (j % 5 == 1)  // on a centroid (a duplicated one for some groups)
          for (int g = 0; g < groups; ++g)
            std::memcpy(&x[static_cast<std::size_t>(g) * C], &cen[(static_cast<std::size_t>(g) * count + (g + j) % count) * C], sizeof(float) * C);
        if (j == 7) x[0] = 1e6f;
        std::vector<std::uint8_t> row(static_cast<std::size_t>(rb) + 1, 0);
        row[rb] = 0xA5;  // past the row: untouched
        kt().cq_encode(x.data(), cen.data(), groups, count, C, row.data());
        ASSERT_EQ(row[rb], 0xA5) << "cq_encode wrote past the row";
        for (int g = 0; g < groups; ++g) {
          const std::uint32_t want = nearest(&x[static_cast<std::size_t>(g) * C], &cen[static_cast<std::size_t>(g) * count * C], count, C);
          const int bit = g * cb;
          const unsigned got = (static_cast<unsigned>(row[bit >> 3]) >> (bit & 7)) & ((1u << cb) - 1u);
          ASSERT_EQ(got, want) << "C " << C << " B " << sh[1] << " d " << d << " row " << j << " group " << g;
        }
        ++rows;
      }
    }
  }
  EXPECT_GT(rows, 500);
}

// cq_finish on its own: a row whose wmax is -inf adds nothing; the others add
// exp(wmax - m) * weights . centroids.
TEST_P(Cq, FinishScalesToTheRunningMax) {
  const int groups = 32, count = 256, C = 4, nq = 4, d = 128;
  std::mt19937 rng(7);
  auto cen = randn(static_cast<std::size_t>(groups) * count * C, rng, 1.0f);
  auto w0 = randn(static_cast<std::size_t>(groups) * count * nq, rng, 1.0f);
  for (std::size_t i = 0; i < w0.size(); ++i)  // row 1 (wmax -inf) has seen nothing: weights 0
    w0[i] = i % nq == 1 || rng() % 3 == 0 ? 0.0f : std::fabs(w0[i]);
  const float wmax0[nq] = {0.5f, kNinf, -1.0f, 2.0f}, m[nq] = {1.0f, 0.0f, -1.0f, 2.5f};
  auto o0 = randn(static_cast<std::size_t>(nq) * d, rng, 1.0f);
  std::vector<float> w = w0, o = o0, wm(wmax0, wmax0 + nq);
  kt().cq_finish(w.data(), wm.data(), m, nq, cen.data(), groups, count, C, o.data(), d);
  for (int r = 0; r < nq; ++r)
    for (int g = 0; g < groups; ++g)
      for (int i = 0; i < C; ++i) {
        double e = o0[static_cast<std::size_t>(r) * d + g * C + i], mag = std::fabs(e);
        if (wmax0[r] != kNinf)
          for (int k = 0; k < count; ++k) {
            const double t = std::exp(static_cast<double>(wmax0[r]) - m[r]) * w0[(static_cast<std::size_t>(g) * count + k) * nq + r] *
                             cen[(static_cast<std::size_t>(g) * count + k) * C + i];
            e += t;
            mag += std::fabs(t);
          }
        ASSERT_NEAR(o[static_cast<std::size_t>(r) * d + g * C + i], e, 2e-6 * mag) << "row " << r << " channel " << g * C + i;
      }
  for (float x : w) ASSERT_EQ(x, 0.0f);
  for (float x : wm) ASSERT_EQ(x, kNinf);
}

INSTANTIATE_TEST_SUITE_P(AllIsas, Cq, ::testing::ValuesIn(isas()),
                         [](const ::testing::TestParamInfo<Isa>& i) { return std::string(isa_name(i.param)); });
