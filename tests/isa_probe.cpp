// isa_probe ISA: exits 0 if the ISA's kernels are built and the CPU runs them, else prints
// why and exits 1. Used by .ci/run to decide which KVSLIM_ISA runs of the kernel tests apply.
#include <cstdio>

#include "kvslim/cpu/isa.h"
#include "kvslim/error.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: isa_probe scalar|avx2|avx512\n");
    return 2;
  }
  try {
    const kvslim::Isa isa = kvslim::parse_isa(argv[1]);
    if (!kvslim::cpu_supports(isa)) {
      std::printf("this CPU lacks %s\n", argv[1]);
      return 1;
    }
    if (!kvslim::isa_built(isa)) {
      std::printf("%s kernels are not built into this kvslim\n", argv[1]);
      return 1;
    }
  } catch (const kvslim::Error& e) {
    std::printf("%s\n", e.what());
    return 1;
  }
  return 0;
}
