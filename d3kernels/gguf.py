"""GGUF files (docs/design.md section 2.1): the header read and checked, the architectures, the tensor data
mapped from the file without a copy.

`open_gguf(path)` reads the header (metadata and tensor table) and checks the file's structure: every
tensor's bytes lie inside the file, at an aligned offset, in whole blocks, without overlap. `read_model`
then checks the architecture ("llama", which includes Mistral's files, or "qwen2"), builds the config
fields, checks every tensor's name, shape and storage type against them, and only then maps the file:
`GGUFModel.get(hf_name)` gives each weight as a view of the mapping (a d3kernels.quant.PackedWeight, or a
float32 tensor for norms and biases). Any error is raised before the mapping exists, so nothing half-loaded
survives; its message names the file, the tensor or field, and what was expected.

Storage: a matrix stays in its GGUF type when d3kernels.quant keeps that type packed (QTYPES). Any other
type is refused unless the caller converts (`convert=True`: load_model was given a dtype), and then it is
dequantized with gguf-py's dequantize. llama.cpp stores a Llama model's Q and K rows in its interleaved-RoPE
order; they stay so, as PackedWeight(heads=) that reads in Hugging Face order. Qwen2 files are not
permuted (llama.cpp runs Qwen2's RoPE in the NEOX order, which is Hugging Face's rotate_half).

The map is private (copy-on-write): the pages are the page cache's, shared with other readers of the file,
and resident only once read; a write would copy a page instead of changing the file. Imports torch, numpy
and d3kernels.quant; gguf-py only to dequantize a type that quant does not keep packed.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from . import quant

ARCHITECTURES = ("llama", "qwen2")
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# GGUF metadata value types: struct format of the scalars; 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml type ids beyond the packed ones: (name, values per block, bytes per block), for the size checks and
# the messages (ggml.h / gguf-py's GGML_QUANT_SIZES)
_OTHER_TYPES = {10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66),
                17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18),
                21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1),
                25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
                34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17)}
SUPPORTED_TYPES = tuple(q.upper() for q in quant.GGUF_TYPES.values())


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded: the message names the file, the tensor or field, and what is wrong."""


def type_name(type_id: int) -> str:
    """GGUF's name of a ggml type id ("Q4_K", "F16", ...)."""
    if type_id in quant.GGUF_TYPES:
        return quant.GGUF_TYPES[type_id].upper()
    return _OTHER_TYPES.get(type_id, (f"type {type_id}",))[0]


def _block(type_id: int) -> Optional[tuple]:
    """(values per block, bytes per block) of a ggml type id, None if unknown."""
    if type_id in quant.GGUF_TYPES:
        return quant.QTYPES[quant.GGUF_TYPES[type_id]]
    if type_id in _OTHER_TYPES:
        return _OTHER_TYPES[type_id][1:]
    return None


@dataclass
class TensorInfo:
    """One entry of the tensor table. shape: row-major (rows, cols) = ggml's ne reversed; offset: absolute
    byte offset in the file."""
    name: str
    shape: tuple
    type_id: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)

    @property
    def qtype(self) -> Optional[str]:
        """d3kernels.quant's name of the type, None if quant does not keep it packed."""
        return quant.GGUF_TYPES.get(self.type_id)


