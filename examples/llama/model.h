// Llama-family model weights (f32) and their loaders:
//   - llama2.c checkpoints (`stories260K.bin`): 7 int32 header fields, then f32 weights in
//     llama2.c order; tokenizer `tok*.bin` next to the checkpoint. Interleaved RoPE.
//   - Hugging Face LlamaForCausalLM directories: config.json, model.safetensors (F32
//     tensors only), tokenizer.json. Half-split RoPE.
// Every malformed, truncated or inconsistent file throws kvslim::Error (kIo or kFormat) with
// a message naming the file and the offending value.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "tokenizer.h"

namespace kvslim::llama {

/// Which channels RoPE rotates together.
enum class RopeStyle {
  kInterleaved,  // pairs (2j, 2j+1): llama2.c, Meta's original checkpoints
  kHalf,         // pairs (j, j + head_dim/2): Hugging Face transformers
};

/// "interleaved" / "half" (the recordings' meta.json spelling).
const char* rope_style_name(RopeStyle style) noexcept;

/// Shape and hyper-parameters of a model.
struct ModelConfig {
  int dim = 0;         // residual stream width
  int hidden_dim = 0;  // SwiGLU inner width
  int n_layers = 0;
  int n_heads = 0;     // query heads
  int n_kv_heads = 0;  // key/value heads (GQA when < n_heads)
  int head_dim = 0;
  int vocab_size = 0;
  int seq_len = 0;     // context length the model was trained with
  RopeStyle rope = RopeStyle::kInterleaved;
  double rope_theta = 10000.0;
  float rms_eps = 1e-5f;
};

/// Weights of one transformer block; matrices are row-major [out][in] as both formats store
/// them.
struct LayerWeights {
  std::vector<float> attn_norm;  // [dim]
  std::vector<float> wq;         // [n_heads * head_dim][dim]
  std::vector<float> wk;         // [n_kv_heads * head_dim][dim]
  std::vector<float> wv;         // [n_kv_heads * head_dim][dim]
  std::vector<float> wo;         // [dim][n_heads * head_dim]
  std::vector<float> ffn_norm;   // [dim]
  std::vector<float> w1;         // gate [hidden_dim][dim]
  std::vector<float> w2;         // down [dim][hidden_dim]
  std::vector<float> w3;         // up   [hidden_dim][dim]
};

/// A loaded model: config, weights and tokenizer.
struct Model {
  std::string path;  // checkpoint file or model directory as given to the loader
  std::string kind;  // "llama2c" or "hf"
  std::string name;  // file or directory stem, e.g. "stories260K"
  std::string weights_path;    // checkpoint or model.safetensors actually read
  std::string tokenizer_path;  // tok*.bin or tokenizer.json actually read
  ModelConfig config;
  std::vector<float> embedding;   // [vocab_size][dim]
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;  // [dim]
  std::vector<float> classifier;  // [vocab_size][dim]; empty when tied to the embedding
  std::unique_ptr<Tokenizer> tokenizer;

  const float* classifier_weights() const {
    return classifier.empty() ? embedding.data() : classifier.data();
  }
};

/// Loads a model from a checkpoint file or a model directory, detecting the kind:
/// a `.bin` file, or a directory holding one non-tokenizer `.bin`, is a llama2.c checkpoint
/// (tokenizer `tok*.bin` or `tokenizer.bin` beside it); a directory with `model.safetensors`
/// (or that file itself) is a Hugging Face model.
Model load_model(const std::string& path);

/// llama2.c checkpoint + tokenizer file.
Model load_llama2c(const std::string& checkpoint, const std::string& tokenizer);

/// Hugging Face directory with config.json, model.safetensors and tokenizer.json.
Model load_hf(const std::string& dir);

}  // namespace kvslim::llama
