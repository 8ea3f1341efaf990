#include "kvslim/testing/recordings.h"

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "check.h"
#include "util/json.h"

namespace kvslim::testing {
namespace fs = std::filesystem;

namespace {
std::vector<float> read_f32(const std::string& path, std::size_t count) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  KVSLIM_CHECK(f.good(), ErrorCode::kIo, "cannot open recording tensor '{}'", path);
  const auto size = static_cast<std::size_t>(f.tellg());
  KVSLIM_CHECK(size == count * 4, ErrorCode::kFormat,
               "recording tensor '{}' has {} bytes, meta.json implies {} ({} floats)", path, size,
               count * 4, count);
  std::vector<float> out(count);
  f.seekg(0);
  f.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(size));
  KVSLIM_CHECK(f.good(), ErrorCode::kIo, "short read from '{}'", path);
  return out;
}
}  // namespace

Recording load_recording(const std::string& dir) {
  Recording r;
  r.dir = dir;
  const std::string meta_path = (fs::path(dir) / "meta.json").string();
  const json::Value meta = json::parse_file(meta_path);  // kIo / kFormat naming the file
  try {
    r.name = json::as_string(json::at(meta, "name"), "name");
    const json::Value& c = json::at(meta, "config");
    r.layers = static_cast<int>(json::as_int(json::at(c, "n_layers"), "n_layers"));
    r.q_heads = static_cast<int>(json::as_int(json::at(c, "n_heads"), "n_heads"));
    r.kv_heads = static_cast<int>(json::as_int(json::at(c, "n_kv_heads"), "n_kv_heads"));
    r.head_dim = static_cast<int>(json::as_int(json::at(c, "head_dim"), "head_dim"));
    r.rope = json::as_string(json::at(c, "rope"), "rope");
    r.rope_theta = json::as_number(json::at(c, "rope_theta"), "rope_theta");
    r.rms_eps = json::as_number(json::at(c, "rms_eps"), "rms_eps");
    r.tokens = static_cast<int>(json::as_int(json::at(meta, "n_tokens"), "n_tokens"));
    r.text_byte_offset = json::as_int(json::at(meta, "text_byte_offset"), "text_byte_offset");
    for (const auto& t : json::as_array(json::at(meta, "token_ids"), "token_ids"))
      r.token_ids.push_back(static_cast<int>(json::as_int(t, "token id")));
  } catch (const Error& e) {
    KVSLIM_FAIL(ErrorCode::kFormat, "recording '{}': {}", meta_path, e.what());
  }
  KVSLIM_CHECK(r.layers > 0 && r.q_heads > 0 && r.kv_heads > 0 && r.head_dim > 0 && r.tokens > 0 &&
                   r.q_heads % r.kv_heads == 0,
               ErrorCode::kFormat, "recording '{}': implausible config", dir);
  const std::size_t qn = static_cast<std::size_t>(r.layers) * r.q_heads * r.tokens * r.head_dim;
  const std::size_t kn = static_cast<std::size_t>(r.layers) * r.kv_heads * r.tokens * r.head_dim;
  const fs::path p(dir);
  r.q = read_f32((p / "q.f32").string(), qn);
  r.k = read_f32((p / "k.f32").string(), kn);
  r.k_pre = read_f32((p / "k_pre.f32").string(), kn);
  r.v = read_f32((p / "v.f32").string(), kn);
  r.attn_out = read_f32((p / "attn_out.f32").string(), qn);
  r.nll = read_f32((p / "nll.f32").string(), static_cast<std::size_t>(r.tokens));
  return r;
}

std::vector<std::string> find_recordings(const std::string& root) {
  std::vector<std::string> out;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return out;
  for (auto it = fs::recursive_directory_iterator(root, ec); it != fs::recursive_directory_iterator();
       it.increment(ec)) {
    if (ec) break;
    if (it->is_regular_file() && it->path().filename() == "meta.json")
      out.push_back(it->path().parent_path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace kvslim::testing
