"""The CUDA backend (d3kernels._C via d3kernels._ops) against the reference.

CPU part (runs everywhere): the availability flags and argument rejection. The
torch.library registration of torch.ops.d3k.* (schemas, opcheck, fake kernels,
the reference as CPU kernel, torch.compile on the CPU) is tested in
test_op_api.py.

GPU part (marker `gpu`; skipped without a GPU or without the kernels in _C):
each op against the reference by tolerance.assert_close (float64 oracle = the
reference on float64 copies, same_precision = the reference at the test dtype),
outputs poisoned with NaN, caches poisoned with NaN wherever kv_valid = 0 (the
kernels must not read them), untouched cache entries compared bit for bit,
kv_valid exactly. Real model shapes (Llama-3.2-1B, Llama-3-8B, Llama-2-7B MHA,
Qwen2-7B with bias, SmolLM2-135M) and odd ones (scalar K path, G > 8, B > 16).
Tests whose id contains "small" are sized for compute-sanitizer:
    compute-sanitizer --tool memcheck python -m pytest python_tests/test_cuda_ops.py -m gpu -k small
"""
import math

import pytest
import torch

from tolerance import SLACK, assert_close, poison

from helpers import cache_rows, launch_args, tiny_model
from test_op_api import cpu_args as _cpu_args

from d3kernels import D3Schedule, Decoder, _ops, backends, guarded, ops
from d3kernels.model import Model, Weights
from d3kernels import reference as ref

EPS = 1e-5
DTYPES = [torch.bfloat16, torch.float16]
_HAS_GPU = torch.cuda.is_available()


def _gpu_skip_reason():
    if not _HAS_GPU:
        return "needs a CUDA GPU"
    if not _ops.CUDA_OPS_AVAILABLE:
        return f"d3kernels._C has no CUDA kernels: {_ops.C_ERROR}"
    return _ops.arch_problem("cuda")


def _require_gpu():
    r = _gpu_skip_reason()
    if r is not None:
        pytest.skip(r)


# =========================================================================== CPU: registration
def _rope(S, D, theta=10000.0, device="cpu"):
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    f = torch.outer(torch.arange(S, dtype=torch.float64), inv)
    return f.cos().float().to(device), f.sin().float().to(device)


def test_availability_flags():
    assert isinstance(_ops.CUDA_OPS_AVAILABLE, bool)
    if _ops.C is None:
        assert not _ops.CUDA_OPS_AVAILABLE
        assert _ops.arch_problem("cuda") == _ops.C_ERROR
    else:
        assert "CUDA tensors" in _ops.arch_problem("cpu")
    assert backends.why_not("cuda", "cpu", torch.bfloat16) is not None
    for name in ("attn_block", "mlp_block", "write_kv", "lm_head", "sample"):
        assert callable(getattr(_ops.cuda_ops, name))


