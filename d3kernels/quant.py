"""Weights as the checkpoint stores them (docs/design.md section 2.1): `PackedWeight`, `PackedRows`,
`PackedStack`.

A PackedWeight is a weight matrix [rows, cols] (or a stack [L, rows, cols] of one type) kept in its storage
type: GGUF blocks (q4_0, q4_1, q5_0, q5_1, q8_0 of 32 values; q4_K, q5_K, q6_K of 256), 16-bit floats
(f16, bf16) or float32. Its bytes are a uint8 tensor [..., rows, row_bytes] read directly by the native CPU
backend (d3kernels.cpu). A PackedRows is a matrix made of row blocks of their own types ([q; k; v],
[gate; up]); a PackedStack is a stack [L, rows, cols] of per-layer matrices whose types may differ from
layer to layer (a Q4_K_M file stores some layers' attn_v and ffn_down as q6_K, the others as q4_K).
cat / stack build those two without copying a byte, so a mapped GGUF file stays the only copy.

Everything but the cpu backend reads them through `dequantize()` (exact float32 values: the specification)
or the two helpers the prefill and the embedding use, `linear` and `rows`, which the cpu backend makes
native (`NATIVE`).

Row order. llama.cpp stores a Llama model's Q and K rows permuted for its interleaved RoPE: within each
head of D rows, stored row 2 i + j holds Hugging Face row j D/2 + i. A PackedWeight made with heads > 0
keeps that storage order (no copy) and gives the Hugging Face order everywhere: dequantize(), linear()
(output columns), rows(). NATIVE["linear"] returns storage order; linear() reorders it.

Block layouts (little-endian, ggml-common.h), with d, dmin, m float16:
  q4_0 {d; u8 qs[16]}            v = d (q - 8)
  q4_1 {d, m; u8 qs[16]}         v = d q + m
  q5_0 {d; u8 qh[4]; u8 qs[16]}  v = d (q - 16), q = nibble | bit << 4
  q5_1 {d, m; u8 qh[4]; qs[16]}  v = d q + m
  q8_0 {d; i8 qs[32]}            v = d q
  (32-value blocks: byte j of qs holds value j in its low nibble and value j + 16 in its high nibble; bit j
  of qh, read as a little-endian u32, is value j's fifth bit.)
  q4_K {d, dmin; u8 scales[12]; u8 qs[128]}           8 sub-blocks of 32, v = (d sc) q - (dmin m)
  q5_K {d, dmin; u8 scales[12]; u8 qh[32]; qs[128]}   the same with q = nibble | (bit s of qh[l]) << 4
  q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; d}      16 sub-blocks of 16, v = (d sc) (q - 32)
  (q4_K / q5_K: 32-byte group c of qs holds sub-block 2c in its low nibbles and 2c + 1 in its high ones;
  sub-block s has a 6-bit scale sc and min m packed as ggml's get_scale_min_k4. q6_K: each half of 128
  values takes 64 bytes of ql (values l and l + 32 in low nibbles of bytes l and l + 32, values l + 64 and
  l + 96 in their high nibbles) and 32 of qh (two bits per value, shifts 0, 2, 4, 6 in that order).)
The float expressions above are evaluated in that order, in float32, as gguf-py's dequantize does: the
results are equal bit for bit (python_tests/test_quant_formats.py).

Imports torch only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

BLOCK = 32
QK_K = 256
# qtype -> (values per block, bytes per block), and the code the C++ side uses (d3k/cpu/ops.h QType)
QTYPES = {"f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q4_0": (32, 18), "q4_1": (32, 20), "q8_0": (32, 34),
          "q5_0": (32, 22), "q5_1": (32, 24), "q4_K": (256, 144), "q5_K": (256, 176), "q6_K": (256, 210)}
CODES = {"f32": 0, "f16": 1, "bf16": 2, "q4_0": 3, "q4_1": 4, "q8_0": 5, "q5_0": 6, "q5_1": 7, "q4_K": 8,
         "q5_K": 9, "q6_K": 10}
FLOAT_QTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_FLOAT_DTYPES = {q: dt for dt, q in FLOAT_QTYPES.items()}
# GGUF tensor type numbers (ggml_type) of the types kept packed
GGUF_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 12: "q4_K",
              13: "q5_K", 14: "q6_K", 30: "bf16"}
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


# ------------------------------------------------------------------------------------------ row order
def to_hf_order(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """x with its rows along `dim` moved from llama.cpp's interleaved-RoPE order to Hugging Face order
    (heads of D rows: stored row 2 i + j of a head is HF row j D/2 + i)."""
    dim = dim % x.dim()
    shape = x.shape
    R = shape[dim]
    return x.reshape(*shape[:dim], heads, R // heads // 2, 2, *shape[dim + 1:]) \
        .transpose(dim + 1, dim + 2).reshape(shape)


def _storage_rows(ids: torch.Tensor, rows: int, heads: int) -> torch.Tensor:
    """The stored row of each Hugging Face row index in ids (int64, any shape)."""
    D = rows // heads
    h, k = ids // D, ids % D
    return h * D + 2 * (k % (D // 2)) + k // (D // 2)


def _device_dtype(device, dtype) -> tuple:
    """to()'s arguments as (torch.device or None, dtype or None); a dtype may come first, as in Tensor.to."""
    if isinstance(device, torch.dtype):
        device, dtype = None, device
    return (None if device is None else torch.device(device)), dtype


