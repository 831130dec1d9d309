"""Page-guarded CPU tensors, for the emulated CUDA build (backend "cuda-emu").

`empty(shape, dtype, at_end=True)` returns a CPU tensor whose bytes end exactly
at a PROT_NONE page (or, with at_end=False, start right after one). A kernel
running on the SIMT emulation layer that reads or writes one byte past the end
(before the start) faults, and the emulation reports an out-of-bounds access
with the block and thread that made it; `describe(message)` adds which guarded
buffer the address belongs to. Tensors keep their mapping alive; it is unmapped
when the last tensor or view of it is gone.

Alignment: a buffer whose size is a multiple of 16 bytes ends exactly at the
guard page and starts 16-byte aligned, so the kernels take the same vectorized
paths as on a GPU; otherwise it is aligned to its element size only, which the
launchers also see on a GPU when such a size forces the scalar path.
"""
from __future__ import annotations

import ctypes
import mmap
import re
import weakref
from math import prod

import torch

PAGE = mmap.PAGESIZE
_PROT_NONE = 0
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

# start address -> (nbytes, at_end, weakref to the mapping); for describe()
_BUFFERS: dict = {}


def _address(m: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def _protect(addr: int, nbytes: int) -> None:
    if _libc.mprotect(addr, nbytes, _PROT_NONE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of a guard page failed")


def empty(shape, dtype: torch.dtype, at_end: bool = True, align: int | None = None) -> torch.Tensor:
    """An uninitialized CPU tensor of `shape` and `dtype` with a guard page right after its last byte
    (at_end=True) or right before its first byte (at_end=False). `align` forces a start alignment in
    bytes (with at_end, the last align - 1 bytes before the guard page may then be unguarded)."""
    shape = tuple(int(s) for s in shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = prod(shape) * itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    data_pages = -(-nbytes // PAGE)
    m = mmap.mmap(-1, (data_pages + 2) * PAGE)
    base = _address(m)
    _protect(base, PAGE)
    _protect(base + (data_pages + 1) * PAGE, PAGE)
    if at_end:
        align = align or (16 if nbytes % 16 == 0 else itemsize)
        start = base + (data_pages + 1) * PAGE - nbytes
        start -= start % align
    else:
        start = base + PAGE
    t = torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=start - base)
    _BUFFERS[start] = (nbytes, at_end, weakref.ref(m))
    weakref.finalize(m, _BUFFERS.pop, start, None)
    return t.view(dtype).view(shape)


def like(t: torch.Tensor, at_end: bool = True) -> torch.Tensor:
    """A guarded copy of `t` (same shape, dtype and values; contiguous, on the CPU)."""
    out = empty(t.shape, t.dtype, at_end=at_end)
    out.copy_(t)
    return out


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or 0x7b bytes (integers), so a value nobody wrote shows, and return t."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.view(torch.uint8).fill_(0x7B).view(t.dtype) if t.numel() else t


def describe(message: str) -> str:
    """`message` with, for each address in it that lies on a guard page, the buffer it runs past."""
    notes = []
    for hexaddr in re.findall(r"0x[0-9a-fA-F]+", message):
        a = int(hexaddr, 16)
        for start, (nbytes, at_end, ref) in list(_BUFFERS.items()):
            if ref() is None:
                continue
            if at_end and start + nbytes <= a < start + nbytes + PAGE + 16:
                notes.append(f"{hexaddr} is {a - start - nbytes} bytes past the end of a guarded buffer of "
                             f"{nbytes} bytes at {start:#x}")
            elif not at_end and start - PAGE <= a < start:
                notes.append(f"{hexaddr} is {start - a} bytes before the start of a guarded buffer of "
                             f"{nbytes} bytes at {start:#x}")
    return message if not notes else message + " (" + "; ".join(notes) + ")"
