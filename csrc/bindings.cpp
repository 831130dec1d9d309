// The single pybind11 file of d3kernels._C. Torch-free: ops take raw device
// pointers (as integers), sizes and a stream handle. Launchers return an error
// string ("" = success); this file turns non-empty ones into RuntimeError.
// See csrc/README.md for how to add a kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cctype>
#include <stdexcept>
#include <string>

#include "d3k/build_info.h"

namespace py = pybind11;

#ifndef D3K_CUDA_ARCHS
#define D3K_CUDA_ARCHS ""
#endif
#ifndef D3K_VERSION
#define D3K_VERSION "unknown"
#endif

namespace {

// "80,90a,100-real" -> [80, 90, 100]; entries without a number are skipped.
py::list parse_archs(const std::string& spec) {
  py::list out;
  std::size_t i = 0;
  while (i < spec.size()) {
    std::size_t j = spec.find_first_of(",;", i);
    if (j == std::string::npos) j = spec.size();
    std::size_t k = i;
    while (k < j && std::isspace(static_cast<unsigned char>(spec[k]))) ++k;
    int v = 0;
    bool any = false;
    while (k < j && std::isdigit(static_cast<unsigned char>(spec[k]))) {
      v = v * 10 + (spec[k] - '0');
      any = true;
      ++k;
    }
    if (any) out.append(v);
    i = j + 1;
  }
  return out;
}

std::string version_string(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

py::dict build_info() {
  py::dict d;
  d["version"] = D3K_VERSION;
  d["cuda_archs"] = parse_archs(D3K_CUDA_ARCHS);
  d["nvcc_version"] = d3k::compiled_cudart_version();
  d["compiled_with"] = "nvcc";
  return d;
}

[[noreturn]] void raise_runtime(const std::string& what, int runtime_version, int driver_version,
                                const std::string& cuda_err) {
  const int built = d3k::compiled_cudart_version();
  std::string msg;
  if (cuda_err.find("cudaErrorInsufficientDriver") != std::string::npos) {
    if (driver_version == 0) {
      msg = "no usable NVIDIA driver found (libcuda could not be loaded), so the CUDA backend "
            "cannot run on this machine; install an NVIDIA driver that supports CUDA " +
            version_string(built) + " on a machine with an NVIDIA GPU";
    } else {
      msg = "NVIDIA driver too old for the CUDA " + std::to_string(built / 1000) +
            " runtime this extension was built with; update the driver (driver supports CUDA " +
            version_string(driver_version) + ", runtime is " + version_string(runtime_version) +
            ")";
    }
  } else {
    msg = "CUDA " + what + " failed";
  }
  throw std::runtime_error("d3kernels._C: " + msg + ": " + cuda_err);
}

py::dict runtime_info() {
  int rt = 0, drv = 0;
  std::string err = d3k::runtime_and_driver_version(&rt, &drv);
  if (!err.empty()) raise_runtime("version query", rt, drv, err);

  int n = d3k::device_count(&err);
  if (n < 0) raise_runtime("device query", rt, drv, err);

  py::list devices;
  for (int dev = 0; dev < n; ++dev) {
    d3k::DeviceInfo info;
    err = d3k::device_info(dev, &info);
    if (!err.empty()) raise_runtime("device " + std::to_string(dev) + " query", rt, drv, err);
    py::dict d;
    d["name"] = info.name;
    d["capability"] = info.capability;
    d["sm_count"] = info.sm_count;
    d["mem_bytes"] = info.mem_bytes;
    devices.append(d);
  }

  py::dict d;
  d["runtime_version"] = rt;
  d["driver_version"] = drv;
  d["device_count"] = n;
  d["devices"] = devices;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "d3kernels CUDA backend (torch-free; raw pointers and streams)";

  m.def("build_info", &build_info,
        "Build facts: {version, cuda_archs, nvcc_version (CUDART_VERSION), compiled_with}.");
  m.def("runtime_info", &runtime_info,
        "Runtime facts: {runtime_version, driver_version, device_count, devices: "
        "[{name, capability, sm_count, mem_bytes}]}. Raises RuntimeError if CUDA is unusable.");
  m.def(
      "device_capability",
      [](int dev) {
        std::string err;
        std::string cap = d3k::device_capability(dev, &err);
        if (!err.empty()) throw std::runtime_error("d3kernels._C: " + err);
        return cap;
      },
      py::arg("dev") = 0, "Compute capability of device dev as \"major.minor\", e.g. \"9.0\".");

  // Launchers go here, one m.def per op (csrc/README.md, step 3).
}
