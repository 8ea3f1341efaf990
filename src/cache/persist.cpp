// KVCache::save / load: the saved-cache format (docs/formats.md, "Saved cache").
//
//   file     = header, CONFIG, SHARED, HEAD x (layers * kv_heads, layer-major), END
//   header   = magic "KVSLIMKC", u32 format version, u32 flags (0)
//   section  = u32 tag, u64 payload bytes, payload, u64 xxHash64(tag, length, payload)
//
// Load reads the whole stream, checks the header and every section's checksum, then parses
// every section into new stores; only when all of it passed does it swap them in, so a load
// that throws leaves the cache as it was.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <istream>
#include <iterator>
#include <ostream>

#include "cache/persist.h"
#include "check.h"
#include "kvslim/cache/kv_cache.h"
#include "kvslim/cache/token_store.h"
#include "kvslim/kernels/kernel_table.h"
#include "kvslim/policy/codebook.h"
#include "kvslim/policy/policy.h"
#include "kvslim/version.h"

namespace kvslim::detail {

namespace {

constexpr char kMagic[8] = {'K', 'V', 'S', 'L', 'I', 'M', 'K', 'C'};
constexpr std::uint32_t kFormatVersion = 1;
constexpr std::size_t kHeaderBytes = 16, kSectionHead = 12, kChecksumBytes = 8;
constexpr std::uint64_t kChecksumSeed = 0x6b76736c696d3031ull;  // "kvslim01"

constexpr std::uint32_t tag(const char (&t)[5]) {
  return static_cast<std::uint32_t>(static_cast<unsigned char>(t[0])) |
         static_cast<std::uint32_t>(static_cast<unsigned char>(t[1])) << 8 |
         static_cast<std::uint32_t>(static_cast<unsigned char>(t[2])) << 16 |
         static_cast<std::uint32_t>(static_cast<unsigned char>(t[3])) << 24;
}
constexpr std::uint32_t kConfig = tag("CONF"), kShared = tag("SHRD"), kHead = tag("HEAD"), kEnd = tag("END.");

std::string tag_text(std::uint32_t t) {
  std::string s;
  for (int i = 0; i < 4; ++i) {
    const char c = static_cast<char>((t >> (8 * i)) & 0xFF);
    s += c >= 0x20 && c < 0x7F ? std::string(1, c) : fmt::format("\\x{:02x}", static_cast<unsigned char>(c));
  }
  return s;
}

void write_section(std::ostream& os, std::uint32_t t, const std::string& payload) {
  StateWriter head;
  head.put<std::uint32_t>(t);
  head.put<std::uint64_t>(payload.size());
  const std::uint64_t sum =
      xxhash64(payload.data(), payload.size(), xxhash64(head.bytes().data(), head.bytes().size(), kChecksumSeed));
  os.write(head.bytes().data(), static_cast<std::streamsize>(head.bytes().size()));
  os.write(payload.data(), static_cast<std::streamsize>(payload.size()));
  StateWriter tail;
  tail.put<std::uint64_t>(sum);
  os.write(tail.bytes().data(), static_cast<std::streamsize>(tail.bytes().size()));
}

struct Section {
  std::uint32_t tag;
  const std::byte* data;
  std::size_t size;
  std::size_t offset;  // of the section's start in the file
};

// Header check and section split with checksums; nothing is interpreted yet.
std::vector<Section> split_sections(const std::string& file) {
  const auto* base = reinterpret_cast<const std::byte*>(file.data());
  const std::size_t n = file.size();
  KVSLIM_CHECK(n >= sizeof(kMagic) && std::memcmp(file.data(), kMagic, sizeof(kMagic)) == 0, ErrorCode::kFormat,
               "saved cache: not a kvslim saved cache (the file is {} bytes and does not start with the magic "
               "\"KVSLIMKC\")",
               n);
  KVSLIM_CHECK(n >= kHeaderBytes, ErrorCode::kFormat, "saved cache: the file ends inside its header ({} of {} bytes)",
               n, kHeaderBytes);
  std::uint32_t version = 0, flags = 0;
  std::memcpy(&version, file.data() + 8, 4);
  std::memcpy(&flags, file.data() + 12, 4);
  KVSLIM_CHECK(version <= kFormatVersion, ErrorCode::kVersion,
               "saved cache: format version {} is newer than the version this library reads ({}); load it with a "
               "newer kvslim",
               version, kFormatVersion);
  KVSLIM_CHECK(version == kFormatVersion, ErrorCode::kFormat,
               "saved cache: format version {} is not one this library reads (it reads version {})", version,
               kFormatVersion);
  KVSLIM_CHECK(flags == 0, ErrorCode::kFormat, "saved cache: header flags are {:#x}, expected 0", flags);
  std::vector<Section> out;
  std::size_t pos = kHeaderBytes;
  for (;;) {
    KVSLIM_CHECK(pos < n, ErrorCode::kFormat,
                 "saved cache: the file ends after {} sections without the END section (truncated at byte {})",
                 out.size(), n);
    KVSLIM_CHECK(n - pos >= kSectionHead, ErrorCode::kFormat,
                 "saved cache: the file ends inside the header of section {} (byte {} of {})", out.size(), pos, n);
    std::uint32_t t = 0;
    std::uint64_t len = 0;
    std::memcpy(&t, file.data() + pos, 4);
    std::memcpy(&len, file.data() + pos + 4, 8);
    KVSLIM_CHECK(t == kConfig || t == kShared || t == kHead || t == kEnd, ErrorCode::kFormat,
                 "saved cache: section {} at byte {} has the unknown tag '{}'", out.size(), pos, tag_text(t));
    const std::size_t room = n - pos - kSectionHead;
    KVSLIM_CHECK(room >= kChecksumBytes && len <= room - kChecksumBytes, ErrorCode::kFormat,
                 "saved cache: section {} ('{}', byte {}) says it holds {} bytes but only {} follow (truncated or "
                 "corrupted)",
                 out.size(), tag_text(t), pos, len, room < kChecksumBytes ? 0 : room - kChecksumBytes);
    const std::byte* payload = base + pos + kSectionHead;
    std::uint64_t stored = 0;
    std::memcpy(&stored, payload + len, 8);
    const std::uint64_t sum = xxhash64(payload, len, xxhash64(file.data() + pos, kSectionHead, kChecksumSeed));
    KVSLIM_CHECK(sum == stored, ErrorCode::kFormat,
                 "saved cache: section {} ('{}', byte {}, {} bytes) fails its checksum (stored {:016x}, computed "
                 "{:016x}): the file is corrupted",
                 out.size(), tag_text(t), pos, len, stored, sum);
    out.push_back({t, payload, static_cast<std::size_t>(len), pos});
    pos += kSectionHead + len + kChecksumBytes;
    if (t == kEnd) break;
  }
  KVSLIM_CHECK(pos == n, ErrorCode::kFormat, "saved cache: {} bytes follow the END section", n - pos);
  return out;
}

std::string read_all(std::istream& is) {
  std::string s{std::istreambuf_iterator<char>(is), std::istreambuf_iterator<char>()};
  KVSLIM_CHECK(!is.bad(), ErrorCode::kIo, "KVCache::load: reading the stream failed after {} bytes", s.size());
  return s;
}

void put_config(StateWriter& w, const CacheParts& c) {
  const CacheConfig& cfg = c.cfg;
  w.put<std::int32_t>(cfg.layers);
  w.put<std::int32_t>(cfg.q_heads);
  w.put<std::int32_t>(cfg.kv_heads);
  w.put<std::int32_t>(cfg.head_dim);
  w.put<std::int64_t>(cfg.max_tokens);
  w.put_str(cfg.recipe);
  w.put<std::uint8_t>(cfg.non_finite == NonFinitePolicy::kAllow ? 1 : 0);
  w.put_bool(cfg.pre_rope_keys);
  w.put_bool(cfg.rope.has_value());
  const RopeSpec rope = cfg.rope.value_or(RopeSpec{});
  w.put<double>(rope.theta);
  w.put<std::int32_t>(rope.rotary_dims);
  w.put_bool(rope.interleaved);
  w.put<double>(rope.scaling);
  w.put<std::uint64_t>(c.codebooks.size());
  for (const auto& [name, cb] : c.codebooks) {
    w.put_str(name);
    w.put<std::uint64_t>(cb->fingerprint());
  }
  w.put_str(fmt::format("{}.{}.{}", KVSLIM_VERSION_MAJOR, KVSLIM_VERSION_MINOR, KVSLIM_VERSION_PATCH));
  w.put_str(c.kt.name);
}

template <class T>
void same(const char* field, const T& file, const T& here) {
  KVSLIM_CHECK(file == here, ErrorCode::kMismatch,
               "saved cache does not fit this cache: {} is {} in the file but {} here", field, file, here);
}

// Reads the CONFIG section into a CacheConfig (codebooks as (name, fingerprint)).
struct SavedConfig {
  CacheConfig cfg;
  std::vector<std::pair<std::string, std::uint64_t>> codebooks;
  std::string version, isa;
};

SavedConfig get_config(StateReader& r) {
  SavedConfig s;
  CacheConfig& c = s.cfg;
  c.layers = r.get<std::int32_t>("layers");
  c.q_heads = r.get<std::int32_t>("q_heads");
  c.kv_heads = r.get<std::int32_t>("kv_heads");
  c.head_dim = r.get<std::int32_t>("head_dim");
  c.max_tokens = r.get<std::int64_t>("max_tokens");
  c.recipe = r.get_str("recipe");
  const auto nf = r.get<std::uint8_t>("non_finite");
  r.check(nf <= 1, "non_finite", "value {} is not a NonFinitePolicy", nf);
  c.non_finite = nf ? NonFinitePolicy::kAllow : NonFinitePolicy::kReject;
  c.pre_rope_keys = r.get_bool("pre_rope_keys");
  const bool has_rope = r.get_bool("rope");
  RopeSpec rope;
  rope.theta = r.get<double>("rope theta");
  rope.rotary_dims = r.get<std::int32_t>("rope rotary_dims");
  rope.interleaved = r.get_bool("rope interleaved");
  rope.scaling = r.get<double>("rope scaling");
  if (has_rope) c.rope = rope;
  const std::size_t ncb = r.get_count<std::byte>("codebooks", 1u << 16);
  for (std::size_t i = 0; i < ncb; ++i) {
    std::string name = r.get_str("codebook name");
    s.codebooks.emplace_back(std::move(name), r.get<std::uint64_t>("codebook fingerprint"));
  }
  s.version = r.get_str("library version");
  s.isa = r.get_str("ISA");
  r.expect_end();
  return s;
}

void check_config(const SavedConfig& s, const CacheParts& c) {
  const CacheConfig &f = s.cfg, &h = c.cfg;
  same("layers", f.layers, h.layers);
  same("q_heads", f.q_heads, h.q_heads);
  same("kv_heads", f.kv_heads, h.kv_heads);
  same("head_dim", f.head_dim, h.head_dim);
  same("max_tokens", f.max_tokens, h.max_tokens);
  same("non_finite (0 reject, 1 allow)", static_cast<int>(f.non_finite), static_cast<int>(h.non_finite));
  same("pre_rope_keys", f.pre_rope_keys, h.pre_rope_keys);
  same("rope (set)", f.rope.has_value(), h.rope.has_value());
  if (f.rope) {
    same("rope.theta", f.rope->theta, h.rope->theta);
    same("rope.rotary_dims", f.rope->rotary_dims, h.rope->rotary_dims);
    same("rope.interleaved", f.rope->interleaved, h.rope->interleaved);
    same("rope.scaling", f.rope->scaling, h.rope->scaling);
  }
  // The heads' chains are compared one by one (HEAD sections): equivalent recipe texts that
  // build the same chains are fine. Codebooks are compared by content.
  same("the number of codebooks", s.codebooks.size(), c.codebooks.size());
  for (std::size_t i = 0; i < s.codebooks.size(); ++i)
    KVSLIM_CHECK(s.codebooks[i].second == c.codebooks[i].second->fingerprint(), ErrorCode::kMismatch,
                 "saved cache does not fit this cache: codebooks '{}' in the file have fingerprint {:016x} but this "
                 "cache's codebooks '{}' have {:016x} (different centroids)",
                 s.codebooks[i].first, s.codebooks[i].second, c.codebooks[i].first,
                 c.codebooks[i].second->fingerprint());
}

std::string head_name(int layer, int h) { return fmt::format("HEAD (layer {}, kv head {})", layer, h); }

}  // namespace

void save_cache(const CacheParts& c, std::ostream& os) {
  const CacheConfig& cfg = c.cfg;
  SharedPages shared;
  std::vector<std::string> heads;
  heads.reserve(c.stores.size());
  for (int l = 0; l < cfg.layers; ++l)
    for (int h = 0; h < cfg.kv_heads; ++h) {
      const TokenStore& s = *c.stores[static_cast<std::size_t>(l) * cfg.kv_heads + h];
      StateWriter w;
      w.put<std::int32_t>(l);
      w.put<std::int32_t>(h);
      w.put_str(s.pipeline().text);
      s.save_state(w, shared);
      heads.push_back(std::move(w.bytes()));
    }
  const auto start = os.tellp();
  os.write(kMagic, sizeof(kMagic));
  StateWriter head;
  head.put<std::uint32_t>(kFormatVersion);
  head.put<std::uint32_t>(0);
  os.write(head.bytes().data(), static_cast<std::streamsize>(head.bytes().size()));
  StateWriter conf;
  put_config(conf, c);
  write_section(os, kConfig, conf.bytes());
  StateWriter sh;
  sh.put<std::uint64_t>(shared.saved.size());
  for (const SharedBytes* p : shared.saved) sh.put_array(p->data(), p->size());
  write_section(os, kShared, sh.bytes());
  for (const std::string& x : heads) write_section(os, kHead, x);
  StateWriter end;
  end.put<std::uint64_t>(heads.size());
  write_section(os, kEnd, end.bytes());
  os.flush();
  KVSLIM_CHECK(os.good(), ErrorCode::kIo, "KVCache::save: writing the stream failed{}",
               start >= 0 && os.tellp() >= 0 ? fmt::format(" after {} bytes", static_cast<long long>(os.tellp() - start))
                                             : std::string());
}

void load_cache(CacheParts& c, std::istream& is) {
  const CacheConfig& cfg = c.cfg;
  const std::string file = read_all(is);
  const std::vector<Section> secs = split_sections(file);
  const std::size_t nheads = static_cast<std::size_t>(cfg.layers) * cfg.kv_heads;
  auto expect_tag = [&](std::size_t i, std::uint32_t t, const char* what) {
    KVSLIM_CHECK(i < secs.size() && secs[i].tag == t, ErrorCode::kFormat,
                 "saved cache: section {} should be {} but is '{}'", i, what,
                 i < secs.size() ? tag_text(secs[i].tag) : std::string("missing"));
  };
  expect_tag(0, kConfig, "CONF");
  {
    StateReader r(secs[0].data, secs[0].size, "CONF");
    check_config(get_config(r), c);
  }
  // The END section says how many heads the file holds; check it before the heads, so a file
  // of another shape is reported as such (the CONFIG check above already caught most).
  {
    const Section& e = secs.back();
    StateReader r(e.data, e.size, "END");
    const auto n = r.get<std::uint64_t>("head count");
    r.expect_end();
    KVSLIM_CHECK(n == nheads && secs.size() == nheads + 3, ErrorCode::kFormat,
                 "saved cache: the file holds {} sections and says {} heads; this cache has {} heads ({} layers x {} "
                 "kv heads), so it needs {} sections",
                 secs.size(), n, nheads, cfg.layers, cfg.kv_heads, nheads + 3);
  }
  expect_tag(1, kShared, "SHRD");
  SharedPages shared;
  {
    StateReader r(secs[1].data, secs[1].size, "SHRD");
    const std::size_t n = r.get_count<std::uint64_t>("shared pages", secs[1].size);
    for (std::size_t i = 0; i < n; ++i) {
      auto p = std::allocate_shared<SharedBytes>(TrackedAllocator<SharedBytes>(&c.shared),
                                                 TrackedAllocator<std::byte>(&c.shared));
      r.get_array(*p, "shared page", secs[1].size);
      shared.loaded.push_back(std::move(p));
    }
    r.expect_end();
  }

  // New stores, set up as the cache's constructor set up the old ones.
  TrackedAllocator<TokenStore> alloc(&c.shared);
  std::vector<TokenStore*> fresh;
  struct Guard {
    std::vector<TokenStore*>& v;
    TrackedAllocator<TokenStore>& a;
    ~Guard() {
      for (TokenStore* s : v) {
        s->~TokenStore();
        a.deallocate(s, 1);
      }
    }
  } guard{fresh, alloc};
  fresh.reserve(nheads);
  for (std::size_t i = 0; i < nheads; ++i) {
    TokenStore* s = alloc.allocate(1);
    try {
      new (s) TokenStore(cfg.head_dim, &c.stores[i]->pipeline());
    } catch (...) {
      alloc.deallocate(s, 1);
      throw;
    }
    fresh.push_back(s);
    if (c.rope) s->set_rope(c.rope);
  }
  for (int l = 1; l < cfg.layers; ++l)
    for (int h = 0; h < cfg.kv_heads; ++h) {
      const std::size_t i = static_cast<std::size_t>(l) * cfg.kv_heads + h;
      const Pipeline& p = fresh[i]->pipeline();
      if (p.merge && p.merge->cross_layer()) fresh[i]->pair_with_lower(fresh[i - cfg.kv_heads], &c.shared);
    }
  StoreLimits limits;
  limits.max_tokens = cfg.max_tokens;
  limits.finite_rows = cfg.non_finite == NonFinitePolicy::kReject;
  for (int l = 0; l < cfg.layers; ++l)
    for (int h = 0; h < cfg.kv_heads; ++h) {
      const std::size_t i = static_cast<std::size_t>(l) * cfg.kv_heads + h;
      const Section& sec = secs[2 + i];
      const std::string name = head_name(l, h);
      KVSLIM_CHECK(sec.tag == kHead, ErrorCode::kFormat, "saved cache: section {} should be {} but is '{}'", 2 + i,
                   name, tag_text(sec.tag));
      StateReader r(sec.data, sec.size, name);
      const auto fl = r.get<std::int32_t>("layer");
      const auto fh = r.get<std::int32_t>("kv head");
      r.check(fl == l && fh == h, "layer and kv head", "the section is for layer {} kv head {}", fl, fh);
      const std::string chain = r.get_str("recipe chain");
      KVSLIM_CHECK(chain == fresh[i]->pipeline().text, ErrorCode::kMismatch,
                   "saved cache does not fit this cache: layer {} kv head {} was saved with the chain '{}' but this "
                   "cache uses '{}'",
                   l, h, chain, fresh[i]->pipeline().text);
      fresh[i]->load_state(r, shared, limits);
      r.expect_end();
    }
  for (std::size_t i = 0; i < shared.loaded.size(); ++i)
    KVSLIM_CHECK(shared.loaded[i].use_count() > 1, ErrorCode::kFormat,
                 "saved cache: section SHRD: shared page {} is referenced by no page", i);
  // Everything was read and checked: swap the new stores in; the guard frees the old ones.
  for (std::size_t i = 0; i < nheads; ++i) std::swap(c.stores[i], fresh[i]);
}

}  // namespace kvslim::detail

namespace kvslim {

void KVCache::save(const std::string& path) {
  // Written next to the target and renamed over it, so a failed save never destroys an
  // earlier file at that path.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream os(tmp, std::ios::binary | std::ios::trunc);
    KVSLIM_CHECK(os.is_open(), ErrorCode::kIo, "KVCache::save: cannot open '{}' for writing: {}", tmp,
                 std::strerror(errno));
    try {
      save(os);
      os.close();
      KVSLIM_CHECK(!os.fail(), ErrorCode::kIo, "KVCache::save: closing '{}' failed: {}", tmp, std::strerror(errno));
    } catch (...) {
      std::remove(tmp.c_str());
      throw;
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    KVSLIM_FAIL(ErrorCode::kIo, "KVCache::save: cannot rename '{}' to '{}': {}", tmp, path, std::strerror(e));
  }
}

void KVCache::load(const std::string& path) {
  std::ifstream is(path, std::ios::binary);
  KVSLIM_CHECK(is.is_open(), ErrorCode::kIo, "KVCache::load: cannot open '{}': {}", path, std::strerror(errno));
  load(is);
}

}  // namespace kvslim
