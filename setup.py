"""Build script for d3kernels: metadata lives in pyproject.toml; this file only
builds the torch-free extensions from csrc/ with CMake (one CMake run builds both):
  d3kernels._C      the CUDA kernels, compiled by nvcc;
  d3kernels._C_emu  the same launchers and kernels compiled by the host C++
                    compiler against the SIMT emulation layer (csrc/emu/); needs
                    no CUDA toolkit and runs on CPU tensors (backend "cuda-emu");
  d3kernels._C_cpu  the native CPU backend (csrc/cpu/), host compiler (backend "cpu").

Environment knobs:
  CUDA_HOME            toolkit root; if set, only $CUDA_HOME/bin/nvcc is tried.
                       If unset: /usr/local/cuda/bin/nvcc, then nvcc on PATH
                       (resolved with realpath, so wrapper scripts work).
  D3K_NVCC             explicit nvcc path; overrides the search above
                       (D3K_NVCC=/nonexistent simulates a machine without nvcc).
  D3K_CUDA_ARCHS       CMAKE_CUDA_ARCHITECTURES, ';' or ',' separated (default 90).
  MAX_JOBS             parallel compile jobs (default: ninja's choice).
  D3K_SKIP_CUDA_BUILD  =1: do not build _C.
  D3K_REQUIRE_CUDA     =1: fail instead of installing without _C.
  D3K_SKIP_EMU_BUILD   =1: do not build _C_emu.
  D3K_SKIP_CPU_BUILD   =1: do not build _C_cpu.

Without nvcc (or with D3K_SKIP_CUDA_BUILD=1) _C is not built, with one
warning, and the CUDA backend is unavailable (d3kernels._ops.C_ERROR says
why); _C_emu is still built. With neither, the package installs as pure
Python. pip shows build output only with -v. A failing CMake build is an
error, never silently skipped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
EXT_NAME = "d3kernels._C"
EMU_EXT_NAME = "d3kernels._C_emu"
CPU_EXT_NAME = "d3kernels._C_cpu"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_exe(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_nvcc() -> tuple[str | None, str]:
    """Return (realpath of nvcc or None, how it was found / why not)."""
    override = os.environ.get("D3K_NVCC")
    if override:
        if _is_exe(override):
            return os.path.realpath(override), f"D3K_NVCC={override}"
        return None, f"D3K_NVCC={override} is not an executable nvcc"
    cuda_home = os.environ.get("CUDA_HOME")
    if cuda_home:
        cand = os.path.join(cuda_home, "bin", "nvcc")
        if _is_exe(cand):
            return os.path.realpath(cand), f"CUDA_HOME={cuda_home}"
        return None, f"CUDA_HOME={cuda_home} has no bin/nvcc"
    if _is_exe("/usr/local/cuda/bin/nvcc"):
        return os.path.realpath("/usr/local/cuda/bin/nvcc"), "/usr/local/cuda"
    on_path = shutil.which("nvcc")
    if on_path:
        return os.path.realpath(on_path), f"PATH ({on_path})"
    return None, "no nvcc in CUDA_HOME (unset), /usr/local/cuda/bin or PATH"


def cuda_archs() -> str:
    raw = os.environ.get("D3K_CUDA_ARCHS", "").strip() or "90"
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    return ";".join(archs) or "90"


def _plan() -> tuple[str | None, str]:
    """(nvcc, reason): nvcc is None when _C will not be built."""
    if _env_flag("D3K_SKIP_CUDA_BUILD"):
        return None, "D3K_SKIP_CUDA_BUILD=1 is set"
    return find_nvcc()


NVCC, NVCC_REASON = _plan()


def _host_plan(skip_flag: str) -> tuple[bool, str]:
    """(build a host-compiled extension?, why not)."""
    if _env_flag(skip_flag):
        return False, f"{skip_flag}=1 is set"
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        return False, "no C++ compiler (c++, g++ or clang++ on PATH, or CXX)"
    return True, ""


BUILD_EMU, EMU_REASON = _host_plan("D3K_SKIP_EMU_BUILD")
BUILD_CPU, CPU_REASON = _host_plan("D3K_SKIP_CPU_BUILD")


def _no_cuda_message(require: bool) -> str:
    if _env_flag("D3K_SKIP_CUDA_BUILD"):
        fix = "unset D3K_SKIP_CUDA_BUILD"
    else:
        fix = "install the CUDA 13 toolkit and set CUDA_HOME (e.g. CUDA_HOME=/usr/local/cuda)"
    fix = f"To fix: {fix}, then reinstall (pip install --no-build-isolation -e .)."
    if require:
        return (f"d3kernels: D3K_REQUIRE_CUDA=1, but the CUDA extension d3kernels._C cannot be "
                f"built ({NVCC_REASON}). {fix}")
    return (f"d3kernels: NOT building the CUDA extension d3kernels._C ({NVCC_REASON}). "
            f"The CUDA backend will be unavailable. {fix} "
            "Set D3K_REQUIRE_CUDA=1 to make this an error.")


class BuildPy(build_py):
    """Runs once per build: reports (or refuses) a build without _C."""

    def run(self):
        if NVCC is None:
            if _env_flag("D3K_REQUIRE_CUDA"):
                raise SystemExit("error: " + _no_cuda_message(require=True))
            msg = _no_cuda_message(require=False)
            stale = sorted((ROOT / "d3kernels").glob("_C.*"))
            if stale and getattr(self, "editable_mode", False):
                msg += (f" Note: a previously built {stale[0].relative_to(ROOT)} is still in the "
                        "source tree and will be imported; delete it to run without _C.")
            bar = "=" * 78
            print(f"\n{bar}\nWARNING: {msg}\n{bar}\n", file=sys.stderr, flush=True)
        if not BUILD_EMU:
            print(f"WARNING: d3kernels: NOT building the emulated CUDA build d3kernels._C_emu ({EMU_REASON}); "
                  "backend 'cuda-emu' will be unavailable.", file=sys.stderr, flush=True)
        if not BUILD_CPU:
            print(f"WARNING: d3kernels: NOT building the native CPU backend d3kernels._C_cpu ({CPU_REASON}); "
                  "backend 'cpu' will be unavailable and CPU decoding runs on the reference.", file=sys.stderr,
                  flush=True)
        super().run()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _tool(module: str, attr: str, exe: str) -> str:
    """cmake/ninja from the pip packages in the build env, else from PATH."""
    try:
        mod = __import__(module)
        path = os.path.join(getattr(mod, attr), exe)
        if _is_exe(path):
            return path
    except Exception:
        pass
    found = shutil.which(exe)
    if not found:
        raise SystemExit(f"error: d3kernels: '{exe}' not found; pip install {module}")
    return found


class CMakeBuild(build_ext):
    """One CMake run builds every CMakeExtension (_C and/or _C_emu) into the package directory."""

    _cmake_ran = False

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if not CMakeBuild._cmake_ran:
            self._run_cmake(ext)
            CMakeBuild._cmake_ran = True
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        if not out_path.is_file():
            raise SystemExit(f"error: d3kernels: CMake did not produce {out_path}")

    def _run_cmake(self, ext):
        import pybind11

        nvcc = NVCC
        archs = cuda_archs()
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = out_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        ninja = _tool("ninja", "BIN_DIR", "ninja")

        # A persistent in-tree build dir (pip's editable builds use a fresh temp
        # build_temp), so rebuilds are incremental. One per (nvcc, python):
        # changing the CUDA compiler of an existing CMake cache is not supported.
        key = hashlib.sha1(f"{nvcc}|{sys.executable}".encode()).hexdigest()[:10]
        build_dir = ROOT / "build" / f"cmake-{key}"
        build_dir.mkdir(parents=True, exist_ok=True)

        configure = [
            cmake,
            "-S", str(ROOT),
            "-B", str(build_dir),
            "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DD3K_BUILD_CUDA={'ON' if nvcc else 'OFF'}",
            f"-DD3K_BUILD_EMU={'ON' if BUILD_EMU else 'OFF'}",
            f"-DD3K_BUILD_CPU={'ON' if BUILD_CPU else 'OFF'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DD3K_VERSION={self.distribution.get_version()}",
        ]
        if nvcc:
            configure += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
        build = [cmake, "--build", str(build_dir), "--config", "Release"]
        jobs = os.environ.get("MAX_JOBS", "").strip()
        if jobs:
            build += ["--parallel", jobs]

        what = [f"{EXT_NAME} with nvcc {nvcc} (found via {NVCC_REASON}), CUDA archs {archs}"] if nvcc else []
        what += [f"{EMU_EXT_NAME} (emulated CUDA build) with the host C++ compiler"] if BUILD_EMU else []
        what += [f"{CPU_EXT_NAME} (native CPU backend) with the host C++ compiler"] if BUILD_CPU else []
        print("d3kernels: building " + "; ".join(what), flush=True)
        env = dict(os.environ)
        env.pop("CMAKE_CUDA_ARCHITECTURES", None)  # our -D value is the one that counts
        for cmd in (configure, build):
            print("+ " + " ".join(cmd), flush=True)
            try:
                subprocess.run(cmd, check=True, env=env)
            except subprocess.CalledProcessError as e:
                raise SystemExit(
                    f"error: d3kernels: building the extensions failed (exit {e.returncode}); "
                    "see the compiler output above. To install without the CUDA backend, "
                    "set D3K_SKIP_CUDA_BUILD=1 (and D3K_SKIP_EMU_BUILD=1 for the emulated build)."
                ) from None


ext_modules = ([CMakeExtension(EXT_NAME)] if NVCC is not None else []) + \
              ([CMakeExtension(EMU_EXT_NAME)] if BUILD_EMU else []) + \
              ([CMakeExtension(CPU_EXT_NAME)] if BUILD_CPU else [])

setup(
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPy, "build_ext": CMakeBuild},
)