def test_arch_problem_names_the_build_knob(monkeypatch):
    if _ops.C is None:
        pytest.skip("_C not built")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Fake T4")
    _ops._arch_problem_for.cache_clear()
    try:
        msg = _ops.arch_problem(torch.device("cuda", 0))
        assert msg is not None and "D3K_CUDA_ARCHS" in msg and "7.5" in msg
        built = _ops.build_info()["cuda_archs"][0]
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (built // 10, built % 10))
        _ops._arch_problem_for.cache_clear()
        assert _ops.arch_problem(torch.device("cuda", 0)) is None
    finally:
        _ops._arch_problem_for.cache_clear()


def test_cuda_ops_reject_cpu_tensors():
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        _ops.cuda_ops.mlp_block(*_cpu_args("mlp_block"))
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        _ops.cuda_ops.sample(torch.empty(2, dtype=torch.int64), torch.randn(2, 5))


@pytest.mark.skipif(not _ops.CUDA_OPS_AVAILABLE, reason="d3kernels._C has no CUDA kernels")
def test_launchers_validate_before_touching_the_gpu():
    """The C++ launchers check their arguments first (no CUDA call), so this runs anywhere."""
    C, p = _ops.C, 256                       # p: a fake 16-byte aligned device address
    mlp = dict(B=1, d=8, F=8, eps=EPS, dtype=1)
    with pytest.raises(RuntimeError, match="dtype code 7 is not supported"):
        C.mlp_block(launch_args(C, "MlpBlockArgs", p, **{**mlp, "dtype": 7}))
    with pytest.raises(RuntimeError, match="null pointer"):
        C.mlp_block(launch_args(C, "MlpBlockArgs", p, h=0, **mlp))
    attn = dict(B=1, d=64, H=2, Hkv=1, D=64, S=16, rope_len=16, rope_ld=32, num_splits=1, eps=EPS, dtype=1)
    with pytest.raises(RuntimeError, match="head_dim 32 is not supported"):
        C.attn_block(launch_args(C, "AttnBlockArgs", p, **{**attn, "D": 32, "rope_ld": 16}))
    with pytest.raises(RuntimeError, match="multiple of H_kv"):
        C.attn_block(launch_args(C, "AttnBlockArgs", p, **{**attn, "H": 3, "Hkv": 2}))
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        C.attn_block(launch_args(C, "AttnBlockArgs", p, k_cache=p + 8, **attn))
    with pytest.raises(RuntimeError, match="null pointer"):
        C.lm_head(launch_args(C, "LmHeadArgs", p, logits=0, B=1, d=8, V=8, eps=EPS, dtype=1))
    kv = dict(L=2, B=1, d=8, H=2, Hkv=1, D=64, S=16, rope_len=16, rope_ld=32, eps=EPS, dtype=1)
    with pytest.raises(RuntimeError, match="mode code 5"):
        C.write_kv(launch_args(C, "WriteKvArgs", p, mode=5, **kv))
    with pytest.raises(RuntimeError, match="head_dim 96"):
        C.write_kv(launch_args(C, "WriteKvArgs", p, **{**kv, "D": 96, "rope_ld": 48}))
    with pytest.raises(AttributeError):      # fields are set by name: a misspelt one cannot pass silently
        launch_args(C, "WriteKvArgs", p, H_kv=1)
    with pytest.raises(RuntimeError, match="row stride"):
        C.argmax(p, p, 2, 100, 50, 0, 0)


# =========================================================================== targets
# Every kernel test runs on two targets:
# - "gpu": d3kernels._C on a CUDA GPU (marker `gpu`), every case, real model shapes included;
# - "emu": d3kernels._C_emu, the same csrc/ code on the SIMT emulation layer, on CPU tensors, the
#   "small" cases only (emulation speed). Each emu case runs under EMU_SEEDS (different thread and
#   block orders, guard pages after and before the buffers) and the results must agree bit for bit;
#   every tensor the kernels see is page-guarded (an access past it fails the launch) and the scratch
#   is poisoned for every call.
EMU_SEEDS = (1, 2, 3)


class Target:
    """Where a kernel test runs; `ops` may be another CudaKernels over an emulated variant (test_emu.py)."""

    def __init__(self, name, ops=None):
        self.name = name
        self.emu = name == "emu"
        self.device = "cpu" if self.emu else "cuda"
        self.ops = ops or (_ops.cuda_emu_ops if self.emu else _ops.cuda_ops)

    def skip_reason(self):
        if self.emu:
            return None if _ops.cuda_emu_ops.available else f"d3kernels._C_emu is not built: {_ops.C_EMU_ERROR}"
        return _gpu_skip_reason()


def _params(table, dtypes=DTYPES):
    """(target, case, dtype) parameters: every case on the GPU, the "small" ones also emulated."""
    out = []
    for case in table:
        for dt in dtypes:
            dts = str(dt).replace("torch.", "")
            out.append(pytest.param("gpu", case, dt, marks=pytest.mark.gpu, id=f"gpu-{case}-{dts}"))
            if case.startswith("small"):
                out.append(pytest.param("emu", case, dt, id=f"emu-{case}-{dts}"))
    return out


def _target(name) -> Target:
    t = Target(name)
    r = t.skip_reason()
    if r is not None:
        pytest.skip(r)
    return t


TARGETS = [pytest.param("gpu", marks=pytest.mark.gpu, id="gpu"), pytest.param("emu", id="emu")]


# =========================================================================== helpers
def _rn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, device=g.device) * scale


def _gen(t: Target, seed):
    return torch.Generator(device=t.device).manual_seed(seed)


