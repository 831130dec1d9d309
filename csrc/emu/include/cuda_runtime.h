// Emulated build (D3K_EMU): stands in for the CUDA runtime header, so csrc/ compiles
// with the host C++ compiler against the SIMT emulation layer (d3k_emu/simt.h).
#pragma once
#include "d3k_emu/simt.h"
