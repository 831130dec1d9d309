"""Weight storage formats (d3kernels/quant.py, docs/design.md section 2.1).

- Every block decoder equals gguf-py's `gguf.quants.dequantize` (an independent implementation) bit for bit
  on random blocks, extremes included: scales 0, +-65504, subnormal, the smallest normal; every nibble value;
  int8 scales -128 and 127. NaN and infinity are left out (their payloads are not specified).
- The quantizers round-trip within a bound per type.
- PackedWeight(heads=): llama.cpp's interleaved-RoPE row order in storage, Hugging Face order out of
  dequantize / linear / rows, for the fallback and for a native linear that returns storage order.
- PackedRows / PackedStack: metadata, values, linear, rows, no copy, errors; Weights, Model.dequantized,
  calibrate's fingerprint and save_hf with per-layer mixed types.
"""
import numpy as np
import pytest
import torch

from d3kernels import quant

gguf = pytest.importorskip("gguf")

TYPES = list(quant.QTYPES)
GGUF_ID = {q: i for i, q in quant.GGUF_TYPES.items()}
# float16 fields of each block: byte offsets of d (and dmin / m)
F16_FIELDS = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,), "q4_K": (0, 2),
              "q5_K": (0, 2), "q6_K": (208,)}
# float16 bit patterns that must decode exactly: zeros, extremes, subnormals, the smallest normal, one
F16_EXTREMES = [0x0000, 0x8000, 0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x03FF, 0x0400, 0x8400, 0x3C00, 0x1400]
# round-trip bound: max |dequantize(quantize(w)) - w| / max |w| on Gaussian weights, about 1.5x the measured
# value (seed 3: q4_0 0.071, q4_1 0.058, q5_0 0.031, q5_1 0.028, q8_0 0.0039, q4_K 0.058, q5_K 0.028, q6_K 0.016)
ROUND_TRIP = {"f32": 0.0, "f16": 5e-4, "bf16": 4e-3, "q8_0": 6e-3, "q4_0": 0.1, "q4_1": 0.085, "q5_0": 0.05,
              "q5_1": 0.04, "q4_K": 0.085, "q5_K": 0.04, "q6_K": 0.025}


