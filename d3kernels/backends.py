"""Backend selection: one table of what can run where, and why not (docs/design.md section 3).

"auto" picks cuda, then triton, then reference; on CPU tensors it picks the
native cpu backend (d3kernels.cpu) when it is built and verified, else the
reference (the Triton interpreter runs only when "triton" is named). The cpu
backend verifies itself like a GPU one: a selftest record, or the first-use
selftest (a few seconds). A GPU
backend counts for auto once it is verified: VERIFIED_ON_GPU, or a passing
selftest record for this device and this build (d3kernels/verify.py). With
neither, auto runs the selftest once at first use (FIRST_USE_CHECK, which
d3kernels/__init__ sets to d3kernels.selftest.first_use; D3K_SELFTEST=0 turns
that off); a failed record keeps the backend off. A named backend that cannot
run raises an error that says why. D3K_BACKEND overrides "auto".

"cuda-emu" is the CUDA backend's own code (csrc/) built for the CPU on the SIMT
emulation layer (d3kernels._C_emu): CPU tensors, float16/bfloat16. It proves
the kernels' indexing, masking, barriers and bounds without a GPU, at CPU
emulation speed; "auto" never picks it.

Imports: _ops (the CUDA backends and the torch.library registration) and the
reference; triton only when asked about. Nothing above it (ops, the driver,
the CLI).
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from . import _ops, verify
from . import reference as _reference

BACKENDS = ("cuda", "triton", "cpu", "reference")      # the order "auto" tries
NAMED_ONLY = ("cuda-emu",)                         # run only when named
ALL_BACKENDS = BACKENDS + NAMED_ONLY
GPU_DTYPES = (torch.float16, torch.bfloat16)
# "auto" only picks a GPU backend once its test suite has passed on a real GPU (bench/gpu_check.sh test).
# Until then it can still be named explicitly (backend="cuda" / D3K_BACKEND=cuda).
VERIFIED_ON_GPU = {"cuda": False, "triton": False}
# What auto considers per device type, in order, before the reference (tests put the emulated CUDA build
# here to stand in for a GPU).
AUTO_CANDIDATES = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
# The backends that read d3kernels.quant.PackedWeights (weights as the checkpoint stores them)
PACKED_READERS = ("cpu",)
# callable(backend, device) -> bool: verify an unverified backend at first use (set by d3kernels/__init__)
FIRST_USE_CHECK = None
SELFTEST_ENV = "D3K_SELFTEST"


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(backend: str, device, dtype: torch.dtype, head_dim: Optional[int] = None,
            page_size: Optional[int] = None) -> Optional[str]:
    """None if `backend` can run ops on (device, dtype, head_dim), else the reason it cannot. page_size: the
    page size of a paged KV cache that attn_block_paged reads (the CUDA kernels need a multiple of 16)."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "triton":
        try:
            importlib.import_module("d3kernels.triton")
        except Exception as e:  # triton missing or broken
            return f"triton is not importable ({type(e).__name__}: {e}); pip install 'triton>=3.6'"
        if device.type == "cpu":
            if not _triton_interpreting():
                return "tensors are on the CPU; Triton runs on CUDA GPUs (or on CPU with TRITON_INTERPRET=1)"
            if dtype == torch.bfloat16:
                return "the Triton CPU interpreter mishandles bfloat16; use float16 or float32"
        elif device.type != "cuda":
            return f"Triton needs a CUDA device, got {device.type}"
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
        if head_dim is not None and (head_dim & (head_dim - 1) or not 16 <= head_dim <= 256):
            return f"head_dim {head_dim} is not supported (a power of two in [16, 256])"
        return None
    if backend == "cuda":
        if _ops.C is None:
            return _ops.C_ERROR
        if not _ops.CUDA_OPS_AVAILABLE:
            return "the CUDA kernels are not part of this build yet (d3kernels._C holds build info only)"
        if device.type != "cuda":
            return f"tensors are on {device.type}; the CUDA backend needs CUDA tensors"
        return _ops.kernel_limits_problem(dtype, head_dim, page_size) or _ops.arch_problem(device)
    if backend == "cpu":
        from . import cpu
        problem = cpu.available()
        if problem is not None:
            return problem
        if device.type != "cpu":
            return f"tensors are on {device.type}; the cpu backend runs on CPU tensors"
        if dtype not in cpu.DTYPES:
            return f"dtype {dtype} is not supported by the cpu backend (float32, float16, bfloat16)"
        if head_dim is not None and head_dim % 2:
            return f"head_dim {head_dim} is odd (RoPE rotates pairs)"
        return None
    if backend == "cuda-emu":
        if not _ops.cuda_emu_ops.available:
            return _ops.C_EMU_ERROR or "d3kernels._C_emu has no CUDA kernels; rebuild it"
        if device.type != "cpu":
            return f"tensors are on {device.type}; the emulated CUDA build runs on CPU tensors"
        return _ops.kernel_limits_problem(dtype, head_dim, page_size)
    raise ValueError(f"backend must be one of {('auto',) + ALL_BACKENDS}, got {backend!r}")


