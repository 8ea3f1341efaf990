// Coupled-quantization codebooks (kvslim/policy/codebook.h): k-means training, the codebook
// file and its checksum.
#include "kvslim/policy/codebook.h"

#include <Eigen/Core>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>

#include "check.h"
#include "util/splitmix.h"

namespace kvslim {

static_assert(std::endian::native == std::endian::little,
              "the codebook file and fingerprint copy little-endian bytes directly");

namespace {

// ---- xxHash64 ----
constexpr std::uint64_t kP1 = 0x9E3779B185EBCA87ull, kP2 = 0xC2B2AE3D27D4EB4Full, kP3 = 0x165667B19E3779F9ull,
                        kP4 = 0x85EBCA77C2B2AE63ull, kP5 = 0x27D4EB2F165667C5ull;

std::uint64_t read64(const unsigned char* p) {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
std::uint32_t read32(const unsigned char* p) {
  std::uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
std::uint64_t xx_round(std::uint64_t acc, std::uint64_t input) {
  acc += input * kP2;
  return std::rotl(acc, 31) * kP1;
}
std::uint64_t xx_merge(std::uint64_t h, std::uint64_t v) {
  h ^= xx_round(0, v);
  return h * kP1 + kP4;
}

using SplitMix = detail::SplitMix64;

const char* kv_name(bool value) { return value ? "value" : "key"; }

// ---- k-means on one codebook ----

using ColMatrixXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic>;
constexpr Eigen::Index kBlock = 2048;  // rows per distance GEMM block (bounds scratch to K x 2048)

// Index with probability proportional to p[i] (p >= 0, total = sum p > 0).
Eigen::Index sample(const std::vector<double>& p, double total, SplitMix& rng) {
  const double target = rng.uniform() * total;
  double cum = 0.0;
  Eigen::Index last = -1;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (p[i] <= 0.0) continue;
    cum += p[i];
    last = static_cast<Eigen::Index>(i);
    if (cum > target) return last;
  }
  return last;  // rounding left target >= cum: the last row that can be drawn
}

// rows: [n][stride], the codebook's C channels start at rows[i * stride]; w: [n] or null.
// out: [K][C] centroids.
void kmeans(const float* rows, std::int64_t n, int stride, int C, const float* w, int K, std::uint64_t seed,
            const TrainOptions& opt, float* out) {
  const Eigen::Index N = n, D = C;
  std::vector<double> wt(static_cast<std::size_t>(n), 1.0);
  if (w)
    for (std::int64_t i = 0; i < n; ++i) wt[static_cast<std::size_t>(i)] = w[i];
  // Centre the data (weighted mean) so that the expansion |x|^2 - 2 x.c + |c|^2 used for the
  // distances does not lose the cluster differences to a large common offset.
  std::vector<double> mu(static_cast<std::size_t>(C), 0.0);
  double wsum = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    wsum += wt[static_cast<std::size_t>(i)];
    for (int c = 0; c < C; ++c) mu[static_cast<std::size_t>(c)] += wt[static_cast<std::size_t>(i)] * rows[i * stride + c];
  }
  for (double& m : mu) m /= wsum;
  ColMatrixXf X(D, N);  // one centred point per column
  for (Eigen::Index i = 0; i < N; ++i)
    for (Eigen::Index c = 0; c < D; ++c)
      X(c, i) = static_cast<float>(rows[i * stride + c] - mu[static_cast<std::size_t>(c)]);
  const Eigen::RowVectorXf xn = X.colwise().squaredNorm();

  // Centroids: exact weighted means of original rows (double), and their centred float copy.
  std::vector<double> mean(static_cast<std::size_t>(K) * C);
  ColMatrixXf Cm(D, K);
  auto set_centroid_to_row = [&](int j, Eigen::Index i) {
    for (int c = 0; c < C; ++c) mean[static_cast<std::size_t>(j) * C + c] = rows[i * stride + c];
    Cm.col(j) = X.col(i);
  };

  // k-means++: first centre drawn by weight, then by weight x squared distance to the nearest.
  SplitMix rng{seed};
  std::vector<double> d2(static_cast<std::size_t>(n), std::numeric_limits<double>::infinity());
  std::vector<double> p(static_cast<std::size_t>(n));
  set_centroid_to_row(0, sample(wt, wsum, rng));
  for (int j = 1; j < K; ++j) {
    const Eigen::RowVectorXf dj = (X.colwise() - Cm.col(j - 1)).colwise().squaredNorm();
    double total = 0.0;
    for (Eigen::Index i = 0; i < N; ++i) {
      const auto u = static_cast<std::size_t>(i);
      d2[u] = std::min(d2[u], static_cast<double>(dj(i)));
      p[u] = wt[u] * d2[u];
      total += p[u];
    }
    // Every row already sits on a centre (fewer distinct rows than centroids): draw by weight.
    set_centroid_to_row(j, total > 0.0 ? sample(p, total, rng) : sample(wt, wsum, rng));
  }

  // Lloyd iterations.
  std::vector<int> assign(static_cast<std::size_t>(n), -1);
  std::vector<double> dist(static_cast<std::size_t>(n));
  std::vector<double> cw(static_cast<std::size_t>(K)), sum(mean.size());
  ColMatrixXf G;
  double prev = std::numeric_limits<double>::infinity();
  for (int it = 0; it < opt.iterations; ++it) {
    const Eigen::RowVectorXf cn = Cm.colwise().squaredNorm();
    bool changed = false;
    double inertia = 0.0;
    for (Eigen::Index b0 = 0; b0 < N; b0 += kBlock) {
      const Eigen::Index bn = std::min(kBlock, N - b0);
      G.noalias() = Cm.transpose() * X.middleCols(b0, bn);  // [K][bn] dot products
      for (Eigen::Index i = 0; i < bn; ++i) {
        const float* g = G.col(i).data();
        int best = 0;
        float bd = cn(0) - 2.0f * g[0];
        for (int j = 1; j < K; ++j) {
          const float d = cn(j) - 2.0f * g[j];
          if (d < bd) bd = d, best = j;
        }
        const auto u = static_cast<std::size_t>(b0 + i);
        changed |= assign[u] != best;
        assign[u] = best;
        dist[u] = std::max(0.0, static_cast<double>(xn(b0 + i)) + bd);
        inertia += wt[u] * dist[u];
      }
    }
    if (!changed) break;  // the centroids are already the means of this assignment
    // Update: weighted means in double, in row order.
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(cw.begin(), cw.end(), 0.0);
    for (std::int64_t i = 0; i < n; ++i) {
      const auto u = static_cast<std::size_t>(i);
      const auto j = static_cast<std::size_t>(assign[u]);
      cw[j] += wt[u];
      for (int c = 0; c < C; ++c) sum[j * C + c] += wt[u] * rows[i * stride + c];
    }
    for (int j = 0; j < K; ++j) {
      const auto uj = static_cast<std::size_t>(j);
      if (cw[uj] > 0.0) {
        for (int c = 0; c < C; ++c) {
          mean[uj * C + c] = sum[uj * C + c] / cw[uj];
          Cm(c, j) = static_cast<float>(mean[uj * C + c] - mu[static_cast<std::size_t>(c)]);
        }
        continue;
      }
      // Empty: take the row that costs the objective most (weight x squared distance) out
      // of its cluster. Ties go to the lowest row. Its old cluster keeps its (slightly stale)
      // mean until the next iteration.
      Eigen::Index far = -1;
      double worst = 0.0;
      for (Eigen::Index i = 0; i < N; ++i) {
        const auto u = static_cast<std::size_t>(i);
        if (wt[u] * dist[u] > worst) worst = wt[u] * dist[u], far = i;
      }
      if (far < 0) continue;  // every row sits on its centroid: this one keeps its old place
      set_centroid_to_row(j, far);
      dist[static_cast<std::size_t>(far)] = 0.0;
      assign[static_cast<std::size_t>(far)] = j;
    }
    if (prev - inertia <= opt.tolerance * prev) break;
    prev = inertia;
  }
  for (std::size_t q = 0; q < mean.size(); ++q) out[q] = static_cast<float>(mean[q]);
}

void check_finite_rows(const float* x, std::int64_t n, int d, int layer, int head, const char* what) {
  for (std::int64_t i = 0; i < n; ++i)
    for (int c = 0; c < d; ++c)
      KVSLIM_CHECK(std::isfinite(x[i * d + c]), ErrorCode::kNonFinite,
                   "train_codebooks: layer {} kv head {}: {} row {} channel {} is {}", layer, head, what, i, c,
                   x[i * d + c]);
}

void check_weights(const float* w, std::int64_t n, int layer, int head, const char* what) {
  if (!w) return;
  double total = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    KVSLIM_CHECK(std::isfinite(w[i]), ErrorCode::kNonFinite,
                 "train_codebooks: layer {} kv head {}: {} weight of row {} is {}", layer, head, what, i, w[i]);
    KVSLIM_CHECK(w[i] >= 0.0f, ErrorCode::kInvalidArgument,
                 "train_codebooks: layer {} kv head {}: {} weight of row {} is {}, weights must be >= 0", layer, head,
                 what, i, w[i]);
    total += w[i];
  }
  KVSLIM_CHECK(total > 0.0, ErrorCode::kInvalidArgument,
               "train_codebooks: layer {} kv head {}: the {} weights sum to 0", layer, head, what);
}

// ---- file ----
constexpr char kMagic[8] = {'K', 'V', 'S', 'L', 'C', 'B', '0', '1'};
constexpr std::uint32_t kVersion = 1;
constexpr std::size_t kHeaderBytes = 72, kChecksumBytes = 8;
constexpr std::uint32_t kMaxDim = 1u << 16;  // bound on layers, kv_heads, head_dim read from a file

template <class T>
void put(std::string& buf, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  buf.append(b, sizeof(T));
}
template <class T>
T get(const std::string& buf, std::size_t off) {
  T v;
  std::memcpy(&v, buf.data() + off, sizeof(T));
  return v;
}

// The seven shape fields, in file order (also the fingerprint's seed input).
std::string shape_bytes(const Codebooks& cb) {
  std::string s;
  for (int v : {cb.layers(), cb.kv_heads(), cb.head_dim(), cb.key_shape().channels, cb.key_shape().bits,
                cb.value_shape().channels, cb.value_shape().bits})
    put(s, static_cast<std::uint32_t>(v));
  return s;
}

std::string serialize(const Codebooks& cb) {
  const auto& d = cb.data();
  for (std::size_t i = 0; i < d.size(); ++i)
    KVSLIM_CHECK(std::isfinite(d[i]), ErrorCode::kNonFinite,
                 "save_codebooks: centroid value {} (float index {} of {}) is not finite", d[i], i, d.size());
  std::string buf;
  buf.reserve(kHeaderBytes + 4 * d.size() + kChecksumBytes);
  buf.append(kMagic, 8);
  put(buf, kVersion);
  put(buf, std::uint32_t{0});  // flags, reserved
  buf += shape_bytes(cb);
  put(buf, static_cast<std::uint32_t>(cb.options().iterations));
  put(buf, cb.options().seed);
  put(buf, cb.options().tolerance);
  put(buf, static_cast<std::uint64_t>(d.size()));
  KVSLIM_DCHECK(buf.size() == kHeaderBytes);
  buf.append(reinterpret_cast<const char*>(d.data()), 4 * d.size());
  put(buf, xxhash64(buf.data(), buf.size()));
  return buf;
}

Codebooks parse(const std::string& buf, const std::string& name) {
  const std::size_t size = buf.size();
  constexpr std::size_t kMin = kHeaderBytes + kChecksumBytes;
  KVSLIM_CHECK(size >= 8, ErrorCode::kFormat,
               "codebook {}: truncated: {} bytes, a codebook file has at least {} (header and checksum)", name, size,
               kMin);
  KVSLIM_CHECK(std::memcmp(buf.data(), kMagic, 8) == 0, ErrorCode::kFormat,
               "codebook {}: bad magic (not a kvslim codebook file; expected \"KVSLCB01\")", name);
  KVSLIM_CHECK(size >= 12, ErrorCode::kFormat, "codebook {}: truncated: {} bytes, expected at least {}", name, size,
               kMin);
  const auto version = get<std::uint32_t>(buf, 8);
  KVSLIM_CHECK(version <= kVersion, ErrorCode::kFormat,
               "codebook {}: version {} is newer than this library reads (up to {})", name, version, kVersion);
  KVSLIM_CHECK(version >= 1, ErrorCode::kFormat, "codebook {}: version 0 is not a valid version", name);
  KVSLIM_CHECK(size >= kMin, ErrorCode::kFormat, "codebook {}: truncated: {} bytes, expected at least {}", name, size,
               kMin);
  const auto count = get<std::uint64_t>(buf, 64);
  KVSLIM_CHECK(count <= (std::uint64_t{1} << 60), ErrorCode::kFormat, "codebook {}: implausible float count {}",
               name, count);
  const std::uint64_t expected = kMin + 4 * count;
  KVSLIM_CHECK(size >= expected, ErrorCode::kFormat,
               "codebook {}: truncated: expected {} bytes ({} floats), file has {}", name, expected, count, size);
  KVSLIM_CHECK(size == expected, ErrorCode::kFormat,
               "codebook {}: {} trailing bytes: expected {} bytes ({} floats), file has {}", name, size - expected,
               expected, count, size);
  const auto stored = get<std::uint64_t>(buf, size - kChecksumBytes);
  const std::uint64_t actual = xxhash64(buf.data(), size - kChecksumBytes);
  KVSLIM_CHECK(stored == actual, ErrorCode::kFormat,
               "codebook {}: checksum mismatch (stored {:016x}, computed {:016x}): the file is corrupted", name,
               stored, actual);
  // The checksum holds, so what follows only fails for a file a different writer produced.
  const auto flags = get<std::uint32_t>(buf, 12);
  KVSLIM_CHECK(flags == 0, ErrorCode::kFormat, "codebook {}: flags {:#x} unknown to version {}", name, flags,
               kVersion);
  std::uint32_t f[7];
  for (int i = 0; i < 7; ++i) f[i] = get<std::uint32_t>(buf, 16 + 4 * static_cast<std::size_t>(i));
  static constexpr const char* kField[7] = {"layers", "kv_heads", "head_dim", "key channels", "key bits",
                                            "value channels", "value bits"};
  for (int i = 0; i < 7; ++i)
    KVSLIM_CHECK(f[i] >= 1 && f[i] <= kMaxDim, ErrorCode::kFormat, "codebook {}: {} = {} is out of range [1, {}]",
                 name, kField[i], f[i], kMaxDim);
  const CodebookShape ks{static_cast<int>(f[3]), static_cast<int>(f[4])};
  const CodebookShape vs{static_cast<int>(f[5]), static_cast<int>(f[6])};
  TrainOptions opt;
  opt.iterations = static_cast<int>(get<std::uint32_t>(buf, 44));
  opt.seed = get<std::uint64_t>(buf, 48);
  opt.tolerance = get<double>(buf, 56);
  Codebooks cb = [&] {
    try {
      return Codebooks(static_cast<int>(f[0]), static_cast<int>(f[1]), static_cast<int>(f[2]), ks, vs);
    } catch (const Error& e) {
      KVSLIM_FAIL(ErrorCode::kFormat, "codebook {}: invalid shape: {}", name, e.what());
    }
  }();
  KVSLIM_CHECK(cb.data().size() == count, ErrorCode::kFormat,
               "codebook {}: {} floats stored, the shape needs {}", name, count, cb.data().size());
  cb.set_options(opt);
  std::memcpy(cb.mutable_centroids(0, 0, false, 0), buf.data() + kHeaderBytes, 4 * count);
  const auto& d = cb.data();
  for (std::size_t i = 0; i < d.size(); ++i)
    KVSLIM_CHECK(std::isfinite(d[i]), ErrorCode::kFormat, "codebook {}: centroid float {} of {} is {}", name, i,
                 d.size(), d[i]);
  return cb;
}

}  // namespace