@dataclass
class GGUFFile:
    """A GGUF file's header: scalar and string metadata (arrays are skipped: {key: ("array", type, n)}), the
    tensor table, and the open map the header was read from (closed by `close()`)."""
    path: str
    size: int
    version: int
    alignment: int
    metadata: dict
    tensors: dict
    data_start: int
    _map: Optional[mmap.mmap] = field(default=None, repr=False)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class _Cursor:
    """Reads the header from the map with bounds checks: a read past the end is a GGUFError."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated or corrupt header: {what} needs bytes [{self.pos}, "
                            f"{self.pos + n}), the file has {self.size}")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what + " (its length)")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: corrupt header: {what} is not UTF-8") from None

    def skip_array(self, vtype: int, n: int, what: str) -> None:
        if vtype in _SCALARS:
            self.need(n * struct.calcsize(_SCALARS[vtype]), what)
            self.pos += n * struct.calcsize(_SCALARS[vtype])
        elif vtype == _STRING:
            buf, pos, size = self.buf, self.pos, self.size
            for i in range(n):       # strings: each length has to be read (a tokenizer's vocabulary)
                if pos + 8 > size:
                    self.pos = pos
                    self.need(8, f"{what}[{i}]")
                pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            self.pos = pos
            self.need(0, what)
        else:
            raise GGUFError(f"{self.path}: corrupt header: {what} has element type {vtype} (nested arrays are not "
                            "used by the architectures supported)")


def open_gguf(path: str) -> GGUFFile:
    """Read and check the header of the GGUF file at `path` (a map of the file is opened: close() it, or hand
    the GGUFFile to read_model). GGUFError for a file that is not GGUF, truncated or inconsistent."""
    size = os.path.getsize(path)
    if size < 24:
        raise GGUFError(f"{path}: {size} bytes, too short for a GGUF header (24 bytes at least)")
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        return _read_header(mm, size, path)
    except BaseException:
        mm.close()
        raise


def _read_header(mm, size: int, path: str) -> GGUFFile:
    c = _Cursor(mm, size, path)
    magic = mm[0:4]
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    c.pos = 4
    version = c.scalar("<I", "version")
    if version not in VERSIONS:
        hint = " (a big-endian file?)" if struct.unpack("<I", struct.pack(">I", version))[0] in VERSIONS else ""
        raise GGUFError(f"{path}: GGUF version {version}{hint}; supported: {VERSIONS}")
    n_tensors = c.scalar("<Q", "tensor count")
    n_kv = c.scalar("<Q", "metadata count")
    # every metadata entry takes at least 12 bytes and every tensor entry 24: larger counts cannot fit
    if n_kv * 12 + n_tensors * 24 > size:
        raise GGUFError(f"{path}: corrupt header: {n_tensors} tensors and {n_kv} metadata entries cannot fit "
                        f"in {size} bytes")
    meta = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        vtype = c.scalar("<I", f"the type of metadata {key!r}")
        if vtype in _SCALARS:
            meta[key] = c.scalar(_SCALARS[vtype], f"metadata {key!r}")
        elif vtype == _STRING:
            meta[key] = c.string(f"metadata {key!r}")
        elif vtype == _ARRAY:
            etype = c.scalar("<I", f"the element type of metadata {key!r}")
            n = c.scalar("<Q", f"the length of metadata {key!r}")
            c.skip_array(etype, n, f"metadata {key!r}")
            meta[key] = ("array", etype, n)
        else:
            raise GGUFError(f"{path}: corrupt header: metadata {key!r} has value type {vtype}")
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise GGUFError(f"{path}: general.alignment = {alignment!r}, expected a positive multiple of 8")
    infos = []
    for i in range(n_tensors):
        name = c.string(f"the name of tensor #{i}")
        n_dims = c.scalar("<I", f"the rank of tensor {name!r}")
        if not 1 <= n_dims <= 4:
            raise GGUFError(f"{path}: tensor {name!r}: rank {n_dims}, expected 1 to 4 (a corrupt header)")
        ne = [c.scalar("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
        type_id = c.scalar("<I", f"the type of tensor {name!r}")
        offset = c.scalar("<Q", f"the offset of tensor {name!r}")
        infos.append((name, ne, type_id, offset))
    data_start = -(-c.pos // alignment) * alignment
    tensors = {}
    for name, ne, type_id, offset in infos:
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name!r} is listed twice")
        block = _block(type_id)
        if block is None:
            raise GGUFError(f"{path}: tensor {name!r}: unknown ggml type {type_id} (a corrupt header, or a type "
                            "newer than this reader)")
        per, nbytes_block = block
        if any(n <= 0 for n in ne):
            raise GGUFError(f"{path}: tensor {name!r}: shape {tuple(reversed(ne))} has an empty dimension")
        if ne[0] % per:
            raise GGUFError(f"{path}: tensor {name!r}: rows of {ne[0]} values are not whole {type_name(type_id)} "
                            f"blocks of {per}")
        nbytes = ne[0] // per * nbytes_block * math.prod(ne[1:])     # Python ints: no overflow
        start = data_start + offset
        if offset % alignment:
            raise GGUFError(f"{path}: tensor {name!r}: data offset {offset} is not a multiple of the alignment "
                            f"{alignment} (a corrupt header)")
        if start + nbytes > size:
            raise GGUFError(f"{path}: tensor {name!r} ({type_name(type_id)}, shape {tuple(reversed(ne))}): its "
                            f"data [{start}, {start + nbytes}) ends past the end of the file ({size} bytes): "
                            "the file is truncated or its header is corrupt")
        tensors[name] = TensorInfo(name, tuple(reversed(ne)), type_id, start, nbytes)
    order = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(order, order[1:]):
        if a.offset + a.nbytes > b.offset:
            raise GGUFError(f"{path}: tensors {a.name!r} and {b.name!r} overlap in the file (a corrupt header)")
    return GGUFFile(path, size, version, alignment, meta, tensors, data_start, mm)


# ------------------------------------------------------------------------------------------ architectures
# HF state-dict name (per layer: after "model.layers.{l}.") -> GGUF tensor name (after "blk.{l}.")
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
               "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
               "self_attn.o_proj.weight": "attn_output.weight",
               "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
BIAS_NAMES = {"self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
              "self_attn.v_proj.bias": "attn_v.bias"}
ROPE_FREQS = "rope_freqs.weight"


def _field(f: GGUFFile, key: str, kind=int, default=None):
    """Metadata `key` as `kind`; GGUFError when it is missing (and has no default) or of another kind."""
    v = f.metadata.get(key, default)
    if v is None:
        raise GGUFError(f"{f.path}: missing metadata field {key!r}")
    if isinstance(v, tuple) or isinstance(v, str) != (kind is str) or (kind is int and isinstance(v, float)):
        raise GGUFError(f"{f.path}: metadata field {key!r} = {v!r}, expected {kind.__name__}")
    return kind(v)


def config_fields(f: GGUFFile) -> dict:
    """The ModelConfig fields of a llama or qwen2 GGUF file (GGUFError naming the field otherwise)."""
    arch = f.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{f.path}: unsupported GGUF architecture {arch!r} (field general.architecture); "
                        f"supported: {', '.join(ARCHITECTURES)}")
    heads = _field(f, f"{arch}.attention.head_count")
    hidden = _field(f, f"{arch}.embedding_length")
    kv_heads = _field(f, f"{arch}.attention.head_count_kv", default=heads)
    head_dim = _field(f, f"{arch}.attention.key_length", default=hidden // heads)
    rope_dim = _field(f, f"{arch}.rope.dimension_count", default=head_dim)
    if rope_dim != head_dim or _field(f, f"{arch}.attention.value_length", default=head_dim) != head_dim:
        raise GGUFError(f"{f.path}: {arch}.rope.dimension_count {rope_dim} and the value length must equal the "
                        f"head size {head_dim} (partial rotary embeddings are not supported)")
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads or head_dim % 2:
        raise GGUFError(f"{f.path}: {arch}.attention.head_count {heads} must be a positive multiple of "
                        f"head_count_kv {kv_heads}, and the head size {head_dim} even")
    rope_scaling = None
    stype = f.metadata.get(f"{arch}.rope.scaling.type", "none")
    if stype == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _field(f, f"{arch}.rope.scaling.factor", float)}
    elif stype != "none":
        raise GGUFError(f"{f.path}: unsupported rope scaling {stype!r} (field {arch}.rope.scaling.type); "
                        "supported: none, linear, and Llama 3's rope_freqs tensor")
    if "token_embd.weight" not in f.tensors:
        raise GGUFError(f"{f.path}: missing tensor 'token_embd.weight'")
    eos = f.metadata.get("tokenizer.ggml.eos_token_id")
    return dict(
        arch=arch, num_layers=_field(f, f"{arch}.block_count"), hidden=hidden, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, intermediate=_field(f, f"{arch}.feed_forward_length"),
        vocab=f.tensors["token_embd.weight"].shape[0],
        eps=_field(f, f"{arch}.attention.layer_norm_rms_epsilon", float, 1e-5 if arch == "llama" else 1e-6),
        rope_theta=_field(f, f"{arch}.rope.freq_base", float, 10000.0), rope_scaling=rope_scaling,
        max_position=_field(f, f"{arch}.context_length", default=2048),
        tie_embeddings="output.weight" not in f.tensors, qkv_bias=arch == "qwen2",
        bos_token_id=f.metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if isinstance(eos, int) else (),
        name=f.metadata.get("general.name") or os.path.basename(f.path))


def _expected(cfg: dict) -> dict:
    """{GGUF tensor name: (shape, HF name or None, heads)} of every tensor the architecture reads."""
    d, F, V = cfg["hidden"], cfg["intermediate"], cfg["vocab"]
    HD, KD = cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
    permuted = cfg["arch"] == "llama"        # llama.cpp's interleaved-RoPE order of Q and K rows
    out = {"token_embd.weight": ((V, d), "model.embed_tokens.weight", 0),
           "output_norm.weight": ((d,), "model.norm.weight", 0)}
    if not cfg["tie_embeddings"]:
        out["output.weight"] = ((V, d), "lm_head.weight", 0)
    per = {"attn_norm.weight": (d,), "attn_q.weight": (HD, d), "attn_k.weight": (KD, d), "attn_v.weight": (KD, d),
           "attn_output.weight": (d, HD), "ffn_norm.weight": (d,), "ffn_gate.weight": (F, d),
           "ffn_up.weight": (F, d), "ffn_down.weight": (d, F)}
    heads = {"attn_q.weight": cfg["heads"] if permuted else 0, "attn_k.weight": cfg["kv_heads"] if permuted else 0}
    hf_of = {g: h for h, g in LAYER_NAMES.items()}
    if cfg["qkv_bias"]:
        per.update({"attn_q.bias": (HD,), "attn_k.bias": (KD,), "attn_v.bias": (KD,)})
        hf_of.update({g: h for h, g in BIAS_NAMES.items()})
    for l in range(cfg["num_layers"]):
        for g, shape in per.items():
            out[f"blk.{l}.{g}"] = (shape, f"model.layers.{l}.{hf_of[g]}", heads.get(g, 0))
    return out


@dataclass
class GGUFModel:
    """A checked llama / qwen2 GGUF file, mapped: `config` (ModelConfig fields), `get(hf_name)`."""
    file: GGUFFile
    config: dict
    packed: bool
    _by_hf: dict
    _buf: torch.Tensor

    def get(self, hf_name: str):
        """The weight of a Hugging Face state-dict name, None if the file has none: a 2-D PackedWeight (Q and K
        of a llama file with heads=) when packed, else float32 values in HF row order; norms and biases float32
        tensors. Views of the map, no copy, unless converted."""
        if hf_name not in self._by_hf:
            return None
        t, heads = self._by_hf[hf_name]
        data = self._buf[t.offset:t.offset + t.nbytes]
        qtype = t.qtype
        if len(t.shape) == 2 and qtype is not None:
            w = quant.PackedWeight(data.view(t.shape[0], -1), qtype, t.shape[1], heads=heads)
            return w if self.packed else w.dequantize()
        if qtype == "f32":
            return data.view(torch.float32).view(t.shape)
        if qtype is not None:
            return quant.dequantize(data.view(1, -1), qtype, int(np.prod(t.shape))).view(t.shape)
        v = _gguf_py_dequantize(data, t)
        return v if not heads else quant.to_hf_order(v, heads, 0)

    def rope_freqs(self) -> Optional[torch.Tensor]:
        """The rope_freqs tensor (Llama 3's per-frequency divisors) as float32 [head_dim / 2], or None."""
        t = self.file.tensors.get(ROPE_FREQS)
        if t is None:
            return None
        data = self._buf[t.offset:t.offset + t.nbytes]
        if t.qtype is None:
            return _gguf_py_dequantize(data, t).reshape(-1)
        return quant.dequantize(data.view(1, -1), t.qtype, int(np.prod(t.shape))).reshape(-1)


def _gguf_py_dequantize(data: torch.Tensor, t: TensorInfo) -> torch.Tensor:
    """float32 values of a tensor whose type quant does not decode, by gguf-py (the dequantize of any type)."""
    try:
        import gguf as gguf_py
    except ImportError:
        raise GGUFError(f"tensor {t.name!r} is stored as {t.type_name}: converting it needs the gguf package "
                        "(pip install gguf)") from None
    arr = gguf_py.quants.dequantize(data.numpy(), gguf_py.GGMLQuantizationType(t.type_id))
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(t.shape))


