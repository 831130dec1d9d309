"""The Triton backend against the reference (docs/design.md section 6).

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py); with one, natively. Each op's output is poisoned first and compared
by tolerance.assert_close: float64 oracle = the reference on float64 copies of the
inputs, same_precision = the reference on the test-dtype inputs. Cache entries an
op must not touch are compared bit for bit, kv_valid exactly.

Interpreted programs cost milliseconds each, so shapes are small but odd.
"""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from helpers import TRITON_DEVICE, cache_rows, tiny_model  # noqa: E402
from tolerance import assert_close, poison  # noqa: E402

from d3kernels import D3Schedule, Decoder, ops  # noqa: E402
from d3kernels import reference as ref  # noqa: E402

DEV = TRITON_DEVICE
# the interpreter mishandles bf16 (backends.why_not refuses it on CPU)
DTYPES = [torch.bfloat16, torch.float16] if DEV == "cuda" else [torch.float16, torch.float32]
EPS = 1e-5

# (B, d, H, H_kv, D, S, positions, active, holes [(b, p)], bias)
ATTN_CASES = [
    (3, 72, 4, 2, 16, 40, [0, 17, 39], [1, 1, 1], [(1, 3), (1, 10), (2, 0), (2, 16), (2, 38)], True),   # GQA
    (4, 40, 2, 2, 32, 33, [5, 9, 30, 2], [1, 0, 1, 1], [(0, 2), (2, 29)], False),                   # MHA, inactive
    (2, 48, 8, 2, 64, 24, [12, 23], [1, 1], [(0, 11)], True),                                       # G = 4
    (1, 32, 2, 1, 256, 20, [19], [1], [], False),                                                    # D = 256
    (33, 24, 2, 1, 16, 16, list(range(1, 16)) * 2 + [0, 15, 7], [1] * 30 + [0, 1, 1], [(4, 0)], True),  # 2 batch tiles
]


def _rn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def _rope(S, D):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    f = torch.outer(torch.arange(S).float(), inv_freq)
    return f.cos(), f.sin()


def _to(t, dtype):
    """Model tensors to the test dtype on DEV; integer tensors keep their dtype."""
    return t.to(DEV, dtype) if t.is_floating_point() else t.to(DEV)


def _inputs(x, dtype):
    """All to DEV; model tensors to dtype, rope tables stay float32 (the ops' contract)."""
    return {n: None if t is None else (t.to(DEV) if n.startswith("rope") else _to(t, dtype)) for n, t in x.items()}


def _f64(t):
    return None if t is None else (t.double() if t.is_floating_point() else t.clone())


def _clone(t):
    return None if t is None else t.clone()


def _same(name, a, b):
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------- attn_block

def _attn_inputs(B, d, H, H_kv, D, S, positions, active, holes, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = (H + 2 * H_kv) * D
    # entries attention must ignore (holes, p >= pos) hold NaN
    k, v, kv_valid = cache_rows(g, B, H_kv, S, D, positions, holes, torch.float32)
    cos, sin = _rope(S, D)
    x = dict(h=_rn(g, B, d), attn_norm=1 + 0.1 * _rn(g, d), wqkv=_rn(g, R, d, scale=d ** -0.5),
             bqkv=_rn(g, R, scale=0.1) if bias else None, wo=_rn(g, d, H * D, scale=(H * D) ** -0.5),
             k_cache=k, v_cache=v, kv_valid=kv_valid, pos=torch.tensor(positions, dtype=torch.int32),
             rope_cos=cos, rope_sin=sin, row_active=torch.tensor(active, dtype=torch.uint8))
    return _inputs(x, dtype)


def _attn_call(fn, out, x, **kw):
    fn(out, x["h"], x["attn_norm"], x["wqkv"], x["bqkv"], x["wo"], x["k_cache"], x["v_cache"], x["kv_valid"],
       x["pos"], x["rope_cos"], x["rope_sin"], x["row_active"], EPS, **kw)


def _attn_references(x):
    """The reference attn_block on copies of x at x's precision and in float64:
    (inputs, out) for each, the cache tensors in the inputs updated as the op leaves them."""
    sp = {n: _clone(t) for n, t in x.items()}
    out_sp = torch.empty_like(x["h"])
    _attn_call(ref.attn_block, out_sp, sp)
    o64 = {n: _f64(t) for n, t in x.items()}
    out_64 = torch.empty_like(o64["h"])
    _attn_call(ref.attn_block, out_64, o64)
    return sp, out_sp, o64, out_64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(ATTN_CASES)))
