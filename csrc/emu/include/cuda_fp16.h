// Emulated build (D3K_EMU): host __half (d3k_emu/types.h).
#pragma once
#include "d3k_emu/types.h"
