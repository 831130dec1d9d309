"""GGUF files (d3kernels/gguf.py, docs/design.md section 2.1), on real files written here with gguf-py.

- A tiny qwen2 and a tiny llama (Q/K permuted as llama.cpp's converter does, Llama 3 rope_freqs) with mixed
  storage types load packed; their reference logits equal transformers' on the same (dequantized) weights.
- Per-layer mixed types (a Q4_K_M file's q6_K / q4_K attn_v and ffn_down) load as PackedStacks with the
  right type per layer and gguf-py's values; every packed tensor is a view of one map of the file.
- Truncated and corrupt files: a GGUFError naming the file, the tensor or field and what is wrong, and the
  file is no longer mapped afterwards. Unsupported types are refused without a dtype, converted with one.
  Another architecture is refused naming the field.
- Files quantized by llama.cpp itself (when llama-cpp-python is installed): Q4_K_M, Q5_K_M, Q5_1 load with
  llama.cpp's per-layer types and transformers' logits; Q3_K_M is refused.
- Resident memory: a subprocess loads a ~300 MB file and reads every weight byte; its resident memory grows
  by at most the file size + 15%.
"""
import gc
import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from d3kernels import D3Schedule, Decoder, load_model, quant
from d3kernels.gguf import GGUFError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

GGUF_ID = {q: i for i, q in quant.GGUF_TYPES.items()}
ATOL = 2e-4          # fp32 logits after 3 layers, both sides accumulate in fp32 (test_hf_parity's bound)
# K-quant rows are 256 values, so the tiny models are 256 wide
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, num_hidden_layers=3, max_position_embeddings=512, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
PROMPT = [5, 17, 42, 99, 3, 120, 7, 250, 11]
HF_TO_GGUF = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
              "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight", "self_attn.q_proj.bias": "attn_q.bias",
              "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias"}


