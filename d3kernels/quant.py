"""Weights as the checkpoint stores them (docs/design.md section 2.2): `PackedWeight`.

A PackedWeight is a weight matrix [rows, cols] (or a stack [L, rows, cols]) kept in its storage type: GGUF
blocks of 32 values (q4_0, q4_1, q8_0) or 16-bit floats (f16, bf16), or float32. Its bytes are a uint8
tensor [..., rows, row_bytes] read directly by the native CPU backend (d3kernels.cpu). Everything else
reads it through `dequantize()` (the reference's float32 values, the specification) or the two helpers
the prefill and the embedding use, `linear` and `rows`, which the CPU backend makes native (`NATIVE`).

Block layouts (little-endian, as GGUF writes them): q4_0 {f16 d; u8 qs[16]}: v = d (q - 8); q4_1 {f16 d,
m; u8 qs[16]}: v = d q + m; q8_0 {f16 d; i8 qs[32]}: v = d q. Byte j of qs holds value j in its low
nibble and value j + 16 in its high nibble.

Imports torch only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

BLOCK = 32
# qtype -> (values per block, bytes per block), and the code the C++ side uses (d3k/cpu/ops.h QType)
QTYPES = {"f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q4_0": (32, 18), "q4_1": (32, 20), "q8_0": (32, 34)}
CODES = {"f32": 0, "f16": 1, "bf16": 2, "q4_0": 3, "q4_1": 4, "q8_0": 5}
FLOAT_QTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_FLOAT_DTYPES = {q: dt for dt, q in FLOAT_QTYPES.items()}
# GGUF tensor type numbers (ggml_type) of the types kept packed
GGUF_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 8: "q8_0", 30: "bf16"}
# the fast paths of d3kernels.cpu, when built: {"linear": fn(x, w, b), "rows": fn(w, ids, out)}
NATIVE: dict = {}


def row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one row of `cols` values; ValueError if they are not whole blocks."""
    if qtype not in QTYPES:
        raise ValueError(f"unsupported weight type {qtype!r}; supported: {sorted(QTYPES)}")
    per, nbytes = QTYPES[qtype]
    if cols % per:
        raise ValueError(f"a {qtype} row of {cols} values is not whole blocks of {per} (a misaligned row)")
    return cols // per * nbytes