def _f64(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else (
        t.clone() if isinstance(t, torch.Tensor) else t)


def _clone(t):
    return t.clone() if isinstance(t, torch.Tensor) else t


def _same(name, a, b):
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


def _poison_gpu_scratch():
    """The GPU backend caches its scratch across calls: poison it, so a kernel that reads scratch it did not
    write in this call fails (the split counters too: k1 must zero them)."""
    from d3kernels import workspace
    for t in workspace.active().buffers.values():
        if isinstance(t, torch.Tensor):
            poison(t) if t.is_floating_point() else t.fill_(0x7B7B7B7B)


def _kernel_args(args, at_end):
    """Guarded copies (emu) of the tensors a kernel sees."""
    return [guarded.like(a, at_end=at_end) if isinstance(a, torch.Tensor) else a for a in args]


def run_kernel(t: Target, op: str, args, prepare=None):
    """Run `op` of the target's kernels on copies of `args` and return the copies. On the emulation, once per
    seed of EMU_SEEDS, with the guard page after the buffers for odd seeds and before them for even ones;
    the runs must agree bit for bit (a race or an order dependence shows as a difference).
    `prepare(at_end)` may build the emulation's guarded arguments instead of plain guarded copies."""
    if not t.emu:
        _poison_gpu_scratch()
        ours = [_clone(a) for a in args]
        getattr(t.ops, op)(*ours)
        torch.cuda.synchronize()
        return ours
    runs = []
    for seed in EMU_SEEDS:
        t.ops.C.set_seed(seed)
        ours = (prepare or (lambda at_end: _kernel_args(args, at_end)))(seed % 2 == 1)
        getattr(t.ops, op)(*ours)
        runs.append(ours)
    for seed, other in zip(EMU_SEEDS[1:], runs[1:]):
        for i, (a, b) in enumerate(zip(runs[0], other)):
            if isinstance(a, torch.Tensor):
                _same(f"{op} argument {i}: seed {EMU_SEEDS[0]} vs seed {seed}", a, b)
    return runs[0]


def _run3(t: Target, op: str, args):
    """The target's kernels, the reference at the test dtype and the float64 reference, each on copies of
    `args` (outputs were poisoned by the caller). Returns (ours, same_precision, oracle64)."""
    ours = run_kernel(t, op, args)
    same = [_clone(a) for a in args]
    o64 = [_f64(a) for a in args]
    getattr(ref, op)(*same)
    getattr(ref, op)(*o64)
    return ours, same, o64


# =========================================================================== attn_block
# name: (B, d, H, H_kv, D, S, positions, active, holes [(b, p)], bias)
# On the emulated (and the real) H100-sized device, attn_plan splits S = 700 into 3 splits of 256.
ATTN = {
    "small_gqa_splits": (3, 256, 8, 2, 64, 700, [0, 450, 699], [1, 1, 1], [(1, 3), (1, 300), (2, 0), (2, 698)], True),
    "small_mha_inactive": (4, 136, 2, 2, 128, 300, [5, 299, 30, 2], [1, 0, 1, 1], [(0, 2), (2, 29)], False),
    "small_scalar_g12": (2, 203, 12, 1, 64, 520, [519, 260], [1, 1], [(0, 100), (1, 0)], True),
    "small_g16_b17": (17, 64, 16, 1, 128, 300, [(7 * b) % 300 for b in range(17)], [1] * 15 + [0, 1], [(3, 1)],
                      False),
    # B = 1, a middle split whose positions are all masked (kv_valid = 0 over [256, 512)), D = 128
    "small_b1_masked_split": (1, 128, 4, 1, 128, 800, [799], [1], [(0, p) for p in range(256, 512)], False),
    "llama32_1b_b1": (1, 2048, 32, 8, 64, 8192, [5000], [1], [(0, 17)], False),
    "llama32_1b_b4": (4, 2048, 32, 8, 64, 8192, [4097, 10, 8000, 0], [1, 1, 0, 1], [(0, 4000), (1, 3)], False),
    "llama32_1b_32k": (1, 2048, 32, 8, 64, 32768, [32767], [1], [(0, 20000)], False),
    "llama3_8b": (2, 4096, 32, 8, 128, 6000, [4100, 77], [1, 1], [], False),
    "llama2_7b_mha": (1, 4096, 32, 32, 128, 2048, [2047], [1], [(0, 1000)], False),
    "qwen2_7b_bias": (3, 3584, 28, 4, 128, 6000, [5000, 1, 4096], [1, 1, 1], [(2, 4095)], True),
    "smollm2_b16": (16, 576, 9, 3, 64, 2048, [(b * 127) % 2048 for b in range(16)], [1] * 16, [(5, 3)], False),
}


def _attn_args(t: Target, case, dtype, seed=0):
    B, d, H, H_kv, D, S, positions, active, holes, bias = case
    dev = t.device
    g = _gen(t, seed)
    R = (H + 2 * H_kv) * D
    k, v, kv_valid = cache_rows(g, B, H_kv, S, D, positions, holes, dtype)   # NaN: the kernel skips kv_valid = 0
    cos, sin = _rope(S, D, device=dev)
    out = poison(torch.empty(B, d, dtype=dtype, device=dev))
    return [out, _rn(g, B, d).to(dtype), (1 + 0.1 * _rn(g, d)).to(dtype), _rn(g, R, d, scale=d ** -0.5).to(dtype),
            _rn(g, R, scale=0.1).to(dtype) if bias else None, _rn(g, d, H * D, scale=(H * D) ** -0.5).to(dtype),
            k, v, kv_valid, torch.tensor(positions, dtype=torch.int32, device=dev), cos, sin,
            torch.tensor(active, dtype=torch.uint8, device=dev), EPS]


def _check_attn(case, dtype, ours, same, o64):
    B, d, H, H_kv, D, S, positions, active, holes, bias = case
    assert_close("out", ours[0], same[0], o64[0], dtype)
    for b in range(B):
        if not active[b]:
            _same(f"out[{b}] (inactive = h)", ours[0][b], ours[1][b])
    _same("kv_valid", ours[8], same[8])
    for i, name in ((6, "k_cache"), (7, "v_cache")):
        written = torch.zeros(B, S, dtype=torch.bool, device=ours[i].device)
        for b, p in enumerate(positions):
            if active[b]:
                written[b, p] = True
                assert_close(f"{name}[{b}, :, {p}]", ours[i][b, :, p], same[i][b, :, p], o64[i][b, :, p], dtype)
        keep = (~written)[:, None, :, None].expand_as(ours[i])
        _same(f"{name} (untouched)", ours[i][keep], same[i][keep])


@pytest.mark.parametrize("target,case,dtype", _params(ATTN))
def test_attn_block(target, case, dtype):
    t = _target(target)
    c = ATTN[case]
    ours, same, o64 = _run3(t, "attn_block", _attn_args(t, c, dtype))
    _check_attn(c, dtype, ours, same, o64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", TARGETS)
def test_small_attn_block_out_aliases_h(target, dtype):
    """out may be h itself (in-place residual): same result as separate buffers, bit for bit."""
    t = _target(target)
    c = ATTN["small_gqa_splits"]
    a = _kernel_args(_attn_args(t, c, dtype), at_end=True) if t.emu else _attn_args(t, c, dtype)
    b = [_clone(x) for x in a]
    t.ops.attn_block(*a)
    b[0] = b[1]
    t.ops.attn_block(*b)
    _same("out (aliased)", b[1], a[0])
    _same("k_cache (aliased)", b[6], a[6])


@pytest.mark.parametrize("target", TARGETS)
def test_small_attn_block_bad_position_gives_nan(target):
    """An active row with pos outside [0, S) cannot raise without a host sync: its out row is NaN and
    it writes nothing; the other rows are unaffected."""
    t = _target(target)
    c = ATTN["small_mha_inactive"]
    a = _attn_args(t, c, torch.bfloat16)
    good = run_kernel(t, "attn_block", a)
    for bad in (c[5], -1):                  # row 2: pos = S, then pos = -1
        a[9][2] = bad
        ours = run_kernel(t, "attn_block", a)
        assert torch.isnan(ours[0][2].float()).all()
        _same("k_cache row 2", ours[6][2], a[6][2])
        _same("v_cache row 2", ours[7][2], a[7][2])
        _same("kv_valid row 2", ours[8][2], a[8][2])
        for b in (0, 1, 3):
            _same(f"out[{b}]", ours[0][b], good[0][b])
        with pytest.raises(ValueError, match="row 2 has position"):      # the reference checks on the host
            ref.attn_block(*[_clone(x) for x in a])


# =========================================================================== mlp_block
# name: (B, d, F, active)
MLP = {
    "small_vec": (3, 256, 520, [1, 0, 1]),
    "small_scalar": (2, 203, 517, [1, 1]),
    "small_b17": (17, 64, 96, [1] * 16 + [0]),
    "small_b1": (1, 128, 200, [1]),
    "llama32_1b_b1": (1, 2048, 8192, [1]),
    "llama32_1b_b4": (4, 2048, 8192, [1, 1, 0, 1]),
    "llama3_8b": (2, 4096, 14336, [1, 1]),
    "llama2_7b": (1, 4096, 11008, [1]),
    "qwen2_7b": (3, 3584, 18944, [1, 1, 1]),
    "smollm2_b16": (16, 576, 1536, [1] * 16),
}


def _mlp_args(t: Target, case, dtype, seed=1):
    B, d, F, active = case
    g = _gen(t, seed)
    return [poison(torch.empty(B, d, dtype=dtype, device=t.device)), _rn(g, B, d).to(dtype),
            (1 + 0.1 * _rn(g, d)).to(dtype), _rn(g, 2 * F, d, scale=d ** -0.5).to(dtype),
            _rn(g, d, F, scale=F ** -0.5).to(dtype), torch.tensor(active, dtype=torch.uint8, device=t.device), EPS]


@pytest.mark.parametrize("target,case,dtype", _params(MLP))
def test_mlp_block(target, case, dtype):
    t = _target(target)
    c = MLP[case]
    ours, same, o64 = _run3(t, "mlp_block", _mlp_args(t, c, dtype))
    assert_close("out", ours[0], same[0], o64[0], dtype)
    for b, a in enumerate(c[3]):
        if not a:
            _same(f"out[{b}] (inactive = h)", ours[0][b], ours[1][b])


@pytest.mark.parametrize("target", TARGETS)
def test_small_mlp_block_out_aliases_h(target):
    t = _target(target)
    a = _mlp_args(t, MLP["small_vec"], torch.bfloat16)
    a = _kernel_args(a, at_end=True) if t.emu else a
    b = [_clone(x) for x in a]
    t.ops.mlp_block(*a)
    b[0] = b[1]
    t.ops.mlp_block(*b)
    _same("out (aliased)", b[1], a[0])


# =========================================================================== lm_head
# name: (B, d, V)
HEAD = {
    "small_vec": (2, 256, 1001),
    "small_scalar": (3, 203, 769),
    "small_b17": (17, 64, 100),
    "small_b1": (1, 128, 515),
    "llama32_1b": (1, 2048, 128256),
    "llama32_1b_b5": (5, 2048, 128256),
    "smollm2_b16": (16, 576, 49152),
}


@pytest.mark.parametrize("target,case,dtype", _params(HEAD))
def test_lm_head(target, case, dtype):
    t = _target(target)
    B, d, V = HEAD[case]
    g = _gen(t, 2)
    args = [poison(torch.empty(B, V, device=t.device)), _rn(g, B, d).to(dtype), (1 + 0.1 * _rn(g, d)).to(dtype),
            _rn(g, V, d, scale=3 * d ** -0.5).to(dtype), EPS]
    ours, same, o64 = _run3(t, "lm_head", args)
    # the outputs are float32: the bound uses the fp32 reference error plus the bf16/fp16 slack
    assert_close("logits", ours[0], same[0], o64[0], dtype)


# =========================================================================== write_kv
# name: (L, B, d, H, H_kv, D, S, bias)
KV = {
    "small_vec": (4, 3, 256, 4, 2, 64, 40, True),
    "small_scalar": (3, 2, 203, 2, 1, 128, 20, False),
    "small_b17": (3, 17, 64, 2, 2, 64, 12, True),
    "llama32_1b": (3, 2, 2048, 32, 8, 64, 5000, False),
    "qwen2_7b": (2, 2, 3584, 28, 4, 128, 300, True),
}


def _kv_args(t: Target, case, dtype, mode, seed=3):
    L, B, d, H, H_kv, D, S, bias = case
    dev = t.device
    g = _gen(t, seed)
    R = (H + 2 * H_kv) * D
    pos = torch.randint(0, S, (B,), generator=g, device=dev, dtype=torch.int32)
    flags = (torch.rand(L, B, generator=g, device=dev) < 0.5).to(torch.uint8)
    flags[0, 0] = 0
    flags[1, 0] = 1                          # row 0: layer 1 has a source below it
    if B > 1:
        flags[:, 1] = 1                      # row 1: every layer flagged (copy has no source: mask)
    kv_valid = (torch.rand(L, B, S, generator=g, device=dev) < 0.7).to(torch.uint8)
    cos, sin = _rope(S, D, device=dev)
    return [_rn(g, L, B, H_kv, S, D).to(dtype), _rn(g, L, B, H_kv, S, D).to(dtype), kv_valid,
            _rn(g, B, d).to(dtype), (1 + 0.1 * _rn(g, L, d)).to(dtype), _rn(g, L, R, d, scale=d ** -0.5).to(dtype),
            _rn(g, L, R, scale=0.1).to(dtype) if bias else None, pos, cos, sin, flags, mode, EPS]


@pytest.mark.parametrize("mode", ["mask", "project", "copy"])
@pytest.mark.parametrize("target,case,dtype", _params(KV))
def test_write_kv(target, case, dtype, mode):
    t = _target(target)
    L, B, d, H, H_kv, D, S, bias = KV[case]
    args = _kv_args(t, KV[case], dtype, mode)
    ours, same, o64 = _run3(t, "write_kv", args)
    _same("kv_valid", ours[2], same[2])
    if mode != "project":
        _same("k_cache", ours[0], same[0])
        _same("v_cache", ours[1], same[1])
        return
    pos, flags = args[7].tolist(), args[10].bool()
    for i, name in ((0, "k_cache"), (1, "v_cache")):
        written = torch.zeros(L, B, S, dtype=torch.bool, device=t.device)
        for b, p in enumerate(pos):
            written[flags[:, b], b, p] = True
        for l in range(L):
            for b, p in enumerate(pos):
                if flags[l, b]:
                    assert_close(f"{name}[{l}, {b}, :, {p}]", ours[i][l, b, :, p], same[i][l, b, :, p],
                                 o64[i][l, b, :, p], dtype)
        keep = (~written)[:, :, None, :, None].expand_as(ours[i])
        _same(f"{name} (untouched)", ours[i][keep], same[i][keep])


@pytest.mark.parametrize("target", TARGETS)
def test_small_write_kv_skips_out_of_range_positions(target):
    """Flagged rows whose pos is outside [0, S) are left untouched by every mode."""
    t = _target(target)
    for mode in ("mask", "project", "copy"):
        args = _kv_args(t, KV["small_vec"], torch.float16, mode)
        good = _run3(t, "write_kv", args)[1]     # the reference with valid positions
        args[7][0] = KV["small_vec"][6]          # row 0: pos = S
        args[7][2] = -1                          # row 2: pos = -1
        ours = run_kernel(t, "write_kv", args)
        for i in (0, 1, 2):
            _same(f"{mode}: argument {i} rows 0, 2 untouched", ours[i][:, 0::2], args[i][:, 0::2])
            _same(f"{mode}: argument {i} row 1", ours[i][:, 1], good[i][:, 1])
        with pytest.raises(ValueError, match="row 0 has position 40"):   # the reference can check on the host
            ref.write_kv(*[_clone(a) for a in args])


# =========================================================================== sample (greedy)
SAMPLE = {"small_odd": (3, 1001, 1001), "small_strided": (2, 1001, 1010), "small_vec4": (3, 1000, 1000),
          "small_b17_llama3": (17, 128256, 128256), "smollm2": (1, 49152, 49152)}


@pytest.mark.parametrize("target,case,dtype", _params(SAMPLE, dtypes=[torch.float32]))
def test_sample_greedy(target, case, dtype):
    t = _target(target)
    B, V, ld = SAMPLE[case]
    g = _gen(t, 4)
    big = torch.randn(B, ld, generator=g, device=t.device)
    logits = big[:, :V]
    logits[0, 7] = logits[0, V - 3] = logits[0].max() + 1          # tie: the first index wins
    if B > 1:
        logits[1, :] = float("-inf")                                 # all -inf: index 0
    if B > 2:
        logits[2, 5] = logits[2, V - 1] = float("nan")               # NaN counts as the maximum; the first wins
    tokens = poison(torch.empty(B, dtype=torch.int64, device=t.device))
    # the logits are a [B, V] view of a [B, ld] buffer: the emulation guards the whole buffer
    ours = run_kernel(t, "sample", [tokens, logits],
                      prepare=lambda at_end: [guarded.like(tokens, at_end), guarded.like(big, at_end)[:, :V]])
    _same("tokens", ours[0], logits.argmax(dim=-1))


# =========================================================================== errors
@pytest.mark.parametrize("target", TARGETS)
def test_small_unsupported_dtype_and_head_dim_raise(target):
    t = _target(target)
    args = _mlp_args(t, MLP["small_vec"], torch.bfloat16)
    f32 = [x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args]
    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        t.ops.mlp_block(*f32)
    c = (1, 64, 2, 1, 32, 16, [3], [1], [], False)               # head_dim 32
    with pytest.raises(RuntimeError, match="head_dim 32"):
        t.ops.attn_block(*_attn_args(t, c, torch.bfloat16))
    bad = _mlp_args(t, MLP["small_vec"], torch.bfloat16)
    bad[3] = bad[3][:, :-1]                                        # wrong shape
    with pytest.raises(ValueError, match="w_gate_up"):                # metadata: checked at the boundary
        ops.mlp_block(*bad, backend="cuda-emu" if t.emu else "cuda")
    if t.emu:                                                      # CPU tensors only
        with pytest.raises(RuntimeError, match="CPU tensors"):
            t.ops.mlp_block(*[x.to("meta") if isinstance(x, torch.Tensor) else x for x in args])
    else:
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            t.ops.mlp_block(*[x.cpu() if isinstance(x, torch.Tensor) else x for x in args])


@pytest.mark.parametrize("target", TARGETS)
def test_small_pdl_in_use_on_hopper(target):
    t = _target(target)
    facts = t.ops.C.device_facts(0 if t.emu else torch.cuda.current_device())
    if not t.emu:
        assert facts["sm_count"] == torch.cuda.get_device_properties(0).multi_processor_count
    if facts["cc"] >= 90 and __import__("os").environ.get("D3K_PDL", "1") != "0":
        assert facts["pdl"]


# =========================================================================== end to end
def _cast(model, dtype):
    """The same model with every weight cast to `dtype` (the float64 oracle of a bf16/fp16 model)."""
    w = model.weights
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    lm = c(w.lm_head) if w.lm_head is not w.embed else None
    emb = c(w.embed)
    return Model(model.config, Weights(embed=emb, final_norm=c(w.final_norm), lm_head=emb if lm is None else lm,
                                       attn_norm=c(w.attn_norm), wqkv=c(w.wqkv), bqkv=c(w.bqkv), wo=c(w.wo),
                                       mlp_norm=c(w.mlp_norm), w_gate_up=c(w.w_gate_up), w_down=c(w.w_down)),
                 None, source=model.source)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fill", ["mask", "project", "copy"])
@pytest.mark.parametrize("target", TARGETS)
def test_decoder_matches_reference(target, fill, dtype):
    """A greedy decode with the CUDA kernels (on the GPU, or emulated), full depth and under D3 (layers dropped
    over the steps), rows of different lengths. Then the kernels' own tokens are fed, step by step, to the
    kernels, to the reference at the same dtype and to the float64 reference: every step's logits meet the
    bound of docs/design.md section 6; the kernels' argmax is the token generate() chose; and it is the oracle's
    argmax wherever the oracle's top-2 margin exceeds twice the logits bound (a closer call may go either way
    in bf16/fp16)."""
    t = _target(target)
    backend = "cuda-emu" if t.emu else "cuda"
    model = tiny_model(L=4, d=128, H=4, H_kv=2, D=64, F=160, V=211, dtype=dtype, device=t.device,
                       qkv_bias=fill == "project")
    models = {backend: model, "same": model, "o64": _cast(model, torch.float64)}
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 211, (5,), generator=g).tolist(), torch.randint(0, 211, (9,), generator=g).tolist()]
    n = 8
    for alpha in ((1.0, 0.8) if fill == "mask" else (0.8,)):      # the fill mode matters only under D3
        sched = D3Schedule(4, alpha=alpha, start=0.25, tail=1)
        decs = {k: Decoder(m, sched, max_batch=2, max_seq_len=32, backend="reference" if k != backend else backend,
                           fill=fill) for k, m in models.items()}
        assert decs[backend].backend == backend
        gen = decs[backend].generate(prompts, max_new_tokens=n, ignore_eos=True)
        assert gen.tokens.shape == (2, n)
        depths = [len(k) for k in gen.layers]
        if alpha < 1:
            assert depths[0] == 4 and depths[-1] < 4 and depths == sorted(depths, reverse=True)
        else:
            assert set(depths) == {4}
        logits = {k: d.prefill(prompts) for k, d in decs.items()}
        for i in range(n):
            ours, same, o64 = (logits[k].float() for k in (backend, "same", "o64"))
            assert_close(f"alpha {alpha}, step {i}: logits", ours, same, o64, dtype)
            tok = gen.tokens[:, i].to(ours.device)
            _same(f"alpha {alpha}, step {i}: generate's token", ours.argmax(-1), tok)
            bound = 2 * (same - o64).abs().max() + SLACK[dtype] * o64.abs().max()
            top2 = o64.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > 2 * bound
            assert torch.equal(ours.argmax(-1)[clear], o64.argmax(-1)[clear]), (alpha, i, ours.argmax(-1),
                                                                                  o64.argmax(-1))
            logits = {k: d.step(tok) for k, d in decs.items()}


