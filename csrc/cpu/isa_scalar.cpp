// The CPU backend's inner loops for the "scalar" path (CMakeLists.txt sets this file's flags).
#define D3K_ISA_NS isa_scalar
#define D3K_ISA_TABLE kScalar
#define D3K_ISA_NAME "scalar"
#include "d3k/cpu/kernels_impl.h"
