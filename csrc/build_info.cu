// Build and runtime introspection for d3kernels._C. Every function reports
// errors as strings (see d3k/common.cuh); nothing here throws or aborts, so a
// machine without a GPU or driver gets a clean Python RuntimeError.
#include <cuda_runtime.h>

#include "d3k/build_info.h"
#include "d3k/common.cuh"

namespace d3k {

int compiled_cudart_version() { return CUDART_VERSION; }

namespace {

std::string version_string(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

// Error strings from a failed call are not sticky for these APIs, but clear the
// per-thread last error anyway so a later launch check does not see it.
std::string clear_and_return(const std::string& msg) {
  if (!msg.empty()) (void)cudaGetLastError();
  return msg;
}

}  // namespace

std::string runtime_and_driver_version(int* runtime_version, int* driver_version) {
  *runtime_version = 0;
  *driver_version = 0;
  D3K_CHECK_CUDA(cudaRuntimeGetVersion(runtime_version));
  // Returns cudaSuccess with 0 when no driver is installed.
  D3K_CHECK_CUDA(cudaDriverGetVersion(driver_version));
  return "";
}

std::string cuda_runtime_version(std::string* err) {
  int rt = 0, drv = 0;
  std::string e = clear_and_return(runtime_and_driver_version(&rt, &drv));
  if (!e.empty()) {
    if (err) *err = e;
    return "";
  }
  return version_string(rt);
}

int device_count(std::string* err) {
  int n = 0;
  cudaError_t probe = cudaGetDeviceCount(&n);
  if (probe == cudaErrorNoDevice) {  // driver present, no device: not an error
    (void)cudaGetLastError();
    return 0;
  }
  if (probe != cudaSuccess) {
    (void)cudaGetLastError();
    if (err) *err = cuda_error_string(probe, "cudaGetDeviceCount(&n)", __FILE__, __LINE__);
    return -1;
  }
  return n;
}

std::string device_info(int dev, DeviceInfo* out) {
  cudaDeviceProp prop;
  std::string e = [&]() -> std::string {
    D3K_CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
    return "";
  }();
  if (!e.empty()) return clear_and_return(e);
  out->name = prop.name;
  out->capability = std::to_string(prop.major) + "." + std::to_string(prop.minor);
  out->sm_count = prop.multiProcessorCount;
  out->mem_bytes = prop.totalGlobalMem;
  return "";
}

std::string device_capability(int dev, std::string* err) {
  DeviceInfo info;
  std::string e = device_info(dev, &info);
  if (!e.empty()) {
    if (err) *err = e;
    return "";
  }
  return info.capability;
}

}  // namespace d3k
