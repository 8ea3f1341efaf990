// Internal: argument checks at the API boundary. fmt stays out of public headers, so this
// header is only included by the library's own .cpp files (and tools/examples/tests).
#pragma once

#include <fmt/format.h>

#include <cassert>

#include "kvslim/error.h"

namespace kvslim::detail {

[[noreturn]] inline void throw_error(ErrorCode code, std::string message) {
  throw Error(code, std::move(message));
}

}  // namespace kvslim::detail

/// KVSLIM_CHECK(cond, code, "fmt {}", args...): throws kvslim::Error(code, message) if !cond.
#define KVSLIM_CHECK(cond, code, ...)                                            \
  do {                                                                           \
    if (!(cond)) ::kvslim::detail::throw_error((code), fmt::format(__VA_ARGS__)); \
  } while (0)

#define KVSLIM_FAIL(code, ...) ::kvslim::detail::throw_error((code), fmt::format(__VA_ARGS__))

#ifndef NDEBUG
#define KVSLIM_DCHECK(cond) assert(cond)
#else
#define KVSLIM_DCHECK(cond) ((void)0)
#endif