# ------------------------------------------------------------------------------------------ PackedWeight
class PackedWeight:
    """A weight [..., rows, cols] stored as `qtype`; `data` is uint8 [..., rows, row_bytes], contiguous.

    heads > 0: the rows are in llama.cpp's interleaved-RoPE order (a GGUF Llama Q or K weight), `heads` heads
    of rows // heads rows each; every reader below gives Hugging Face order. The data is not copied.
    """

    packed = True

    def __init__(self, data: torch.Tensor, qtype: str, cols: int, heads: int = 0):
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() < 2:
            raise TypeError("PackedWeight data must be a uint8 tensor [..., rows, row_bytes]")
        if data.shape[-1] != row_bytes(qtype, cols):
            raise ValueError(f"{qtype} rows of {cols} values take {row_bytes(qtype, cols)} bytes, got "
                             f"{data.shape[-1]}")
        heads = int(heads)
        if heads < 0 or (heads and data.shape[-2] % (2 * heads)):
            raise ValueError(f"heads={heads}: expected a positive count dividing {data.shape[-2]} rows into "
                             "heads of an even number of rows")
        self.data, self.qtype, self.cols, self.heads = data.contiguous(), qtype, cols, heads

    @classmethod
    def from_tensor(cls, w: torch.Tensor) -> "PackedWeight":
        """A float32 / float16 / bfloat16 tensor [..., rows, cols], kept in its dtype (no copy if contiguous)."""
        if w.dtype not in FLOAT_QTYPES:
            raise TypeError(f"a packed float weight is float32, float16 or bfloat16, got {w.dtype}")
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
        """Bytes per value (e.g. 0.625 for q4_1, 0.5625 for q4_K)."""
        per, nbytes = QTYPES[self.qtype]
        return nbytes / per

    @property
    def qtypes(self) -> tuple:
        """The storage types it holds: (qtype,)."""
        return (self.qtype,)

    def storage(self) -> dict:
        """{qtype: bytes} of its storage."""
        return {self.qtype: self.nbytes}

    def __getitem__(self, i: int) -> "PackedWeight":
        """Layer i of a stack (an int index only)."""
        if not isinstance(i, int):
            raise TypeError("a PackedWeight is indexed by one int (a layer of a stack)")
        if self.data.dim() < 3:
            raise IndexError("a 2-D PackedWeight has no layers to index")
        return PackedWeight(self.data[i], self.qtype, self.cols, self.heads)

    def to(self, device=None, dtype=None) -> "PackedWeight | torch.Tensor":
        """Moved to `device` (itself when already there); with a float dtype (to(dtype) or to(dtype=...)), the
        dequantized values instead (a plain tensor)."""
        device, dtype = _device_dtype(device, dtype)
        if dtype is not None:
            return self.dequantize(dtype).to(device)
        if device is None or device == self.device:
            return self
        return PackedWeight(self.data.to(device), self.qtype, self.cols, self.heads)

    def __repr__(self) -> str:
        h = f", heads={self.heads}" if self.heads else ""
        return f"PackedWeight({self.qtype}, shape={tuple(self.shape)}{h}, {self.nbytes} bytes)"

    # ---------------------------------------------------------------- values
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values [..., rows, cols] in Hugging Face row order, as `dtype` (float32 is exact for every type)."""
        v = dequantize(self.data, self.qtype, self.cols)
        if self.heads:
            v = to_hf_order(v, self.heads, -2)
        return v.to(dtype)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, cols] @ W^T (+ bias [rows]) as float32 [N, rows], columns in Hugging Face order (native on the
        CPU backend)."""
        if "linear" in NATIVE and self.data.dim() == 2 and x.device.type == "cpu":
            if not self.heads:
                return NATIVE["linear"](x, self, bias)
            y = to_hf_order(NATIVE["linear"](x, self, None), self.heads, -1)
        else:
            y = x.float() @ self.dequantize().t()
        return y if bias is None else y + bias.float()

    def rows(self, ids: torch.Tensor, out: Optional[torch.Tensor] = None, dtype=torch.float32) -> torch.Tensor:
        """The rows ids [N] int64 (Hugging Face order) dequantized, [N, cols] (into out if given; native on the
        CPU backend)."""
        if out is None:
            out = torch.empty(ids.numel(), self.cols, dtype=dtype, device=self.device)
        if self.data.dim() != 2:
            raise ValueError(f"rows() reads a 2-D weight, this one is {tuple(self.shape)}")
        ids = ids.reshape(-1)
        if self.heads:
            ids = _storage_rows(ids.to(torch.int64), self.data.shape[0], self.heads)
        if "rows" in NATIVE and out.device.type == "cpu":
            NATIVE["rows"](PackedWeight(self.data, self.qtype, self.cols), ids, out)
            return out
        return out.copy_(dequantize(self.data[ids], self.qtype, self.cols))