// ---- CodebookShape, CalibrationKV, Codebooks ----

void CodebookShape::validate(const char* what) const {
  KVSLIM_CHECK(channels == 1 || channels == 2 || channels == 4 || channels == 8, ErrorCode::kInvalidArgument,
               "{} codebook: channels C={} must be 1, 2, 4 or 8", what, channels);
  // 3 bits only for scalar tables (C = 1: the nuq codec's learned levels); coupled groups
  // keep whole codes per byte fraction (the cq kernels' code widths).
  KVSLIM_CHECK(bits == 1 || bits == 2 || bits == 4 || (bits == 3 && channels == 1), ErrorCode::kInvalidArgument,
               "{} codebook: bits B={} must be 1, 2 or 4 (3 only with channels C=1)", what, bits);
  KVSLIM_CHECK(channels * bits <= 8, ErrorCode::kInvalidArgument,
               "{} codebook: C·B = {}·{} = {} bits per code, at most 8 (256 centroids)", what, channels, bits,
               channels * bits);
}

CalibrationKV::CalibrationKV(int layers, int kv_heads, int head_dim)
    : layers_(layers), kv_heads_(kv_heads), head_dim_(head_dim) {
  KVSLIM_CHECK(layers >= 1 && kv_heads >= 1 && head_dim >= 1, ErrorCode::kInvalidArgument,
               "CalibrationKV: layers={}, kv_heads={}, head_dim={} must all be positive", layers, kv_heads, head_dim);
  heads_.resize(static_cast<std::size_t>(layers) * kv_heads);
}

