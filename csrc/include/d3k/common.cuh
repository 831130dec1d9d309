// Shared helpers for d3kernels CUDA code. Torch-free: launchers take raw
// device pointers, sizes and a cudaStream_t, and report failure by returning
// a non-empty error string ("" means success). bindings.cpp turns a non-empty
// string into a Python RuntimeError, so no C++ exception crosses a launcher.
#pragma once

#include <cuda_runtime.h>

#include <string>

namespace d3k {

// "CUDA error 35 (cudaErrorInsufficientDriver): CUDA driver version is
//  insufficient for CUDA runtime version [cudaGetDeviceCount(&n) at file:line]"
inline std::string cuda_error_string(cudaError_t err, const char* expr,
                                     const char* file, int line) {
  std::string msg = "CUDA error " + std::to_string(static_cast<int>(err)) + " (" +
                    cudaGetErrorName(err) + "): " + cudaGetErrorString(err);
  if (expr != nullptr) {
    msg += std::string(" [") + expr + " at " + file + ":" + std::to_string(line) + "]";
  }
  return msg;
}

}  // namespace d3k

// Evaluate a CUDA runtime call; on failure, return the error string from the
// enclosing function (which must return std::string).
#define D3K_CHECK_CUDA(expr)                                                  \
  do {                                                                        \
    cudaError_t d3k_err_ = (expr);                                            \
    if (d3k_err_ != cudaSuccess) {                                            \
      return ::d3k::cuda_error_string(d3k_err_, #expr, __FILE__, __LINE__);   \
    }                                                                         \
  } while (0)

// Check for a launch error right after a <<<...>>> launch.
#define D3K_CHECK_LAUNCH() D3K_CHECK_CUDA(cudaGetLastError())

// Argument validation in launchers: on a false condition, return the message.
// Usage: D3K_CHECK(d % 8 == 0, "mlp_block: hidden size must be a multiple of 8");
#define D3K_CHECK(cond, msg)                                                  \
  do {                                                                        \
    if (!(cond)) {                                                            \
      return std::string(msg);                                                \
    }                                                                         \
  } while (0)
