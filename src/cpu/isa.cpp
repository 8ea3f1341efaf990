// ISA detection: cpuid for the feature bits, xgetbv for the OS having enabled the AVX
// (YMM) and AVX-512 (opmask/ZMM) register state — a CPU flag alone is not enough.
#include "kvslim/cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <mutex>

#include "check.h"
#include "kvslim/kernels/kernel_table.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define KVSLIM_X86 1
#endif

namespace kvslim {
namespace {

#ifdef KVSLIM_X86
unsigned long long xgetbv0() {
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}
#endif

struct Features {
  bool avx2 = false;
  bool avx512 = false;
};

Features detect() {
  Features f;
#ifdef KVSLIM_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  const bool fma = c & (1u << 12);
  const bool f16c = c & (1u << 29);
  const bool avx = c & (1u << 28);
  if (!osxsave || !avx) return f;
  const unsigned long long xcr0 = xgetbv0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6;
  const bool zmm_os = (xcr0 & 0xe6) == 0xe6;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31);
  f.avx2 = ymm_os && avx2 && fma && f16c;
  f.avx512 = f.avx2 && zmm_os && avx512f && avx512dq && avx512bw && avx512vl;
#endif
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

std::atomic<int> g_active{-1};
std::mutex g_mu;

}  // namespace

const char* isa_name(Isa isa) noexcept {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

Isa parse_isa(std::string_view name) {
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  KVSLIM_FAIL(ErrorCode::kInvalidArgument, "unknown ISA '{}' (expected scalar, avx2 or avx512)", name);
}

bool cpu_supports(Isa isa) noexcept {
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return features().avx2;
    case Isa::kAvx512: return features().avx512;
  }
  return false;
}

bool isa_built(Isa isa) noexcept { return kernels::table_for(static_cast<int>(isa)) != nullptr; }

std::vector<Isa> available_isas() {
  std::vector<Isa> out;
  for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512})
    if (isa_built(i) && cpu_supports(i)) out.push_back(i);
  return out;
}

namespace {
void check_available(Isa isa, const char* source) {
  KVSLIM_CHECK(cpu_supports(isa), ErrorCode::kUnsupportedIsa,
               "{} asks for ISA '{}', which this CPU (or OS) does not support", source, isa_name(isa));
  KVSLIM_CHECK(isa_built(isa), ErrorCode::kUnsupportedIsa,
               "{} asks for ISA '{}', whose kernels were not built into this kvslim", source,
               isa_name(isa));
}
}  // namespace

Isa active_isa() {
  int a = g_active.load(std::memory_order_acquire);
  if (a >= 0) return static_cast<Isa>(a);
  std::lock_guard<std::mutex> lock(g_mu);
  a = g_active.load(std::memory_order_relaxed);
  if (a >= 0) return static_cast<Isa>(a);
  Isa chosen = Isa::kScalar;
  if (const char* env = std::getenv("KVSLIM_ISA"); env && *env) {
    Isa want;
    try {
      want = parse_isa(env);
    } catch (const Error&) {
      KVSLIM_FAIL(ErrorCode::kUnsupportedIsa,
                  "KVSLIM_ISA='{}' is not an ISA (expected scalar, avx2 or avx512)", env);
    }
    check_available(want, "KVSLIM_ISA");
    chosen = want;
  } else {
    for (Isa i : available_isas()) chosen = i;  // best last
  }
  g_active.store(static_cast<int>(chosen), std::memory_order_release);
  return chosen;
}

void set_active_isa(Isa isa) {
  check_available(isa, "set_active_isa");
  std::lock_guard<std::mutex> lock(g_mu);
  g_active.store(static_cast<int>(isa), std::memory_order_release);
}

}  // namespace kvslim
