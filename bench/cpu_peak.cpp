// The multiply-add peak of the cpu backend's int16 path on this core: the clock (a chain of dependent adds, one cycle
// each), the throughput of vpmaddwd and vfmadd231ps (12 independent chains each), and of one 8-row GEMM tile group
// of Q4_0 as the tile issues it (47 vector instructions: decode, 16 madd, 8 add, 8 convert, 8 FMA), all from
// registers. bench/RESULTS.md derives the prompt's fraction of the peak from it.
//
//     g++ -O2 -mavx2 -mfma bench/cpu_peak.cpp -o /tmp/cpu_peak && /tmp/cpu_peak
//
// Each loop is one asm statement, counter included: a loop of asm statements over C++ variables lets the compiler
// keep the chains in memory between statements, and the store-to-load forwarding then limits the chains, not the
// instruction (an earlier version of this probe reported vpmaddwd at 1 per cycle that way; it issues 2).
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <algorithm>

static double secs(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

#define D3K_CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", \
                    "xmm12", "xmm13", "xmm14", "xmm15", "r11", "cc"
// ymm0-11 are the chains, ymm15 the int16 operand (all ones), ymm14 the float one (0)
#define D3K_SETUP "vpcmpeqw %%ymm15, %%ymm15, %%ymm15\n\tvpsrlw $15, %%ymm15, %%ymm15\n\tvxorps %%ymm14, %%ymm14, %%ymm14\n\t"
#define D3K_X12(I) I(0) I(1) I(2) I(3) I(4) I(5) I(6) I(7) I(8) I(9) I(10) I(11)
#define D3K_MADD(k) "vpmaddwd %%ymm15, %%ymm" #k ", %%ymm" #k "\n\t"
#define D3K_FMA(k) "vfmadd231ps %%ymm14, %%ymm14, %%ymm" #k "\n\t"
// one tile group: w0 / w1 decoded (ymm12 / ymm13), the scale broadcast (ymm14), then per activation row b:
// two madd, their add, a convert and an FMA into row b's sum (ymm0-7; ymm8-11 are temporaries)
#define D3K_ROW(b, t0, t1)                                                                                   \
  "vpmaddwd %%ymm15, %%ymm12, %%ymm" #t0 "\n\tvpmaddwd %%ymm15, %%ymm13, %%ymm" #t1 "\n\t"                   \
  "vpaddd %%ymm" #t1 ", %%ymm" #t0 ", %%ymm" #t0 "\n\tvcvtdq2ps %%ymm" #t0 ", %%ymm" #t0 "\n\t"               \
  "vfmadd231ps %%ymm14, %%ymm" #t0 ", %%ymm" #b "\n\t"
#define D3K_TILE                                                                                              \
  "vpand %%ymm15, %%ymm15, %%ymm12\n\tvpsrlw $4, %%ymm15, %%ymm13\n\tvpaddw %%ymm15, %%ymm12, %%ymm12\n\t"     \
  "vpaddw %%ymm15, %%ymm13, %%ymm13\n\tvbroadcastss %%xmm15, %%ymm14\n\t" D3K_ROW(0, 8, 9) D3K_ROW(1, 10, 11)  \
  D3K_ROW(2, 8, 9) D3K_ROW(3, 10, 11) D3K_ROW(4, 8, 9) D3K_ROW(5, 10, 11) D3K_ROW(6, 8, 9) D3K_ROW(7, 10, 11)

// seconds per iteration of BODY (best of 5)
#define D3K_TIME(BODY, out)                                                                  \
  for (int rep = 0; rep < 5; ++rep) {                                                        \
    int64_t n = kIters;                                                                      \
    const auto t0 = std::chrono::steady_clock::now();                                        \
    asm volatile(D3K_SETUP "1:\n\t" BODY "dec %0\n\tjnz 1b" : "+r"(n) : : D3K_CLOBBER);       \
    out = std::min(out, secs(t0) / kIters);                                                  \
  }

int main() {
  constexpr int64_t kIters = 50000000;
  double clk = 1e9, madd = 1e9, fma = 1e9, tile = 1e9;
  D3K_TIME("add $1, %%r11\n\tadd $1, %%r11\n\tadd $1, %%r11\n\tadd $1, %%r11\n\t", clk);
  clk /= 4;   // seconds per cycle
  D3K_TIME(D3K_X12(D3K_MADD), madd);
  D3K_TIME(D3K_X12(D3K_FMA), fma);
  D3K_TIME(D3K_TILE, tile);
  madd /= 12;
  fma /= 12;
  printf("clock %.2f GHz; vpmaddwd ymm %.2f per cycle (%.0f int16 multiply-adds/cycle, %.1f G/s per core); "
         "vfmadd231ps ymm %.2f per cycle; one Q4_0 tile group (8 rows x 32 values, 47 instructions) %.1f cycles: "
         "%.1f multiply-adds/cycle, %.1f G/s per core\n",
         1e-9 / clk, clk / madd, 16 * clk / madd, 16 / madd / 1e9, clk / fma, tile / clk, 256 * clk / tile,
         256 / tile / 1e9);
}
