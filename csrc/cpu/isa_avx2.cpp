// The CPU backend's inner loops for the "avx2" path (CMakeLists.txt sets this file's flags).
#define D3K_ISA_NS isa_avx2
#define D3K_ISA_TABLE kAvx2
#define D3K_ISA_NAME "avx2"
#include "d3k/cpu/kernels_impl.h"
