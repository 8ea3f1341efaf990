#include "model.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <filesystem>
#include <map>

#include "check.h"
#include "file_io.h"
#include "util/json.h"

namespace kvslim::llama {
namespace fs = std::filesystem;

const char* rope_style_name(RopeStyle style) noexcept {
  return style == RopeStyle::kHalf ? "half" : "interleaved";
}

namespace {

void check_field(const std::string& file, std::string_view field, std::int64_t value,
                 std::int64_t lo, std::int64_t hi) {
  KVSLIM_CHECK(value >= lo && value <= hi, ErrorCode::kFormat,
               "'{}': {} = {} is out of range [{}, {}]", file, field, value, lo, hi);
}

/// Shape dimensions are bounded so that products stay far from int64 overflow.
constexpr std::int64_t kMaxWidth = 1 << 16;
constexpr std::int64_t kMaxVocab = 1 << 22;
constexpr std::int64_t kMaxLayers = 1024;
constexpr std::int64_t kMaxSeq = 1 << 22;

void check_shape(const std::string& file, const ModelConfig& c) {
  KVSLIM_CHECK(c.dim % c.n_heads == 0, ErrorCode::kFormat,
               "'{}': dim {} is not a multiple of n_heads {}", file, c.dim, c.n_heads);
  KVSLIM_CHECK(c.n_heads % c.n_kv_heads == 0, ErrorCode::kFormat,
               "'{}': n_heads {} is not a multiple of n_kv_heads {}", file, c.n_heads,
               c.n_kv_heads);
  KVSLIM_CHECK(c.head_dim % 2 == 0, ErrorCode::kFormat,
               "'{}': head_dim {} is odd; RoPE needs channel pairs", file, c.head_dim);
}

std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

std::string stem_of(const fs::path& p) {
  fs::path q = p;
  if (q.filename().empty()) q = q.parent_path();  // "dir/" -> "dir"
  return fs::is_directory(q) ? q.filename().string() : q.stem().string();
}

bool is_tokenizer_name(const std::string& filename) { return filename.rfind("tok", 0) == 0; }

/// The llama2.c tokenizer beside `checkpoint`: tok<vocab>.bin if present, else the only
/// tok*.bin / tokenizer.bin in the directory.
std::string find_llama2c_tokenizer(const fs::path& checkpoint) {
  const fs::path dir = checkpoint.has_parent_path() ? checkpoint.parent_path() : fs::path(".");
  std::vector<std::string> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (e.is_regular_file(ec) && is_tokenizer_name(name) && e.path().extension() == ".bin" &&
        e.path() != checkpoint)
      found.push_back(e.path().string());
  }
  std::sort(found.begin(), found.end());
  KVSLIM_CHECK(!found.empty(), ErrorCode::kIo,
               "no llama2.c tokenizer (tok*.bin or tokenizer.bin) next to checkpoint '{}' in "
               "directory '{}'",
               checkpoint.string(), dir.string());
  if (found.size() == 1) return found[0];
  // Several candidates: pick the one named after the checkpoint's vocabulary size.
  const std::string header = read_file(checkpoint.string(), "llama2.c checkpoint").substr(0, 28);
  ByteReader r(header, checkpoint.string());
  std::int32_t vocab = 0;
  for (int i = 0; i < 6; ++i) vocab = r.i32("header");
  const fs::path want = dir / ("tok" + std::to_string(vocab < 0 ? -static_cast<std::int64_t>(vocab) : vocab) + ".bin");
  for (const std::string& f : found)
    if (fs::path(f) == want) return f;
  std::string list;
  for (const std::string& f : found) list += " '" + f + "'";
  KVSLIM_FAIL(ErrorCode::kIo, "several tokenizers next to checkpoint '{}' and none is named '{}':{}",
              checkpoint.string(), want.string(), list);
}

/// Copies `n` floats from the checkpoint bytes (unaligned source, hence memcpy).
std::vector<float> take_floats(ByteReader& r, std::int64_t n, std::string_view field) {
  std::vector<float> out(static_cast<std::size_t>(n));
  const std::string_view b = r.bytes(static_cast<std::size_t>(n) * 4, field);
  if (n > 0) std::memcpy(out.data(), b.data(), b.size());
  return out;
}

// ---------------------------------------------------------------- safetensors

struct TensorEntry {
  std::vector<std::int64_t> shape;
  std::size_t begin = 0, end = 0;  // byte offsets into the data section
};

/// Parses a safetensors file: 8-byte LE header length, JSON header, data section.
std::map<std::string, TensorEntry> parse_safetensors(const std::string& path,
                                                     const std::string& data,
                                                     std::size_t* data_start) {
  ByteReader r(data, path);
  const std::uint64_t header_len = r.u64("safetensors header length");
  KVSLIM_CHECK(header_len >= 2 && header_len <= r.remaining(), ErrorCode::kFormat,
               "safetensors '{}': header length {} does not fit in the file of {} bytes", path,
               header_len, data.size());
  const std::string_view header = r.bytes(static_cast<std::size_t>(header_len), "header");
  *data_start = r.offset();
  const std::size_t data_size = r.remaining();
  json::Value root;
  try {
    root = json::parse(header);
  } catch (const Error& e) {
    KVSLIM_FAIL(ErrorCode::kFormat, "safetensors '{}': bad JSON header: {}", path, e.what());
  }
  KVSLIM_CHECK(root.is_object(), ErrorCode::kFormat,
               "safetensors '{}': header is not a JSON object", path);
  std::map<std::string, TensorEntry> out;
  try {
    for (const auto& [name, t] : json::as_object(root)) {
      if (name == "__metadata__") continue;
      const std::string& dtype = json::as_string(json::at(t, "dtype"), "dtype");
      KVSLIM_CHECK(dtype == "F32", ErrorCode::kFormat,
                   "tensor '{}' has dtype {}; only F32 is supported (convert the model to "
                   "float32)",
                   name, dtype);
      TensorEntry e;
      std::int64_t numel = 1;
      for (const json::Value& d : json::as_array(json::at(t, "shape"), "shape")) {
        const std::int64_t v = json::as_int(d, "shape entry");
        KVSLIM_CHECK(v >= 0 && v <= kMaxVocab * 64, ErrorCode::kFormat,
                     "tensor '{}' has dimension {}", name, v);
        e.shape.push_back(v);
        numel *= v;
        KVSLIM_CHECK(numel <= (std::int64_t{1} << 40), ErrorCode::kFormat,
                     "tensor '{}' is implausibly large", name);
      }
      const auto& off = json::as_array(json::at(t, "data_offsets"), "data_offsets");
      KVSLIM_CHECK(off.size() == 2, ErrorCode::kFormat, "tensor '{}': data_offsets is not a pair",
                   name);
      const std::int64_t b = json::as_int(off[0], "data offset"),
                         en = json::as_int(off[1], "data offset");
      KVSLIM_CHECK(b >= 0 && en >= b && static_cast<std::uint64_t>(en) <= data_size,
                   ErrorCode::kFormat,
                   "tensor '{}': data_offsets [{}, {}] fall outside the {} data bytes", name, b,
                   en, data_size);
      KVSLIM_CHECK(en - b == numel * 4, ErrorCode::kFormat,
                   "tensor '{}': data_offsets [{}, {}] hold {} bytes but shape {} needs {}", name,
                   b, en, en - b, shape_str(e.shape), numel * 4);
      e.begin = static_cast<std::size_t>(b);
      e.end = static_cast<std::size_t>(en);
      out.emplace(name, std::move(e));
    }
  } catch (const Error& e) {
    KVSLIM_FAIL(ErrorCode::kFormat, "safetensors '{}': {}", path, e.what());
  } catch (const nlohmann::json::exception& e) {  // not expected: json:: helpers check types
    KVSLIM_FAIL(ErrorCode::kFormat, "safetensors '{}': {}", path, e.what());
  }
  return out;
}

std::int64_t config_int(const json::Value& cfg, const std::string& path, std::string_view key,
                        std::int64_t lo, std::int64_t hi, const std::int64_t* fallback = nullptr) {
  const json::Value* v = json::find(cfg, key);
  if ((!v || v->is_null()) && fallback) return *fallback;
  KVSLIM_CHECK(v != nullptr, ErrorCode::kFormat, "'{}': missing key '{}'", path, key);
  std::int64_t x = 0;
  try {
    x = json::as_int(*v, key);
  } catch (const Error& e) {
    KVSLIM_FAIL(ErrorCode::kFormat, "'{}': {}", path, e.what());
  }
  check_field(path, key, x, lo, hi);
  return x;
}

double config_number(const json::Value& cfg, const std::string& path, std::string_view key,
                     double fallback) {
  const json::Value* v = json::find(cfg, key);
  if (!v || v->is_null()) return fallback;
  double x = 0.0;
  try {
    x = json::as_number(*v, key);
  } catch (const Error& e) {
    KVSLIM_FAIL(ErrorCode::kFormat, "'{}': {}", path, e.what());
  }
  KVSLIM_CHECK(x > 0.0, ErrorCode::kFormat, "'{}': {} = {} must be positive", path, key, x);
  return x;
}

}  // namespace

