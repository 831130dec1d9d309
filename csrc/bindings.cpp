// The single pybind11 file of d3kernels._C. Torch-free: ops take raw device
// pointers (as integers), sizes and a stream handle. Launchers return an error
// string ("" = success); this file turns non-empty ones into RuntimeError.
// See csrc/README.md for how to add a kernel.
//
// Compiled three times: for d3kernels._C (nvcc build); with D3K_EMU and
// D3K_MODULE_NAME=_C_emu, for d3kernels._C_emu, the same launchers and kernels
// built by the host compiler against the SIMT emulation layer (csrc/emu/), where
// "device" pointers are CPU addresses (_C_emu adds the emulation's controls);
// and with D3K_CPU for d3kernels._C_cpu, the native CPU backend (csrc/cpu/,
// d3k/cpu/ops.h), bound at the end of this file.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cctype>
#include <stdexcept>
#include <string>

#if !defined(D3K_CPU)
#include "d3k/build_info.h"
#include "d3k/limits.h"
#include "d3k/ops.h"
#if defined(D3K_EMU)
#include "d3k_emu/control.h"
#endif

namespace py = pybind11;

#ifndef D3K_CUDA_ARCHS
#define D3K_CUDA_ARCHS ""
#endif
#ifndef D3K_VERSION
#define D3K_VERSION "unknown"
#endif
#ifndef D3K_MODULE_NAME
#define D3K_MODULE_NAME _C
#endif
#if defined(D3K_EMU)
#define D3K_COMPILED_WITH "emu"
#else
#define D3K_COMPILED_WITH "nvcc"
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
  d["compiled_with"] = D3K_COMPILED_WITH;
  py::dict limits;  // what the kernels take (d3k/limits.h): backends and CudaKernels read these
  py::list head_dims, dtypes;
  for (int hd : d3k::kHeadDims) head_dims.append(hd);
  for (const char* dt : d3k::kDtypes) dtypes.append(dt);
  limits["head_dims"] = head_dims;
  limits["dtypes"] = dtypes;
  limits["page_size_multiple"] = d3k::kPageSizeMultiple;
  limits["max_page_size"] = d3k::kMaxPageSize;
  d["limits"] = limits;
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

void check(const std::string& err) {
  if (!err.empty()) throw std::runtime_error(err);
}

}  // namespace