# ------------------------------------------------------------------------------------------ PackedRows
def _as_part(p) -> PackedWeight:
    """A 2-D PackedWeight of a part (a float32 / float16 / bfloat16 tensor is wrapped as stored, no copy)."""
    if isinstance(p, torch.Tensor):
        p = PackedWeight.from_tensor(p)
    if not isinstance(p, PackedWeight) or p.dim() != 2:
        raise TypeError(f"expected a 2-D PackedWeight or float tensor, got {p!r}")
    return p


class PackedRows:
    """A matrix [rows, cols] made of row blocks stacked vertically ([q; k; v], [gate; up]), each part a 2-D
    PackedWeight with its own storage type and row order (float tensors are wrapped as f32 / f16 / bf16
    PackedWeights, not copied). `.parts`; `.splits`: the parts' row counts."""

    packed = True

    def __init__(self, parts: Sequence):
        flat = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, PackedRows) else [_as_part(p)])
        if not flat:
            raise ValueError("PackedRows needs at least one part")
        cols, dev = flat[0].cols, flat[0].device
        for i, p in enumerate(flat):
            if p.cols != cols or p.device != dev:
                raise ValueError(f"PackedRows part {i}: expected {cols} columns on {dev}, got {p.cols} on "
                                 f"{p.device}")
        self.parts = flat
        self.splits = [p.shape[0] for p in flat]
        self.cols = cols

    @property
    def shape(self) -> torch.Size:
        return torch.Size((sum(self.splits), self.cols))

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def dim(self) -> int:
        return 2

    def is_contiguous(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def element_size(self) -> float:
        """Average bytes per value."""
        return self.nbytes / (sum(self.splits) * self.cols)

    @property
    def qtypes(self) -> tuple:
        return tuple(sorted({p.qtype for p in self.parts}))

    def storage(self) -> dict:
        return _merge(p.storage() for p in self.parts)

    def to(self, device=None, dtype=None) -> "PackedRows | torch.Tensor":
        device, dtype = _device_dtype(device, dtype)
        if dtype is not None:
            return self.dequantize(dtype).to(device)
        if device is None or device == self.device:
            return self
        return PackedRows([p.to(device) for p in self.parts])

    def __repr__(self) -> str:
        return f"PackedRows({', '.join(repr(p) for p in self.parts)})"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values [rows, cols] as `dtype`."""
        return torch.cat([p.dequantize(dtype) for p in self.parts])

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, cols] @ W^T (+ bias [rows]) as float32 [N, rows]: the parts' outputs side by side."""
        bs = [None] * len(self.parts) if bias is None else bias.split(self.splits)
        return torch.cat([p.linear(x, b) for p, b in zip(self.parts, bs)], dim=-1)

    def rows(self, ids: torch.Tensor, out: Optional[torch.Tensor] = None, dtype=torch.float32) -> torch.Tensor:
        """The rows ids [N] int64 dequantized, [N, cols] (into out if given)."""
        ids = ids.reshape(-1).to(torch.int64)
        if out is None:
            out = torch.empty(ids.numel(), self.cols, dtype=dtype, device=self.device)
        lo = 0
        for p, n in zip(self.parts, self.splits):
            sel = ((ids >= lo) & (ids < lo + n)).nonzero().reshape(-1)
            if sel.numel():
                out[sel] = p.rows(ids[sel] - lo, dtype=out.dtype)
            lo += n
        return out


# ------------------------------------------------------------------------------------------ PackedStack
class PackedStack:
    """A stack [L, rows, cols] of per-layer matrices (2-D PackedWeights or PackedRows), each with its own
    storage types. `.layers`; `[l]` is layer l's matrix."""

    packed = True

    def __init__(self, layers: Sequence):
        out = []
        for p in layers:
            out.append(p if isinstance(p, PackedRows) else _as_part(p))
        if not out:
            raise ValueError("PackedStack needs at least one layer")
        shape, dev = tuple(out[0].shape), out[0].device
        for l, p in enumerate(out):
            if tuple(p.shape) != shape or p.device != dev:
                raise ValueError(f"PackedStack layer {l}: expected shape {shape} on {dev}, got {tuple(p.shape)} "
                                 f"on {p.device}")
        self.layers = out

    def __getitem__(self, l: int):
        if not isinstance(l, int):
            raise TypeError("a PackedStack is indexed by one int (a layer)")
        return self.layers[l]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.layers), *self.layers[0].shape))

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    def dim(self) -> int:
        return 3

    def is_contiguous(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.layers)

    def element_size(self) -> float:
        """Average bytes per value over the stack."""
        L, R, C = self.shape
        return self.nbytes / (L * R * C)

    @property
    def qtypes(self) -> tuple:
        return tuple(sorted({q for p in self.layers for q in p.qtypes}))

    def storage(self) -> dict:
        return _merge(p.storage() for p in self.layers)

    def to(self, device=None, dtype=None) -> "PackedStack | torch.Tensor":
        device, dtype = _device_dtype(device, dtype)
        if dtype is not None:
            return self.dequantize(dtype).to(device)
        if device is None or device == self.device:
            return self
        return PackedStack([p.to(device) for p in self.layers])

    def __repr__(self) -> str:
        return f"PackedStack({len(self.layers)} x {tuple(self.layers[0].shape)}, {'+'.join(self.qtypes)}, " \
               f"{self.nbytes} bytes)"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values [L, rows, cols] as `dtype`."""
        return torch.stack([p.dequantize(dtype) for p in self.layers])


def _merge(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def is_packed(w) -> bool:
    return isinstance(w, (PackedWeight, PackedRows, PackedStack))


def storage(w) -> dict:
    """{storage type: bytes} of a packed weight or a tensor (its dtype's name: f32, f16, bf16, or str(dtype))."""
    if is_packed(w):
        return w.storage()
    return {FLOAT_QTYPES.get(w.dtype, str(w.dtype).replace("torch.", "")): w.numel() * w.element_size()}


# ------------------------------------------------------------------------------------------ block decoders
def _f16(b: torch.Tensor) -> torch.Tensor:
    """float32 [..., 1] of little-endian float16 bytes [..., 2]."""
    return b.contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor, shifts) -> torch.Tensor:
    """[..., len(shifts), n]: (b [..., n] >> shift) for each shift."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=b.device).reshape(-1, 1)
    return b.unsqueeze(-2) >> s


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """Values [..., 32] of a 32-value block's qs [..., 16]: value j low nibble of byte j, j + 16 high nibble."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _high_bit32(qh: torch.Tensor) -> torch.Tensor:
    """[..., 32] of 0 / 16: bit j of qh [..., 4] (a little-endian u32) shifted to value j's fifth bit."""
    return ((_bits(qh, range(8)) & 1).transpose(-1, -2).reshape(*qh.shape[:-1], 32)) << 4


