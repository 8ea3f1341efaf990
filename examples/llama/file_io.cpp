#include "file_io.h"

#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <system_error>

#include "check.h"

namespace kvslim::llama {

static_assert(std::endian::native == std::endian::little,
              "the model formats are little-endian and are read with memcpy");

std::string read_file(const std::string& path, std::string_view what) {
  std::error_code ec;
  KVSLIM_CHECK(std::filesystem::exists(path, ec), ErrorCode::kIo, "{} '{}' does not exist", what,
               path);
  KVSLIM_CHECK(!std::filesystem::is_directory(path, ec), ErrorCode::kIo,
               "{} '{}' is a directory, expected a file", what, path);
  std::ifstream f(path, std::ios::binary);
  KVSLIM_CHECK(f.good(), ErrorCode::kIo, "cannot open {} '{}': {}", what, path,
               std::strerror(errno));
  std::string data;
  f.seekg(0, std::ios::end);
  const std::streamoff size = f.tellg();
  KVSLIM_CHECK(size >= 0, ErrorCode::kIo, "cannot determine the size of {} '{}'", what, path);
  f.seekg(0, std::ios::beg);
  data.resize(static_cast<std::size_t>(size));
  f.read(data.data(), static_cast<std::streamsize>(size));
  KVSLIM_CHECK(f.good() || (f.eof() && f.gcount() == size), ErrorCode::kIo,
               "short read from {} '{}'", what, path);
  return data;
}

void write_file(const std::string& path, const void* data, std::size_t bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  KVSLIM_CHECK(f.good(), ErrorCode::kIo, "cannot create '{}': {}", path, std::strerror(errno));
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  f.close();
  KVSLIM_CHECK(!f.fail(), ErrorCode::kIo, "cannot write {} bytes to '{}'", bytes, path);
}

bool is_file(const std::string& path) {
  std::error_code ec;
  return std::filesystem::is_regular_file(path, ec);
}

bool is_directory(const std::string& path) {
  std::error_code ec;
  return std::filesystem::is_directory(path, ec);
}

void ByteReader::need(std::size_t n, std::string_view field) const {
  KVSLIM_CHECK(n <= remaining(), ErrorCode::kFormat,
               "'{}' is truncated: {} needs {} bytes at offset {} but the file has {} bytes",
               file_, field, n, pos_, bytes_.size());
}

// Fields are little-endian, as is every machine kvslim builds for (x86-64).
template <class T>
T ByteReader::scalar(std::string_view field) {
  const std::string_view raw = bytes(sizeof(T), field);
  T v;
  std::memcpy(&v, raw.data(), sizeof(T));
  return v;
}

std::int32_t ByteReader::i32(std::string_view field) { return scalar<std::int32_t>(field); }
std::uint64_t ByteReader::u64(std::string_view field) { return scalar<std::uint64_t>(field); }
float ByteReader::f32(std::string_view field) { return scalar<float>(field); }

std::string_view ByteReader::bytes(std::size_t n, std::string_view field) {
  need(n, field);
  std::string_view v = bytes_.substr(pos_, n);
  pos_ += n;
  return v;
}

}  // namespace kvslim::llama