# =========================================================================== graphs and compile
def _layer(dtype, d=576, H=9, H_kv=3, D=64, F=1536, V=4096, S=256, B=2, seed=5):
    g = torch.Generator(device="cuda").manual_seed(seed)
    R = (H + 2 * H_kv) * D
    cos, sin = _rope(S, D, device="cuda")
    w = dict(attn_norm=(1 + 0.1 * _rn(g, d)).to(dtype), wqkv=_rn(g, R, d, scale=d ** -0.5).to(dtype),
             wo=_rn(g, d, H * D, scale=(H * D) ** -0.5).to(dtype), mlp_norm=(1 + 0.1 * _rn(g, d)).to(dtype),
             w_gate_up=_rn(g, 2 * F, d, scale=d ** -0.5).to(dtype), w_down=_rn(g, d, F, scale=F ** -0.5).to(dtype),
             final_norm=(1 + 0.1 * _rn(g, d)).to(dtype), w_lm=_rn(g, V, d, scale=3 * d ** -0.5).to(dtype))
    st = dict(h=_rn(g, B, d).to(dtype), tmp=torch.empty(B, d, dtype=dtype, device="cuda"),
              k=torch.zeros(B, H_kv, S, D, dtype=dtype, device="cuda"),
              v=torch.zeros(B, H_kv, S, D, dtype=dtype, device="cuda"),
              valid=torch.zeros(B, S, dtype=torch.uint8, device="cuda"),
              pos=torch.tensor([3, 40], dtype=torch.int32, device="cuda")[:B],
              active=torch.ones(B, dtype=torch.uint8, device="cuda"),
              logits=torch.empty(B, V, device="cuda"), tokens=torch.zeros(B, dtype=torch.int64, device="cuda"),
              cos=cos, sin=sin)
    return w, st


