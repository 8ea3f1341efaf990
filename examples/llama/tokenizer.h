// Tokenizers of the two supported model families:
//   - Llama2cTokenizer: llama2.c's tokenizer.bin format and its score-greedy merge encoder
//     (the text gets a leading space; unknown UTF-8 code points fall back to byte tokens
//     <0xXX> at ids 3..258).
//   - BpeTokenizer: a Hugging Face tokenizer.json with a BPE model, merges applied by rank
//     over the whole text (no pre-tokenizer), the normalizer's Prepend/Replace steps
//     (Llama's "prepend ▁, spaces become ▁") and byte fallback.
// Both encode without BOS; callers add it (see eval.h's token stream rule).
#pragma once

#include <atomic>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace kvslim::llama {

/// Text <-> token ids for one model.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  /// Ids of `text`, without BOS, with the tokenizer's own leading-space convention.
  virtual std::vector<int> encode(std::string_view text) const = 0;
  /// Bytes that `token` adds to the output text when it follows `prev` (prev = -1 at the
  /// start): byte tokens become their byte, the leading space after BOS is dropped, special
  /// tokens yield nothing.
  virtual std::string decode(int prev, int token) const = 0;
  /// The vocabulary entry of `token` as readable text (recordings' `token_pieces`).
  virtual std::string piece(int token) const = 0;
  virtual int vocab_size() const = 0;

  /// Concatenated decode() of a sequence.
  std::string decode(std::span<const int> tokens) const;

  int bos_id() const noexcept { return bos_id_; }
  int eos_id() const noexcept { return eos_id_; }

  /// Characters (UTF-8 code points) that encode() could not represent — no token for them
  /// and no byte tokens to fall back on — with their bytes, summed over every encode() call
  /// since construction. They became <unk>, or were dropped when the vocabulary has no
  /// <unk> (unknown_dropped()). The tokenizer never prints; callers report these counts.
  struct UnknownCount {
    std::int64_t chars = 0;
    std::int64_t bytes = 0;
  };
  UnknownCount unknown() const noexcept {
    return {unknown_chars_.load(std::memory_order_relaxed),
            unknown_bytes_.load(std::memory_order_relaxed)};
  }
  bool unknown_dropped() const noexcept { return unknown_dropped_; }

 protected:
  void count_unknown(std::size_t bytes) const noexcept {
    unknown_chars_.fetch_add(1, std::memory_order_relaxed);
    unknown_bytes_.fetch_add(static_cast<std::int64_t>(bytes), std::memory_order_relaxed);
  }

  int bos_id_ = 1;
  int eos_id_ = 2;
  bool unknown_dropped_ = false;

 private:
  mutable std::atomic<std::int64_t> unknown_chars_{0};
  mutable std::atomic<std::int64_t> unknown_bytes_{0};
};

/// llama2.c tokenizer (tok512.bin, tokenizer.bin).
class Llama2cTokenizer final : public Tokenizer {
 public:
  /// Reads `path`, which must hold exactly `vocab_size` entries. Throws Error(kIo/kFormat).
  Llama2cTokenizer(const std::string& path, int vocab_size);
  using Tokenizer::decode;

  std::vector<int> encode(std::string_view text) const override;
  std::string decode(int prev, int token) const override;
  std::string piece(int token) const override;
  int vocab_size() const override { return static_cast<int>(vocab_.size()); }

 private:
  int lookup(std::string_view s) const;

  std::vector<std::string> vocab_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> ids_;
  int byte_base_ = -1;  // id of <0x00> if the vocabulary has byte tokens
};

/// Hugging Face tokenizer.json with a BPE model.
class BpeTokenizer final : public Tokenizer {
 public:
  /// Reads `path`; ids must be below `model_vocab_size`. bos/eos come from config.json.
  BpeTokenizer(const std::string& path, int model_vocab_size, int bos_id, int eos_id);
  using Tokenizer::decode;

  std::vector<int> encode(std::string_view text) const override;
  std::string decode(int prev, int token) const override;
  std::string piece(int token) const override;
  int vocab_size() const override { return static_cast<int>(vocab_.size()); }

 private:
  struct Merge {
    int rank;
    int id;
  };
  struct NormalizerStep {
    bool prepend;         // true: Prepend(text); false: Replace(pattern -> text)
    std::string pattern;  // Replace only
    std::string text;
  };

  std::string normalize(std::string_view text) const;
  static std::uint64_t pair_key(int a, int b) {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) |
           static_cast<std::uint32_t>(b);
  }

  std::vector<std::string> vocab_;  // id -> token string (empty for unused ids)
  std::vector<bool> special_;
  std::unordered_map<std::string, int> ids_;
  std::unordered_map<std::uint64_t, Merge> merges_;
  std::vector<NormalizerStep> normalizer_;
  int unk_id_ = -1;
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;
};

}  // namespace kvslim::llama
