#include "kvslim/error.h"

namespace kvslim {

const char* error_code_name(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "invalid_argument";
    case ErrorCode::kShapeMismatch: return "shape_mismatch";
    case ErrorCode::kOutOfRange: return "out_of_range";
    case ErrorCode::kRecipe: return "recipe";
    case ErrorCode::kNonFinite: return "non_finite";
    case ErrorCode::kPosition: return "position";
    case ErrorCode::kCapacity: return "capacity";
    case ErrorCode::kUnsupportedIsa: return "unsupported_isa";
    case ErrorCode::kIo: return "io";
    case ErrorCode::kFormat: return "format";
    case ErrorCode::kInvalidState: return "invalid_state";
    case ErrorCode::kVersion: return "version";
    case ErrorCode::kMismatch: return "mismatch";
  }
  return "unknown";
}

}  // namespace kvslim
