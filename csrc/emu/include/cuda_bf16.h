// Emulated build (D3K_EMU): host __nv_bfloat16 (d3k_emu/types.h).
#pragma once
#include "d3k_emu/types.h"