def _step(w, s, op=None):
    """One decode-like step of one layer: attn, mlp, lm_head, greedy sample, pos += 1."""
    o = op or _ops.cuda_ops
    o.attn_block(s["tmp"], s["h"], w["attn_norm"], w["wqkv"], None, w["wo"], s["k"], s["v"], s["valid"], s["pos"],
                 s["cos"], s["sin"], s["active"], EPS)
    o.mlp_block(s["h"], s["tmp"], w["mlp_norm"], w["w_gate_up"], w["w_down"], s["active"], EPS)
    o.lm_head(s["logits"], s["h"], w["final_norm"], w["w_lm"], EPS)
    _ops.cuda_ops.sample(s["tokens"], s["logits"])
    s["pos"].add_(1)


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager():
    _require_gpu()
    w, eager = _layer(torch.bfloat16)
    _, graph = _layer(torch.bfloat16)
    for _ in range(6):
        _step(w, eager)
    _step(w, graph)                                   # warm-up: scratch allocated outside capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _step(w, graph)
    torch.cuda.current_stream().wait_stream(side)
    mem = torch.cuda.memory_allocated()
    cg = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cg):
        _step(w, graph)
    assert torch.cuda.memory_allocated() == mem, "capture allocated"
    for _ in range(4):                                # capture runs nothing: 2 eager steps + 4 replays = 6
        cg.replay()
    torch.cuda.synchronize()
    for name in ("h", "k", "v", "valid", "pos", "logits", "tokens"):
        _same(f"graph {name}", graph[name], eager[name])


