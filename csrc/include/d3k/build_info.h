// Build and runtime introspection (csrc/build_info.cu). Plain C++ header: no
// CUDA types, so bindings.cpp needs no CUDA headers. Functions that can fail
// return an error string ("" on success) or fill *err.
#pragma once

#include <cstddef>
#include <string>

namespace d3k {

struct DeviceInfo {
  std::string name;
  std::string capability;  // "9.0"
  int sm_count = 0;
  std::size_t mem_bytes = 0;
};

// CUDART_VERSION the extension was compiled against, e.g. 13000.
int compiled_cudart_version();

// Version of the (statically linked) CUDA runtime, e.g. "13.0"; "" on error
// with *err set.
std::string cuda_runtime_version(std::string* err);

// cudaRuntimeGetVersion / cudaDriverGetVersion as ints (13000 = 13.0).
// The driver version is 0 when no NVIDIA driver (libcuda) can be loaded.
std::string runtime_and_driver_version(int* runtime_version, int* driver_version);

// Number of visible CUDA devices; 0 when a driver is present but no device is.
// Returns -1 and sets *err on any other error (e.g. no or too-old driver).
int device_count(std::string* err);

// Compute capability "major.minor", e.g. "9.0"; "" on error with *err set.
std::string device_capability(int dev, std::string* err);

// Properties of device dev; returns "" on success or an error string.
std::string device_info(int dev, DeviceInfo* out);

}  // namespace d3k