void CalibrationKV::set(int layer, int kv_head, const CalibrationHead& rows) {
  KVSLIM_CHECK(layer >= 0 && layer < layers_ && kv_head >= 0 && kv_head < kv_heads_, ErrorCode::kOutOfRange,
               "CalibrationKV::set: (layer {}, kv head {}) outside {} layers x {} kv heads", layer, kv_head, layers_,
               kv_heads_);
  KVSLIM_CHECK(rows.k && rows.v && rows.rows >= 0, ErrorCode::kInvalidArgument,
               "CalibrationKV::set: layer {} kv head {}: k and v must be non-null and rows={} >= 0", layer, kv_head,
               rows.rows);
  heads_[static_cast<std::size_t>(layer) * kv_heads_ + kv_head] = rows;
}

const CalibrationHead& CalibrationKV::head(int layer, int kv_head) const {
  KVSLIM_CHECK(layer >= 0 && layer < layers_ && kv_head >= 0 && kv_head < kv_heads_, ErrorCode::kOutOfRange,
               "CalibrationKV::head: (layer {}, kv head {}) outside {} layers x {} kv heads", layer, kv_head, layers_,
               kv_heads_);
  return heads_[static_cast<std::size_t>(layer) * kv_heads_ + kv_head];
}

Codebooks::Codebooks(int layers, int kv_heads, int head_dim, CodebookShape key, CodebookShape value)
    : layers_(layers), kv_heads_(kv_heads), head_dim_(head_dim), key_(key), value_(value) {
  KVSLIM_CHECK(layers >= 1 && kv_heads >= 1 && head_dim >= 1, ErrorCode::kInvalidArgument,
               "Codebooks: layers={}, kv_heads={}, head_dim={} must all be positive", layers, kv_heads, head_dim);
  key.validate("key");
  value.validate("value");
  for (bool v : {false, true})
    KVSLIM_CHECK(head_dim % shape(v).channels == 0, ErrorCode::kInvalidArgument,
                 "{} codebook: head_dim {} is not a multiple of the group size C={}", kv_name(v), head_dim,
                 shape(v).channels);
  const std::size_t per_head = static_cast<std::size_t>(head_dim) * (key.centroids() + value.centroids());
  data_.assign(per_head * layers * kv_heads, 0.0f);
}

