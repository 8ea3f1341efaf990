#pragma once
#define KVSLIM_VERSION_MAJOR 0
#define KVSLIM_VERSION_MINOR 1
#define KVSLIM_VERSION_PATCH 0
namespace kvslim {
/// "0.1.0"
inline constexpr const char* kVersion = "0.1.0";
}  // namespace kvslim
