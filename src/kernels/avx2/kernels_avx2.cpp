// AVX2 kernel table. Requires AVX2, FMA and F16C (this file alone is compiled with
// -mavx2 -mfma -mf16c; dispatch only hands it out when cpuid + xgetbv say they run).
// Everything but kTable has internal linkage, so no AVX2 copy of an inline function can
// leak into the rest of the library (see STYLE.md, "Dispatch").
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kvslim/kernels/kernel_table.h"

namespace kvslim::kernels::avx2 {
namespace {

#include "kernels/avx2/simd_avx2.h"
#include "kernels/kernels-inl.h"
#include "kernels/hadamard-inl.h"
#include "kernels/avx2/kivi_q8-inl.h"

#define KVSLIM_CQ_SOFTMAX softmax_block_k
#include "kernels/cq-inl.h"
#undef KVSLIM_CQ_SOFTMAX
#include "kernels/avx2/cq_simd-inl.h"

}  // namespace

extern const KernelTable kTable = {
    "avx2",
    f32_to_f16_k, f16_to_f32_k, f32_to_bf16_k, bf16_to_f32_k,
    scores_f32_k, scores_f16_k, scores_bf16_k,
    accum_f32_k, accum_f16_k, accum_bf16_k,
    softmax_block_k,
    kivi_quant_keys_k, kivi_quant_values_k, kivi_dequant_keys_k, kivi_dequant_values_k,
    kivi_scores_generic, kivi_accum_generic,
    mask_block_k, attend_f32_k, attend_f16_k, attend_bf16_k, attend_kivi_t<kivi_scores_generic, kivi_accum_generic>,
    attend_kivi_q8_k,
    cq_tables_k, cq_scores_k, cq_accum_k, attend_cq_k, cq_finish_k, cq_encode_k,
    hadamard_rows_k, rope_rows_k,
    nuq_quant_k, nuq_dequant_k, nuq_scores_k, nuq_accum_k, attend_nuq_k,
};

}  // namespace kvslim::kernels::avx2
