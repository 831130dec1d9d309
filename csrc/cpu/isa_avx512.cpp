// The CPU backend's inner loops for the "avx512" path (CMakeLists.txt sets this file's flags).
#define D3K_ISA_NS isa_avx512
#define D3K_ISA_TABLE kAvx512
#define D3K_ISA_NAME "avx512"
#include "d3k/cpu/kernels_impl.h"
