"""The native cpu backend (d3kernels.cpu, csrc/cpu/) against the reference: every op, every weight storage
type, activation dtypes float32, bfloat16 and float16, odd sizes, every instruction set this CPU has (forced), the
recorded step program against eager launches, greedy decoding on the embedded model, bad inputs, and a
planted bug that the op tests must catch."""
import os

import pytest
import torch

from d3kernels import backends, quant
from d3kernels import reference as ref
from d3kernels.tolerance import PACKED_SLACK, compare

cpu = pytest.importorskip("d3kernels.cpu")
if cpu.available() is not None:
    pytest.skip(f"the cpu backend is not available: {cpu.available()}", allow_module_level=True)

ISAS = ("avx512", "avx2", "scalar")
KTYPES = ("q4_K", "q5_K", "q6_K")
WTYPES = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0") + KTYPES
BLOCK_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0") + KTYPES
EPS = 1e-5
# odd sizes: d and F whole blocks of 32 (the 32-value block types need that), H = 3 query heads on 1 KV head
SH = dict(B=3, d=96, H=3, H_kv=1, D=32, F=160, V=301, S=40, L=4)
# the K-quants' super-blocks of 256 need d, H D and F multiples of 256
SHK = dict(B=3, d=256, H=4, H_kv=2, D=64, F=256, V=301, S=40, L=4)


def _shape(wtype):
    return SHK if wtype in KTYPES else SH


def _isa(name):
    if name not in cpu.C.build_info()["isas"]:
        pytest.skip(f"this CPU lacks the {name} instructions")
    return cpu.forced_isa(name)


