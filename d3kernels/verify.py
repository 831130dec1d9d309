"""Which GPU backends this device has verified: the selftest records in the user cache
(docs/design.md section 3.3).

A record (written by `d3kernels selftest`, d3kernels.selftest) holds the device, the build it tested and
each case's result. It counts only for the same device (name, compute capability, driver), the same torch
and the same build of the backend: the compiled extension's bytes for "cuda" / "cuda-emu", the kernel
sources and the Triton version for "triton". `backends.resolve("auto")` reads it through `status()`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from typing import Optional

import torch

from . import _ops
from .model import user_cache_dir

RECORD_DIR = "selftest"


def device_key(device) -> dict:
    """What identifies the device a record was made on."""
    device = torch.device(device)
    if device.type == "cuda":
        i = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(i)
        try:
            driver = int(torch._C._cuda_getDriverVersion())
        except Exception:           # an older torch without the binding
            driver = None
        return {"type": "cuda", "name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}",
                "driver": driver, "torch": torch.__version__}
    return {"type": device.type, "name": platform.processor() or platform.machine(), "machine": platform.machine(),
            "torch": torch.__version__}


def _file_hash(paths) -> str:
    """sha256 of the files' bytes, computed once per (path, size, mtime): auto resolves a backend on every
    op call, so this must not re-read a large extension module each time."""
    stamp = []
    for p in paths:
        st = os.stat(p)
        stamp.append((p, st.st_size, st.st_mtime_ns))
    return _hash_stamped(tuple(stamp))


@functools.lru_cache(maxsize=32)
def _hash_stamped(stamp: tuple) -> str:
    h = hashlib.sha256()
    for p, _, _ in stamp:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def build_id(backend: str, ops=None) -> str:
    """The build of `backend` this process runs: a hash of the extension module it loaded ("cuda",
    "cuda-emu"; `ops`, a CudaKernels, may name another build of it), of the Triton kernel sources and
    the Triton version ("triton"), or of the CPU extension, its wrapper and instruction set ("cpu")."""
    if backend in ("cuda", "cuda-emu"):
        if ops is None:
            ops = _ops.cuda_ops if backend == "cuda" else _ops.cuda_emu_ops
        if ops.C is None:
            return "not-built"
        return _file_hash([ops.C.__file__])
    if backend == "triton":
        import triton
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton")
        files = sorted(os.path.join(here, f) for f in os.listdir(here) if f.endswith(".py"))
        return _file_hash(files) + "-triton" + triton.__version__
    if backend == "cpu":     # the extension, its Python wrapper and the instruction set in use
        if _ops.C_CPU is None:
            return "not-built"
        here = os.path.dirname(os.path.abspath(__file__))
        return _file_hash([_ops.C_CPU.__file__, os.path.join(here, "cpu.py")]) + "-" + _ops.C_CPU.isa()
    raise ValueError(f"no selftest build id for backend {backend!r}")


def record_path(backend: str, device, ops=None) -> str:
    key = hashlib.sha256(json.dumps(device_key(device), sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(user_cache_dir(), RECORD_DIR, f"{backend}-{key}-{build_id(backend, ops)}.json")


_READ: dict = {}      # record path -> ((size, mtime), parsed record or None)


def _read(path: str) -> Optional[dict]:
    """The JSON record at path (parsed once per version of the file), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (st.st_size, st.st_mtime_ns)
    hit = _READ.get(path)
    if hit is None or hit[0] != stamp:
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            rec = None
        hit = _READ[path] = (stamp, rec)
    return hit[1]


def status(backend: str, device, ops=None) -> Optional[dict]:
    """This device's selftest record for this build of `backend`, or None. record["passed"] says how it
    ended."""
    path = record_path(backend, device, ops)
    rec = _read(path)
    if rec is None or rec.get("device") != device_key(device) or rec.get("build_id") != build_id(backend, ops):
        return None
    return dict(rec, path=path)


def save(record: dict, device, ops=None) -> str:
    """Write a selftest record where status() finds it; returns the path (a read-only home: nothing
    written, the path returned anyway)."""
    path = record_path(record["backend"], device, ops)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
    except OSError:
        pass
    return path


def records() -> list:
    """Every record in the user cache (for `d3kernels info`), newest first."""
    d = os.path.join(user_cache_dir(), RECORD_DIR)
    out = []
    if os.path.isdir(d):
        for fn in os.listdir(d):
            try:
                with open(os.path.join(d, fn)) as f:
                    rec = json.load(f)
                rec["path"] = os.path.join(d, fn)
                out.append(rec)
            except (OSError, ValueError):
                continue
    return sorted(out, key=lambda r: r.get("date", ""), reverse=True)
