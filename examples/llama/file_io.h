// Whole-file reads and little-endian field decoding for the model and tokenizer loaders.
// Every failure is a kvslim::Error naming the file, so a bad path never turns into a crash.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

namespace kvslim::llama {

/// Reads a whole file. `what` says what the file is for ("checkpoint", "tokenizer") so the
/// message of the Error(kIo) thrown on failure tells the user which input is wrong.
std::string read_file(const std::string& path, std::string_view what);

/// Writes a whole file; throws Error(kIo) naming the path on failure.
void write_file(const std::string& path, const void* data, std::size_t bytes);

/// True if `path` names an existing regular file.
bool is_file(const std::string& path);
/// True if `path` names an existing directory.
bool is_directory(const std::string& path);

/// Sequential reader over a byte buffer that throws Error(kFormat) naming `file` and the
/// field when the buffer ends early (truncated files).
class ByteReader {
 public:
  ByteReader(std::string_view bytes, std::string file) : bytes_(bytes), file_(std::move(file)) {}

  std::int32_t i32(std::string_view field);
  std::uint64_t u64(std::string_view field);
  float f32(std::string_view field);
  std::string_view bytes(std::size_t n, std::string_view field);

  std::size_t offset() const noexcept { return pos_; }
  std::size_t remaining() const noexcept { return bytes_.size() - pos_; }

 private:
  void need(std::size_t n, std::string_view field) const;
  template <class T>
  T scalar(std::string_view field);

  std::string_view bytes_;
  std::string file_;
  std::size_t pos_ = 0;
};

}  // namespace kvslim::llama