def _finite_f16(rng, n):
    """n random finite float16 bit patterns (uint16)."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    return np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits).astype(np.uint16)


def _random_blocks(qtype: str, n_blocks: int, seed: int) -> np.ndarray:
    """uint8 [n_blocks, bytes per block]: random bytes, every float16 field finite, the first blocks carrying
    the extreme scales, the next ones every nibble / byte value in order."""
    rng = np.random.default_rng(seed)
    per, nbytes = quant.QTYPES[qtype]
    if per == 1:       # float types: random finite values (subnormals and extremes included by chance)
        if qtype == "f16":
            return _finite_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
        bits = rng.integers(0, 1 << 32, size=n_blocks, dtype=np.uint32)
        if qtype == "bf16":
            bits = (bits >> 16).astype(np.uint16)
            bits = np.where((bits & 0x7F80) == 0x7F80, bits & 0x807F, bits).astype(np.uint16)
            bits[:4] = [0x0001, 0x7F7F, 0xFF7F, 0x0080]
            return bits.view(np.uint8).reshape(n_blocks, 2)
        bits = np.where((bits & 0x7F800000) == 0x7F800000, bits & 0x807FFFFF, bits).astype(np.uint32)
        bits[:4] = [0x00000001, 0x7F7FFFFF, 0xFF7FFFFF, 0x00800000]
        return bits.view(np.uint8).reshape(n_blocks, 4)
    b = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    ramp = np.arange(nbytes, dtype=np.uint8)
    b[len(F16_EXTREMES):len(F16_EXTREMES) + 16] = (ramp[None, :] * 7 + np.arange(16, dtype=np.uint8)[:, None] * 17)
    for off in F16_FIELDS[qtype]:
        f = _finite_f16(rng, n_blocks)
        f[:len(F16_EXTREMES)] = F16_EXTREMES
        b[:, off:off + 2] = f.view(np.uint8).reshape(n_blocks, 2)
    if qtype == "q6_K":        # int8 scales: both ends
        b[0, 192:208] = np.array([0x80, 0x7F] * 8, dtype=np.uint8)
    return b


@pytest.mark.parametrize("qtype", TYPES)
def test_decoders_equal_gguf_py_bit_for_bit(qtype):
    per, nbytes = quant.QTYPES[qtype]
    blocks = _random_blocks(qtype, 512 if per > 1 else 4096, seed=TYPES.index(qtype))
    rows = 8
    data = blocks.reshape(rows, -1)
    cols = data.shape[1] // nbytes * per
    want = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(GGUF_ID[qtype]))
    got = quant.dequantize(torch.from_numpy(data.copy()), qtype, cols).numpy()
    assert got.shape == (rows, cols) and got.dtype == np.float32
    assert np.isfinite(want).all()
    diff = np.flatnonzero(want.view(np.uint32) != got.view(np.uint32))
    assert diff.size == 0, f"{qtype}: {diff.size} values differ, first at {diff[0]}: {want.flat[diff[0]]} vs " \
                           f"{got.flat[diff[0]]}"


@pytest.mark.parametrize("qtype", TYPES)
def test_quantize_round_trip_and_layout(qtype):
    """quantize() makes blocks that gguf-py decodes to our values, within the type's bound of the input."""
    per = quant.QTYPES[qtype][0]
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 5, 512, generator=g)
    w[0, 0] = 0.0                                     # an all-zero row: scales 0
    p = quant.quantize(w, qtype)
    assert p.shape == w.shape and p.data.shape == (2, 5, quant.row_bytes(qtype, 512)) and p.qtype == qtype
    v = p.dequantize()
    assert (v - w).abs().max() / w.abs().max() <= ROUND_TRIP[qtype]
    assert torch.equal(v[0, 0], torch.zeros(512))
    if per > 1 or qtype != "f32":
        ref = gguf.quants.dequantize(p.data.numpy(), gguf.GGMLQuantizationType(GGUF_ID[qtype]))
        assert np.array_equal(ref, v.numpy())
    assert p.element_size() == quant.QTYPES[qtype][1] / per


def test_row_bytes_and_bad_inputs():
    assert quant.row_bytes("q4_K", 512) == 288 and quant.row_bytes("q6_K", 256) == 210
    with pytest.raises(ValueError, match="not whole blocks of 256"):
        quant.row_bytes("q5_K", 288)
    with pytest.raises(ValueError, match="unsupported weight type 'q3_K'"):
        quant.row_bytes("q3_K", 256)
    with pytest.raises(ValueError, match="take 144 bytes, got 140"):
        quant.PackedWeight(torch.zeros(2, 140, dtype=torch.uint8), "q4_K", 256)
    with pytest.raises(ValueError, match="heads=3"):
        quant.PackedWeight(torch.zeros(8, 144, dtype=torch.uint8), "q4_K", 256, heads=3)


