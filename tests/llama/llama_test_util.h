// Helpers shared by the llama engine tests: cached models, a scratch directory, relative L2.
#pragma once

#include <gtest/gtest.h>

#include <unistd.h>

#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "model.h"
#include "test_support.h"

namespace kvslim::llama::test {

inline constexpr const char* kStories = "models/stories260K";
inline constexpr const char* kStoriesBin = "models/stories260K/stories260K.bin";
inline constexpr const char* kTiny = "models/tinystories656K";
inline constexpr const char* kTinyWeights = "models/tinystories656K/model.safetensors";
inline constexpr const char* kText = "data/text/tinystories_valid_part1_marked.txt";

/// Models are small (1-2.6 MB) but loading once per test binary keeps ASan runs short.
inline const Model& shared_model(const std::string& rel) {
  static std::map<std::string, std::unique_ptr<Model>> cache;
  auto& m = cache[rel];
  if (!m) m = std::make_unique<Model>(load_model(kvslim::test::shared_path(rel)));
  return *m;
}

/// "stories260K" or "tinystories656K": the name of a test parameter holding kStories or kTiny.
inline std::string model_label(const std::string& rel) {
  return rel.find("260K") != std::string::npos ? "stories260K" : "tinystories656K";
}

/// The whole file as a string ("" if it cannot be read).
inline std::string read_all(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

/// A fresh directory under the system temp dir, removed on destruction.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& tag) {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = "kvslim_llama_" + tag + "_" + std::to_string(::getpid());
    if (info) name += std::string("_") + info->name();
    for (char& ch : name)
      if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '_') ch = '_';
    path_ = std::filesystem::temp_directory_path() / name;
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

/// ||a - b|| / ||b|| over the first n entries.
inline double rel_l2(const float* a, const float* b, std::size_t n) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

}  // namespace kvslim::llama::test
