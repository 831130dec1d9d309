// Greedy sampling: tokens[b] = argmax(logits[b]) on the device, no host sync.
#include <climits>

#include "d3k/head.cuh"
#include "d3k/launch.cuh"
#include "d3k/ops.h"

namespace d3k {

std::string argmax(uintptr_t tokens, uintptr_t logits, int64_t B, int64_t V, int64_t ld, int device,
                   uintptr_t stream) {
  const std::string op = "d3k.sample: ";
  D3K_CHECK(B >= 1 && B <= INT_MAX, op + "B must be >= 1, got " + std::to_string(B));
  D3K_CHECK(V >= 1 && V <= INT_MAX / 2, op + "vocab size V=" + std::to_string(V) + " out of range");
  D3K_CHECK(ld >= V, op + "logits row stride must be >= V");
  D3K_CHECK(tokens && logits, op + "null pointer argument");
  DeviceGuard guard;
  DeviceCaps caps;
  std::string e = guard.enter(device, &caps);
  if (!e.empty()) return e;
  const int vec4 = (ld % 4 == 0 && aligned16(reinterpret_cast<void*>(logits))) ? 1 : 0;
  cudaError_t err = launch(argmax_kernel<kArgmaxThreads>, dim3(static_cast<unsigned>(B)), dim3(kArgmaxThreads), 0,
                           reinterpret_cast<cudaStream_t>(stream), caps.pdl, reinterpret_cast<const float*>(logits),
                           ld, static_cast<int>(V), reinterpret_cast<int64_t*>(tokens), vec4);
  D3K_LAUNCH_CHECK("sample: launch of argmax", err);
  return "";
}

}  // namespace d3k