def test_attn_block(case, dtype):
    B, d, H, H_kv, D, S, positions, active, holes, bias = ATTN_CASES[case]
    x = _attn_inputs(B, d, H, H_kv, D, S, positions, active, holes, bias, dtype, seed=case)
    k0, v0, valid0 = x["k_cache"].clone(), x["v_cache"].clone(), x["kv_valid"].clone()

    sp, out_sp, o64, out_64 = _attn_references(x)

    out = poison(torch.empty_like(x["h"]))
    _attn_call(ops.attn_block, out, x, backend="triton")

    assert_close("out", out, out_sp, out_64, dtype)
    act = torch.tensor(active, dtype=torch.bool)
    _same("inactive rows out == h", out[~act.to(DEV)], x["h"][~act.to(DEV)])
    _same("kv_valid", x["kv_valid"], sp["kv_valid"])
    written = torch.zeros(B, H_kv, S, D, dtype=torch.bool)
    for b, p in enumerate(positions):
        if active[b]:
            written[b, :, p] = True
    written = written.to(DEV)
    for name in ("k_cache", "v_cache"):
        assert_close(name + " at pos", x[name][written], sp[name][written], o64[name][written], dtype)
        _same(name + " elsewhere untouched", x[name][~written], (k0 if name == "k_cache" else v0)[~written])
    expect_valid = valid0.clone()
    for b, p in enumerate(positions):
        if active[b]:
            expect_valid[b, p] = 1
    _same("kv_valid set at pos", x["kv_valid"], expect_valid)


def test_attn_block_in_place():
    """out may alias h (in-place residual update)."""
    dtype = DTYPES[-1]
    B, d, H, H_kv, D, S, positions, active, holes, bias = ATTN_CASES[1]
    x = _attn_inputs(B, d, H, H_kv, D, S, positions, active, holes, bias, dtype)
    sp, out_sp, o64, out_64 = _attn_references(x)
    h = x["h"]
    _attn_call(ops.attn_block, h, x, backend="triton")
    assert_close("out (aliasing h)", h, out_sp, out_64, dtype)


# --------------------------------------------------------------------------- mlp_block

MLP_CASES = [(3, 72, 100, [1, 0, 1]), (1, 64, 96, [1]), (33, 40, 24, [1] * 20 + [0] * 3 + [1] * 10)]


def _mlp_inputs(B, d, F, active, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = dict(h=_rn(g, B, d), mlp_norm=1 + 0.1 * _rn(g, d), w_gate_up=_rn(g, 2 * F, d, scale=d ** -0.5),
             w_down=_rn(g, d, F, scale=F ** -0.5), row_active=torch.tensor(active, dtype=torch.uint8))
    return {n: _to(t, dtype) for n, t in x.items()}


def _mlp_call(fn, out, x, **kw):
    fn(out, x["h"], x["mlp_norm"], x["w_gate_up"], x["w_down"], x["row_active"], EPS, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(MLP_CASES)))
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in_place"])
def test_mlp_block(case, dtype, in_place):
    B, d, F, active = MLP_CASES[case]
    x = _mlp_inputs(B, d, F, active, dtype, seed=case)
    out_sp = torch.empty_like(x["h"])
    _mlp_call(ref.mlp_block, out_sp, x)
    o64 = {n: _f64(t) for n, t in x.items()}
    out_64 = torch.empty_like(o64["h"])
    _mlp_call(ref.mlp_block, out_64, o64)
    h0 = x["h"].clone()
    if in_place:
        out = x["h"]
    else:
        out = poison(torch.empty_like(x["h"]))
    _mlp_call(ops.mlp_block, out, x, backend="triton")
    assert_close("out", out, out_sp, out_64, dtype)
    act = torch.tensor(active, dtype=torch.bool).to(DEV)
    _same("inactive rows out == h", out[~act], h0[~act])


