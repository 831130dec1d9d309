// Per-device facts for the launchers (SM count, compute capability, whether
// Programmatic Dependent Launch is used), cached after the first query.
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

#include "d3k/launch.cuh"
#include "d3k/ops.h"

namespace d3k {

namespace {

// Its binaryVersion tells which code the runtime picked for a device: the
// kernels contain griddepcontrol.wait only in their sm_90+ builds.
__global__ void probe_kernel() {}

constexpr int kMaxDevices = 64;
std::mutex g_mu;
DeviceCaps g_caps[kMaxDevices];
bool g_known[kMaxDevices] = {};

bool pdl_env_enabled() {
  const char* v = std::getenv("D3K_PDL");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

}  // namespace

std::string device_caps(int device, DeviceCaps* out) {
  if (device < 0 || device >= kMaxDevices) return "d3k: CUDA device index " + std::to_string(device) + " out of range";
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (g_known[device]) {
      *out = g_caps[device];
      return "";
    }
  }
  DeviceCaps c;
  int major = 0, minor = 0;
  D3K_CHECK_CUDA(cudaDeviceGetAttribute(&c.sm_count, cudaDevAttrMultiProcessorCount, device));
  D3K_CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  D3K_CHECK_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  c.cc = 10 * major + minor;
  cudaFuncAttributes fa;
  {
    DeviceGuard guard;
    std::string e = guard.enter(device);
    if (!e.empty()) return e;
    D3K_CHECK_CUDA(cudaFuncGetAttributes(&fa, probe_kernel));
  }
  c.pdl = pdl_env_enabled() && c.cc >= 90 && fa.binaryVersion >= 90;
  std::lock_guard<std::mutex> lock(g_mu);
  g_caps[device] = c;
  g_known[device] = true;
  *out = c;
  return "";
}

std::string device_facts(int device, int* sm_count, int* cc, bool* pdl) {
  DeviceCaps c;
  std::string e = device_caps(device, &c);
  if (!e.empty()) {
    (void)cudaGetLastError();
    return e;
  }
  *sm_count = c.sm_count;
  *cc = c.cc;
  *pdl = c.pdl;
  return "";
}

}  // namespace d3k