@pytest.mark.gpu
def test_compile_fullgraph_cuda():
    _require_gpu()
    w, a = _layer(torch.bfloat16)
    _, b = _layer(torch.bfloat16)

    def step(s_tmp, s_h, k, v, valid, pos, cos, sin, active, logits):
        torch.ops.d3k.attn_block(s_tmp, s_h, w["attn_norm"], w["wqkv"], None, w["wo"], k, v, valid, pos, cos, sin,
                                 active, EPS)
        torch.ops.d3k.mlp_block(s_h, s_tmp, w["mlp_norm"], w["w_gate_up"], w["w_down"], active, EPS)
        torch.ops.d3k.lm_head(logits, s_h, w["final_norm"], w["w_lm"], EPS)
        return logits.argmax(-1)

    compiled = torch.compile(step, fullgraph=True)
    keys = ("tmp", "h", "k", "v", "valid", "pos", "cos", "sin", "active", "logits")
    ta = compiled(*[a[k] for k in keys])
    tb = step(*[b[k] for k in keys])
    torch.cuda.synchronize()
    _same("tokens", ta, tb)
    for name in ("h", "k", "v", "valid", "logits"):
        _same(f"compiled {name}", a[name], b[name])


def test_attn_case_table_is_consistent():
    """Every attn case is well formed (runs without a GPU)."""
    for name, (B, d, H, H_kv, D, S, positions, active, holes, bias) in ATTN.items():
        assert len(positions) == len(active) == B, name
        assert all(0 <= p < S for p in positions), name
        assert H % H_kv == 0 and D in (64, 128), name
        assert all(p2 < positions[b] for b, p2 in holes), name
    assert math.isfinite(EPS)
