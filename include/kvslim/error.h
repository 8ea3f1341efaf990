// kvslim error type. Every bad input at the API boundary throws kvslim::Error with a
// message that names the bad value and what was expected; the library never aborts or
// prints. Kernels are noexcept and never throw: arguments are checked before they run.
#pragma once

#include <stdexcept>
#include <string>

namespace kvslim {

/// What kind of mistake an Error reports; lets callers branch without parsing messages.
enum class ErrorCode {
  kInvalidArgument,   // a value out of its allowed range (bits, group, thread count, ...)
  kShapeMismatch,     // tensor shape or stride does not fit the cache configuration
  kOutOfRange,        // layer, head or token index out of range
  kRecipe,            // unknown recipe stage or key, malformed recipe string
  kNonFinite,         // NaN or Inf in appended keys/values
  kPosition,          // token positions going backwards or repeating
  kCapacity,          // cache full, budget larger than capacity
  kUnsupportedIsa,    // asked for an instruction set this CPU lacks
  kIo,                // file could not be read or written
  kFormat,            // corrupted, truncated or unknown file contents
  kInvalidState,      // the object cannot take this call now (e.g. a moved-from KVCache)
  kVersion,           // a saved cache written by a newer format version than this library reads
  kMismatch,          // a saved cache whose config, recipe or codebooks disagree with the target's
};

/// Returns a stable lowercase name for a code ("shape_mismatch", ...).
const char* error_code_name(ErrorCode code) noexcept;

/// The one exception type kvslim throws.
class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message)
      : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace kvslim
