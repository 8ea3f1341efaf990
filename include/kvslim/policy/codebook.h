// Codebooks for Coupled Quantization (CQ; Zhang et al., "KV Cache is 1 Bit Per Channel:
// Efficient Large Language Model Inference with Coupled Quantization", 2024). CQ codes a
// group of C adjacent channels of a key (or value) row jointly: the group's C floats are
// replaced by the index of the nearest of 2^(C·B) learned centroids, B bits per channel.
// Channels of a head are correlated, so a joint codebook spends the same bits better than
// C independent scalar quantizers (tests/codebook_test.cpp measures it on real keys).
//
// This header holds the calibration side: the codebook container, k-means training and the
// codebook file (docs/formats.md, "Codebook file"). The `cq` codec reads a Codebooks object.
//
//   kvslim::CalibrationKV cal(layers, kv_heads, head_dim);
//   cal.set(l, h, {k_rows, v_rows, n, mass, mass});   // per (layer, kv head), see below
//   auto cb = kvslim::train_codebooks(cal, {4, 2}, {4, 2}, {});  // C=4, B=2 for K and V
//   kvslim::save_codebooks(cb, "model.kvcb");
//   ...
//   auto cb2 = kvslim::load_codebooks("model.kvcb");
//   kvslim::check_codebooks_match(cb2, layers, kv_heads, head_dim, {4, 2}, {4, 2});
//   std::uint32_t code = kvslim::nearest(x + g * 4, cb2.centroids(l, h, false, g), 256, 4);
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kvslim {

/// Channels per group (C) and bits per channel (B) of one codebook; 2^(C·B) centroids.
struct CodebookShape {
  int channels = 1;  // C in {1, 2, 4, 8}
  int bits = 1;      // B in {1, 2, 4} (or 3 with C = 1: scalar level tables), C·B <= 8

  /// Throws Error(kInvalidArgument) naming the bad value when C, B or C·B is out of range.
  /// `what` ("key", "value") prefixes the message.
  void validate(const char* what = "codebook") const;
  /// 2^(C·B) (valid shapes only).
  int centroids() const noexcept { return 1 << (channels * bits); }
  bool operator==(const CodebookShape&) const = default;
};

/// How the codebooks were trained; recorded in the codebook file.
struct TrainOptions {
  std::uint64_t seed = 1;    // k-means++ seed (splitmix64 stream per codebook)
  int iterations = 25;       // maximum Lloyd iterations per codebook (>= 0)
  double tolerance = 1e-6;   // stop when the weighted inertia falls by less than this fraction
};

/// Calibration rows of one (layer, kv head). Non-owning: the pointers must stay valid until
/// train_codebooks returns.
///   k, v        [rows][head_dim] f32, row stride head_dim (post-RoPE keys as the cache stores
///               them, and values)
///   k_weight,   [rows] f32 per-row importance, >= 0 and finite, or nullptr (all rows weigh 1).
///   v_weight    The intended weight is the attention mass the token received (summed over
///               the query heads of the GQA group and the calibration queries): a row-level
///               stand-in for the Fisher information the CQ paper weights its k-means with
///               (squared gradient of the loss w.r.t. the activation). A per-row Fisher
///               (squared gradient norm of that row) may be passed instead; the weight
///               scales the row's squared error in the k-means objective, for every group.
struct CalibrationHead {
  const float* k = nullptr;
  const float* v = nullptr;
  std::int64_t rows = 0;
  const float* k_weight = nullptr;
  const float* v_weight = nullptr;
};

/// Calibration data for every (layer, kv head) of a model.
class CalibrationKV {
 public:
  /// Throws Error(kInvalidArgument) for non-positive sizes.
  CalibrationKV(int layers, int kv_heads, int head_dim);

  int layers() const noexcept { return layers_; }
  int kv_heads() const noexcept { return kv_heads_; }
  int head_dim() const noexcept { return head_dim_; }

  /// Sets the rows of (layer, kv_head). Throws Error(kOutOfRange) for a bad index and
  /// Error(kInvalidArgument) for null k/v or rows < 0. Every head must be set before training.
  void set(int layer, int kv_head, const CalibrationHead& rows);
  const CalibrationHead& head(int layer, int kv_head) const;

 private:
  int layers_, kv_heads_, head_dim_;
  std::vector<CalibrationHead> heads_;  // [layer][kv_head]
};

/// The centroids of every (layer, kv head, K/V, channel group). Group g of a row covers
/// channels [g·C, (g+1)·C); groups = head_dim / C.
/// Storage (one contiguous f32 array, also the file's data section):
///   [layer][kv_head][K=0, V=1][group][centroid][C]
/// where the K block has head_dim / Ck groups of 2^(Ck·Bk) centroids and the V block
/// head_dim / Cv groups of 2^(Cv·Bv).
class Codebooks {
 public:
  /// All centroids zero. Throws Error(kInvalidArgument) for non-positive sizes, a bad shape,
  /// or head_dim not a multiple of C (naming both).
  Codebooks(int layers, int kv_heads, int head_dim, CodebookShape key, CodebookShape value);

  int layers() const noexcept { return layers_; }
  int kv_heads() const noexcept { return kv_heads_; }
  int head_dim() const noexcept { return head_dim_; }
  CodebookShape key_shape() const noexcept { return key_; }
  CodebookShape value_shape() const noexcept { return value_; }
  CodebookShape shape(bool value) const noexcept { return value ? value_ : key_; }
  /// Channel groups per row: head_dim / C.
  int groups(bool value) const noexcept { return head_dim_ / shape(value).channels; }
  /// 2^(C·B) for K (value = false) or V.
  int centroid_count(bool value) const noexcept { return shape(value).centroids(); }

  /// [centroid_count(value)][C] floats of one codebook. Throws Error(kOutOfRange) naming the
  /// bad index.
  const float* centroids(int layer, int kv_head, bool value, int group) const;
  float* mutable_centroids(int layer, int kv_head, bool value, int group);

  /// Everything, in the storage order above.
  const std::vector<float>& data() const noexcept { return data_; }

  /// How the centroids were trained (defaults for a Codebooks not made by train_codebooks).
  const TrainOptions& options() const noexcept { return options_; }
  void set_options(const TrainOptions& o) { options_ = o; }

  /// xxHash64 of the shape (layers, kv_heads, head_dim, Ck, Bk, Cv, Bv) and the centroid
  /// bytes; equal codebooks have equal fingerprints on every platform. Training options are
  /// not part of it. Lets a codec or a saved cache check it was built with these codebooks.
  std::uint64_t fingerprint() const;

 private:
  std::size_t offset(int layer, int kv_head, bool value, int group) const;

  int layers_, kv_heads_, head_dim_;
  CodebookShape key_, value_;
  TrainOptions options_;
  std::vector<float> data_;
};

/// Trains one codebook per (layer, kv head, K/V, group) with weighted k-means:
/// k-means++ initialisation (D²·weight sampling, seeded from opt.seed and the codebook's
/// index with splitmix64, so the random choices are the same on every platform), then up to
/// opt.iterations Lloyd iterations (distances and assignment through Eigen, ties to the lower
/// centroid index, centroids = weighted means accumulated in double). A cluster left empty is
/// re-seeded with the row that contributes most to the objective (largest weight × squared
/// distance to its centroid; lowest row index on ties). Same input, shapes and options give
/// the same bytes for a given build; across ISAs or compilers the float distance sums may
/// differ in the last bit, which can flip a near-tie.
/// Throws Error(kInvalidArgument) for a bad shape, head_dim not divisible by C, a head left
/// unset, or rows < 2^(C·B) (naming n and the codebook size); Error(kNonFinite) for NaN/Inf
/// in k, v or the weights (naming layer, head and row), Error(kInvalidArgument) for negative
/// weights or bad options.
Codebooks train_codebooks(const CalibrationKV& data, CodebookShape k, CodebookShape v, const TrainOptions& opt = {});

/// Index of the centroid nearest to x in squared L2 (ties to the lower index).
///   x          [C] floats
///   centroids  [count][C] floats
/// count >= 1; no checks (hot path of the encoder).
std::uint32_t nearest(const float* x, const float* centroids, int count, int C) noexcept;

/// Writes the codebook file (docs/formats.md, "Codebook file"). Throws Error(kNonFinite) if a
/// centroid is NaN/Inf, Error(kIo) if the file or stream cannot be written.
void save_codebooks(const Codebooks& cb, const std::string& path);
void save_codebooks(const Codebooks& cb, std::ostream& out);

/// Reads and validates a codebook file: Error(kIo) if it cannot be opened or read;
/// Error(kFormat) for a truncated file (expected vs actual size), bad magic, a version newer
/// than this library reads, an invalid shape, a size that does not fit the shape, a checksum
/// mismatch or a non-finite centroid.
Codebooks load_codebooks(const std::string& path);
Codebooks load_codebooks(std::istream& in);

/// Throws Error(kInvalidArgument) naming the first field that differs, e.g.
/// "codebook file for head_dim 64, cache has head_dim 128".
void check_codebooks_match(const Codebooks& cb, int layers, int kv_heads, int head_dim, CodebookShape k,
                           CodebookShape v);

/// The key and value codebook shapes of the `cq` stages of a recipe (base chain and overrides;
/// channels=/bits= and the k/v keys as the codec reads them), so that tools train the
/// codebooks a recipe needs. Throws Error(kRecipe) for a malformed recipe,
/// Error(kInvalidArgument) if no stage is `cq`, a shape is invalid, or two cq stages disagree
/// (one codebook file holds one shape). A cq tier nested in mikv's lo=(...) is not looked at.
std::pair<CodebookShape, CodebookShape> cq_recipe_shapes(std::string_view recipe);

/// xxHash64 (Yann Collet's algorithm) of n bytes; the checksum of the codebook file.
std::uint64_t xxhash64(const void* data, std::size_t n, std::uint64_t seed = 0) noexcept;

}  // namespace kvslim