# ------------------------------------------------------------------------------------------ row order
def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): HF rows -> interleaved-RoPE rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("qtype", ["f32", "q8_0", "q4_K", "q6_K"])
def test_heads_read_in_hf_order(qtype, monkeypatch):
    g = torch.Generator().manual_seed(4)
    H, D, d = 3, 8, 256
    hf = torch.randn(H * D, d, generator=g)
    stored = quant.quantize(_llama_cpp_permute(hf, H), qtype)
    w = quant.PackedWeight(stored.data, qtype, d, heads=H)
    assert w.data.data_ptr() == stored.data.data_ptr()                  # no copy
    want = quant.quantize(hf, qtype).dequantize()                       # rows quantize independently
    assert torch.equal(w.dequantize(), want)
    x = torch.randn(5, d, generator=g)
    bias = torch.randn(H * D, generator=g)
    monkeypatch.setattr(quant, "NATIVE", {})
    torch.testing.assert_close(w.linear(x, bias), x @ want.t() + bias, rtol=1e-5, atol=1e-5)
    ids = torch.tensor([0, 4, 5, 9, 23, 12])
    assert torch.equal(w.rows(ids), want[ids])
    # a native linear returns storage order; linear() reorders its columns and adds the bias after
    calls = []

    def native(x_, w_, b_):
        calls.append(b_)
        return x_.float() @ quant.dequantize(w_.data, w_.qtype, w_.cols).t()

    monkeypatch.setattr(quant, "NATIVE", {"linear": native})
    torch.testing.assert_close(w.linear(x, bias), x @ want.t() + bias, rtol=1e-5, atol=1e-5)
    assert calls == [None]
    stack = quant.PackedWeight(torch.stack([stored.data, stored.data]), qtype, d, heads=H)
    assert torch.equal(stack[1].dequantize(), want) and torch.equal(stack.dequantize()[0], want)


# ------------------------------------------------------------------------------------------ PackedRows / Stack
def _parts(seed=5, d=256):
    g = torch.Generator().manual_seed(seed)
    q = quant.quantize(_llama_cpp_permute(torch.randn(16, d, generator=g), 2), "q4_K")
    q = quant.PackedWeight(q.data, "q4_K", d, heads=2)
    k = quant.quantize(torch.randn(8, d, generator=g), "q6_K")
    v = torch.randn(8, d, generator=g).to(torch.bfloat16)
    return q, k, v


def test_packed_rows(monkeypatch):
    monkeypatch.setattr(quant, "NATIVE", {})
    q, k, v = _parts()
    r = quant.cat([q, k, v])
    assert isinstance(r, quant.PackedRows) and r.splits == [16, 8, 8]
    assert r.parts[0] is q and r.parts[1] is k and r.parts[2].qtype == "bf16"
    assert r.parts[2].data.data_ptr() == v.data_ptr()                    # a float part is wrapped, not copied
    assert tuple(r.shape) == (32, 256) and r.dim() == 2 and r.is_contiguous() and r.device == torch.device("cpu")
    assert r.nbytes == q.nbytes + k.nbytes + v.numel() * 2
    assert r.element_size() == r.nbytes / (32 * 256)
    assert r.qtypes == ("bf16", "q4_K", "q6_K") and r.storage() == {"q4_K": q.nbytes, "q6_K": k.nbytes,
                                                                    "bf16": 8 * 256 * 2}
    full = torch.cat([q.dequantize(), k.dequantize(), v.float()])
    assert torch.equal(r.dequantize(), full) and torch.equal(r.to(dtype=torch.float32), full)
    assert r.dequantize(torch.float64).dtype == torch.float64
    x = torch.randn(3, 256)
    b = torch.randn(32)
    torch.testing.assert_close(r.linear(x, b), x @ full.t() + b, rtol=1e-5, atol=1e-4)
    ids = torch.tensor([31, 0, 16, 15, 23, 24])
    assert torch.equal(quant.rows(r, ids), full[ids])
    assert quant.cat([r]) is r and quant.is_packed(r)
    with pytest.raises(ValueError, match="part 1: expected 256 columns"):
        quant.PackedRows([q, quant.quantize(torch.randn(4, 512), "q8_0")])
    with pytest.raises(ValueError, match="along their rows only"):
        quant.cat([q, k], dim=1)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quant.cat([q, torch.zeros(4, 256, dtype=torch.float64)])