std::size_t Codebooks::offset(int layer, int kv_head, bool value, int group) const {
  KVSLIM_CHECK(layer >= 0 && layer < layers_ && kv_head >= 0 && kv_head < kv_heads_ && group >= 0 &&
                   group < groups(value),
               ErrorCode::kOutOfRange,
               "Codebooks: (layer {}, kv head {}, {} group {}) outside {} layers x {} kv heads x {} groups", layer,
               kv_head, kv_name(value), group, layers_, kv_heads_, groups(value));
  const std::size_t kblock = static_cast<std::size_t>(head_dim_) * key_.centroids();
  const std::size_t vblock = static_cast<std::size_t>(head_dim_) * value_.centroids();
  const CodebookShape s = shape(value);
  return (static_cast<std::size_t>(layer) * kv_heads_ + kv_head) * (kblock + vblock) + (value ? kblock : 0) +
         static_cast<std::size_t>(group) * s.centroids() * s.channels;
}

const float* Codebooks::centroids(int layer, int kv_head, bool value, int group) const {
  return data_.data() + offset(layer, kv_head, value, group);
}

float* Codebooks::mutable_centroids(int layer, int kv_head, bool value, int group) {
  return data_.data() + offset(layer, kv_head, value, group);
}

std::uint64_t Codebooks::fingerprint() const {
  const std::string s = shape_bytes(*this);
  return xxhash64(data_.data(), 4 * data_.size(), xxhash64(s.data(), s.size()));
}