// ---------------------------------------------------------------- llama2.c

Model load_llama2c(const std::string& checkpoint, const std::string& tokenizer) {
  const std::string data = read_file(checkpoint, "llama2.c checkpoint");
  ByteReader r(data, checkpoint);
  static constexpr std::array<const char*, 7> kFields = {
      "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
  std::array<std::int64_t, 7> h{};
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = r.i32(kFields[i]);
  check_field(checkpoint, "dim", h[0], 1, kMaxWidth);
  check_field(checkpoint, "hidden_dim", h[1], 1, kMaxWidth * 8);
  check_field(checkpoint, "n_layers", h[2], 1, kMaxLayers);
  check_field(checkpoint, "n_heads", h[3], 1, h[0]);
  check_field(checkpoint, "n_kv_heads", h[4], 1, h[3]);
  KVSLIM_CHECK(h[5] != 0, ErrorCode::kFormat, "'{}': vocab_size = 0", checkpoint);
  check_field(checkpoint, "|vocab_size|", h[5] < 0 ? -h[5] : h[5], 1, kMaxVocab);
  check_field(checkpoint, "seq_len", h[6], 1, kMaxSeq);

  Model m;
  m.path = checkpoint;
  m.kind = "llama2c";
  m.name = stem_of(checkpoint);
  m.weights_path = checkpoint;
  m.tokenizer_path = tokenizer;
  ModelConfig& c = m.config;
  c.dim = static_cast<int>(h[0]);
  c.hidden_dim = static_cast<int>(h[1]);
  c.n_layers = static_cast<int>(h[2]);
  c.n_heads = static_cast<int>(h[3]);
  c.n_kv_heads = static_cast<int>(h[4]);
  const bool shared_classifier = h[5] > 0;  // llama2.c: negative vocab_size = own classifier
  c.vocab_size = static_cast<int>(h[5] < 0 ? -h[5] : h[5]);
  c.seq_len = static_cast<int>(h[6]);
  c.head_dim = c.dim / c.n_heads;
  c.rope = RopeStyle::kInterleaved;
  c.rope_theta = 10000.0;
  c.rms_eps = 1e-5f;
  check_shape(checkpoint, c);

  const std::int64_t D = c.dim, H = c.hidden_dim, L = c.n_layers, V = c.vocab_size;
  const std::int64_t kv_dim = static_cast<std::int64_t>(c.n_kv_heads) * c.head_dim;
  const std::int64_t per_layer = D + D * D + 2 * kv_dim * D + D * D + D + 3 * H * D;
  const std::int64_t freq = static_cast<std::int64_t>(c.seq_len) * c.head_dim;  // real + imag
  const std::int64_t floats = V * D + L * per_layer + D + freq + (shared_classifier ? 0 : V * D);
  const std::int64_t expected = 28 + 4 * floats;
  KVSLIM_CHECK(static_cast<std::int64_t>(data.size()) == expected, ErrorCode::kFormat,
               "llama2.c checkpoint '{}' has {} bytes but its header (dim={}, hidden_dim={}, "
               "n_layers={}, n_heads={}, n_kv_heads={}, vocab_size={}, seq_len={}) implies {} "
               "bytes: the file is {} or not a llama2.c checkpoint",
               checkpoint, data.size(), h[0], h[1], h[2], h[3], h[4], h[5], h[6], expected,
               static_cast<std::int64_t>(data.size()) < expected ? "truncated" : "too long");

  m.embedding = take_floats(r, V * D, "token embedding");
  m.layers.resize(static_cast<std::size_t>(L));
  // llama2.c stores each weight kind for all layers before the next kind.
  auto per_layer_read = [&](std::vector<float> LayerWeights::*field, std::int64_t n,
                            std::string_view what) {
    for (LayerWeights& lw : m.layers) lw.*field = take_floats(r, n, what);
  };
  per_layer_read(&LayerWeights::attn_norm, D, "rms_att_weight");
  per_layer_read(&LayerWeights::wq, D * D, "wq");
  per_layer_read(&LayerWeights::wk, kv_dim * D, "wk");
  per_layer_read(&LayerWeights::wv, kv_dim * D, "wv");
  per_layer_read(&LayerWeights::wo, D * D, "wo");
  per_layer_read(&LayerWeights::ffn_norm, D, "rms_ffn_weight");
  per_layer_read(&LayerWeights::w1, H * D, "w1");
  per_layer_read(&LayerWeights::w2, D * H, "w2");
  per_layer_read(&LayerWeights::w3, H * D, "w3");
  m.final_norm = take_floats(r, D, "rms_final_weight");
  r.bytes(static_cast<std::size_t>(freq) * 4, "freq_cis");  // unused: RoPE is recomputed
  if (!shared_classifier) m.classifier = take_floats(r, V * D, "wcls");

  m.tokenizer = std::make_unique<Llama2cTokenizer>(tokenizer, c.vocab_size);
  return m;
}

// ---------------------------------------------------------------- Hugging Face

Model load_hf(const std::string& dir) {
  const fs::path d(dir);
  const std::string config_path = (d / "config.json").string();
  const std::string weights_path = (d / "model.safetensors").string();
  const std::string tokenizer_path = (d / "tokenizer.json").string();

  json::Value cfg;
  try {
    cfg = json::parse(read_file(config_path, "model config"));
  } catch (const Error& e) {
    if (e.code() == ErrorCode::kIo) throw;
    KVSLIM_FAIL(ErrorCode::kFormat, "config '{}': {}", config_path, e.what());
  }
  KVSLIM_CHECK(cfg.is_object(), ErrorCode::kFormat, "config '{}' is not a JSON object",
               config_path);
  if (const json::Value* mt = json::find(cfg, "model_type"); mt && mt->is_string())
    KVSLIM_CHECK(json::as_string(*mt) == "llama", ErrorCode::kFormat,
                 "config '{}': model_type '{}' is not supported (llama only)", config_path,
                 json::as_string(*mt));
  if (const json::Value* act = json::find(cfg, "hidden_act"); act && act->is_string())
    KVSLIM_CHECK(json::as_string(*act) == "silu", ErrorCode::kFormat,
                 "config '{}': hidden_act '{}' is not supported (silu only)", config_path,
                 json::as_string(*act));
  if (const json::Value* rs = json::find(cfg, "rope_scaling"))
    KVSLIM_CHECK(rs->is_null(), ErrorCode::kFormat,
                 "config '{}': rope_scaling is not supported", config_path);
  for (const char* key : {"attention_bias", "mlp_bias"})
    if (const json::Value* b = json::find(cfg, key); b && b->is_boolean())
      KVSLIM_CHECK(!json::as_bool(*b), ErrorCode::kFormat,
                   "config '{}': {} = true is not supported", config_path, key);

  Model m;
  m.path = dir;
  m.kind = "hf";
  m.name = stem_of(d);
  m.weights_path = weights_path;
  m.tokenizer_path = tokenizer_path;
  ModelConfig& c = m.config;
  c.dim = static_cast<int>(config_int(cfg, config_path, "hidden_size", 1, kMaxWidth));
  c.hidden_dim =
      static_cast<int>(config_int(cfg, config_path, "intermediate_size", 1, kMaxWidth * 8));
  c.n_layers = static_cast<int>(config_int(cfg, config_path, "num_hidden_layers", 1, kMaxLayers));
  c.n_heads = static_cast<int>(config_int(cfg, config_path, "num_attention_heads", 1, c.dim));
  const std::int64_t heads = c.n_heads;
  c.n_kv_heads = static_cast<int>(
      config_int(cfg, config_path, "num_key_value_heads", 1, c.n_heads, &heads));
  const std::int64_t default_head_dim = c.dim / c.n_heads;
  c.head_dim = static_cast<int>(
      config_int(cfg, config_path, "head_dim", 1, kMaxWidth, &default_head_dim));
  c.vocab_size = static_cast<int>(config_int(cfg, config_path, "vocab_size", 1, kMaxVocab));
  c.seq_len =
      static_cast<int>(config_int(cfg, config_path, "max_position_embeddings", 1, kMaxSeq));
  c.rope = RopeStyle::kHalf;
  c.rope_theta = config_number(cfg, config_path, "rope_theta", 10000.0);
  c.rms_eps = static_cast<float>(config_number(cfg, config_path, "rms_norm_eps", 1e-6));
  KVSLIM_CHECK(c.head_dim * c.n_heads == c.dim || json::find(cfg, "head_dim"), ErrorCode::kFormat,
               "config '{}': hidden_size {} is not a multiple of num_attention_heads {}",
               config_path, c.dim, c.n_heads);
  KVSLIM_CHECK(c.n_heads % c.n_kv_heads == 0 && c.head_dim % 2 == 0, ErrorCode::kFormat,
               "config '{}': num_attention_heads {} / num_key_value_heads {} / head_dim {} do "
               "not form a GQA layout with an even head_dim",
               config_path, c.n_heads, c.n_kv_heads, c.head_dim);
  bool tied = false;
  if (const json::Value* t = json::find(cfg, "tie_word_embeddings"); t && t->is_boolean())
    tied = json::as_bool(*t);
  const std::int64_t one = 1, two = 2;
  const int bos = static_cast<int>(config_int(cfg, config_path, "bos_token_id", 0, kMaxVocab, &one));
  const int eos = static_cast<int>(config_int(cfg, config_path, "eos_token_id", 0, kMaxVocab, &two));

  const std::string data = read_file(weights_path, "weights");
  std::size_t data_start = 0;
  const auto tensors = parse_safetensors(weights_path, data, &data_start);
  auto has = [&](const std::string& name) { return tensors.count(name) != 0; };
  auto take = [&](const std::string& name, std::vector<std::int64_t> shape) {
    const auto it = tensors.find(name);
    KVSLIM_CHECK(it != tensors.end(), ErrorCode::kFormat,
                 "safetensors '{}' has no tensor '{}' (expected shape {})", weights_path, name,
                 shape_str(shape));
    KVSLIM_CHECK(it->second.shape == shape, ErrorCode::kFormat,
                 "tensor '{}' in '{}' has shape {}, but config.json implies {}", name,
                 weights_path, shape_str(it->second.shape), shape_str(shape));
    std::vector<float> out((it->second.end - it->second.begin) / 4);
    if (!out.empty())
      std::memcpy(out.data(), data.data() + data_start + it->second.begin, out.size() * 4);
    return out;
  };

  const std::int64_t D = c.dim, H = c.hidden_dim, V = c.vocab_size;
  const std::int64_t q_dim = static_cast<std::int64_t>(c.n_heads) * c.head_dim;
  const std::int64_t kv_dim = static_cast<std::int64_t>(c.n_kv_heads) * c.head_dim;
  // Tied checkpoints may store the shared matrix under either name.
  if (has("model.embed_tokens.weight")) {
    m.embedding = take("model.embed_tokens.weight", {V, D});
    if (!tied || has("lm_head.weight")) m.classifier = take("lm_head.weight", {V, D});
  } else {
    KVSLIM_CHECK(tied, ErrorCode::kFormat,
                 "safetensors '{}' has no tensor 'model.embed_tokens.weight'", weights_path);
    m.embedding = take("lm_head.weight", {V, D});
  }
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights lw;
    lw.attn_norm = take(p + "input_layernorm.weight", {D});
    lw.wq = take(p + "self_attn.q_proj.weight", {q_dim, D});
    lw.wk = take(p + "self_attn.k_proj.weight", {kv_dim, D});
    lw.wv = take(p + "self_attn.v_proj.weight", {kv_dim, D});
    lw.wo = take(p + "self_attn.o_proj.weight", {D, q_dim});
    lw.ffn_norm = take(p + "post_attention_layernorm.weight", {D});
    lw.w1 = take(p + "mlp.gate_proj.weight", {H, D});
    lw.w2 = take(p + "mlp.down_proj.weight", {D, H});
    lw.w3 = take(p + "mlp.up_proj.weight", {H, D});
    m.layers.push_back(std::move(lw));
  }
  m.final_norm = take("model.norm.weight", {D});

  m.tokenizer = std::make_unique<BpeTokenizer>(tokenizer_path, c.vocab_size, bos, eos);
  return m;
}