def test_packed_stack_of_mixed_layers():
    q, k, v = _parts()
    layers = [quant.cat([q, k, v]), quant.cat([quant.quantize(torch.randn(24, 256), "q5_0"),
                                               quant.quantize(torch.randn(8, 256), "q5_1")])]
    s = quant.stack(layers)
    assert isinstance(s, quant.PackedStack) and s[0] is layers[0] and s[1] is layers[1] and len(s) == 2
    assert tuple(s.shape) == (2, 32, 256) and s.dim() == 3 and s.nbytes == layers[0].nbytes + layers[1].nbytes
    assert s.qtypes == ("bf16", "q4_K", "q5_0", "q5_1", "q6_K")
    assert s.element_size() == s.nbytes / (2 * 32 * 256)
    full = torch.stack([layers[0].dequantize(), layers[1].dequantize()])
    assert torch.equal(s.dequantize(), full) and torch.equal(s.to(dtype=torch.float32), full)
    assert s.to("cpu") is s
    one_type = quant.stack([quant.quantize(torch.randn(4, 256), "q8_0") for _ in range(3)])
    assert isinstance(one_type, quant.PackedStack) and one_type.qtypes == ("q8_0",)
    with pytest.raises(ValueError, match=r"layer 1: expected shape \(32, 256\)"):
        quant.stack([layers[0], quant.quantize(torch.randn(8, 256), "q8_0")])
    with pytest.raises(TypeError, match="one int"):
        s[0:1]


def test_weights_and_model_with_mixed_stacks(tmp_path, monkeypatch):
    """A model whose layer matrices are PackedStacks of per-layer types: the Weights, the dequantized model,
    calibrate's fingerprint, save_hf / load_model, and the prefill's quant.linear all read the same values."""
    import dataclasses
    from d3kernels import D3Schedule, Decoder
    from d3kernels.calibrate import model_key
    from d3kernels.model import load_model, random_model, save_hf
    monkeypatch.setattr(quant, "NATIVE", {})
    m = random_model(L=3, d=256, H=4, H_kv=2, D=64, F=512, V=301)
    w = m.weights
    kinds = {"wqkv": ["q4_K", "q5_K", "q8_0"], "wo": ["q6_K", "q4_0", "q4_1"],
             "w_gate_up": ["q5_0", "q5_1", "f16"], "w_down": ["q6_K", "q4_K", "q6_K"]}
    packed = {k: quant.stack([quant.quantize(getattr(w, k)[l], t) for l, t in enumerate(ts)])
              for k, ts in kinds.items()}
    mp = type(m)(m.config, dataclasses.replace(w, **packed))
    assert mp.weights.packed and mp.weights.layers[1].wqkv.qtype == "q5_K"
    assert mp.weights.layers[2].w_down.qtype == "q6_K"
    expect_bytes = sum(p.nbytes for p in packed.values()) / sum(p.shape.numel() for p in packed.values())
    assert mp.weights.bytes_per_weight == pytest.approx(expect_bytes)
    md = mp.dequantized()
    assert not md.weights.packed
    for k in kinds:
        assert torch.equal(getattr(md.weights, k), packed[k].dequantize())
    assert model_key(mp) == model_key(md)
    sched = D3Schedule(3, alpha=1.0)
    ids = [[5, 17, 42, 99, 3]]
    ref = Decoder(md, sched, max_seq_len=32, backend="reference").prefill(ids)
    via_packed = Decoder(mp, sched, max_seq_len=32, backend="reference").prefill(ids)
    assert torch.equal(ref, via_packed)
    # the prefill reads the packed matrices through quant.linear; its logits equal the float model's
    from d3kernels.prefill import _linear
    x = torch.randn(4, 256)
    torch.testing.assert_close(_linear(x, mp.weights.layers[0].wqkv), _linear(x, md.weights.layers[0].wqkv),
                               rtol=1e-5, atol=1e-4)
    out = save_hf(mp, str(tmp_path / "hf"))
    back = load_model(out, device="cpu", dtype=torch.float32)
    assert torch.equal(back.weights.w_down, md.weights.w_down)
