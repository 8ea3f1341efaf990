// Encode/decode throughput of each page format, straight through the kernel table (what
// Codec::encode/decode run when a page is sealed or materialized), per ISA:
//   BM_encode/<isa>/<format>, BM_decode/<isa>/<format>
// 512 MiB of f32 keys and values (2M tokens x head_dim 128) as pages of 32 tokens; KIVI
// uses vgroup 32 (its default at head_dim 128). bytes_per_second counts f32 bytes (input of encode, output of decode), so
// it compares directly with BM_memcpy.
#include <benchmark/benchmark.h>

#include <memory>
#include <string>
#include <vector>

#include "bench_util.h"
#include "kvslim/cache/recipe.h"
#include "kvslim/cpu/isa.h"
#include "kvslim/kernels/kernel_table.h"
#include "kvslim/policy/policy.h"

namespace kvslim::bench {
namespace {

constexpr int kD = 128, kPage = 32;

// Pages are encoded by the library's own codecs (built from recipes, vgroup defaults to 32
// at head_dim 128), so the benchmark measures exactly what sealing runs, in the real layout.
struct Format {
  const char* name;
  const char* recipe;
};
const Format kFormats[] = {{"f16", "f16"},
                           {"bf16", "bf16"},
                           {"kivi8", "kivi:kbits=8,vbits=8,residual=0"},
                           {"kivi4", "kivi:kbits=4,vbits=4,residual=0"},
                           {"kivi3", "kivi:kbits=3,vbits=3,residual=0"},
                           {"kivi2", "kivi:kbits=2,vbits=2,residual=0"},
                           {"kivi1", "kivi:kbits=1,vbits=1,residual=0"},
                           // dense-and-sparse side lists (picking the outliers is the cost)
                           {"kivi4o1", "kivi:kbits=4,vbits=4,residual=0,outliers=0.01"},
                           {"nuq4", "nuq:kbits=4,vbits=4,residual=0"},
                           {"nuq3", "nuq:kbits=3,vbits=3,residual=0"}};

std::shared_ptr<const Codec> codec_of(const Format& f) { return build_pipeline(parse_recipe(f.recipe).base, kD).codec; }

void encode_all(const kernels::KernelTable& kt, const Codec& c, const float* k, const float* v, std::size_t pages,
                std::byte* out) {
  const std::size_t pb = c.page_bytes(kPage, kD), n = static_cast<std::size_t>(kPage) * kD;
  for (std::size_t i = 0; i < pages; ++i) c.encode(kt, k + i * n, v + i * n, kPage, kD, out + i * pb);
}

void decode_all(const kernels::KernelTable& kt, const Codec& c, const std::byte* in, std::size_t pages, float* k,
                float* v) {
  const std::size_t pb = c.page_bytes(kPage, kD), n = static_cast<std::size_t>(kPage) * kD;
  for (std::size_t i = 0; i < pages; ++i) c.decode(kt, in + i * pb, kPage, kD, k + i * n, v + i * n);
}

void BM_encode(benchmark::State& state, Isa isa, Format f) {
  const kernels::KernelTable& kt = *kernels::table_for(static_cast<int>(isa));
  const auto& in = big_input();
  const auto codec = codec_of(f);
  const std::size_t half = in.size() / 2, pages = half / (static_cast<std::size_t>(kPage) * kD);
  std::vector<std::byte> out(pages * codec->page_bytes(kPage, kD), std::byte{1});
  for (auto _ : state) {
    encode_all(kt, *codec, in.data(), in.data() + half, pages, out.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(in.size() * sizeof(float)));
  state.counters["ratio_vs_f32"] = static_cast<double>(2 * kPage * kD * 4) / static_cast<double>(codec->page_bytes(kPage, kD));
}

void BM_decode(benchmark::State& state, Isa isa, Format f) {
  const kernels::KernelTable& kt = *kernels::table_for(static_cast<int>(isa));
  const auto& in = big_input();
  const auto codec = codec_of(f);
  const std::size_t half = in.size() / 2, pages = half / (static_cast<std::size_t>(kPage) * kD);
  std::vector<std::byte> enc(pages * codec->page_bytes(kPage, kD));
  encode_all(kt, *codec, in.data(), in.data() + half, pages, enc.data());
  std::vector<float> out(in.size(), 1.0f);
  for (auto _ : state) {
    decode_all(kt, *codec, enc.data(), pages, out.data(), out.data() + half);
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