def _scale_min_k4(scales: torch.Tensor) -> tuple:
    """The 8 six-bit scales and mins [..., 8] of a q4_K / q5_K block's scales [..., 12] (get_scale_min_k4)."""
    s = scales.reshape(*scales.shape[:-1], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 8, 32] nibbles of a q4_K / q5_K block's qs [..., 128]: group c holds sub-blocks 2c (low), 2c+1."""
    g = qs.reshape(*qs.shape[:-1], 4, 32)
    return torch.stack([g & 0xF, g >> 4], dim=-2).reshape(*qs.shape[:-1], 8, 32)


def _dec_q4_0(b):
    return _f16(b[..., 0:2]) * (_nibbles32(b[..., 2:]).to(torch.int8) - 8).float()


def _dec_q4_1(b):
    return _f16(b[..., 0:2]) * _nibbles32(b[..., 4:]).float() + _f16(b[..., 2:4])


def _dec_q5_0(b):
    q = _nibbles32(b[..., 6:]) | _high_bit32(b[..., 2:6])
    return _f16(b[..., 0:2]) * (q.to(torch.int8) - 16).float()


def _dec_q5_1(b):
    q = _nibbles32(b[..., 8:]) | _high_bit32(b[..., 4:8])
    return _f16(b[..., 0:2]) * q.float() + _f16(b[..., 2:4])


