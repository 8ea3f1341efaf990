#include "kvslim/cpu/isa.h"
#include "kvslim/kernels/kernel_table.h"

namespace kvslim::kernels {

#if KVSLIM_HAVE_AVX2
namespace avx2 {
extern const KernelTable kTable;
}
#endif
#if KVSLIM_HAVE_AVX512
namespace avx512 {
extern const KernelTable kTable;
}
#endif

const KernelTable* table_for(int isa) noexcept {
  switch (static_cast<Isa>(isa)) {
    case Isa::kScalar: return &scalar::kTable;
#if KVSLIM_HAVE_AVX2
    case Isa::kAvx2: return &avx2::kTable;
#endif
#if KVSLIM_HAVE_AVX512
    case Isa::kAvx512: return &avx512::kTable;
#endif
    default: return nullptr;
  }
}

const KernelTable& active() { return *table_for(static_cast<int>(active_isa())); }

}  // namespace kvslim::kernels