# --------------------------------------------------------------------------- lm_head

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,d,V", [(3, 72, 101), (33, 40, 37), (1, 64, 257)])
def test_lm_head(B, d, V, dtype):
    g = torch.Generator().manual_seed(V)
    h, norm, w = (_to(t, dtype) for t in (_rn(g, B, d), 1 + 0.1 * _rn(g, d), _rn(g, V, d, scale=d ** -0.5)))
    sp = torch.empty(B, V, device=DEV)
    ref.lm_head(sp, h, norm, w, EPS)
    o64 = torch.empty(B, V, device=DEV, dtype=torch.float64)
    ref.lm_head(o64, h.double(), norm.double(), w.double(), EPS)
    logits = poison(torch.empty(B, V, device=DEV))
    ops.lm_head(logits, h, norm, w, EPS, backend="triton")
    # the reference rounds nothing here (fp32 logits), so same_precision is fp32 math on dtype inputs
    assert_close("logits", logits, sp, o64, dtype)


# --------------------------------------------------------------------------- write_kv

KV_FLAGS = [[1, 0, 0], [1, 1, 0], [0, 1, 1], [1, 1, 0]]     # [L=4, B=3]


def _kv_inputs(dtype, bias, seed=0, L=4, B=3, d=72, H=4, H_kv=2, D=16, S=12):
    g = torch.Generator().manual_seed(seed)
    R = (H + 2 * H_kv) * D
    cos, sin = _rope(S, D)
    x = dict(k_cache=_rn(g, L, B, H_kv, S, D), v_cache=_rn(g, L, B, H_kv, S, D),
             kv_valid=(torch.rand(L, B, S, generator=g) < 0.7).to(torch.uint8), src_h=_rn(g, B, d),
             norms=1 + 0.1 * _rn(g, L, d), wqkv=_rn(g, L, R, d, scale=d ** -0.5),
             bqkv=_rn(g, L, R, scale=0.1) if bias else None, pos=torch.tensor([3, 11, 0], dtype=torch.int32),
             rope_cos=cos, rope_sin=sin, flags=torch.tensor(KV_FLAGS, dtype=torch.uint8))
    return _inputs(x, dtype)