def _dec_q8_0(b):
    return b[..., 2:].contiguous().view(torch.int8).float() * _f16(b[..., 0:2])


def _dec_q4_K(b):
    sc, mn = _scale_min_k4(b[..., 4:16])
    d = (_f16(b[..., 0:2]) * sc.float()).unsqueeze(-1)                          # [..., 8, 1]
    dm = (_f16(b[..., 2:4]) * mn.float()).unsqueeze(-1)
    return (d * _k_nibbles(b[..., 16:]).float() - dm).flatten(-2)


def _dec_q5_K(b):
    sc, mn = _scale_min_k4(b[..., 4:16])
    d = (_f16(b[..., 0:2]) * sc.float()).unsqueeze(-1)
    dm = (_f16(b[..., 2:4]) * mn.float()).unsqueeze(-1)
    hi = (_bits(b[..., 16:48], range(8)) & 1) << 4                              # [..., 8, 32]: sub-block s, bit s
    return (d * (_k_nibbles(b[..., 48:]) | hi).float() - dm).flatten(-2)


def _dec_q6_K(b):
    lead = b.shape[:-1]
    ql, qh = b[..., 0:128], b[..., 128:192]
    sc = b[..., 192:208].contiguous().view(torch.int8).float()                 # [..., 16]
    d = (_f16(b[..., 208:210]) * sc).unsqueeze(-1)                             # [..., 16, 1]
    low = _bits(ql.reshape(*lead, 2, 64), (0, 4)) & 0xF                        # [..., 2, 2, 64]
    low = low.reshape(*lead, 8, 32)                                            # half, shift, 32-group
    high = (_bits(qh.reshape(*lead, 2, 32), (0, 2, 4, 6)) & 3).reshape(*lead, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).float().reshape(*lead, 16, 16)
    return (d * q).flatten(-2)


_DECODERS = {"q4_0": _dec_q4_0, "q4_1": _dec_q4_1, "q5_0": _dec_q5_0, "q5_1": _dec_q5_1, "q8_0": _dec_q8_0,
             "q4_K": _dec_q4_K, "q5_K": _dec_q5_K, "q6_K": _dec_q6_K}


