// Controls of the SIMT emulation layer, for bindings.cpp (plain C++: no CUDA types).
#pragma once

#include <cstdint>

namespace d3k_emu {

// Seed of the thread and block orders. Setting it also restarts the per-launch
// sequence, so the same seed and the same calls give the same orders.
void set_seed(uint64_t seed);
uint64_t seed();

struct Stats {
  uint64_t launches = 0;  // kernel launches run (this OS thread)
  uint64_t blocks = 0;    // blocks run
  uint64_t switches = 0;  // fiber context switches
  uint64_t schedule = 0;  // hash of the last launch's schedule (block order, every resumed thread in order)
};
Stats stats();

// The SM count the emulated device reports (D3K_EMU_SM_COUNT, default 132).
int sm_count();

}  // namespace d3k_emu