PYBIND11_MODULE(D3K_MODULE_NAME, m) {
#if defined(D3K_EMU)
  m.doc() = "d3kernels CUDA kernels on the SIMT emulation layer (CPU addresses; csrc/emu/)";
  m.def("set_seed", &d3k_emu::set_seed, py::arg("seed"),
        "Seed of the emulated thread and block orders; also restarts the per-launch order sequence.");
  m.def("seed", &d3k_emu::seed, "The current seed of the emulated thread and block orders.");
  m.def(
      "emu_stats",
      []() {
        const d3k_emu::Stats s = d3k_emu::stats();
        py::dict d;
        d["launches"] = s.launches;
        d["blocks"] = s.blocks;
        d["switches"] = s.switches;
        d["schedule"] = s.schedule;
        d["sm_count"] = d3k_emu::sm_count();
        return d;
      },
      "Counters of this OS thread: {launches, blocks, switches (fiber context switches), schedule (hash of "
      "the last launch's block and thread order), sm_count}.");
#else
  m.doc() = "d3kernels CUDA backend (torch-free; raw pointers and streams)";
#endif

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

  // ------------------------------------------------------------ launchers
  // Pointers are raw device addresses (ints), dtype a code (0 float16, 1 bfloat16), stream a
  // cudaStream_t as an int; a launcher error becomes RuntimeError. d3kernels/_ops.py is the only caller.
  m.def(
      "device_facts",
      [](int device) {
        int sm = 0, cc = 0;
        bool pdl = false;
        check(d3k::device_facts(device, &sm, &cc, &pdl));
        py::dict r;
        r["sm_count"] = sm;
        r["cc"] = cc;
        r["pdl"] = pdl;
        return r;
      },
      py::arg("device"), "{sm_count, cc (e.g. 90), pdl (Programmatic Dependent Launch in use)} of a device.");
  m.def(
      "attn_workspace",
      [](int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t S, int device) {
        d3k::AttnWorkspace w;
        check(d3k::attn_workspace(B, H, Hkv, D, S, device, &w));
        py::dict r;
        r["num_splits"] = w.num_splits;
        r["split_len"] = w.split_len;
        r["head_groups"] = w.head_groups;
        r["q_elems"] = w.q_elems;
        r["o_elems"] = w.o_elems;
        r["ml_elems"] = w.ml_elems;
        r["acc_elems"] = w.acc_elems;
        r["counters"] = w.counters;
        r["rows_elems"] = w.rows_elems;
        return r;
      },
      py::arg("B"), py::arg("H"), py::arg("H_kv"), py::arg("D"), py::arg("S"), py::arg("device"),
      "Scratch sizes of attn_block: {num_splits, split_len, head_groups, q_elems, o_elems, ml_elems "
      "(fp32), acc_elems (fp32), counters (int32), rows_elems (int32, attn_block_paged only)}.");
  // The launch arguments are the Args structs of d3k/ops.h, bound field by field from their X-macro lists:
  // Python sets each field by name (an unknown name raises), then calls the launcher with the struct.
  // module_local: _C and _C_emu bind the same C++ types, and both load in one process.
  py::enum_<d3k::CacheLayout>(m, "CacheLayout", py::module_local())
      .value("contiguous", d3k::CacheLayout::kContiguous)
      .value("paged", d3k::CacheLayout::kPaged);
#define D3K_BIND_FIELD(type, name) cls.def_readwrite(#name, &Args::name);
#define D3K_BIND_ARGS(ARGS, FIELDS, LAUNCHER)                                                   \
  {                                                                                             \
    using Args = d3k::ARGS;                                                                     \
    py::class_<Args> cls(m, #ARGS, py::module_local());                                         \
    cls.def(py::init<>());                                                                      \
    FIELDS(D3K_BIND_FIELD)                                                                      \
    m.def(#LAUNCHER, [](const Args& a) { check(d3k::LAUNCHER(a)); }, py::arg("args"),           \
          "d3k::" #LAUNCHER "(" #ARGS "): launch on args.stream; RuntimeError with the launcher's message.");   \
  }
  D3K_BIND_ARGS(AttnBlockArgs, D3K_ATTN_BLOCK_FIELDS, attn_block)
  D3K_BIND_ARGS(MlpBlockArgs, D3K_MLP_BLOCK_FIELDS, mlp_block)
  D3K_BIND_ARGS(LmHeadArgs, D3K_LM_HEAD_FIELDS, lm_head)
  D3K_BIND_ARGS(WriteKvArgs, D3K_WRITE_KV_FIELDS, write_kv)
#undef D3K_BIND_ARGS
#undef D3K_BIND_FIELD
  m.def(
      "argmax",
      [](uintptr_t tokens, uintptr_t logits, int64_t B, int64_t V, int64_t ld, int device, uintptr_t stream) {
        check(d3k::argmax(tokens, logits, B, V, ld, device, stream));
      },
      "argmax(tokens int64 [B], logits fp32 [B, V] row stride ld, B, V, ld, device, stream): greedy sampling.");
}
#else  // D3K_CPU: d3kernels._C_cpu
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "d3k/cpu/ops.h"

namespace py = pybind11;
namespace cpu = d3k::cpu;

#ifndef D3K_VERSION
#define D3K_VERSION "unknown"
#endif

namespace {
void check(const std::string& err) {
  if (!err.empty()) throw std::runtime_error(err);
}
}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "d3kernels native CPU backend (torch-free; raw CPU pointers; csrc/cpu/)";
  m.def("build_info", []() {
    py::dict d;
    d["version"] = D3K_VERSION;
    d["compiled_with"] = "cpu";
#if defined(_OPENMP)
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["isas"] = cpu::isas_supported();
    return d;
  }, "Build facts: {version, compiled_with: 'cpu', openmp, isas (the instruction sets this CPU can run)}.");
  m.def("isa", &cpu::isa, "The instruction set in use: 'avx512' | 'avx2' | 'scalar'.");
  m.def("set_isa", [](const std::string& name) { check(cpu::set_isa(name)); }, py::arg("name"),
        "Use another instruction set (a lower one, for tests); RuntimeError if this CPU lacks it.");
  m.def("num_threads", &cpu::num_threads, "Worker threads per launch.");
  m.def("set_num_threads", &cpu::set_num_threads, py::arg("n"), "Worker threads per launch (>= 1).");
  m.def("row_bytes", [](int q, int64_t cols) { return cpu::row_bytes(cpu::QType(q), cols); }, py::arg("qtype"),
        py::arg("cols"), "Bytes of one row of cols values of QType code qtype; -1 if not whole blocks.");

  m.attr("MAX_SEGS") = cpu::kMaxSegs;   // row blocks per weight matrix (ops.h MatDesc)
  py::enum_<cpu::QType>(m, "QType", py::module_local())
      .value("f32", cpu::QType::kF32).value("f16", cpu::QType::kF16).value("bf16", cpu::QType::kBF16)
      .value("q4_0", cpu::QType::kQ4_0).value("q4_1", cpu::QType::kQ4_1).value("q8_0", cpu::QType::kQ8_0)
      .value("q5_0", cpu::QType::kQ5_0).value("q5_1", cpu::QType::kQ5_1).value("q4_K", cpu::QType::kQ4_K)
      .value("q5_K", cpu::QType::kQ5_K).value("q6_K", cpu::QType::kQ6_K);
  py::enum_<cpu::DType>(m, "DType", py::module_local())
      .value("f32", cpu::DType::kF32).value("f16", cpu::DType::kF16).value("bf16", cpu::DType::kBF16);
  py::enum_<cpu::Layout>(m, "Layout", py::module_local())
      .value("contiguous", cpu::Layout::kContiguous).value("paged", cpu::Layout::kPaged);
  // Args structs bound field by field from their X-macro lists, as for the CUDA ops; every launcher
  // releases the GIL while its threads run.
  py::class_<cpu::Program> program(m, "Program", py::module_local());
  program.def(py::init<>())
      .def("__len__", &cpu::Program::size)
      .def("run", [](const cpu::Program& p) {
        std::string e;
        {
          py::gil_scoped_release nogil;
          e = p.run();
        }
        check(e);
      }, "Run the recorded launches in order, in one parallel region.");
#define D3K_CPU_BIND_FIELD(type, name) cls.def_readwrite(#name, &Args::name);
#define D3K_CPU_BIND_ARGS(ARGS, FIELDS, LAUNCHER, ADD)                                              \
  {                                                                                                 \
    using Args = cpu::ARGS;                                                                         \
    py::class_<Args> cls(m, #ARGS, py::module_local());                                             \
    cls.def(py::init<>());                                                                          \
    FIELDS(D3K_CPU_BIND_FIELD)                                                                      \
    m.def(#LAUNCHER, [](const Args& a) {                                                            \
      std::string e;                                                                                \
      {                                                                                             \
        py::gil_scoped_release nogil;                                                               \
        e = cpu::LAUNCHER(a);                                                                       \
      }                                                                                             \
      check(e);                                                                                     \
    }, py::arg("args"), "d3k::cpu::" #LAUNCHER "(" #ARGS "); RuntimeError with the launcher's message.");  \
    program.def(#ADD, [](cpu::Program& p, const Args& a) { check(p.ADD(a)); }, py::arg("args"),    \
                "Record a launch (checked now).");                                                  \
  }
  D3K_CPU_BIND_ARGS(AttnArgs, D3K_CPU_ATTN_FIELDS, attn_block, add_attn)
  D3K_CPU_BIND_ARGS(MlpArgs, D3K_CPU_MLP_FIELDS, mlp_block, add_mlp)
  D3K_CPU_BIND_ARGS(WriteKvArgs, D3K_CPU_WRITE_KV_FIELDS, write_kv, add_write_kv)
  D3K_CPU_BIND_ARGS(LmHeadArgs, D3K_CPU_LM_HEAD_FIELDS, lm_head, add_lm_head)
#undef D3K_CPU_BIND_ARGS
#undef D3K_CPU_BIND_FIELD
  m.def("linear", [](uintptr_t y, uintptr_t x, uintptr_t w, int w_type, int64_t w_ld, uintptr_t bias, int64_t N,
                     int64_t R, int64_t K) {
    std::string e;
    {
      py::gil_scoped_release nogil;
      e = cpu::linear(y, x, w, cpu::QType(w_type), w_ld, bias, N, R, K);
    }
    check(e);
  }, "linear(y, x, w, w_type, w_ld, bias, N, R, K): y [N, R] f32 = x [N, K] f32 @ w^T (+ bias).");
  m.def("embed", [](uintptr_t out, int dtype, uintptr_t ids, uintptr_t w, int w_type, int64_t w_ld, int64_t N,
                    int64_t R, int64_t K) {
    check(cpu::embed(out, cpu::DType(dtype), ids, w, cpu::QType(w_type), w_ld, N, R, K));
  }, "embed(out, dtype, ids, w, w_type, w_ld, N, R, K): out [N, K] = rows ids [N] int64 of w [R, K].");
  m.def("argmax", [](uintptr_t tokens, uintptr_t logits, int64_t B, int64_t V, int64_t ld) {
    check(cpu::argmax(tokens, logits, B, V, ld));
  }, "argmax(tokens int64 [B], logits f32 [B, V] row stride ld, B, V, ld).");
}
#endif  // D3K_CPU