def dequantize(data: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """float32 values [..., rows, cols] of packed bytes [..., rows, row_bytes], in storage row order (the
    specification of every type; see the module docstring)."""
    lead = data.shape[:-1]
    if data.shape[-1] != row_bytes(qtype, cols):
        raise ValueError(f"{qtype} rows of {cols} values take {row_bytes(qtype, cols)} bytes, got {data.shape[-1]}")
    if qtype in _FLOAT_DTYPES:
        return data.contiguous().view(_FLOAT_DTYPES[qtype]).reshape(*lead, cols).float()
    per, nbytes = QTYPES[qtype]
    blocks = data.reshape(*lead, cols // per, nbytes)
    return _DECODERS[qtype](blocks).reshape(*lead, cols)


# ------------------------------------------------------------------------------------------ quantizers
def _pack_nibbles32(q: torch.Tensor) -> torch.Tensor:
    return (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)


def _pack_high_bit32(q: torch.Tensor) -> torch.Tensor:
    """qh [..., 4] of values q [..., 32] (0..31): bit j = value j's fifth bit."""
    bits = ((q >> 4) & 1).reshape(*q.shape[:-1], 4, 8)
    w = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=q.device)
    return (bits * w).sum(-1).to(torch.uint8)


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.half().view(torch.uint8)


def _quant_k_scales(scale: torch.Tensor, mins: torch.Tensor) -> tuple:
    """6-bit codes of per-sub-block scales and mins [..., 8] (both >= 0): (d, dmin, sc, m, packed [..., 12])."""
    d = scale.amax(-1, keepdim=True) / 63
    dmin = mins.amax(-1, keepdim=True) / 63
    sc = torch.where(d > 0, scale / d, torch.zeros_like(scale)).round().clamp(0, 63).to(torch.uint8)
    m = torch.where(dmin > 0, mins / dmin, torch.zeros_like(mins)).round().clamp(0, 63).to(torch.uint8)
    packed = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6),
                        (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)], dim=-1)
    return d.half().float(), dmin.half().float(), sc, m, packed


def _quant_k_asym(x: torch.Tensor, levels: int) -> tuple:
    """q4_K / q5_K rounding of blocks x [..., 8, 32]: (d, dmin halves as bytes, packed scales, q [..., 8, 32])."""
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1)
    d, dmin, sc, m, packed = _quant_k_scales((hi - lo) / levels, -lo)
    ds = (d * sc.float()).unsqueeze(-1)
    dm = (dmin * m.float()).unsqueeze(-1)
    q = torch.where(ds > 0, (x + dm) / ds, torch.zeros_like(x)).round().clamp(0, levels).to(torch.uint8)
    return _half(d), _half(dmin), packed, q


