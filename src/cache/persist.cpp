// KVCache::save / load: the saved-cache format (docs/formats.md). Work in progress.
#include <istream>
#include <ostream>

#include "check.h"
#include "kvslim/cache/kv_cache.h"

namespace kvslim {

void KVCache::save(std::ostream&) { KVSLIM_CHECK(false, ErrorCode::kInvalidState, "KVCache::save: {}", "not yet"); }
void KVCache::save(const std::string&) { KVSLIM_CHECK(false, ErrorCode::kInvalidState, "KVCache::save: {}", "not yet"); }
void KVCache::load(std::istream&) { KVSLIM_CHECK(false, ErrorCode::kInvalidState, "KVCache::load: {}", "not yet"); }
void KVCache::load(const std::string&) { KVSLIM_CHECK(false, ErrorCode::kInvalidState, "KVCache::load: {}", "not yet"); }

}  // namespace kvslim
