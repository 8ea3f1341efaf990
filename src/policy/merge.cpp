// The merging family: KVMerger (include/kvslim/policy/merge/kvmerger.h) and its factory.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "check.h"
#include "kvslim/cache/token_store.h"
#include "kvslim/policy/eviction/h2o.h"
#include "kvslim/policy/merge/kvmerger.h"
#include "policy/codecs.h"

namespace kvslim {

std::string KVMerger::describe() const {
  return fmt::format("kvmerger:{},threshold={},sigma={}{}", o_.budget.describe(), o_.threshold, o_.sigma,
                     o_.keep_pivot ? ",keep=pivot" : "");
}

std::shared_ptr<const Scorer> KVMerger::implied_scorer() const { return std::make_shared<AccumulatedAttention>(); }

namespace {

double dot(const float* a, const float* b, int d) {
  double s = 0.0;
  for (int c = 0; c < d; ++c) s += static_cast<double>(a[c]) * b[c];
  return s;
}

// A merging set: candidates [first, first + len) (offsets into the candidate list).
struct Run {
  std::int64_t first, len;
  double mean;  // mean adjacent cosine inside the run
};

}  // namespace

void KVMerger::merge(const kernels::KernelTable& kt, TokenStore& store) const {
  std::int64_t excess = store.size() - o_.budget.at(store.seen());
  if (excess <= 0) return;
  const int d = store.head_dim();
  const std::size_t ud = static_cast<std::size_t>(d);
  const Evictable range = evictable(store, o_.budget.recent);
  const std::int64_t n = range.end - range.first;
  std::vector<std::int64_t> victims;
  if (n >= 2) {
    std::vector<std::int64_t> cand(static_cast<std::size_t>(n));
    std::iota(cand.begin(), cand.end(), range.first);
    std::vector<float> k(static_cast<std::size_t>(n) * ud), v(k.size());
    store.rows(kt, cand, k.data(), v.data());
    std::vector<double> norm(static_cast<std::size_t>(n)), cosv(static_cast<std::size_t>(n), 0.0);
    for (std::int64_t i = 0; i < n; ++i) norm[i] = std::sqrt(dot(&k[i * ud], &k[i * ud], d));
    // cosv[i]: cosine of candidate i with candidate i - 1 (a zero key is parallel to nothing).
    for (std::int64_t i = 1; i < n; ++i)
      if (norm[i] > 0.0 && norm[i - 1] > 0.0)
        cosv[i] = dot(&k[i * ud], &k[(i - 1) * ud], d) / (norm[i] * norm[i - 1]);
    std::vector<Run> runs;
    for (std::int64_t i = 1; i < n;) {
      if (cosv[i] < o_.threshold) {
        ++i;
        continue;
      }
      Run r{i - 1, 1, 0.0};
      double sum = 0.0;
      for (; i < n && cosv[i] >= o_.threshold; ++i, ++r.len) sum += cosv[i];
      r.mean = sum / static_cast<double>(r.len - 1);
      runs.push_back(r);
    }
    // Closed runs first (the candidate after them breaks the run), the most similar first; the
    // run that reaches the recent window may still grow and goes last, so that runs are merged
    // whole instead of pair by pair as their tokens leave the window.
    std::stable_sort(runs.begin(), runs.end(), [n](const Run& a, const Run& b) {
      const bool ao = a.first + a.len == n, bo = b.first + b.len == n;
      return ao != bo ? bo : a.mean > b.mean;
    });

    const auto imp = store.importance();
    const std::vector<std::int64_t> pos = store.positions();
    std::vector<double> mk(ud), mv(ud);
    struct State {
      std::vector<float> k, v;
      float weight, importance;
      std::int64_t position;
    };
    std::vector<State> states;
    for (const Run& run : runs) {
      if (excess <= 0) break;
      const std::int64_t first = run.first, len = run.len;
      // Pivot: the most attended (ties: the older).
      std::int64_t p = first;
      if (!imp.empty())
        for (std::int64_t i = first + 1; i < first + len; ++i)
          if (imp[cand[i]] > imp[cand[p]]) p = i;
      if (o_.keep_pivot) {
        for (std::int64_t i = first; i < first + len; ++i)
          if (i != p) victims.push_back(cand[i]);
        excess -= len - 1;
        continue;
      }
      const float* kp = &k[p * ud];
      const double scale = 2.0 * o_.sigma * o_.sigma * std::max(norm[p] * norm[p], 1e-300);
      std::fill(mk.begin(), mk.end(), 0.0);
      std::fill(mv.begin(), mv.end(), 0.0);
      double gsum = 0.0, isum = 0.0;
      for (std::int64_t i = first; i < first + len; ++i) {
        const float* ki = &k[i * ud];
        const float* vi = &v[i * ud];
        double dist = 0.0;
        for (int c = 0; c < d; ++c) {
          const double x = static_cast<double>(ki[c]) - kp[c];
          dist += x * x;
        }
        const double g = std::exp(-dist / scale);
        gsum += g;
        for (std::size_t c = 0; c < ud; ++c) {
          mk[c] += g * ki[c];
          mv[c] += g * vi[c];
        }
        if (!imp.empty()) isum += imp[cand[i]];
        victims.push_back(cand[i]);
      }
      State st{std::vector<float>(ud), std::vector<float>(ud), static_cast<float>(len), static_cast<float>(isum),
               pos[static_cast<std::size_t>(cand[p])]};
      for (std::size_t c = 0; c < ud; ++c) {
        st.k[c] = static_cast<float>(mk[c] / gsum);
        st.v[c] = static_cast<float>(mv[c] / gsum);
      }
      states.push_back(std::move(st));
      excess -= len - 1;
    }
    // The states join the specials (after every ordinary token, so the victims' indices hold).
    for (const State& st : states) {
      store.add_special(st.k.data(), st.v.data(), st.weight, st.position);
      auto im = store.importance();
      if (!im.empty()) im[im.size() - 1] = st.importance;
    }
    if (!victims.empty()) store.drop(kt, victims);
  }
  if (excess <= 0) return;
  // Merging could not remove enough: the lowest-importance candidates leave, then the
  // lowest-importance merged states (never the compensation token of a razor stage).
  victims.clear();
  const Evictable left = evictable(store, o_.budget.recent);
  const auto imp = store.importance();
  std::vector<std::int64_t> cand;
  for (std::int64_t j = left.first; j < left.end; ++j) cand.push_back(j);
  std::vector<std::int64_t> merged;
  for (std::int64_t j = store.specials_first(); j < store.size(); ++j)
    if (j != store.compensation_index()) merged.push_back(j);
  auto less = [&](std::int64_t a, std::int64_t b) {
    return imp.empty() ? a < b : (imp[a] < imp[b] || (imp[a] == imp[b] && a < b));
  };
  for (std::vector<std::int64_t>* list : {&cand, &merged}) {
    const std::int64_t take = std::min<std::int64_t>(excess, static_cast<std::int64_t>(list->size()));
    if (take <= 0) continue;
    std::partial_sort(list->begin(), list->begin() + take, list->end(), less);
    victims.insert(victims.end(), list->begin(), list->begin() + take);
    excess -= take;
  }
  if (!victims.empty()) store.drop(kt, victims);
}

namespace detail {

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
