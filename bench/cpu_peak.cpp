// The multiply-add peak of the cpu backend's int16 path on this core: the clock (a chain of dependent adds, one cycle
// each) and the throughput of vpmaddwd (12 independent chains), with vfmadd231ps beside it. bench/RESULTS.md
// derives the prompt's fraction of the peak from it.
//
//     g++ -O2 -mavx2 -mfma bench/cpu_peak.cpp -o /tmp/cpu_peak && /tmp/cpu_peak
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <algorithm>
static double secs(std::chrono::steady_clock::time_point t0) { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
int main() {
  const int64_t N = 200000000;
  double best_clk = 1e9, best_madd = 1e9, best_fma = 1e9;
  for (int rep = 0; rep < 5; ++rep) {
    uint64_t x = rep;
    auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < N; ++i) asm volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    best_clk = std::min(best_clk, secs(t0) / (4.0 * N));   // seconds per cycle
    __m256i a[12];
    for (int k = 0; k < 12; ++k) a[k] = _mm256_set1_epi16(k + rep);
    const __m256i b = _mm256_set1_epi16(1);
    const int64_t M = N / 4;
    t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < M; ++i) {
      asm volatile(
          "vpmaddwd %12, %0, %0\n\tvpmaddwd %12, %1, %1\n\tvpmaddwd %12, %2, %2\n\tvpmaddwd %12, %3, %3\n\t"
          "vpmaddwd %12, %4, %4\n\tvpmaddwd %12, %5, %5\n\tvpmaddwd %12, %6, %6\n\tvpmaddwd %12, %7, %7\n\t"
          "vpmaddwd %12, %8, %8\n\tvpmaddwd %12, %9, %9\n\tvpmaddwd %12, %10, %10\n\tvpmaddwd %12, %11, %11"
          : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]), "+x"(a[4]), "+x"(a[5]), "+x"(a[6]), "+x"(a[7]),
            "+x"(a[8]), "+x"(a[9]), "+x"(a[10]), "+x"(a[11])
          : "x"(b));
    }
    best_madd = std::min(best_madd, secs(t0) / (12.0 * M));   // seconds per madd
    __m256 f[12];
    for (int k = 0; k < 12; ++k) f[k] = _mm256_set1_ps(k + rep);
    const __m256 g = _mm256_set1_ps(1.f);
    t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < M; ++i) {
      asm volatile(
          "vfmadd231ps %12, %12, %0\n\tvfmadd231ps %12, %12, %1\n\tvfmadd231ps %12, %12, %2\n\tvfmadd231ps %12, %12, %3\n\t"
          "vfmadd231ps %12, %12, %4\n\tvfmadd231ps %12, %12, %5\n\tvfmadd231ps %12, %12, %6\n\tvfmadd231ps %12, %12, %7\n\t"
          "vfmadd231ps %12, %12, %8\n\tvfmadd231ps %12, %12, %9\n\tvfmadd231ps %12, %12, %10\n\tvfmadd231ps %12, %12, %11"
          : "+x"(f[0]), "+x"(f[1]), "+x"(f[2]), "+x"(f[3]), "+x"(f[4]), "+x"(f[5]), "+x"(f[6]), "+x"(f[7]),
            "+x"(f[8]), "+x"(f[9]), "+x"(f[10]), "+x"(f[11])
          : "x"(g));
    }
    best_fma = std::min(best_fma, secs(t0) / (12.0 * M));
  }
  printf("clock %.2f GHz; vpmaddwd ymm %.2f per cycle (%.0f int16 multiply-adds/cycle, %.1f G/s per core); "
         "vfmadd231ps ymm %.2f per cycle\n", 1e-9 / best_clk, best_clk / best_madd, 16 * best_clk / best_madd,
         16 / best_madd / 1e9, best_clk / best_fma);
}