// ---- training ----

Codebooks train_codebooks(const CalibrationKV& data, CodebookShape k, CodebookShape v, const TrainOptions& opt) {
  KVSLIM_CHECK(opt.iterations >= 0, ErrorCode::kInvalidArgument, "train_codebooks: iterations={} must be >= 0",
               opt.iterations);
  KVSLIM_CHECK(std::isfinite(opt.tolerance) && opt.tolerance >= 0.0, ErrorCode::kInvalidArgument,
               "train_codebooks: tolerance={} must be finite and >= 0", opt.tolerance);
  Codebooks cb(data.layers(), data.kv_heads(), data.head_dim(), k, v);  // validates shapes and head_dim
  cb.set_options(opt);
  const int d = data.head_dim();
  // Check every head before training any, so a bad call costs nothing.
  for (int l = 0; l < data.layers(); ++l)
    for (int h = 0; h < data.kv_heads(); ++h) {
      const CalibrationHead& r = data.head(l, h);
      KVSLIM_CHECK(r.k && r.v, ErrorCode::kInvalidArgument,
                   "train_codebooks: layer {} kv head {} has no calibration rows (CalibrationKV::set not called)", l,
                   h);
      for (bool val : {false, true}) {
        const CodebookShape s = cb.shape(val);
        KVSLIM_CHECK(r.rows >= s.centroids(), ErrorCode::kInvalidArgument,
                     "train_codebooks: layer {} kv head {}: n={} calibration rows is fewer than the {} codebook size "
                     "{} (C={}, B={})",
                     l, h, r.rows, kv_name(val), s.centroids(), s.channels, s.bits);
      }
      check_finite_rows(r.k, r.rows, d, l, h, "key");
      check_finite_rows(r.v, r.rows, d, l, h, "value");
      check_weights(r.k_weight, r.rows, l, h, "key");
      check_weights(r.v_weight, r.rows, l, h, "value");
    }
  std::uint64_t index = 0;  // codebook number in storage order: its own seed
  for (int l = 0; l < data.layers(); ++l)
    for (int h = 0; h < data.kv_heads(); ++h) {
      const CalibrationHead& r = data.head(l, h);
      for (bool val : {false, true}) {
        const CodebookShape s = cb.shape(val);
        for (int g = 0; g < cb.groups(val); ++g, ++index) {
          SplitMix mix{opt.seed ^ SplitMix{index}.next()};
          kmeans((val ? r.v : r.k) + g * s.channels, r.rows, d, s.channels, val ? r.v_weight : r.k_weight,
                 s.centroids(), mix.next(), opt, cb.mutable_centroids(l, h, val, g));
        }
      }
    }
  return cb;
}

