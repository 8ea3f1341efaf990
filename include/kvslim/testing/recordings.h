// Reader for real key/value/query recordings (../shared/data/dumps format): one directory
// per 512-token window with meta.json and raw little-endian f32 tensors. Used by the tests,
// the quality tools and kvslim-eval.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvslim::testing {

struct Recording {
  std::string dir;
  std::string name;
  int layers = 0, q_heads = 0, kv_heads = 0, head_dim = 0, tokens = 0;
  std::string rope;  // "interleaved" or "half"
  double rope_theta = 0.0, rms_eps = 0.0;
  std::int64_t text_byte_offset = 0;
  std::vector<int> token_ids;
  // Tensors in C order (see data/README.md):
  std::vector<float> q;         // [layers][q_heads][tokens][head_dim]
  std::vector<float> k;         // [layers][kv_heads][tokens][head_dim] (post-RoPE)
  std::vector<float> k_pre;     // [layers][kv_heads][tokens][head_dim]
  std::vector<float> v;         // [layers][kv_heads][tokens][head_dim]
  std::vector<float> attn_out;  // [layers][q_heads][tokens][head_dim]
  std::vector<float> nll;       // [tokens]

  /// Start of head h of layer l ([tokens][head_dim] rows) in q / attn_out.
  const float* q_head(int l, int h) const { return q.data() + offset(l, h, q_heads); }
  const float* out_head(int l, int h) const { return attn_out.data() + offset(l, h, q_heads); }
  /// Start of kv head h of layer l in k / k_pre / v.
  const float* k_head(int l, int h) const { return k.data() + offset(l, h, kv_heads); }
  const float* k_pre_head(int l, int h) const { return k_pre.data() + offset(l, h, kv_heads); }
  const float* v_head(int l, int h) const { return v.data() + offset(l, h, kv_heads); }

 private:
  std::size_t offset(int l, int h, int heads) const {
    return (static_cast<std::size_t>(l) * heads + h) * tokens * head_dim;
  }
};

/// Load one recording directory; throws Error(kIo) for missing files and Error(kFormat)
/// for files whose size does not match meta.json.
Recording load_recording(const std::string& dir);

/// Every directory under root (recursively) that holds a meta.json, sorted by path.
std::vector<std::string> find_recordings(const std::string& root);

}  // namespace kvslim::testing