def quantize(w: torch.Tensor, qtype: str) -> PackedWeight:
    """Pack float weights [..., rows, cols] as `qtype`. q4_0 / q4_1 / q5_0 / q5_1 / q8_0 round as gguf-py's
    quantizers do (q4_0 / q5_0 / q8_0 scale by the block's signed or absolute maximum, q4_1 / q5_1 by its
    range); q4_K / q5_K / q6_K round each sub-block to nearest (no search for the best scales, unlike
    llama.cpp's quantizer: valid blocks for tests, not the best ones); f16 / bf16 / f32 round to that dtype."""
    if qtype in _FLOAT_DTYPES:
        return PackedWeight.from_tensor(w.to(_FLOAT_DTYPES[qtype]))
    cols = w.shape[-1]
    row_bytes(qtype, cols)
    per = QTYPES[qtype][0]
    x = w.float().reshape(*w.shape[:-1], cols // per, per)
    if qtype == "q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        q = torch.where(d > 0, x / d, torch.zeros_like(x)).round().clamp(-127, 127).to(torch.int8)
        body = [_half(d), q.view(torch.uint8)]
    elif qtype in ("q4_0", "q5_0"):
        # the signed value of largest magnitude maps to -8 (-16): d = max / -8
        n = 8 if qtype == "q4_0" else 16
        idx = x.abs().argmax(-1, keepdim=True)
        d = x.gather(-1, idx) / -n
        q = torch.where(d != 0, x / d, torch.zeros_like(x)).add(n + 0.5).floor().clamp(0, 2 * n - 1)
        q = q.to(torch.uint8)
        body = [_half(d), _pack_nibbles32(q)] if qtype == "q4_0" else [_half(d), _pack_high_bit32(q),
                                                                      _pack_nibbles32(q)]
    elif qtype in ("q4_1", "q5_1"):
        n = 15 if qtype == "q4_1" else 31
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / n
        q = torch.where(d > 0, (x - lo) / d, torch.zeros_like(x)).add(0.5).floor().clamp(0, n).to(torch.uint8)
        body = [_half(d), _half(lo)] + ([_pack_nibbles32(q)] if qtype == "q4_1" else
                                        [_pack_high_bit32(q), _pack_nibbles32(q)])
    elif qtype in ("q4_K", "q5_K"):
        sub = x.reshape(*x.shape[:-1], 8, 32)
        d, dmin, scales, q = _quant_k_asym(sub, 15 if qtype == "q4_K" else 31)
        g = (q & 0xF).reshape(*q.shape[:-2], 4, 2, 32)
        qs = (g[..., 0, :] | (g[..., 1, :] << 4)).flatten(-2)                  # [..., 128]
        body = [d, dmin, scales]
        if qtype == "q5_K":
            w8 = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=q.device).reshape(8, 1)
            body.append((((q >> 4) & 1) * w8).sum(-2).to(torch.uint8))       # [..., 32]: bit s = sub-block s
        body.append(qs)
    else:  # q6_K
        sub = x.reshape(*x.shape[:-1], 16, 16)
        idx = sub.abs().argmax(-1, keepdim=True)
        s = sub.gather(-1, idx).squeeze(-1) / -32                                # [..., 16] signed scales
        d = s.abs().amax(-1, keepdim=True) / 127
        sc = torch.where(d > 0, s / d, torch.zeros_like(s)).round().clamp(-128, 127).to(torch.int8)
        d = d.half().float()
        ds = (d * sc.float()).unsqueeze(-1)
        q = torch.where(ds != 0, sub / ds, torch.zeros_like(sub)).round().clamp(-32, 31).add(32).to(torch.uint8)
        q = q.reshape(*q.shape[:-2], 2, 4, 32)                                  # half, group (shift, 32-chunk)
        ql = torch.cat([(q[..., 0, :] & 0xF) | ((q[..., 2, :] & 0xF) << 4),
                        (q[..., 1, :] & 0xF) | ((q[..., 3, :] & 0xF) << 4)], dim=-1)      # [..., 2, 64]
        qh = (q[..., 0, :] >> 4) | ((q[..., 1, :] >> 4) << 2) | ((q[..., 2, :] >> 4) << 4) | ((q[..., 3, :] >> 4) << 6)
        body = [ql.flatten(-2), qh.flatten(-2), sc.view(torch.uint8), _half(d)]
    data = torch.cat(body, dim=-1).reshape(*w.shape[:-1], -1)
    return PackedWeight(data, qtype, cols)


# ------------------------------------------------------------------------------------------ assembly
def cat(parts: Sequence, dim: int = 0):
    """torch.cat along the rows. With a packed part: a PackedRows of the parts (no copy; each keeps its type)."""
    parts = list(parts)
    if not any(is_packed(p) for p in parts):
        return torch.cat(parts, dim)
    if dim != 0:
        raise ValueError("packed weights are concatenated along their rows only")
    if len(parts) == 1:
        return parts[0]
    return PackedRows(parts)


def stack(parts: Sequence):
    """torch.stack of per-layer weights. With a packed layer: a PackedStack (no copy; each layer keeps its
    types)."""
    parts = list(parts)
    if not any(is_packed(p) for p in parts):
        return torch.stack(parts)
    return PackedStack(parts)


def rows(w, ids: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Embedding lookup of a tensor or a 2-D packed weight: w[ids] (into out [N, cols] if given)."""
    if is_packed(w):
        return w.rows(ids, out)
    if out is None:
        return w[ids]
    return torch.index_select(w, 0, ids.reshape(-1), out=out)