std::uint32_t nearest(const float* x, const float* centroids, int count, int C) noexcept {
  std::uint32_t best = 0;
  float bd = std::numeric_limits<float>::infinity();
  for (int j = 0; j < count; ++j) {
    float dj = 0.0f;
    for (int c = 0; c < C; ++c) {
      const float t = x[c] - centroids[j * C + c];
      float sq = t * t;
      asm("" : "+x"(sq));  // no FMA contraction: the kernels' cq_encode rounds the same way
      dj += sq;
    }
    if (dj < bd) bd = dj, best = static_cast<std::uint32_t>(j);
  }
  return best;
}

// ---- file ----

void save_codebooks(const Codebooks& cb, std::ostream& out) {
  const std::string buf = serialize(cb);
  out.write(buf.data(), static_cast<std::streamsize>(buf.size()));
  out.flush();
  KVSLIM_CHECK(out.good(), ErrorCode::kIo, "save_codebooks: writing {} bytes to the stream failed", buf.size());
}

void save_codebooks(const Codebooks& cb, const std::string& path) {
  const std::string buf = serialize(cb);
  // Written next to the target and renamed, so a failed write never leaves a half file there.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    KVSLIM_CHECK(f.good(), ErrorCode::kIo, "save_codebooks: cannot open '{}' for writing", tmp);
    f.write(buf.data(), static_cast<std::streamsize>(buf.size()));
    f.close();
    KVSLIM_CHECK(!f.fail(), ErrorCode::kIo, "save_codebooks: writing {} bytes to '{}' failed", buf.size(), tmp);
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  KVSLIM_CHECK(!ec, ErrorCode::kIo, "save_codebooks: cannot rename '{}' to '{}': {}", tmp, path, ec.message());
}