def _rand(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale


def _pack(w, wtype):
    """(the weight as the cpu backend reads it, its float64 values for the oracle)."""
    p = quant.quantize(w, wtype)
    return p, p.dequantize().double()


def _check(out, out_ref, out64, dtype, packed, what):
    problem, err, bound = compare(out, out_ref, out64, dtype, slack=PACKED_SLACK if packed else None)
    assert problem is None, f"{what}: {problem}"


def _attn_inputs(r, dtype, B, d, H, H_kv, D, S, **_):
    R = (H + 2 * H_kv) * D
    valid = (torch.rand(B, S, generator=torch.Generator().manual_seed(1)) > 0.3).to(torch.uint8)
    return dict(h=r(B, d).to(dtype), norm=(1 + 0.1 * r(d)).to(dtype), wqkv=r(R, d, scale=d ** -0.5),
                bqkv=r(R, scale=0.1).to(dtype), wo=r(d, H * D, scale=(H * D) ** -0.5),
                k=r(B, H_kv, S, D).to(dtype), v=r(B, H_kv, S, D).to(dtype), valid=valid,
                pos=torch.tensor([5, S - 1, 0][:B], dtype=torch.int32), cos=r(S, D // 2), sin=r(S, D // 2),
                active=torch.tensor([1, 1, 0][:B], dtype=torch.uint8))


def _run_attn(ops, x, wqkv, wo, dtype):
    k, v, valid, out = x["k"].to(dtype).clone(), x["v"].to(dtype).clone(), x["valid"].clone(), None
    out = torch.empty_like(x["h"].to(dtype))
    ops.attn_block(out, x["h"].to(dtype), x["norm"].to(dtype), wqkv, x["bqkv"].to(dtype), wo, k, v, valid,
                   x["pos"], x["cos"], x["sin"], x["active"], EPS)
    return out, k, v, valid


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wtype", WTYPES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_attn_and_mlp_blocks(isa, wtype, dtype):
    r = _rand(3)
    sh = _shape(wtype)
    x = _attn_inputs(r, torch.float32, **sh)
    pq, q64 = _pack(x["wqkv"], wtype)
    po, o64 = _pack(x["wo"], wtype)
    packed = wtype.startswith("q")
    with _isa(isa):
        got = _run_attn(cpu.ops, x, pq, po, dtype)
    want = _run_attn(ref, x, q64.to(dtype), o64.to(dtype), dtype)
    oracle = _run_attn(ref, x, q64, o64, torch.float64)
    for name, g, w, o in zip(("out", "k_cache", "v_cache"), got, want, oracle):
        _check(g, w, o, dtype, packed, f"attn_block {name} ({wtype}, {dtype}, {isa})")
    assert torch.equal(got[3], want[3])

    d, F, B = sh["d"], sh["F"], sh["B"]
    gu, gu64 = _pack(r(2 * F, d, scale=d ** -0.5), wtype)
    dn, dn64 = _pack(r(d, F, scale=F ** -0.5), wtype)
    h, norm, act = x["h"].to(dtype), x["norm"].to(dtype), x["active"]
    outs = []
    for ops, a, b, dt in ((cpu.ops, gu, dn, dtype), (ref, gu64.to(dtype), dn64.to(dtype), dtype),
                          (ref, gu64, dn64, torch.float64)):
        out = torch.empty(B, d, dtype=dt)
        with _isa(isa):
            ops.mlp_block(out, h.to(dt), norm.to(dt), a, b, act, EPS)
        outs.append(out)
    _check(*outs, dtype, packed, f"mlp_block ({wtype}, {dtype}, {isa})")
    assert torch.equal(outs[0][2], h[2]), "an idle row must pass through unchanged"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wtype", WTYPES)
def test_lm_head_and_sampling(isa, wtype):
    r = _rand(5)
    B, d, V = (_shape(wtype)[k] for k in ("B", "d", "V"))
    h, norm = r(B, d), 1 + 0.1 * r(d)
    w, w64 = _pack(r(V, d), wtype)
    outs = []
    for ops, ww, dt in ((cpu.ops, w, torch.float32), (ref, w64.float(), torch.float32), (ref, w64, torch.float64)):
        logits = torch.empty(B, V, dtype=torch.float32 if dt != torch.float64 else dt)
        with _isa(isa):
            ops.lm_head(logits, h.to(dt), norm.to(dt), ww, EPS)
        outs.append(logits)
    _check(*outs, torch.float32, wtype.startswith("q"), f"lm_head ({wtype}, {isa})")
    tokens = torch.empty(B, dtype=torch.int64)
    cpu.ops.sample(tokens, outs[0])
    assert torch.equal(tokens, outs[0].argmax(-1))
    outs[0][1, 7] = float("nan")                    # torch.argmax: NaN counts as the largest
    cpu.ops.sample(tokens, outs[0])
    assert tokens[1] == 7


def test_lm_head_skips_idle_rows():
    """row_active: the active rows' logits equal the all-rows launch's, an idle row's stay as they were (no
    multiply spent on it), and a bad mask is refused before anything is written."""
    r = _rand(6)
    B, d, V = 5, 256, 301
    h, norm = r(B, d), 1 + 0.1 * r(d)
    w, _ = _pack(r(V, d), "q4_K")
    full = torch.empty(B, V)
    cpu.ops.lm_head(full, h, norm, w, EPS)
    for act in ([1, 0, 1, 1, 0], [0, 0, 0, 0, 1], [1] * 5, [0] * 5):
        logits = torch.full((B, V), 7.0)
        cpu.ops.lm_head(logits, h, norm, w, EPS, row_active=torch.tensor(act, dtype=torch.uint8))
        for b, a in enumerate(act):
            assert torch.equal(logits[b], full[b] if a else torch.full((V,), 7.0)), (act, b)
    logits = torch.full((B, V), 7.0)
    for bad in (torch.ones(B, dtype=torch.int32), torch.ones(B + 1, dtype=torch.uint8)):
        with pytest.raises(RuntimeError, match="row_active"):
            cpu.ops.lm_head(logits, h, norm, w, EPS, row_active=bad)
    assert torch.equal(logits, torch.full((B, V), 7.0))


@pytest.mark.parametrize("mode", ("mask", "project", "copy"))
@pytest.mark.parametrize("wtype", ("bf16", "q4_1", "q8_0"))
def test_write_kv(mode, wtype):
    r = _rand(7)
    L, B, d, H, H_kv, D, S = (SH[k] for k in ("L", "B", "d", "H", "H_kv", "D", "S"))
    R = (H + 2 * H_kv) * D
    w, w64 = _pack(r(L, R, d, scale=d ** -0.5), wtype)
    norms, bq = 1 + 0.1 * r(L, d), r(L, R, scale=0.1)
    src, cos, sin = r(B, d), r(S, D // 2), r(S, D // 2)
    k0, v0 = r(L, B, H_kv, S, D), r(L, B, H_kv, S, D)
    valid0 = torch.ones(L, B, S, dtype=torch.uint8)
    pos = torch.tensor([3, 9, S + 5], dtype=torch.int32)          # row 2 out of range: writes nothing
    flags = torch.tensor([[0, 0, 1], [1, 1, 1], [1, 0, 1], [0, 1, 1]], dtype=torch.uint8)
    outs = []
    for ops, ww, dt in ((cpu.ops, w, torch.float32), (ref, w64.float(), torch.float32), (ref, w64, torch.float64)):
        k, v, valid = k0.to(dt).clone(), v0.to(dt).clone(), valid0.clone()
        args = (k, v, valid, src.to(dt), norms.to(dt), ww, bq.to(dt))
        if ops is ref:      # the reference raises on the out-of-range row; the kernels skip it
            kk, vv, va = k[:, :2].clone(), v[:, :2].clone(), valid[:, :2].clone()
            ops.write_kv(kk, vv, va, src[:2].to(dt), norms.to(dt), ww, bq.to(dt), pos[:2], cos, sin,
                         flags[:, :2].contiguous(), mode, EPS)
            k[:, :2], v[:, :2], valid[:, :2] = kk, vv, va
        else:
            ops.write_kv(*args, pos, cos, sin, flags, mode, EPS)
        outs.append((k, v, valid))
    for i, name in enumerate(("k_cache", "v_cache")):
        _check(outs[0][i], outs[1][i], outs[2][i], torch.float32, wtype.startswith("q"), f"write_kv {mode} {name}")
    assert torch.equal(outs[0][2], outs[1][2])


def test_paged_ops_match_the_contiguous_reference():
    """attn_block_paged / write_kv_paged on a shuffled page pool give the reference's paged results."""
    r = _rand(11)
    B, d, H, H_kv, D = 2, 96, 3, 1, 32
    ps, P, M = 8, 9, 4
    R = (H + 2 * H_kv) * D
    wq, wq64 = _pack(r(R, d, scale=d ** -0.5), "q4_0")
    wo, wo64 = _pack(r(d, H * D, scale=(H * D) ** -0.5), "q4_0")
    bt = torch.tensor([[3, 0, 7, 5], [1, 8, 2, 6]], dtype=torch.int32)
    pos = torch.tensor([13, 25], dtype=torch.int32)
    slots = torch.tensor([int(bt[b, int(pos[b]) // ps]) * ps + int(pos[b]) % ps for b in range(B)])
    h, norm, cos, sin = r(B, d), 1 + 0.1 * r(d), r(64, D // 2), r(64, D // 2)
    kp, vp = r(P, ps, H_kv, D), r(P, ps, H_kv, D)
    valid = (torch.rand(P, ps, generator=torch.Generator().manual_seed(2)) > 0.2).to(torch.uint8)
    active = torch.ones(B, dtype=torch.uint8)
    outs = []
    for ops, a, b, dt in ((cpu.ops, wq, wo, torch.float32), (ref, wq64.float(), wo64.float(), torch.float32),
                          (ref, wq64, wo64, torch.float64)):
        out, k, v, va = torch.empty(B, d, dtype=dt), kp.to(dt).clone(), vp.to(dt).clone(), valid.clone()
        ops.attn_block_paged(out, h.to(dt), norm.to(dt), a, None, b, k, v, va, bt, pos, slots, cos, sin, active, EPS)
        outs.append((out, k, v, va))
    for i, name in enumerate(("out", "k_pages", "v_pages")):
        _check(outs[0][i], outs[1][i], outs[2][i], torch.float32, True, f"attn_block_paged {name}")
    assert torch.equal(outs[0][3], outs[1][3])
    # the KV writer at those slots, every mode
    L = 3
    wl, wl64 = _pack(r(L, R, d, scale=d ** -0.5), "q8_0")
    flags = torch.tensor([[0, 1], [1, 1], [1, 0]], dtype=torch.uint8)
    for mode in ("mask", "project", "copy"):
        res = []
        for ops, ww, dt in ((cpu.ops, wl, torch.float32), (ref, wl64.float(), torch.float32),
                            (ref, wl64, torch.float64)):
            k, v = r(L, P, ps, H_kv, D).to(dt), r(L, P, ps, H_kv, D).to(dt)
            k.copy_(torch.arange(k.numel()).reshape(k.shape).to(dt) % 7)
            v.copy_(torch.arange(v.numel()).reshape(v.shape).to(dt) % 5)
            va = torch.ones(L, P, ps, dtype=torch.uint8)
            ops.write_kv_paged(k, v, va, h.to(dt), (1 + 0.1 * torch.ones(L, d)).to(dt), ww, None, bt, pos, slots,
                               cos, sin, flags, mode, EPS)
            res.append((k, v, va))
        for i, name in enumerate(("k_pages", "v_pages")):
            _check(res[0][i], res[1][i], res[2][i], torch.float32, True, f"write_kv_paged {mode} {name}")
        assert torch.equal(res[0][2], res[1][2])


def _quantization_bound(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """Per element, the error of a correct GGUF quantizer: the distance to the nearest point of its block's
    grid (q8_0: q d, |q| <= 127, d = amax / 127; q4_0: (q - 8) d, q in [0, 15], d = max / -8 with max the
    signed value of largest magnitude; q4_1: lo + q d, q in [0, 15], d = (hi - lo) / 15), plus the grid's
    move when d (and q4_1's lo) are stored as float16, plus float32 rounding."""
    x = w.double().reshape(*w.shape[:-1], -1, 32)
    if qtype == "q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        q, off, qmax = torch.arange(-127, 128, dtype=torch.float64), torch.zeros_like(d), 127
    elif qtype == "q4_0":
        d = x.gather(-1, x.abs().argmax(-1, keepdim=True)) / -8
        q, off, qmax = torch.arange(-8, 8, dtype=torch.float64), torch.zeros_like(d), 8
    else:
        lo = x.amin(-1, keepdim=True)
        d = (x.amax(-1, keepdim=True) - lo) / 15
        q, off, qmax = torch.arange(16, dtype=torch.float64), lo, 15
    nearest = (x[..., None] - (off + d * q)[..., None, :]).abs().amin(-1)
    stored = qmax * (d - d.float().half().double()).abs() + (off - off.float().half().double()).abs()
    return (nearest + stored + 1e-6 * x.abs().amax(-1, keepdim=True)).reshape(w.shape)


def test_dequantize_matches_gguf():
    """Our blocks decode as gguf decodes them, and every value is within a correct quantizer's error of
    the original (a truncating quantizer is up to twice as far off, and fails)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    w = _rand(13)(8, 64) * 3
    codes = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}
    for qt, code in codes.items():
        p = quant.quantize(w, qt)
        theirs = gguf.quants.dequantize(p.data.numpy(), code)
        assert torch.equal(p.dequantize(), torch.from_numpy(np.array(theirs, dtype=np.float32)).reshape(8, 64)), qt
        err = (p.dequantize().double() - w.double()).abs()
        over = err > _quantization_bound(w, qt)
        assert not over.any(), f"{qt}: {int(over.sum())} values beyond a correct quantizer's error, worst " \
                               f"{(err - _quantization_bound(w, qt)).max().item():.3e}"
        ids = torch.tensor([5, 0, 7])
        assert torch.equal(p.rows(ids), p.dequantize()[ids]), qt          # the native embedding lookup


def test_prefill_linear_matches_dequantized_matmul():
    r = _rand(17)
    for qt in WTYPES:
        K = 256 if qt in KTYPES else 96
        x = r(70, K)                               # more rows than one block of 64
        w, w64 = _pack(r(50, K), qt)
        b = r(50)
        got = w.linear(x, b)
        want = x.double() @ w64.t() + b.double()
        slack = PACKED_SLACK if qt in BLOCK_TYPES else 1e-5
        assert (got.double() - want).abs().max().item() < slack * want.abs().max().item(), qt


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="misaligned row"):
        quant.quantize(torch.randn(4, 40), "q4_1")
    with pytest.raises(ValueError, match="unsupported weight type"):
        quant.PackedWeight(torch.zeros(4, 22, dtype=torch.uint8), "q2_K", 256)
    # what the Python side cannot catch reaches the launcher's own checks (each says what is wrong)
    a = cpu.C.MlpArgs()
    a.B, a.d, a.F, a.out, a.h, a.mlp_norm, a.row_active = 1, 40, 32, 1, 1, 1, 1

    def desc(*segs):   # a MatDesc of (type, ld, rows, perm_d) row blocks at a dummy address
        d = torch.zeros(1, 16, dtype=torch.int64)
        d[0, 0] = len(segs)
        for i, (t, ld, rows, perm) in enumerate(segs):
            d[0, 1 + 5 * i: 6 + 5 * i] = torch.tensor([1, quant.CODES[t], ld, rows, perm])
        return d

    down = desc(("q4_1", 20, 40, 0))
    for gu, msg in ((desc(("q4_1", 100, 64, 0)), "misaligned row"),             # 40 columns of q4_1
                    (desc(("f32", 160, 32, 0)), "32 rows, expected 64"),         # rows do not add up
                    (desc(("f32", 160, 32, 0), ("q6_K", 210, 32, 0)), "not whole blocks"),
                    (desc(("f32", 100, 64, 0)), "row stride 100 < 160"),
                    (desc(("f32", 160, 64, 6)), "perm_d 6 does not divide"),
                    (desc(("f32", 160, 64, 0)) * torch.tensor([1] + [0] * 15), "null pointer")):
        a.w_gate_up, a.w_down = gu.data_ptr(), down.data_ptr()
        with pytest.raises(RuntimeError, match=msg):
            cpu.C.mlp_block(a)
    x = _attn_inputs(_rand(1), torch.float32, **SH)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16 activations"):
        _run_attn(cpu.ops, x, x["wqkv"].double(), x["wo"].double(), torch.float64)
    with pytest.raises(RuntimeError, match="lacks|unknown instruction set"):
        cpu.set_isa("avx1024")
    assert backends.why_not("cpu", "cpu", torch.float64) is not None


def test_step_program_equals_eager_launches(monkeypatch):
    """A decode step recorded once and run natively gives the eager launches' logits, bit for bit, at every
    step (the same tokens fed to both), also after D3 drops layers and with fill "project"."""
    from d3kernels.decoder import Decoder
    from d3kernels.model import random_model
    from d3kernels.schedule import D3Schedule
    import dataclasses
    m = random_model(L=6, d=96, H=3, H_kv=1, D=32, F=160, V=301)
    w = m.weights
    m = type(m)(m.config, dataclasses.replace(w, **{k: quant.quantize(getattr(w, k), "q4_1") for k in
                                                    ("wqkv", "wo", "w_gate_up", "w_down")}))
    assert m.weights.packed
    sched = D3Schedule(6, alpha=0.8)
    assert len(sched.kept_layers(12)) < 6
    runs, tokens = [], None
    for programs in ("1", "0"):
        monkeypatch.setenv("D3K_CPU_PROGRAMS", programs)
        dec = Decoder(m, sched, max_seq_len=64, backend="cpu", fill="project")
        logits = [dec.prefill([[1, 2, 3, 4]]).clone()]
        fed = tokens or [int(logits[0].argmax())] + [None] * 12
        for i in range(12):
            logits.append(dec.step([fed[i]]).clone())
            fed[i + 1] = fed[i + 1] if tokens else int(logits[-1].argmax())
        tokens = fed
        runs.append((logits, dec.stats()))
    for i, (a, b) in enumerate(zip(runs[0][0], runs[1][0])):
        assert torch.equal(a, b), f"step {i}: the program's logits differ from the eager launches'"
    assert runs[0][1]["cpu_programs"] > 0 and runs[1][1]["cpu_programs"] == 0
    assert runs[0][1]["op_calls"] == runs[1][1]["op_calls"]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_decode_steps_match_the_reference(dtype):
    """8 D3 steps of a float model (activations and weights in `dtype`) on the cpu backend, teacher-forced
    on its own tokens: each step's logits against the reference Decoder's at the same dtype, by the rule of
    docs/design.md section 6 (oracle: the reference on the weights' float32 values)."""
    from d3kernels.decoder import Decoder
    from d3kernels.model import Model, random_model
    from d3kernels.schedule import D3Schedule
    m = random_model(L=4, d=96, H=3, H_kv=1, D=32, F=160, V=301, dtype=dtype, seed=7)
    m32 = Model(m.config, m.weights.to(torch.float32))
    sched = D3Schedule(4, alpha=0.8, start=0.25, tail=1)
    decs = [Decoder(mm, sched, max_batch=2, max_seq_len=32, backend=b)
            for mm, b in ((m, "cpu"), (m, "reference"), (m32, "reference"))]
    logits = [dec.prefill([[5, 17, 3, 99, 42], [7, 150, 2]]) for dec in decs]
    for i in range(1, 9):
        tokens = logits[0].argmax(-1)
        logits = [dec.step(tokens) for dec in decs]
        problem, _, _ = compare(logits[0], logits[1], logits[2], dtype)
        assert problem is None, f"step {i} ({dtype}): {problem}"
    assert len(sched.kept_layers(8)) < 4


@pytest.mark.slow
def test_greedy_decode_on_the_embedded_model_matches_the_reference():
    """Teacher-forced on the reference's greedy tokens: the cpu backend on the packed GGUF (q4_1, q8_0) picks
    the same token wherever the reference's top-2 margin is clear, and its generated text is the same."""
    import d3kernels
    from d3kernels.decoder import Decoder
    from d3kernels.schedule import D3Schedule
    m = d3kernels.load_model(packed=True)
    assert m.weights.packed and set(quant.storage(m.weights.wqkv)) == {"q4_1"}
    assert set(quant.storage(m.weights.embed)) == {"q8_0"}
    tok = m.tokenizer
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}],
                                      add_generation_prompt=True, tokenize=False))["input_ids"]
    sched = D3Schedule(m.config.num_layers, alpha=0.995)
    r = Decoder(m.dequantized(), sched, max_seq_len=256, backend="reference")
    c = Decoder(m, sched, max_seq_len=256, backend="cpu")
    want = torch.as_tensor(r.generate(ids, max_new_tokens=24).tokens[0]).tolist()
    lr, lc = r.prefill(ids).clone(), c.prefill(ids).clone()
    worst = 0.0
    for t in want:
        top = lr[0].topk(2).values
        if top[0] - top[1] > 0.05:
            assert lc[0].argmax() == lr[0].argmax()
        worst = max(worst, (lc - lr).abs().max().item())
        lr, lc = r.step([t]).clone(), c.step([t]).clone()
    assert worst < 0.05, f"logits differ by {worst} (the 16-bit rounding gives ~0.005)"
    assert torch.as_tensor(c.generate(ids, max_new_tokens=24).tokens[0]).tolist() == want


def test_planted_bug_one_block_scale_ignored_fails(tmp_path):
    """A kernel that ignores one block's scale (block 1 of every row, scalar path) must fail the op test."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import emu_variants
    if emu_variants.cpu_build_dir() is None:
        pytest.skip("no CMake build of d3kernels._C_cpu under build/ (install from source: pip install -e .)")
    mod = emu_variants.build_cpu_variant(tmp_path, {"include/d3k/cpu/kernels_impl.h": [(
        "        part += sc[2 * g + h] * (float)s;",
        "        part += (c == 0 && g == 1 ? 1.0f : sc[2 * g + h]) * (float)s;")]},
        ["isa_scalar.cpp"])
    mod.set_isa("scalar")
    bad = cpu.CpuKernels(mod)
    r = _rand(3)
    x = _attn_inputs(r, torch.float32, **SH)
    pq, q64 = _pack(x["wqkv"], "q4_1")
    po, o64 = _pack(x["wo"], "q4_1")
    got = _run_attn(bad, x, pq, po, torch.float32)
    want = _run_attn(ref, x, q64.float(), o64.float(), torch.float32)
    oracle = _run_attn(ref, x, q64, o64, torch.float64)
    problem, _, _ = compare(got[0], want[0], oracle[0], torch.float32, slack=PACKED_SLACK)
    assert problem is not None, "the planted bug went unnoticed"
    # and the unmutated build passes the same case
    good = _run_attn(cpu.CpuKernels(), x, pq, po, torch.float32)
    assert compare(good[0], want[0], oracle[0], torch.float32, slack=PACKED_SLACK)[0] is None


def _interleave(w, heads):
    """HF-order rows [heads D, cols] in llama.cpp's interleaved-RoPE storage order (what a GGUF holds)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def test_row_blocks_of_mixed_types_and_interleaved_rows():
    """A Q4_K_M-like layer: wqkv = [q (q4_K, interleaved rows); k (q6_K, interleaved); v (q8_0)], gate / up in
    two types, and a stack whose layers differ in type (write_kv "project" reads every layer's K/V rows)."""
    r = _rand(21)
    sh = SHK
    B, d, H, H_kv, D, F, L, S = (sh[k] for k in ("B", "d", "H", "H_kv", "D", "F", "L", "S"))
    x = _attn_inputs(r, torch.float32, **sh)
    q, k, v = x["wqkv"].split([H * D, H_kv * D, H_kv * D])
    parts = [quant.PackedWeight(quant.quantize(_interleave(q, H), "q4_K").data, "q4_K", d, heads=H),
             quant.PackedWeight(quant.quantize(_interleave(k, H_kv), "q6_K").data, "q6_K", d, heads=H_kv),
             quant.quantize(v, "q8_0")]
    wqkv = quant.PackedRows(parts)
    q64 = wqkv.dequantize().double()
    assert (q64[: H * D] - q.double()).abs().max() < 0.1 * q.abs().max(), "un-permuted on dequantize"
    po, o64 = _pack(x["wo"], "q5_K")
    for isa in ("avx2", "scalar"):
        with _isa(isa):
            got = _run_attn(cpu.ops, x, wqkv, po, torch.float32)
        want = _run_attn(ref, x, q64.float(), o64.float(), torch.float32)
        oracle = _run_attn(ref, x, q64, o64, torch.float64)
        for name, g, w, o in zip(("out", "k_cache", "v_cache"), got, want, oracle):
            _check(g, w, o, torch.float32, True, f"attn_block {name} (mixed row blocks, {isa})")
    gu = quant.PackedRows([quant.quantize(r(F, d, scale=d ** -0.5), "q4_K"),
                           quant.quantize(r(F, d, scale=d ** -0.5), "q6_K")])
    dn, dn64 = _pack(r(d, F, scale=F ** -0.5), "q6_K")
    outs = []
    for ops, a, b, dt in ((cpu.ops, gu, dn, torch.float32), (ref, gu.dequantize(), dn64.float(), torch.float32),
                          (ref, gu.dequantize().double(), dn64, torch.float64)):
        out = torch.empty(B, d, dtype=dt)
        ops.mlp_block(out, x["h"].to(dt), x["norm"].to(dt), a, b, x["active"], EPS)
        outs.append(out)
    _check(*outs, torch.float32, True, "mlp_block (mixed row blocks)")
    # a stack with a type per layer, some layers interleaved
    R = (H + 2 * H_kv) * D
    types = ("q4_K", "q6_K", "q8_0", "f16")
    layers = []
    for t in types:
        wl = r(R, d, scale=d ** -0.5)
        kq, kk, kv = wl.split([H * D, H_kv * D, H_kv * D])
        layers.append(quant.PackedRows([quant.quantize(q_, t) for q_ in (kq, kk)] + [quant.quantize(kv, "q4_K")])
                      if t != "q8_0" else
                      quant.PackedRows([quant.PackedWeight(quant.quantize(_interleave(kq, H), t).data, t, d, heads=H),
                                        quant.PackedWeight(quant.quantize(_interleave(kk, H_kv), t).data, t, d,
                                                           heads=H_kv), quant.quantize(kv, t)]))
    stack = quant.PackedStack(layers)
    w64 = stack.dequantize().double()
    norms, src, cos, sin = 1 + 0.1 * r(L, d), r(B, d), r(S, D // 2), r(S, D // 2)
    pos = torch.tensor([3, 9, 17], dtype=torch.int32)
    flags = torch.tensor([[0, 0, 1], [1, 1, 1], [1, 0, 1], [0, 1, 1]], dtype=torch.uint8)
    res = []
    for ops, ww, dt in ((cpu.ops, stack, torch.float32), (ref, w64.float(), torch.float32), (ref, w64, torch.float64)):
        k, v = r(L, B, H_kv, S, D).to(dt), r(L, B, H_kv, S, D).to(dt)
        k.zero_(), v.zero_()
        valid = torch.zeros(L, B, S, dtype=torch.uint8)
        ops.write_kv(k, v, valid, src.to(dt), norms.to(dt), ww, None, pos, cos, sin, flags, "project", EPS)
        res.append((k, v, valid))
    for i, name in enumerate(("k_cache", "v_cache")):
        _check(res[0][i], res[1][i], res[2][i], torch.float32, True, f"write_kv project {name} (a type per layer)")
    assert torch.equal(res[0][2], res[1][2])


_GGML = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_K": 12, "q5_K": 13, "q6_K": 14}


def _random_blocks(rng, qtype, rows, cols):
    """Random bytes in every field, with finite f16 scales of a realistic size (scales of 0 included)."""
    import numpy as np
    per, nbytes = quant.QTYPES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // per, nbytes), dtype=np.uint8)

    def f16(scale):
        v = (rng.standard_normal((rows, cols // per)) * scale).astype(np.float16)
        v[0, 0] = 0
        return v.view(np.uint8).reshape(rows, cols // per, 2)
    fields = {"q4_0": [(0, .01)], "q5_0": [(0, .01)], "q8_0": [(0, .01)], "q4_1": [(0, .01), (2, .05)],
              "q5_1": [(0, .01), (2, .05)], "q4_K": [(0, 1e-3), (2, 1e-3)], "q5_K": [(0, 1e-3), (2, 1e-3)],
              "q6_K": [(208, 1e-3)]}[qtype]
    for off, scale in fields:
        raw[..., off:off + 2] = f16(scale)
    return raw.reshape(rows, -1)


def _round_activations(x: torch.Tensor) -> torch.Tensor:
    """float64 [N, K]: the cpu backend's 16-bit rounding of float32 rows x [N, K] (K a multiple of 32), emulated:
    q = round_half_even(x * (1 / dx)) in float32, dx = amax / 32512 per span of 256 values (the last shorter)."""
    out = torch.empty(x.shape, dtype=torch.float64)
    for s0 in range(0, x.shape[1], 256):
        xb = x[:, s0:s0 + 256]
        dx = xb.abs().amax(-1, keepdim=True) / 32512
        inv = torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
        out[:, s0:s0 + 256] = torch.round((xb * inv).double()) * dx.double()
    return out


@pytest.mark.parametrize("isa", ISAS)
def test_block_dot_equals_rounding_emulation(isa):
    """The integer kernels compute exactly the specified math: every block type's row decode equals gguf-py's
    (an independent implementation) bit for bit, and its dot products (GEMV and GEMM tiles) equal a float64
    emulation of the 16-bit activation rounding (dx = amax / 32512 per span of 256 values, the last span of a
    row shorter; round half to even) within float32 summation error."""
    import numpy as np
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(5)
    with _isa(isa):
        for qt in BLOCK_TYPES:
            # spans of 256: whole ones, a row of one short span (96, 32), and whole spans then a short one (576:
            # the embedded model's width)
            shapes = [(33, 512), (16, 2048)] + ([(24, 96), (8, 32), (8, 576)] if quant.QTYPES[qt][0] == 32 else [])
            for R, K in shapes:
                raw = _random_blocks(rng, qt, R, K)
                theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(_GGML[qt])).reshape(R, K)
                w = quant.PackedWeight(torch.from_numpy(raw), qt, K)
                ids = torch.arange(R)
                assert torch.equal(w.rows(ids), torch.from_numpy(np.ascontiguousarray(theirs, dtype=np.float32))), qt
                for N in (1, 2, 7, 33):   # the GEMV, and the GEMM's tiles of 8, 4, 2, 1 rows with their edges
                    x = torch.randn(N, K, generator=torch.Generator().manual_seed(R))
                    y = cpu.linear(x, w)
                    want = _round_activations(x) @ torch.from_numpy(theirs.astype(np.float64)).t()
                    err = (y.double() - want).abs().max().item()
                    assert err <= 1e-5 * want.abs().max().item(), (qt, R, K, N, err)
                    if N > 1:   # batch invariance: a row's result does not depend on the rows beside it
                        assert torch.equal(y[-1:], cpu.linear(x[-1:], w)), (qt, R, K, N)


def test_planted_bug_in_a_gemm_tile_edge_fails(tmp_path):
    """A GEMM whose last single-row tile reads the previous activation row must fail the rounding emulation
    check above (7 rows = tiles of 4, 2 and 1), while 8 rows (one whole tile) still pass."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import emu_variants
    if emu_variants.cpu_build_dir() is None:
        pytest.skip("no CMake build of d3kernels._C_cpu under build/ (install from source: pip install -e .)")
    if "avx2" not in cpu.C.build_info()["isas"]:
        pytest.skip("this CPU lacks the avx2 instructions")
    mod = emu_variants.build_cpu_variant(tmp_path, {"include/d3k/cpu/kernels_impl.h": [(
        "    if (b < nx) pass<F, 1>(w, ld, rb, re, xs + b, y + b * ldy, ldy, K, perm_d);",
        "    if (b < nx) pass<F, 1>(w, ld, rb, re, xs + b - 1, y + b * ldy, ldy, K, perm_d);")]},
        ["isa_avx2.cpp"])
    mod.set_isa("avx2")
    w = quant.quantize(torch.randn(40, 256, generator=torch.Generator().manual_seed(1)), "q4_0")
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    want = x.double() @ w.dequantize().double().t()
    for n, bad in ((7, True), (8, False)):
        y = torch.empty(n, 40)
        mod.linear(y.data_ptr(), x[:n].contiguous().data_ptr(), w.data.data_ptr(), quant.CODES["q4_0"],
                   w.data.shape[1], 0, n, 40, 256)
        err = (y.double() - want[:n]).abs().max().item()
        assert (err > PACKED_SLACK * want.abs().max().item()) == bad, (n, err)