class PackedWeight:
    """A weight [..., rows, cols] stored as `qtype`; `data` is uint8 [..., rows, row_bytes], contiguous."""

    packed = True

    def __init__(self, data: torch.Tensor, qtype: str, cols: int):
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() < 2:
            raise TypeError("PackedWeight data must be a uint8 tensor [..., rows, row_bytes]")
        if data.shape[-1] != row_bytes(qtype, cols):
            raise ValueError(f"{qtype} rows of {cols} values take {row_bytes(qtype, cols)} bytes, got "
                             f"{data.shape[-1]}")
        self.data, self.qtype, self.cols = data.contiguous(), qtype, cols

    @classmethod
    def from_tensor(cls, w: torch.Tensor) -> "PackedWeight":
        """A float32 / float16 / bfloat16 tensor [..., rows, cols], kept in its dtype."""
        qtype = FLOAT_QTYPES[w.dtype]
        w = w.contiguous()
        return cls(w.view(torch.uint8).reshape(*w.shape[:-1], -1), qtype, w.shape[-1])

    # ---------------------------------------------------------------- tensor-like metadata
    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.data.shape[:-1], self.cols))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dim(self) -> int:
        return self.data.dim()

    def is_contiguous(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def element_size(self) -> float:
        """Bytes per value (e.g. 0.625 for q4_1)."""
        per, nbytes = QTYPES[self.qtype]
        return nbytes / per

    def __getitem__(self, i: int) -> "PackedWeight":
        """Layer i of a stack (an int index only)."""
        if not isinstance(i, int):
            raise TypeError("a PackedWeight is indexed by one int (a layer of a stack)")
        return PackedWeight(self.data[i], self.qtype, self.cols)

    def to(self, device=None, dtype=None) -> "PackedWeight | torch.Tensor":
        """Moved to `device`; with a float dtype, the dequantized values instead (a plain tensor)."""
        if dtype is not None:
            return self.dequantize(dtype).to(device)
        return self if device is None else PackedWeight(self.data.to(device), self.qtype, self.cols)

    def __repr__(self) -> str:
        return f"PackedWeight({self.qtype}, shape={tuple(self.shape)}, {self.nbytes} bytes)"

    # ---------------------------------------------------------------- values
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values [..., rows, cols] as `dtype` (float32 is exact for every type)."""
        return dequantize(self.data, self.qtype, self.cols).to(dtype)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, cols] @ W^T (+ bias) as float32 [N, rows] (native on the CPU backend)."""
        if "linear" in NATIVE and self.data.dim() == 2 and x.device.type == "cpu":
            return NATIVE["linear"](x, self, bias)
        y = x.float() @ self.dequantize().t()
        return y if bias is None else y + bias.float()

    def rows(self, ids: torch.Tensor, out: Optional[torch.Tensor] = None, dtype=torch.float32) -> torch.Tensor:
        """The rows ids [N] int64 dequantized, [N, cols] (into out if given; native on the CPU backend)."""
        if out is None:
            out = torch.empty(ids.numel(), self.cols, dtype=dtype, device=self.device)
        if "rows" in NATIVE and self.data.dim() == 2 and out.device.type == "cpu":
            NATIVE["rows"](self, ids, out)
            return out
        return out.copy_(dequantize(self.data[ids.reshape(-1)], self.qtype, self.cols))


def is_packed(w) -> bool:
    return isinstance(w, PackedWeight)


def dequantize(data: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """float32 values [..., rows, cols] of packed bytes [..., rows, row_bytes]."""
    lead = data.shape[:-1]
    if qtype in _FLOAT_DTYPES:
        return data.contiguous().view(_FLOAT_DTYPES[qtype]).reshape(*lead, cols).float()
    per, nbytes = QTYPES[qtype]
    blocks = data.reshape(*lead, cols // per, nbytes)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()           # [..., nb, 1]
    if qtype == "q8_0":
        v = d * blocks[..., 2:].contiguous().view(torch.int8).float()
    else:
        qs = blocks[..., 4:] if qtype == "q4_1" else blocks[..., 2:]
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1).float()                  # values j and j + 16
        v = d * q + blocks[..., 2:4].contiguous().view(torch.float16).float() if qtype == "q4_1" else d * (q - 8)
    return v.reshape(*lead, cols)


def quantize(w: torch.Tensor, qtype: str) -> PackedWeight:
    """Pack float weights [..., rows, cols] as `qtype` (GGUF's rounding: q4_0 / q8_0 scale by the block's
    absolute maximum, q4_1 by its range); f16 / bf16 / f32 round to that dtype."""
    if qtype in _FLOAT_DTYPES:
        return PackedWeight.from_tensor(w.to(_FLOAT_DTYPES[qtype]))
    cols = w.shape[-1]
    row_bytes(qtype, cols)
    x = w.float().reshape(*w.shape[:-1], cols // BLOCK, BLOCK)
    if qtype == "q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        q = torch.where(d > 0, x / d, torch.zeros_like(x)).round().clamp(-127, 127).to(torch.int8)
        body = [d.half().view(torch.uint8), q.view(torch.uint8)]
    elif qtype == "q4_0":
        # GGUF: d = max / -8 where max is the signed value of largest magnitude
        idx = x.abs().argmax(-1, keepdim=True)
        d = x.gather(-1, idx) / -8
        q = torch.where(d != 0, x / d, torch.zeros_like(x)).add(8.5).floor().clamp(0, 15).to(torch.uint8)
        body = [d.half().view(torch.uint8), q[..., :16] | (q[..., 16:] << 4)]
    else:  # q4_1
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        q = torch.where(d > 0, (x - lo) / d, torch.zeros_like(x)).add(0.5).floor().clamp(0, 15).to(torch.uint8)
        body = [d.half().view(torch.uint8), lo.half().view(torch.uint8), q[..., :16] | (q[..., 16:] << 4)]
    data = torch.cat(body, dim=-1).reshape(*w.shape[:-1], -1)
    return PackedWeight(data, qtype, cols)


def cat(parts: Sequence, dim: int = 0):
    """torch.cat along the rows of tensors or of PackedWeights of one type (mixed types: float32 values)."""
    if not any(is_packed(p) for p in parts):
        return torch.cat(list(parts), dim)
    if dim != 0:
        raise ValueError("PackedWeights are concatenated along their rows only")
    types = {p.qtype if is_packed(p) else None for p in parts}
    if len(types) == 1:
        return PackedWeight(torch.cat([p.data for p in parts]), parts[0].qtype, parts[0].cols)
    return torch.cat([p.dequantize() if is_packed(p) else p.float() for p in parts])


def stack(parts: Sequence):
    """torch.stack of per-layer weights; PackedWeights of one type stay packed (else float32 values)."""
    if not any(is_packed(p) for p in parts):
        return torch.stack(list(parts))
    types = {p.qtype if is_packed(p) else None for p in parts}
    if len(types) == 1:
        return PackedWeight(torch.stack([p.data for p in parts]), parts[0].qtype, parts[0].cols)
    return torch.stack([p.dequantize() if is_packed(p) else p.float() for p in parts])


def rows(w, ids: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Embedding lookup of a tensor or a PackedWeight: w[ids] (into out [N, cols] if given)."""
    if is_packed(w):
        return w.rows(ids, out)
    if out is None:
        return w[ids]
    return torch.index_select(w, 0, ids.reshape(-1), out=out)
