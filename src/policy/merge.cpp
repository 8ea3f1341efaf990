// The merging family: KVMerger (include/kvslim/policy/merge/kvmerger.h) and its factory.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "check.h"
#include "kvslim/cache/token_store.h"
#include "kvslim/policy/eviction/h2o.h"
#include "kvslim/policy/merge/kvmerger.h"
#include "kvslim/policy/merge/minicache.h"
#include "policy/codecs.h"
#include "util/dot.h"

namespace kvslim {

std::string KVMerger::describe() const {
  return fmt::format("kvmerger:{},threshold={},sigma={}{}", o_.budget.describe(), o_.threshold, o_.sigma,
                     o_.keep_pivot ? ",keep=pivot" : "");
}

std::shared_ptr<const Scorer> KVMerger::implied_scorer() const { return std::make_shared<AccumulatedAttention>(); }

namespace {

using detail::dot_f64;
using detail::norm_f64;

// One entry of the merge step: an ordinary candidate or an earlier merged state, in position
// order.
struct Entry {
  std::int64_t index;     // logical index in the store
  std::int64_t position;  // a merged state sits at its pivot's position
  const float* k;
  const float* v;
  double count;  // tokens it stands for (1, or a merged state's weight)
  float importance;
};

}  // namespace

void KVMerger::merge(const kernels::KernelTable& kt, TokenStore& store) const {
  std::int64_t excess = store.size() - o_.budget.at(store.seen());
  if (excess <= 0) return;
  const int d = store.head_dim();
  const std::size_t ud = static_cast<std::size_t>(d);
  const Evictable range = evictable(store, o_.budget.recent);
  const auto imp = store.importance();
  const std::vector<std::int64_t> pos = store.positions();
  auto importance = [&](std::int64_t j) { return imp.empty() ? 0.0f : imp[static_cast<std::size_t>(j)]; };

  // Entries: the candidates (decoded once per step), and the merged states, which may absorb
  // their neighbours again, so a run leaving the recent window token by token still ends up in
  // one state. Never the compensation token of a razor stage.
  std::vector<std::int64_t> cand;
  for (std::int64_t j = range.first; j < range.end; ++j) cand.push_back(j);
  std::vector<float> ck(cand.size() * ud), cv(ck.size());
  store.rows(kt, cand, ck.data(), cv.data());
  std::vector<Entry> e;
  e.reserve(cand.size() + static_cast<std::size_t>(store.specials()));
  for (std::size_t i = 0; i < cand.size(); ++i)
    e.push_back({cand[i], pos[static_cast<std::size_t>(cand[i])], &ck[i * ud], &cv[i * ud], 1.0, importance(cand[i])});
  for (std::int64_t s = 0; s < store.specials(); ++s) {
    const std::int64_t j = store.specials_first() + s;
    if (j == store.compensation_index()) continue;
    e.push_back({j, pos[static_cast<std::size_t>(j)], store.special_key(s), store.special_value(s),
                 std::round(std::exp(static_cast<double>(store.special_log_weight(s)))), importance(j)});
  }
  // Positions are unique among the kept tokens (a merged state takes its pivot's), so the
  // order is total.
  std::sort(e.begin(), e.end(), [](const Entry& a, const Entry& b) { return a.position < b.position; });
  const std::size_t n = e.size();

  // Edges between neighbours whose key cosine passes the threshold; the `excess` most similar
  // are taken (ties: the older edge). Each taken edge joins two neighbours, so the head loses
  // exactly one entry per edge and ends at its budget when there are enough edges.
  std::vector<double> norm(n);
  for (std::size_t i = 0; i < n; ++i) norm[i] = norm_f64(e[i].k, d);
  std::vector<std::pair<double, std::size_t>> edges;  // (cosine, i): entries i - 1 and i
  for (std::size_t i = 1; i < n; ++i) {
    if (norm[i] == 0.0 || norm[i - 1] == 0.0) continue;  // a zero key is parallel to nothing
    const double c = dot_f64(e[i].k, e[i - 1].k, d) / (norm[i] * norm[i - 1]);
    if (c >= o_.threshold) edges.emplace_back(c, i);
  }
  const std::size_t take = std::min(edges.size(), static_cast<std::size_t>(excess));
  std::partial_sort(edges.begin(), edges.begin() + static_cast<std::ptrdiff_t>(take), edges.end(),
                    [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  std::vector<char> joined(n, 0);  // joined[i]: entry i is in one set with entry i - 1
  for (std::size_t t = 0; t < take; ++t) joined[edges[t].second] = 1;
  excess -= static_cast<std::int64_t>(take);

  std::vector<std::int64_t> victims;
  struct State {
    std::vector<float> k, v;
    float weight, importance;
    std::int64_t position;
  };
  std::vector<State> states;
  std::vector<double> mk(ud), mv(ud);
  for (std::size_t a = 0; a < n;) {
    std::size_t b = a + 1;
    while (b < n && joined[b]) ++b;
    if (b - a >= 2) {  // the merging set [a, b)
      std::size_t p = a;  // pivot: the most attended (ties: the older)
      for (std::size_t i = a + 1; i < b; ++i)
        if (e[i].importance > e[p].importance) p = i;
      if (o_.keep_pivot) {
        for (std::size_t i = a; i < b; ++i)
          if (i != p) victims.push_back(e[i].index);
      } else {
        const double scale = 2.0 * o_.sigma * o_.sigma * std::max(norm[p] * norm[p], 1e-300);
        std::fill(mk.begin(), mk.end(), 0.0);
        std::fill(mv.begin(), mv.end(), 0.0);
        double gsum = 0.0, count = 0.0, isum = 0.0;
        for (std::size_t i = a; i < b; ++i) {
          double dist = 0.0;
          for (int c = 0; c < d; ++c) {
            const double x = static_cast<double>(e[i].k[c]) - e[p].k[c];
            dist += x * x;
          }
          // A merged state stands for `count` tokens near its key: it enters with that
          // multiplicity, so merging in steps gives the weights merging at once would.
          const double g = e[i].count * std::exp(-dist / scale);
          gsum += g;
          for (std::size_t c = 0; c < ud; ++c) {
            mk[c] += g * e[i].k[c];
            mv[c] += g * e[i].v[c];
          }
          count += e[i].count;
          isum += e[i].importance;
          victims.push_back(e[i].index);
        }
        State st{std::vector<float>(ud), std::vector<float>(ud), static_cast<float>(count), static_cast<float>(isum),
                 e[p].position};
        for (std::size_t c = 0; c < ud; ++c) {
          st.k[c] = static_cast<float>(mk[c] / gsum);
          st.v[c] = static_cast<float>(mv[c] / gsum);
        }
        states.push_back(std::move(st));
      }
    }
    a = b;
  }
  // The new states join the specials (after every index a victim has, so those hold).
  for (const State& st : states) {
    store.add_special(st.k.data(), st.v.data(), st.weight, st.position);
    auto im = store.importance();
    if (!im.empty()) im[im.size() - 1] = st.importance;
  }
  if (!victims.empty()) store.drop(kt, victims);
  if (excess <= 0) return;

  // Merging could not remove enough: the lowest-importance candidates leave, then the
  // lowest-importance merged states (ties: the older).
  victims.clear();
  const Evictable left = evictable(store, o_.budget.recent);
  const auto imp2 = store.importance();
  std::vector<std::int64_t> ord, merged;
  for (std::int64_t j = left.first; j < left.end; ++j) ord.push_back(j);
  for (std::int64_t j = store.specials_first(); j < store.size(); ++j)
    if (j != store.compensation_index()) merged.push_back(j);
  auto less = [&](std::int64_t a, std::int64_t b) {
    return imp2.empty() ? a < b : (imp2[a] < imp2[b] || (imp2[a] == imp2[b] && a < b));
  };
  for (std::vector<std::int64_t>* list : {&ord, &merged}) {
    const std::int64_t k = std::min<std::int64_t>(excess, static_cast<std::int64_t>(list->size()));
    if (k <= 0) continue;
    if (k == 1)  // a decode step: one scan
      std::iter_swap(list->begin(), std::min_element(list->begin(), list->end(), less));
    else
      std::partial_sort(list->begin(), list->begin() + k, list->end(), less);
    victims.insert(victims.end(), list->begin(), list->begin() + k);
    excess -= k;
  }
  if (!victims.empty()) store.drop(kt, victims);
}

// ---- MiniCache ----

std::string MiniCache::describe() const {
  std::string s = fmt::format("minicache:t={},retain={}", o_.t, o_.retain);
  if (o_.threshold >= -1.0) s += fmt::format(",threshold={}", o_.threshold);
  return s;
}

void MiniCache::merge_layers(const kernels::KernelTable& kt, TokenStore& lower, TokenStore& upper) const {
  (void)lower;  // the upper store holds the pairing
  upper.seal_merged(kt, *this);
}

namespace {
// SLERP of the directions of a and b at t into out (unit, or zero if both are zero); returns
// the cosine of a and b (0 if either is zero).
double slerp(const float* a, const float* b, int d, double t, float* out) {
  const double na = norm_f64(a, d), nb = norm_f64(b, d);
  if (na == 0.0 || nb == 0.0) {
    const float* x = na == 0.0 ? b : a;
    const double nx = na == 0.0 ? nb : na;
    for (int c = 0; c < d; ++c) out[c] = nx == 0.0 ? 0.0f : static_cast<float>(x[c] / nx);
    return 0.0;
  }
  const double cosv = std::clamp(dot_f64(a, b, d) / (na * nb), -1.0, 1.0);
  const double omega = std::acos(cosv), so = std::sin(omega);
  // Nearly parallel: SLERP tends to the normalized linear interpolation.
  const double wa = so < 1e-6 ? 1.0 - t : std::sin((1.0 - t) * omega) / so;
  const double wb = so < 1e-6 ? t : std::sin(t * omega) / so;
  double n2 = 0.0;
  std::vector<double> u(static_cast<std::size_t>(d));
  for (int c = 0; c < d; ++c) {
    u[c] = wa * a[c] / na + wb * b[c] / nb;
    n2 += u[c] * u[c];
  }
  // Antiparallel vectors have no SLERP (every great circle qualifies): keep a's direction.
  const double nu = std::sqrt(n2);
  for (int c = 0; c < d; ++c) out[c] = nu > 1e-12 ? static_cast<float>(u[c] / nu) : static_cast<float>(a[c] / na);
  return cosv;
}
}  // namespace

void MiniCache::merge_rows(const float* k0, const float* v0, const float* k1, const float* v1, int ntok, int d,
                           float* dk, float* dv, std::vector<int>& retained) const {
  const std::size_t ud = static_cast<std::size_t>(d);
  std::vector<std::pair<double, int>> sim(static_cast<std::size_t>(ntok));
  for (int j = 0; j < ntok; ++j) {
    const std::size_t o = static_cast<std::size_t>(j) * ud;
    const double ck = slerp(k0 + o, k1 + o, d, o_.t, dk + o);
    const double cv = slerp(v0 + o, v1 + o, d, o_.t, dv + o);
    sim[static_cast<std::size_t>(j)] = {std::min(ck, cv), j};
  }
  const int nret = std::min(ntok, static_cast<int>(std::floor(o_.retain * ntok + 0.5)));
  std::vector<std::pair<double, int>> order = sim;
  std::sort(order.begin(), order.end());  // by similarity, ties: the older token
  std::vector<char> keep(static_cast<std::size_t>(ntok), 0);
  for (int i = 0; i < nret; ++i) keep[static_cast<std::size_t>(order[static_cast<std::size_t>(i)].second)] = 1;
  if (o_.threshold >= -1.0)
    for (const auto& [c, j] : sim)
      if (c < o_.threshold) keep[static_cast<std::size_t>(j)] = 1;
  retained.clear();
  for (int j = 0; j < ntok; ++j)
    if (keep[static_cast<std::size_t>(j)]) retained.push_back(j);
}

namespace detail {

BuiltStage make_minicache(StageParams& p, int) {
  MiniCache::Options o;
  o.t = p.get_double("t", 0.6, 0.0, 1.0);
  o.retain = p.get_double("retain", 0.05, 0.0, 1.0);
  if (p.has("threshold")) o.threshold = p.get_double("threshold", 0.0, -1.0, 1.0);
  p.check_all_used({"t", "retain", "threshold"});
  return BuiltStage{StageKind::kMerge, nullptr, nullptr, std::make_shared<MiniCache>(o), nullptr};
}

BuiltStage make_kvmerger(StageParams& p, int) {
  KVMerger::Options o;
  o.budget = TokenBudget::read(p, "kvmerger", 0.5);
  o.threshold = p.get_double("threshold", 0.9, -1.0, 1.0);
  o.sigma = p.get_double("sigma", 0.5, 1e-6, 1e6);
  const std::string keep = p.get_string("keep", "merge");
  KVSLIM_CHECK(keep == "merge" || keep == "pivot", ErrorCode::kInvalidArgument,
               "recipe stage 'kvmerger': keep={} must be merge or pivot", keep);
  o.keep_pivot = keep == "pivot";
  p.check_all_used({"budget", "ratio", "recent", "threshold", "sigma", "keep"});
  BuiltStage b{StageKind::kMerge, nullptr, nullptr, std::make_shared<KVMerger>(o), nullptr};
  return b;
}

}  // namespace detail
}  // namespace kvslim