// ---------------------------------------------------------------- detection

Model load_model(const std::string& path) {
  const fs::path p(path);
  std::error_code ec;
  KVSLIM_CHECK(fs::exists(p, ec), ErrorCode::kIo, "model path '{}' does not exist", path);
  if (fs::is_regular_file(p, ec)) {
    if (p.filename() == "model.safetensors")
      return load_hf(p.has_parent_path() ? p.parent_path().string() : ".");
    KVSLIM_CHECK(p.extension() == ".bin", ErrorCode::kFormat,
                 "cannot tell the model kind of '{}': expected a llama2.c .bin checkpoint, a "
                 "model.safetensors file or a model directory",
                 path);
    return load_llama2c(path, find_llama2c_tokenizer(p));
  }
  KVSLIM_CHECK(fs::is_directory(p, ec), ErrorCode::kIo, "model path '{}' is not a file or directory",
               path);
  if (fs::exists(p / "model.safetensors", ec)) return load_hf(path);
  std::vector<fs::path> bins;
  for (const auto& e : fs::directory_iterator(p, ec)) {
    if (e.is_regular_file(ec) && e.path().extension() == ".bin" &&
        !is_tokenizer_name(e.path().filename().string()))
      bins.push_back(e.path());
  }
  std::sort(bins.begin(), bins.end());
  KVSLIM_CHECK(!bins.empty(), ErrorCode::kIo,
               "no model in directory '{}': expected model.safetensors (Hugging Face) or a "
               "llama2.c .bin checkpoint",
               path);
  KVSLIM_CHECK(bins.size() == 1, ErrorCode::kIo,
               "directory '{}' holds {} .bin checkpoints ('{}', '{}', ...); pass one file", path,
               bins.size(), bins[0].string(), bins[1].string());
  return load_llama2c(bins[0].string(), find_llama2c_tokenizer(bins[0]));
}

}  // namespace kvslim::llama