def read_model(path: str, packed: bool, convert: bool) -> GGUFModel:
    """Check a llama / qwen2 GGUF file and map it.

    packed: matrices stay in their GGUF types (d3kernels.quant.PackedWeight); else get() dequantizes them to
        float32. convert: a matrix of a type that quant does not keep packed is dequantized (load_model was
        given a dtype); else it is refused.
    Returns the GGUFModel. GGUFError (a ValueError) names the file, the tensor or field, and what is wrong;
    it is raised before the map is handed out, and the map is closed.
    """
    f = open_gguf(path)
    try:
        cfg = config_fields(f)
        by_hf = _check_tensors(f, cfg, convert)
    except BaseException:
        f.close()
        raise
    buf = torch.frombuffer(f._map, dtype=torch.uint8)     # the tensors keep the map alive from here on
    f._map = None
    m = GGUFModel(f, cfg, packed, by_hf, buf)
    freqs = m.rope_freqs()
    if freqs is not None:      # Llama 3's RoPE scaling, stored as llama.cpp applies it: theta_i / factor_i
        cfg["rope_scaling"] = {"rope_type": "freq_factors", "factors": tuple(float(x) for x in freqs)}
    return m


def _check_tensors(f: GGUFFile, cfg: dict, convert: bool) -> dict:
    """{HF name: (TensorInfo, heads)} after checking every tensor's presence, shape and type."""
    expected = _expected(cfg)
    allowed = set(expected) | {ROPE_FREQS}
    unknown = sorted(n for n in f.tensors if n not in allowed)
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise GGUFError(f"{f.path}: tensors that a {cfg['arch']} model of {cfg['num_layers']} layers does not have: "
                        f"{', '.join(unknown[:5])}{more} (another architecture variant, e.g. mixture of experts?)")
    by_hf = {}
    refused = []
    for name, (shape, hf, heads) in expected.items():
        t = f.tensors.get(name)
        if t is None:
            raise GGUFError(f"{f.path}: missing tensor {name!r} (expected shape {shape} for the "
                            f"{cfg['arch']} config in the file)")
        if t.shape != shape:
            raise GGUFError(f"{f.path}: tensor {name!r}: expected shape {shape} from the config, got {t.shape}")
        if len(shape) == 2 and t.qtype is None and not convert:
            refused.append(t)
        by_hf[hf] = (t, heads)
    if refused:
        t = refused[0]
        kinds = sorted({r.type_name for r in refused})
        raise GGUFError(
            f"{f.path}: tensor {t.name!r} is stored as {t.type_name}, which d3kernels does not keep packed "
            f"({len(refused)} matrices of type {', '.join(kinds)}); supported: {', '.join(SUPPORTED_TYPES)}. "
            "Pass a dtype (load_model(path, dtype='fp32') or --dtype fp32) to load the model dequantized "
            f"({_size(sum(int(np.prod(s)) for s, _, _ in expected.values()) * 4)} in float32).")
    if ROPE_FREQS in f.tensors:
        if f.tensors[ROPE_FREQS].shape != (cfg["head_dim"] // 2,):
            raise GGUFError(f"{f.path}: tensor {ROPE_FREQS!r}: expected shape {(cfg['head_dim'] // 2,)}, got "
                            f"{f.tensors[ROPE_FREQS].shape}")
        if cfg["rope_scaling"] is not None:
            raise GGUFError(f"{f.path}: both {cfg['arch']}.rope.scaling.type and a {ROPE_FREQS!r} tensor; "
                            "expected one of them")
    return by_hf


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def tokenizer(path: str, cache_dir: str):
    """transformers' tokenizer of a GGUF file, or None when the file has none. Converting it from GGUF takes
    ~12 s, so the result is saved once in `cache_dir`, keyed by the file's path, size and mtime."""
    import hashlib
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = os.path.join(cache_dir, f"tokenizer-{key}")
    if os.path.exists(os.path.join(cached, "tokenizer_config.json")):
        tok = _saved_tokenizer(cached)
        if tok is not None:
            return tok
    tok = _auto_tokenizer(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    if tok is not None:
        try:
            tok.save_pretrained(cached)
        except OSError:      # a read-only home is fine: convert again next time
            pass
    return tok


# transformers' generic fast tokenizer classes (what a GGUF's tokenizer converts to): loaded by name, since
# importing AutoTokenizer scans every model package of transformers (~3 s of a 1B file's ~3.4 s load here)
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _saved_tokenizer(path: str):
    """The tokenizer that tokenizer() saved in `path`: through its own class when that is a generic one, else
    through AutoTokenizer; None if it cannot be read."""
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as fh:
            name = json.load(fh).get("tokenizer_class")
        if name in _GENERIC_TOKENIZERS:
            import transformers
            cls = getattr(transformers, name, None)
            if cls is not None:
                return cls.from_pretrained(path)
    except Exception:      # an unreadable cache entry: AutoTokenizer decides, or the file is converted again
        pass
    return _auto_tokenizer(path)


def _auto_tokenizer(path: str, **kw):
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path, **kw)
    except Exception:      # a weights-only file has no tokenizer; that is allowed
        return None