Codebooks load_codebooks(std::istream& in) {
  std::string buf((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  KVSLIM_CHECK(!in.bad(), ErrorCode::kIo, "load_codebooks: reading the stream failed");
  return parse(buf, "stream");
}

Codebooks load_codebooks(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  KVSLIM_CHECK(f.good(), ErrorCode::kIo, "load_codebooks: cannot open codebook file '{}'", path);
  std::string buf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  KVSLIM_CHECK(!f.bad(), ErrorCode::kIo, "load_codebooks: reading '{}' failed", path);
  return parse(buf, "file '" + path + "'");
}

void check_codebooks_match(const Codebooks& cb, int layers, int kv_heads, int head_dim, CodebookShape k,
                           CodebookShape v) {
  const struct {
    const char* name;
    int file, cache;
  } fields[] = {{"layers", cb.layers(), layers},
                {"kv_heads", cb.kv_heads(), kv_heads},
                {"head_dim", cb.head_dim(), head_dim},
                {"key channels C", cb.key_shape().channels, k.channels},
                {"key bits B", cb.key_shape().bits, k.bits},
                {"value channels C", cb.value_shape().channels, v.channels},
                {"value bits B", cb.value_shape().bits, v.bits}};
  for (const auto& f : fields)
    KVSLIM_CHECK(f.file == f.cache, ErrorCode::kInvalidArgument, "codebook file for {} {}, cache has {} {}", f.name,
                 f.file, f.name, f.cache);
}

std::uint64_t xxhash64(const void* data, std::size_t n, std::uint64_t seed) noexcept {
  const auto* p = static_cast<const unsigned char*>(data);
  const unsigned char* const end = p + n;
  std::uint64_t h;
  if (n >= 32) {
    std::uint64_t v1 = seed + kP1 + kP2, v2 = seed + kP2, v3 = seed, v4 = seed - kP1;
    for (; end - p >= 32; p += 32) {
      v1 = xx_round(v1, read64(p));
      v2 = xx_round(v2, read64(p + 8));
      v3 = xx_round(v3, read64(p + 16));
      v4 = xx_round(v4, read64(p + 24));
    }
    h = std::rotl(v1, 1) + std::rotl(v2, 7) + std::rotl(v3, 12) + std::rotl(v4, 18);
    h = xx_merge(h, v1);
    h = xx_merge(h, v2);
    h = xx_merge(h, v3);
    h = xx_merge(h, v4);
  } else {
    h = seed + kP5;
  }
  h += n;
  for (; end - p >= 8; p += 8) h = std::rotl(h ^ xx_round(0, read64(p)), 27) * kP1 + kP4;
  if (end - p >= 4) {
    h = std::rotl(h ^ (static_cast<std::uint64_t>(read32(p)) * kP1), 23) * kP2 + kP3;
    p += 4;
  }
  for (; p < end; ++p) h = std::rotl(h ^ (*p * kP5), 11) * kP1;
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  return h;
}

}  // namespace kvslim
