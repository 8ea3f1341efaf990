// Encode/decode throughput of each page format, straight through the kernel table (what
// Codec::encode/decode run when a page is sealed or materialized), per ISA:
//   BM_encode/<isa>/<format>, BM_decode/<isa>/<format>
// 512 MiB of f32 keys and values (2M tokens x head_dim 128) as pages of 32 tokens; KIVI
// uses vgroup 32. bytes_per_second counts f32 bytes (input of encode, output of decode), so
// it compares directly with BM_memcpy.
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "bench_util.h"
#include "kvslim/cpu/isa.h"
#include "kvslim/kernels/kernel_table.h"

namespace kvslim::bench {
namespace {

constexpr int kD = 128, kPage = 32, kVGroup = 32;

struct Format {
  const char* name;
  int bits;  // 0: f16, -1: bf16, else KIVI bits (keys and values)
};
const Format kFormats[] = {{"f16", 0}, {"bf16", -1}, {"kivi8", 8}, {"kivi4", 4}, {"kivi3", 3}, {"kivi2", 2}};

// Bytes of one encoded page (K and V) in the same layout as the codecs.
std::size_t page_bytes(int bits) {
  if (bits <= 0) return 2u * kPage * kD * 2;
  const std::size_t codes = static_cast<std::size_t>(kPage) * kernels::row_bytes(kD, bits);
  return 4u * kD + codes + 4u * kPage * (kD / kVGroup) + codes;
}

struct PagePtrs {
  std::uint16_t *ks, *kz, *vs, *vz;
  std::uint8_t *kc, *vc;
};
PagePtrs split(std::byte* page, int bits) {
  const std::size_t codes = static_cast<std::size_t>(kPage) * kernels::row_bytes(kD, bits);
  PagePtrs p;
  p.ks = reinterpret_cast<std::uint16_t*>(page);
  p.kz = p.ks + kD;
  p.kc = reinterpret_cast<std::uint8_t*>(page + 4u * kD);
  p.vs = reinterpret_cast<std::uint16_t*>(page + 4u * kD + codes);
  p.vz = p.vs + kPage * (kD / kVGroup);
  p.vc = reinterpret_cast<std::uint8_t*>(p.vz + kPage * (kD / kVGroup));
  return p;
}

void encode_all(const kernels::KernelTable& kt, const float* k, const float* v, std::size_t pages, int bits,
                std::byte* out) {
  const std::size_t pb = page_bytes(bits), n = static_cast<std::size_t>(kPage) * kD;
  for (std::size_t i = 0; i < pages; ++i) {
    const float* kp = k + i * n;
    const float* vp = v + i * n;
    std::byte* page = out + i * pb;
    if (bits == 0) {
      kt.f32_to_f16(kp, reinterpret_cast<std::uint16_t*>(page), n);
      kt.f32_to_f16(vp, reinterpret_cast<std::uint16_t*>(page) + n, n);
    } else if (bits < 0) {
      kt.f32_to_bf16(kp, reinterpret_cast<std::uint16_t*>(page), n);
      kt.f32_to_bf16(vp, reinterpret_cast<std::uint16_t*>(page) + n, n);
    } else {
      const PagePtrs p = split(page, bits);
      kt.kivi_quant_keys(kp, kPage, kD, bits, p.ks, p.kz, p.kc);
      kt.kivi_quant_values(vp, kPage, kD, bits, kVGroup, p.vs, p.vz, p.vc);
    }
  }
}

void decode_all(const kernels::KernelTable& kt, const std::byte* in, std::size_t pages, int bits, float* k, float* v) {
  const std::size_t pb = page_bytes(bits), n = static_cast<std::size_t>(kPage) * kD;
  for (std::size_t i = 0; i < pages; ++i) {
    const std::byte* page = in + i * pb;
    if (bits == 0) {
      kt.f16_to_f32(reinterpret_cast<const std::uint16_t*>(page), k + i * n, n);
      kt.f16_to_f32(reinterpret_cast<const std::uint16_t*>(page) + n, v + i * n, n);
    } else if (bits < 0) {
      kt.bf16_to_f32(reinterpret_cast<const std::uint16_t*>(page), k + i * n, n);
      kt.bf16_to_f32(reinterpret_cast<const std::uint16_t*>(page) + n, v + i * n, n);
    } else {
      const PagePtrs p = split(const_cast<std::byte*>(page), bits);
      kt.kivi_dequant_keys(p.ks, p.kz, p.kc, kPage, kD, bits, k + i * n);
      kt.kivi_dequant_values(p.vs, p.vz, p.vc, kPage, kD, bits, kVGroup, v + i * n);
    }
  }
}

void BM_encode(benchmark::State& state, Isa isa, Format f) {
  const kernels::KernelTable& kt = *kernels::table_for(static_cast<int>(isa));
  const auto& in = big_input();
  const std::size_t half = in.size() / 2, pages = half / (static_cast<std::size_t>(kPage) * kD);
  std::vector<std::byte> out(pages * page_bytes(f.bits), std::byte{1});
  for (auto _ : state) {
    encode_all(kt, in.data(), in.data() + half, pages, f.bits, out.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(in.size() * sizeof(float)));
  state.counters["ratio_vs_f32"] = static_cast<double>(2 * kPage * kD * 4) / static_cast<double>(page_bytes(f.bits));
}

void BM_decode(benchmark::State& state, Isa isa, Format f) {
  const kernels::KernelTable& kt = *kernels::table_for(static_cast<int>(isa));
  const auto& in = big_input();
  const std::size_t half = in.size() / 2, pages = half / (static_cast<std::size_t>(kPage) * kD);
  std::vector<std::byte> enc(pages * page_bytes(f.bits));
  encode_all(kt, in.data(), in.data() + half, pages, f.bits, enc.data());
  std::vector<float> out(in.size(), 1.0f);
  for (auto _ : state) {
    decode_all(kt, enc.data(), pages, f.bits, out.data(), out.data() + half);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(out.size() * sizeof(float)));
}

}  // namespace

void register_codecs() {
  for (Isa isa : available_isas())
    for (const Format& f : kFormats) {
      const std::string tail = std::string(isa_name(isa)) + "/" + f.name;
      benchmark::RegisterBenchmark(("BM_encode/" + tail).c_str(), BM_encode, isa, f)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("BM_decode/" + tail).c_str(), BM_decode, isa, f)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    }
}

}  // namespace kvslim::bench