# ------------------------------------------------------------------------------------------ writing files
def write_gguf(path, arch: str, meta: dict, tensors: list) -> str:
    """Write a GGUF file with gguf-py: meta {key: int | float | str}, tensors [(name, array, qtype or None)];
    a qtype's array is its uint8 bytes [rows, row_bytes]."""
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in meta.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_string(k, v)
    for name, arr, qtype in tensors:
        raw = None if qtype is None else gguf.GGMLQuantizationType(GGUF_ID[qtype])
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rows -> llama.cpp's interleaved-RoPE rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(head_dim: int, rp: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: Llama 3's rope_freqs tensor."""
    freqs = 1.0 / (rp["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, lo, hi, old = (rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"],
                           rp["original_max_position_embeddings"])
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def tiny_hf(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **TINY, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=False,
                                                                        rope_parameters=LLAMA3_ROPE))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
            elif n.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model.eval()


def hf_to_gguf(model, kind: str, path, types) -> str:
    """Write `model` as a GGUF file, each matrix in types(gguf_name, layer) (quantized with quant.quantize);
    the model's matrices are replaced by the dequantized values, so both hold the same weights."""
    c = model.config
    H, Hk = c.num_attention_heads, c.num_key_value_heads
    tensors = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            if name.startswith("model.layers."):
                l, rest = name[len("model.layers."):].split(".", 1)
                g, layer = f"blk.{l}.{HF_TO_GGUF[rest]}", int(l)
            else:
                g = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
                layer = -1
            if p.dim() == 1:
                tensors.append((g, p.detach().numpy().astype(np.float32), None))
                continue
            qtype = types(g, layer)
            packed = quant.quantize(p.detach(), qtype)
            p.copy_(packed.dequantize())                         # the model now holds exactly these values
            data = packed.data
            if kind == "llama" and g.endswith(("attn_q.weight", "attn_k.weight")):
                data = llama_cpp_permute(data, H if "attn_q" in g else Hk)   # whole rows move
            tensors.append((g, data.numpy(), qtype))
    meta = {f"{kind}.block_count": c.num_hidden_layers, f"{kind}.context_length": c.max_position_embeddings,
            f"{kind}.embedding_length": c.hidden_size, f"{kind}.feed_forward_length": c.intermediate_size,
            f"{kind}.attention.head_count": H, f"{kind}.attention.head_count_kv": Hk,
            f"{kind}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "general.name": f"tiny-{kind}"}
    if kind == "qwen2":
        meta[f"{kind}.rope.freq_base"] = 1e6
    else:
        meta[f"{kind}.rope.freq_base"] = LLAMA3_ROPE["rope_theta"]
        meta[f"{kind}.rope.dimension_count"] = c.hidden_size // H
        tensors.append(("rope_freqs.weight", llama3_rope_freqs(c.hidden_size // H, LLAMA3_ROPE), None))
    return write_gguf(path, kind, meta, tensors)


# layer-dependent types, as llama.cpp's Q4_K_M mixes them (attn_v and ffn_down: q6_K in some layers)
def mixed_types(name: str, layer: int) -> str:
    if name.endswith(("attn_v.weight", "ffn_down.weight")):
        return "q6_K" if layer != 1 else "q4_K"
    table = {"attn_q.weight": "q4_K", "attn_k.weight": "q5_K", "attn_output.weight": "q5_0",
             "ffn_gate.weight": "q4_K", "ffn_up.weight": "q5_1", "token_embd.weight": "q8_0",
             "output.weight": "q6_K"}
    return table.get(name.split(".", 2)[-1] if name.startswith("blk.") else name, "f16")


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def _ref_logits(m, ids):
    dec = Decoder(m, D3Schedule(m.config.num_layers, alpha=1.0), max_seq_len=64, backend="reference")
    return dec.prefill([ids])[0].float()


def _mapped(path: str) -> bool:
    """Whether this process maps the file at `path`."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(real) for line in f)


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_tiny_model_logits_equal_transformers(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(quant, "NATIVE", {})      # the prefill's linear: the reference values, not a kernel
    hf = tiny_hf(kind)
    path = hf_to_gguf(hf, kind, tmp_path / f"{kind}.gguf", mixed_types)
    m = load_model(path, device="cpu", packed=True)
    cfg = m.config
    assert (cfg.arch, cfg.num_layers, cfg.heads, cfg.kv_heads, cfg.head_dim) == (kind, 3, 4, 2, 64)
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_embeddings == (kind == "qwen2")
    w = m.weights
    assert w.packed and isinstance(w.wqkv, quant.PackedStack)
    q, k, v = w.wqkv[0].parts
    assert (q.qtype, k.qtype, v.qtype) == ("q4_K", "q5_K", "q6_K")
    assert (q.heads, k.heads, v.heads) == ((4, 2, 0) if kind == "llama" else (0, 0, 0))
    if kind == "llama":
        assert cfg.rope_scaling["rope_type"] == "freq_factors"
    got = _ref_logits(m, PROMPT)
    want = _hf_logits(hf, PROMPT)
    assert (got - want).abs().max() <= ATOL
    # the dequantized load (dtype given) reads the same values
    mf = load_model(path, device="cpu", dtype=torch.float32)
    assert not mf.weights.packed
    assert torch.equal(mf.weights.wqkv, w.wqkv.dequantize())
    assert (_ref_logits(mf, PROMPT) - want).abs().max() <= ATOL


def test_mixed_layer_types_are_views_of_one_map(tmp_path):
    hf = tiny_hf("llama", seed=1)
    path = hf_to_gguf(hf, "llama", tmp_path / "mixed.gguf", mixed_types)
    m = load_model(path, device="cpu", packed=True)
    w = m.weights
    assert [w.wqkv[l].parts[2].qtype for l in range(3)] == ["q6_K", "q4_K", "q6_K"]
    assert [w.w_down[l].qtype for l in range(3)] == ["q6_K", "q4_K", "q6_K"]
    assert w.wo.qtypes == ("q5_0",) and w.w_gate_up[0].qtypes == ("q4_K", "q5_1")
    assert w.embed.qtype == "q8_0" and w.lm_head.qtype == "q6_K"
    # values: gguf-py's reading of the same file (Q/K rows un-permuted by the test's own formula)
    reader = gguf.GGUFReader(path)
    t = {x.name: x for x in reader.tensors}

    def theirs(name, heads=0):
        v = torch.from_numpy(np.array(gguf.quants.dequantize(t[name].data, t[name].tensor_type)))
        if heads:
            D = v.shape[0] // heads
            v = v.reshape(heads, D // 2, 2, -1).transpose(1, 2).reshape(v.shape)
        return v

    for l in range(3):
        want = torch.cat([theirs(f"blk.{l}.attn_q.weight", 4), theirs(f"blk.{l}.attn_k.weight", 2),
                          theirs(f"blk.{l}.attn_v.weight")])
        assert torch.equal(w.wqkv[l].dequantize(), want)
        assert torch.equal(w.w_down[l].dequantize(), theirs(f"blk.{l}.ffn_down.weight"))
    # no copy: every packed tensor lies in one buffer, the map of the file
    parts = [p for s in (w.wqkv, w.w_gate_up) for lay in s.layers for p in lay.parts]
    parts += [p for s in (w.wo, w.w_down) for p in s.layers] + [w.embed, w.lm_head]
    assert len({p.data.untyped_storage().data_ptr() for p in parts}) == 1 and _mapped(path)
    del m, w, parts, reader, t, theirs
    gc.collect()
    assert not _mapped(path)          # the model's tensors held the map; with them gone, it is gone


def test_load_logs_storage_types(tmp_path, caplog):
    path = hf_to_gguf(tiny_hf("qwen2"), "qwen2", tmp_path / "q.gguf", mixed_types)
    with caplog.at_level(logging.INFO, logger="d3kernels.model"):
        load_model(path, device="cpu", packed=True)
    line = " ".join(r.getMessage() for r in caplog.records if r.name == "d3kernels.model")
    for part in ("q.gguf", "q4_K", "q6_K", "q5_0", "q8_0", "f32", "MB", "packed"):
        assert part in line


# llama.cpp's own quantizer (llama-cpp-python), when installed: presets by their llama_ftype number
LLAMA_CPP_PRESETS = {"Q4_K_M": 15, "Q5_K_M": 17, "Q5_1": 9, "Q3_K_M": 12}


def llama_cpp_quantize(src: str, dst: str, preset: str) -> str:
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = LLAMA_CPP_PRESETS[preset]
    assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)) == 0
    return dst


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q5_K_M", "Q5_1"])
def test_llama_cpp_quantized_file(preset, tmp_path, monkeypatch):
    """A file quantized by llama.cpp itself: each matrix keeps the type llama.cpp chose for it (per layer),
    decodes to gguf-py's values, and the reference's logits equal transformers' on those values."""
    monkeypatch.setattr(quant, "NATIVE", {})
    hf = tiny_hf("llama", seed=3)
    src = hf_to_gguf(hf, "llama", tmp_path / "f16.gguf", lambda n, l: "f16")
    path = llama_cpp_quantize(src, str(tmp_path / f"{preset}.gguf"), preset)
    reader = gguf.GGUFReader(path)
    t = {x.name: x for x in reader.tensors}
    m = load_model(path, device="cpu", packed=True)
    w, H, Hk = m.weights, 4, 2
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.startswith("model.layers."):
                l, rest = name[len("model.layers."):].split(".", 1)
                g = f"blk.{l}.{HF_TO_GGUF[rest]}"
            else:
                g = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
            x = t[g]
            v = torch.from_numpy(np.array(gguf.quants.dequantize(x.data, x.tensor_type), dtype=np.float32))
            if g.endswith(("attn_q.weight", "attn_k.weight")):       # llama.cpp's permutation undone
                n = H if "attn_q" in g else Hk
                v = v.reshape(n, v.shape[0] // n // 2, 2, -1).transpose(1, 2).reshape(v.shape)
            p.copy_(v.reshape(p.shape))
    for l in range(3):
        stored = [t[f"blk.{l}.{n}.weight"].tensor_type.name for n in ("attn_q", "attn_k", "attn_v", "ffn_down")]
        ours = [p.qtype.upper() for p in w.wqkv[l].parts] + [w.w_down[l].qtype.upper()]
        assert ours == stored
        assert torch.equal(w.wqkv[l].dequantize(), torch.cat([hf.model.layers[l].self_attn.q_proj.weight,
                                                              hf.model.layers[l].self_attn.k_proj.weight,
                                                              hf.model.layers[l].self_attn.v_proj.weight]))
    if preset == "Q4_K_M":      # llama.cpp mixes attn_v's type across layers: the per-layer case is exercised
        assert {w.wqkv[l].parts[2].qtype for l in range(3)} == {"q4_K", "q6_K"}
    del reader, t
    assert (_ref_logits(m, PROMPT) - _hf_logits(hf, PROMPT)).abs().max() <= ATOL


def test_llama_cpp_q3_k_m_file_is_refused(tmp_path):
    src = hf_to_gguf(tiny_hf("llama", seed=3), "llama", tmp_path / "f16.gguf", lambda n, l: "f16")
    path = llama_cpp_quantize(src, str(tmp_path / "Q3_K_M.gguf"), "Q3_K_M")
    _expect_error(path, "is stored as Q3_K", "supported: F32")


# ------------------------------------------------------------------------------------------ refusals
def _small_llama(tmp_path, name="small.gguf", types=None):
    return hf_to_gguf(tiny_hf("llama", seed=2), "llama", tmp_path / name, types or (lambda n, l: "q8_0"))


def _expect_error(path, *parts, **kw):
    with pytest.raises(GGUFError) as e:
        load_model(path, device="cpu", **kw)
    msg = str(e.value)
    for p in (path, *parts):
        assert p in msg, f"{p!r} not in: {msg}"
    del e
    gc.collect()
    assert not _mapped(path), "the file stays mapped after the error"
    return msg


def test_truncated_file(tmp_path):
    path = _small_llama(tmp_path)
    full = open(path, "rb").read()
    reader = gguf.GGUFReader(path)
    last = max(reader.tensors, key=lambda t: t.data_offset)
    last_name, last_end = last.name, int(last.data_offset) + int(last.n_bytes)
    start = min(int(t.data_offset) for t in reader.tensors)
    del reader, last
    gc.collect()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[:last_end - 100])                    # inside the last tensor
    _expect_error(str(cut), repr(last_name), "ends past the end of the file", "truncated")
    cut.write_bytes(full[:start - 40])                        # inside the header
    _expect_error(str(cut), "truncated or corrupt header")
    cut.write_bytes(full[:10])
    _expect_error(str(cut), "too short for a GGUF header")
    cut.write_bytes(b"GGML" + full[4:])
    _expect_error(str(cut), "not a GGUF file")


def _patch_tensor_info(path, name: str, type_id=None, offset=None, dims=None):
    """Rewrite one tensor-table entry of a GGUF file in place (type id, data offset or shape)."""
    data = bytearray(open(path, "rb").read())
    key = len(name).to_bytes(8, "little") + name.encode()
    at = data.index(key) + len(key)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    at += 4
    if dims is not None:
        for i, d in enumerate(dims):
            data[at + 8 * i:at + 8 * i + 8] = d.to_bytes(8, "little")
    at += 8 * n_dims
    if type_id is not None:
        data[at:at + 4] = type_id.to_bytes(4, "little")
    if offset is not None:
        data[at + 4:at + 12] = offset.to_bytes(8, "little")
    open(path, "wb").write(bytes(data))


def test_corrupt_headers(tmp_path):
    path = _small_llama(tmp_path, "bad.gguf")
    good = open(path, "rb").read()
    r = gguf.GGUFReader(path)
    off = {t.name: int(t.data_offset) - int(r.data_offset) for t in r.tensors}
    del r
    gc.collect()
    _patch_tensor_info(path, "blk.1.ffn_up.weight", offset=off["blk.1.ffn_up.weight"] + 4)
    _expect_error(path, "'blk.1.ffn_up.weight'", "not a multiple of the alignment 32")
    open(path, "wb").write(good)
    _patch_tensor_info(path, "blk.0.attn_k.weight", offset=off["blk.0.attn_q.weight"])
    msg = _expect_error(path, "overlap")
    assert "'blk.0.attn_k.weight'" in msg and "'blk.0.attn_q.weight'" in msg
    open(path, "wb").write(good)
    _patch_tensor_info(path, "output_norm.weight", dims=[250])             # 250 floats, not whole q8_0 blocks
    _patch_tensor_info(path, "output_norm.weight", type_id=GGUF_ID["q8_0"])
    _expect_error(path, "'output_norm.weight'", "not whole Q8_0 blocks of 32")
    open(path, "wb").write(good)
    _patch_tensor_info(path, "output_norm.weight", dims=[128])
    _expect_error(path, "'output_norm.weight'", "expected shape (256,) from the config, got (128,)")
    open(path, "wb").write(good)
    _patch_tensor_info(path, "blk.2.ffn_gate.weight", type_id=99)
    _expect_error(path, "'blk.2.ffn_gate.weight'", "unknown ggml type 99")


def test_missing_and_unknown_tensors(tmp_path):
    hf = tiny_hf("llama", seed=2)
    path = hf_to_gguf(hf, "llama", tmp_path / "full.gguf", lambda n, l: "q8_0")
    r = gguf.GGUFReader(path)
    meta = {"llama.block_count": 3, "llama.embedding_length": 256, "llama.feed_forward_length": 512,
            "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2}
    tensors = [(t.name, np.array(t.data), quant.GGUF_TYPES[int(t.tensor_type)] if t.tensor_type else None)
               for t in r.tensors]
    del r
    gc.collect()
    no_up = write_gguf(tmp_path / "no_up.gguf", "llama", meta, [t for t in tensors if t[0] != "blk.2.ffn_up.weight"])
    _expect_error(no_up, "missing tensor 'blk.2.ffn_up.weight'", "(512, 256)")
    extra = np.zeros((4, 256), dtype=np.float32)
    moe = write_gguf(tmp_path / "moe.gguf", "llama", meta, tensors + [("blk.0.ffn_gate_inp.weight", extra, None)])
    _expect_error(moe, "blk.0.ffn_gate_inp.weight", "does not have")
    meta2 = {**meta, "llama.attention.head_count_kv": 3}
    bad_heads = write_gguf(tmp_path / "heads.gguf", "llama", meta2, tensors)
    _expect_error(bad_heads, "head_count 4 must be a positive multiple of head_count_kv 3")
    meta3 = {k: v for k, v in meta.items() if k != "llama.feed_forward_length"}
    _expect_error(write_gguf(tmp_path / "nofield.gguf", "llama", meta3, tensors),
                  "missing metadata field 'llama.feed_forward_length'")


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gemma.gguf", "gemma", {"gemma.block_count": 1},
                      [("token_embd.weight", np.zeros((8, 32), dtype=np.float32), None)])
    _expect_error(path, "unsupported GGUF architecture 'gemma'", "general.architecture", "llama, qwen2")


def test_unsupported_type_refused_unless_a_dtype_is_given(tmp_path):
    """A Q3_K matrix: refused with the tensor, its type and the supported types; converted with dtype=."""
    path = _small_llama(tmp_path, "q3k.gguf")
    r = gguf.GGUFReader(path)
    tensors = [(t.name, np.array(t.data), quant.GGUF_TYPES[int(t.tensor_type)] if t.tensor_type else None)
               for t in r.tensors]
    meta = {"llama.block_count": 3, "llama.embedding_length": 256, "llama.feed_forward_length": 512,
            "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.rope.freq_base": 10000.0}
    del r
    gc.collect()
    rng = np.random.default_rng(0)
    q3 = rng.integers(0, 256, size=(256, 2 * 110), dtype=np.uint8)     # [d, F] as Q3_K: 2 blocks of 110 bytes
    q3[:, 108:110] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # each block's d last
    q3[:, 218:220] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "q3k.gguf"), "llama")
    for k, v in meta.items():
        (w.add_float32 if isinstance(v, float) else w.add_uint32)(k, v)
    for name, arr, qtype in tensors:
        if name == "blk.1.ffn_down.weight":
            w.add_tensor(name, q3, raw_dtype=gguf.GGMLQuantizationType.Q3_K)
        else:
            w.add_tensor(name, arr, raw_dtype=None if qtype is None else gguf.GGMLQuantizationType(GGUF_ID[qtype]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = _expect_error(path, "'blk.1.ffn_down.weight'", "Q3_K", "supported: F32, F16, Q4_0", "Q4_K",
                        "dtype='fp32'")
    assert "blk.0" not in msg
    _expect_error(path, "Q3_K", packed=False)                # no dtype: refused whatever the storage
    m = load_model(path, device="cpu", dtype="fp32")
    want = gguf.quants.dequantize(q3, gguf.GGMLQuantizationType.Q3_K)
    assert torch.equal(m.weights.w_down[1], torch.from_numpy(np.array(want)))


# ------------------------------------------------------------------------------------------ memory
_RSS_SCRIPT = r"""
import json, sys, time
import torch, d3kernels
from d3kernels import quant

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

r0 = rss()
t = time.perf_counter()
m = d3kernels.load_model(sys.argv[1], device="cpu", packed=True)
load_s = time.perf_counter() - t
r1 = rss()
w = m.weights
touched = 0
for s in (w.wqkv, w.wo, w.w_gate_up, w.w_down):
    for layer in s.layers:
        for p in (layer.parts if isinstance(layer, quant.PackedRows) else [layer]):
            p.data.max()              # reads every byte (no conversion, no copy)
            touched += p.nbytes
w.embed.data.max()
touched += w.embed.nbytes
print(json.dumps({"load_s": load_s, "after_load": r1 - r0, "after_reading": rss() - r0, "touched": touched}))
"""


@pytest.mark.slow
def test_resident_memory_is_the_file(tmp_path):
    """A ~300 MB q8_0 file (random blocks) loaded in a fresh process, every weight byte read: resident memory
    grows by at most the file size + 15% (there is no KV cache here)."""
    L, d, F, V, H, Hk, D = 16, 1024, 4096, 32000, 16, 4, 64
    rng = np.random.default_rng(0)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)

    def q8(rows, cols):
        b = rng.integers(0, 256, size=(rows, cols // 32, 34), dtype=np.uint8)
        b[:, :, 0:2] = scale
        return b.reshape(rows, -1), "q8_0"

    tensors = [("token_embd.weight", *q8(V, d)), ("output_norm.weight", np.ones(d, np.float32), None)]
    for l in range(L):
        tensors += [(f"blk.{l}.attn_norm.weight", np.ones(d, np.float32), None),
                    (f"blk.{l}.ffn_norm.weight", np.ones(d, np.float32), None),
                    (f"blk.{l}.attn_q.weight", *q8(H * D, d)), (f"blk.{l}.attn_k.weight", *q8(Hk * D, d)),
                    (f"blk.{l}.attn_v.weight", *q8(Hk * D, d)), (f"blk.{l}.attn_output.weight", *q8(d, H * D)),
                    (f"blk.{l}.ffn_gate.weight", *q8(F, d)), (f"blk.{l}.ffn_up.weight", *q8(F, d)),
                    (f"blk.{l}.ffn_down.weight", *q8(d, F))]
    meta = {"llama.block_count": L, "llama.embedding_length": d, "llama.feed_forward_length": F,
            "llama.attention.head_count": H, "llama.attention.head_count_kv": Hk}
    path = write_gguf(tmp_path / "big.gguf", "llama", meta, tensors)
    del tensors
    size = os.path.getsize(path)
    assert size > 250e6
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, path], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n{size / 1e6:.0f} MB file: load {r['load_s']:.2f} s, resident +{r['after_load'] / 1e6:.0f} MB after "
          f"load, +{r['after_reading'] / 1e6:.0f} MB after reading {r['touched'] / 1e6:.0f} MB of weights")
    assert r["touched"] > 0.99 * size - 1e6
    assert r["after_reading"] <= 1.15 * size
    assert r["after_load"] <= 0.15 * size          # nothing is read, let alone copied, at load