def _kv_call(fn, x, mode, **kw):
    fn(x["k_cache"], x["v_cache"], x["kv_valid"], x["src_h"], x["norms"], x["wqkv"], x["bqkv"], x["pos"],
       x["rope_cos"], x["rope_sin"], x["flags"], mode, EPS, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,bias", [("mask", False), ("copy", False), ("project", False), ("project", True)])
def test_write_kv(mode, bias, dtype):
    x = _kv_inputs(dtype, bias)
    k0, v0 = x["k_cache"].clone(), x["v_cache"].clone()
    sp = {n: _clone(t) for n, t in x.items()}
    _kv_call(ref.write_kv, sp, mode)
    o64 = {n: _f64(t) for n, t in x.items()}
    _kv_call(ref.write_kv, o64, mode)
    _kv_call(ops.write_kv, x, mode, backend="triton")

    _same("kv_valid", x["kv_valid"], sp["kv_valid"])
    if mode != "project":                      # pure data movement: bit-exact
        _same("k_cache", x["k_cache"], sp["k_cache"])
        _same("v_cache", x["v_cache"], sp["v_cache"])
        if mode == "mask":
            _same("k untouched", x["k_cache"], k0)
        return
    written = torch.zeros(x["k_cache"].shape, dtype=torch.bool)
    for l, row in enumerate(KV_FLAGS):
        for b, f in enumerate(row):
            if f:
                written[l, b, :, int(x["pos"][b])] = True
    written = written.to(DEV)
    for name, orig in (("k_cache", k0), ("v_cache", v0)):
        assert_close(name + " at pos", x[name][written], sp[name][written], o64[name][written], dtype)
        _same(name + " elsewhere untouched", x[name][~written], orig[~written])


def test_write_kv_copy_has_sources():
    """The copy case above must exercise both branches: rows with and without a lower source layer."""
    fl = torch.tensor(KV_FLAGS)
    no_src = [(l, b) for l in range(4) for b in range(3) if fl[l, b] and not any(fl[j, b] == 0 for j in range(l))]
    with_src = [(l, b) for l in range(4) for b in range(3) if fl[l, b] and any(fl[j, b] == 0 for j in range(l))]
    assert no_src and with_src


# --------------------------------------------------------------------------- sample and errors

def test_sample_greedy_and_seeded():
    g = torch.Generator().manual_seed(0)
    logits = _rn(g, 3, 101).to(DEV)
    for temp, top_k, top_p in ((0.0, 0, 1.0), (0.8, 10, 0.9)):
        toks, expect = poison(torch.empty(3, dtype=torch.int64, device=DEV)), torch.empty(3, dtype=torch.int64,
                                                                                          device=DEV)
        g1, g2 = torch.Generator(device=DEV).manual_seed(1), torch.Generator(device=DEV).manual_seed(1)
        ops.sample(toks, logits, temp, top_k, top_p, g1, backend="triton")
        ref.sample(expect, logits, temp, top_k, top_p, g2)
        assert torch.equal(toks, expect)


def test_unsupported_head_dim_raises():
    import d3kernels.triton as tri
    x = _attn_inputs(1, 32, 2, 1, 16, 8, [3], [1], [], False, torch.float32)
    bad = {**x, "k_cache": torch.zeros(1, 1, 8, 24, device=DEV), "v_cache": torch.zeros(1, 1, 8, 24, device=DEV),
           "wqkv": torch.zeros(4 * 24, 32, device=DEV), "wo": torch.zeros(32, 2 * 24, device=DEV),
           **dict(zip(("rope_cos", "rope_sin"), (t.to(DEV) for t in _rope(8, 24))))}
    with pytest.raises(ValueError, match="head_dim 24"):
        _attn_call(tri.attn_block, torch.empty(1, 32, device=DEV), bad)
    with pytest.raises(RuntimeError, match="head_dim"):
        _attn_call(ops.attn_block, torch.empty(1, 32, device=DEV), bad, backend="triton")


# --------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("page_size", [None, 8], ids=["contiguous", "paged"])
@pytest.mark.parametrize("fill", ["mask", "project", "copy"])
def test_decoder_matches_reference(fill, page_size):
    """Greedy D3 decoding with the Triton ops gives the reference's tokens, with layers dropped over steps;
    paged: the Triton paged ops on pages given as rows grow, against the reference's contiguous cache."""
    model = tiny_model(L=4, d=64, H=4, H_kv=2, D=16, F=96, V=101, dtype=torch.float32, device=DEV,
                       qkv_bias=fill == "project")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 101, (5,), generator=g).tolist(), torch.randint(0, 101, (9,), generator=g).tolist()]
    gens = {}
    for backend in ("reference", "triton"):
        dec = Decoder(model, D3Schedule(4, alpha=0.8, start=0.25, tail=1), max_batch=2, max_seq_len=32,
                      backend=backend, fill=fill, page_size=page_size if backend == "triton" else None)
        gens[backend] = dec.generate(prompts, max_new_tokens=8, ignore_eos=True)
        assert dec.backend == backend
    tri, refg = gens["triton"], gens["reference"]
    assert tri.tokens.shape == (2, 8)
    assert torch.equal(tri.tokens, refg.tokens), (tri.tokens, refg.tokens)
    depths = [len(k) for k in tri.layers]
    assert depths == [len(k) for k in refg.layers]
    assert depths[0] == 4 and depths[-1] < 4 and depths == sorted(depths, reverse=True)
