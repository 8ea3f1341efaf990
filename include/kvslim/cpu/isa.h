// Instruction-set selection. kvslim picks the best kernel table the CPU and the OS support
// (cpuid + xgetbv) on first use. Override with the environment variable
// KVSLIM_ISA=scalar|avx2|avx512 or with set_active_isa(); asking for an ISA the CPU lacks,
// or whose kernels were not built, throws kvslim::Error(kUnsupportedIsa).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace kvslim {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

/// "scalar", "avx2", "avx512".
const char* isa_name(Isa isa) noexcept;
/// Parse an ISA name; throws Error(kInvalidArgument) naming the bad string.
Isa parse_isa(std::string_view name);
/// True if the CPU and OS can run this ISA's instructions (AVX2 = AVX2+FMA+F16C;
/// AVX-512 = F+BW+DQ+VL).
bool cpu_supports(Isa isa) noexcept;
/// True if the library was built with kernels for this ISA.
bool isa_built(Isa isa) noexcept;
/// ISAs that are both built and supported here, scalar first.
std::vector<Isa> available_isas();
/// The ISA whose kernels run now (resolving KVSLIM_ISA / detection on first call).
Isa active_isa();
/// Force an ISA for the whole process; throws Error(kUnsupportedIsa) if not available.
void set_active_isa(Isa isa);

}  // namespace kvslim