def resolve(backend: str, device, dtype: torch.dtype, head_dim: Optional[int] = None,
            page_size: Optional[int] = None, first_use: bool = True) -> str:
    """The concrete backend name for a request; raises if a named backend cannot run. first_use=False:
    auto does not run a selftest (it only reads the records)."""
    if backend == "auto":
        backend = os.environ.get("D3K_BACKEND", "auto") or "auto"
    if backend == "auto":
        for b in AUTO_CANDIDATES.get(torch.device(device).type, ()):
            if why_not(b, device, dtype, head_dim, page_size) is None and verified(b, device, first_use):
                return b
        return "reference"
    reason = why_not(backend, device, dtype, head_dim, page_size)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run here: {reason}")
    return backend


def verified(backend: str, device, first_use: bool = True) -> bool:
    """Whether auto may pick `backend` on `device`: VERIFIED_ON_GPU, else this device's selftest record for
    this build (a failed one keeps it off), else, once, the first-use selftest (unless D3K_SELFTEST=0)."""
    if VERIFIED_ON_GPU.get(backend, False):
        return True
    rec = verify.status(backend, device)
    if rec is not None:
        return bool(rec.get("passed"))
    if first_use and FIRST_USE_CHECK is not None and os.environ.get(SELFTEST_ENV, "1") != "0":
        return bool(FIRST_USE_CHECK(backend, device))
    return False


def get(backend: str):
    """The module implementing the ops of a concrete backend."""
    if backend == "reference":
        return _reference
    if backend == "triton":
        return importlib.import_module("d3kernels.triton")
    if backend == "cuda":
        return _ops.cuda_ops
    if backend == "cuda-emu":
        return _ops.cuda_emu_ops
    if backend == "cpu":
        from . import cpu
        return cpu.ops
    raise ValueError(f"backend must be one of {ALL_BACKENDS}, got {backend!r}")


def report(device=None, dtype: torch.dtype = torch.bfloat16) -> list:
    """[(backend, available, reason)] for `d3kernels info`."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for b in ALL_BACKENDS:
        if b == "cuda-emu":
            reason = why_not(b, "cpu", dtype)
            rows.append((b, reason is None, reason or "ok (CPU tensors; csrc/ on the SIMT emulation layer)"))
            continue
        reason = why_not(b, device, dtype)
        if reason is None and b in AUTO_CANDIDATES.get(torch.device(device).type, ()) \
                and not verified(b, device, first_use=False):
            rec = verify.status(b, device)
            reason = ("its selftest FAILED on this device, so auto keeps it off (d3kernels selftest --backend "
                      f"{b}; record {rec['path']})" if rec is not None else
                      "not yet verified on this device: auto runs its selftest at first use (D3K_SELFTEST=0: "
                      f"never), or run `d3kernels selftest --backend {b}`; name it to use it anyway")
            rows.append((b, True, reason))
        else:
            rows.append((b, reason is None, reason or "ok"))
    return rows
