"""The batched prefill (d3kernels/prefill.py, what the driver runs) against the specification,
d3kernels.reference.prefill (row by row, float32), by the tolerance rule: new requests of different
lengths, continued conversations whose earlier positions have holes in kv_valid, GQA, MQA and qkv bias, in
float32, bfloat16 and float16."""
import pytest
import torch

from tolerance import assert_close

from d3kernels import Decoder, D3Schedule
from d3kernels import reference as ref
from d3kernels.model import random_model, rope_tables
from d3kernels.prefill import prefill

EPS = 1e-5
# (H, H_kv, qkv bias)
ATTN = {"gqa": (4, 2, False), "mqa": (4, 1, False), "bias": (2, 2, True)}


def _run(fn, cfg, w, dtype, ids, lengths, starts, seed=0, L=3, H_kv=2, S=40, D=16):
    g = torch.Generator().manual_seed(seed)
    B, dev = len(lengths), w.embed.device
    k = torch.randn(L, B, H_kv, S, D, generator=g).to(device=dev, dtype=dtype)
    v = torch.randn(L, B, H_kv, S, D, generator=g).to(device=dev, dtype=dtype)
    valid = (torch.rand(L, B, S, generator=g) < 0.7).to(device=dev, dtype=torch.uint8)   # holes: skipped layers
    h = torch.full((B, w.embed.shape[1]), float("nan"), dtype=dtype, device=dev)
    cos, sin = rope_tables(cfg, S, dev)
    fn(h, ids.to(dev), lengths, w, k, v, valid, cos, sin, EPS, starts=starts)
    return h, k, v, valid



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attn", list(ATTN))
@pytest.mark.parametrize("starts", [[0, 0, 0], [0, 7, 3]], ids=["new", "continued"])
def test_batched_prefill_matches_the_reference(device, dtype, attn, starts):
    """On a GPU the 16-bit path runs tensor-core matmuls and the fused SDPA (not run here yet)."""
    H, H_kv, bias = ATTN[attn]
    m = random_model(3, 64, H, H_kv, 16, 96, 101, dtype=dtype, device=device, seed=3, qkv_bias=bias)
    lengths = [5, 9, 1]
    ids = torch.randint(0, 101, (3, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(H_kv=H_kv)
    got = _run(prefill, m.config, m.weights, dtype, ids, lengths, starts, **kw)
    same = _run(ref.prefill, m.config, m.weights, dtype, ids, lengths, starts, **kw)
    oracle = _run(ref.prefill, m.config, m.weights.to(torch.float64), torch.float64, ids, lengths, starts, **kw)
    assert_close("hidden_out", got[0], same[0], oracle[0], dtype)
    written = torch.zeros_like(got[3], dtype=torch.bool)
    for b, (s0, n) in enumerate(zip(starts, lengths)):
        written[:, b, s0:s0 + n] = True
    for name, i in (("k_cache", 1), ("v_cache", 2)):
        sel = written[:, :, None, :, None].expand_as(got[i]).to(got[i].device)
        assert_close(name, got[i][sel], same[i][sel], oracle[i][sel], dtype)
        assert torch.equal(got[i][~sel], same[i][~sel]), f"{name}: an entry outside the new positions changed"
    assert torch.equal(got[3], same[3]), "kv_valid"


def test_bad_rows_raise():
    m = random_model(2, 64, 4, 2, 16, 96, 101)
    with pytest.raises(ValueError, match="outside the cache"):
        _run(prefill, m.config, m.weights, torch.float32, torch.zeros(3, 50, dtype=torch.int64), [5, 50, 1], [0, 0, 0], L=2)
    with pytest.raises(ValueError, match="lengths"):
        _run(prefill, m.config, m.weights, torch.float32, torch.zeros(2, 5, dtype=torch.int64), [5, 5], [0], L=2)


def test_the_driver_prefills_without_the_reference(monkeypatch):
    """Decoder.prefill runs the batched op on every backend: the specification is not on the path."""
    def spec(*a, **k):
        raise AssertionError("the driver called reference.prefill")
    monkeypatch.setattr(ref, "prefill", spec)
    m = random_model(3, 64, 4, 2, 16, 96, 101)
    dec = Decoder(m, D3Schedule(3, alpha=0.9), max_batch=2, max_seq_len=32, backend="reference")
    g = dec.generate([[1, 2, 3], [4, 5]], max_new_tokens=4, ignore_eos=True)
    assert g.tokens.shape == (2, 4)
    g2 = dec.generate([[7, 8], [9]], max_new_tokens=3, ignore_eos=True, continue_=True)
    assert g2.tokens.shape == (2, 3)
