"""The paged KV cache ops (attn_block_paged, write_kv_paged) against the contiguous ones.

A contiguous cache [B, H_kv, S, D] is scattered into a pool of pages [num_pages, page_size, H_kv, D]
(pages in scrambled order, spare pages holding NaN K/V with kv_valid = 1, so a read of a page no row owns
shows); the contiguous op and the paged op run on the same backend; the paged op's out must equal the
contiguous op's bit for bit (the same arithmetic: the split plan of a cache of max_pages * page_size = S
positions is the contiguous one), and the pool after the call must be the pool before it with exactly the
contiguous op's writes scattered in (every other byte unchanged: spare pages, rows' pages past pos, shared
prefix pages). The paged op's out is also checked against the float64 reference by the bound of
docs/design.md section 6 (tolerance.assert_close).

Cases: page sizes 16 and 64; kv_valid holes; rows sharing prefix pages (prefix caching: the shared pages
must be bit for bit unchanged); rows with slot_mapping = -1 and inactive rows (out = h, nothing written);
every write_kv_paged mode; B = 1, 3, 4 and 17; block_table entries past a row's pos set to -1 (never read).

Targets: "reference"; "emu" (the CUDA kernels on the SIMT emulation layer: test_cuda_ops.run_kernel, i.e.
3 seeds, page-guarded buffers, poisoned scratch, results equal bit for bit across seeds); "triton" (the
interpreter on CPU, fp16/fp32; compiled on a GPU); "gpu" (the CUDA kernels, marker gpu).
"""
import pytest
import torch

from helpers import TRITON_DEVICE, cache_rows, launch_args
from test_cuda_ops import Target, _rope, run_kernel
from tolerance import assert_close, poison

from d3kernels import _ops, backends, guarded, ops
from d3kernels import reference as ref

EPS = 1e-5
CUDA_DTYPES = [torch.bfloat16, torch.float16]
TRITON_DTYPES = [torch.bfloat16, torch.float16] if TRITON_DEVICE == "cuda" else [torch.float16, torch.float32]
REF_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
PAGE_SIZES = [16, 64]


# =========================================================================== targets
class Runner:
    """Runs an op of one backend on copies of its arguments and returns the copies."""

    def __init__(self, name):
        self.name = name
        self.device = "cuda" if name == "gpu" or (name == "triton" and TRITON_DEVICE == "cuda") else "cpu"
        self.kernel = Target("emu" if name == "emu" else "gpu") if name in ("emu", "gpu") else None

    def skip_reason(self):
        if self.kernel is not None:
            return self.kernel.skip_reason()
        if self.name == "triton":
            dt = torch.float16
            return backends.why_not("triton", self.device, dt)
        return None

    def run(self, op, args):
        """`op` on copies of args; the CUDA targets through run_kernel (emu: 3 seeds, guarded, bitwise)."""
        if self.kernel is not None:
            return run_kernel(self.kernel, op, args)
        ours = [_clone(a) for a in args]
        if self.name == "reference":
            getattr(ref, op)(*ours)
        else:
            getattr(ops, op)(*ours, backend="triton")
        return ours

    def run_once(self, op, args):
        """`op` once on (guarded, on the emulation) copies of args: the contiguous baseline."""
        if self.kernel is not None and self.kernel.emu:
            ours = [guarded.like(a) if isinstance(a, torch.Tensor) else a for a in args]
            getattr(self.kernel.ops, op)(*ours)
            return ours
        return self.run(op, args)


def _params(cases, dtypes_of):
    """(target, case, page_size, dtype): every target on the "small" cases, the GPU on every case."""
    out = []
    for target in ("reference", "emu", "triton", "gpu"):
        marks = [pytest.mark.gpu] if target == "gpu" else []
        for case in cases:
            if target != "gpu" and not case.startswith("small"):
                continue
            for ps in PAGE_SIZES:
                for dt in dtypes_of(target):
                    dts = str(dt).replace("torch.", "")
                    out.append(pytest.param(target, case, ps, dt, marks=marks, id=f"{target}-{case}-ps{ps}-{dts}"))
    return out


def _dtypes(target):
    return {"reference": REF_DTYPES, "triton": TRITON_DTYPES}.get(target, CUDA_DTYPES)


def _runner(name) -> Runner:
    r = Runner(name)
    why = r.skip_reason()
    if why is not None:
        pytest.skip(why)
    return r


# =========================================================================== helpers
def _clone(t):
    return t.clone() if isinstance(t, torch.Tensor) else t


def _f64(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else _clone(t)


def _same(name, a, b):
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


def _rn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def paginate(k, v, valid, ps, g, share=None, spare=3):
    """Scatter a layered contiguous cache k, v [L, B, H_kv, S, D], valid [L, B, S] (S a multiple of ps) into
    pages k_pages, v_pages [L, P, ps, H_kv, D], valid_pages [L, P, ps] with one block_table [B, S / ps] int32
    for every layer, pages in scrambled order. share = (rows, n): rows[1:] map their first n pages to
    rows[0]'s (the caller made their contents equal). Pages no row maps hold NaN K/V with kv_valid = 1."""
    L, B, H_kv, S, D = k.shape
    assert S % ps == 0
    M = S // ps
    P = B * M + spare
    bt = torch.randperm(P, generator=g)[: B * M].view(B, M).to(torch.int32)
    if share is not None:
        rows, n = share
        for r in rows[1:]:
            bt[r, :n] = bt[rows[0], :n]
    kp = torch.full((L, P, ps, H_kv, D), float("nan"), dtype=k.dtype)
    vp = kp.clone()
    vld = torch.ones(L, P, ps, dtype=torch.uint8)
    for b in range(B):
        for i in range(M):
            pg = int(bt[b, i])
            kp[:, pg] = k[:, b, :, i * ps:(i + 1) * ps].transpose(1, 2)
            vp[:, pg] = v[:, b, :, i * ps:(i + 1) * ps].transpose(1, 2)
            vld[:, pg] = valid[:, b, i * ps:(i + 1) * ps]
    return kp, vp, vld, bt


def _scatter(pool, bt, b, p, ps, value):
    """pool[..., slot of (b, p), ...] = value (pool [L, P, ps, ...])."""
    pg = int(bt[b, p // ps])
    pool[:, pg, p % ps] = value


def _slots(bt, positions, ps):
    return torch.tensor([int(bt[b, p // ps]) * ps + p % ps for b, p in enumerate(positions)], dtype=torch.int64)


def _pages_of(bt, rows, n):
    return sorted({int(bt[r, i]) for r in rows for i in range(n)})


# =========================================================================== attn_block_paged
# name: (B, d, H, H_kv, D, S, positions, active, holes [(b, p)], bias, slot -1 rows, share (rows, n positions))
# S is a multiple of 64, so max_pages * page_size = S for both page sizes (the contiguous split plan).
# On the emulated H100-sized device small_gqa_splits has 3 splits of 256 positions.
ATTN = {
    "small_gqa_splits": (3, 256, 8, 2, 64, 768, [0, 450, 767], [1, 1, 1], [(1, 3), (1, 300), (2, 200), (2, 766)],
                         True, [], ((1, 2), 128)),
    "small_mha_inactive_skip": (4, 136, 2, 2, 128, 320, [5, 299, 130, 140], [1, 0, 1, 1], [(0, 2), (2, 29)], False,
                                [3], ((1, 2, 3), 128)),
    "small_b1_masked_split": (1, 128, 4, 1, 128, 832, [831], [1], [(0, p) for p in range(256, 512)], False, [],
                              None),
    "small_g16_b17": (17, 64, 16, 1, 128, 320, [(7 * b + 130) % 320 for b in range(17)], [1] * 15 + [0, 1], [(3, 1)],
                      True, [4, 9], ((0, 5, 11), 128)),
    "llama32_1b_b4": (4, 2048, 32, 8, 64, 8192, [4097, 10, 8000, 0], [1, 1, 0, 1], [(0, 4000), (1, 3)], False, [3],
                      None),
    "qwen2_7b_bias": (3, 3584, 28, 4, 128, 6016, [5000, 1, 4096], [1, 1, 1], [(2, 4095)], True, [], None),
    "smollm2_b16": (16, 576, 9, 3, 64, 2048, [(b * 127) % 1024 + 1024 for b in range(16)], [1] * 16, [(5, 3)], False,
                    [7], ((2, 3, 4), 1024)),
}


def _attn_contiguous(case, dtype, seed=0):
    """Contiguous attn_block arguments (CPU): kv_valid = 1 below pos except holes, NaN K/V where kv_valid = 0;
    rows of `share` hold equal K/V and kv_valid over the shared prefix."""
    B, d, H, H_kv, D, S, positions, active, holes, bias, skip, share = case
    g = torch.Generator().manual_seed(seed)
    R = (H + 2 * H_kv) * D
    k, v, kv_valid = cache_rows(g, B, H_kv, S, D, positions, holes, dtype, share)
    cos, sin = _rope(S, D)
    run = [int(a and b not in skip) for b, a in enumerate(active)]
    return [poison(torch.empty(B, d, dtype=dtype)), _rn(g, B, d).to(dtype), (1 + 0.1 * _rn(g, d)).to(dtype),
            _rn(g, R, d, scale=d ** -0.5).to(dtype), _rn(g, R, scale=0.1).to(dtype) if bias else None,
            _rn(g, d, H * D, scale=(H * D) ** -0.5).to(dtype), k, v, kv_valid,
            torch.tensor(positions, dtype=torch.int32), cos, sin, torch.tensor(run, dtype=torch.uint8), EPS]


def _attn_paged(case, ps, cont, seed=0):
    """The paged arguments holding the same cache as `cont`; block_table entries past each row's pos page
    are -1; slot_mapping -1 for the rows of `skip` (which are active: slot -1 alone must stop them)."""
    B, d, H, H_kv, D, S, positions, active, holes, bias, skip, share = case
    g = torch.Generator().manual_seed(seed + 100)
    out, h, norm, wqkv, bqkv, wo, k, v, kv_valid, pos, cos, sin, _, eps = cont
    sh = None if share is None else (share[0], share[1] // ps)
    kp, vp, vld, bt = paginate(k[None], v[None], kv_valid[None], ps, g, share=sh)
    slots = _slots(bt, positions, ps)
    slots[skip] = -1
    for b, p in enumerate(positions):
        bt[b, p // ps + 1:] = -1
    return [poison(torch.empty_like(out)), h, norm, wqkv, bqkv, wo, kp[0], vp[0], vld[0], bt, pos, slots, cos, sin,
            torch.tensor(active, dtype=torch.uint8), eps]


def _to(args, device):
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("target,case,ps,dtype", _params(ATTN, _dtypes))
def test_attn_block_paged(target, case, ps, dtype):
    r = _runner(target)
    c = ATTN[case]
    B, d, H, H_kv, D, S, positions, active, holes, bias, skip, share = c
    cont = _attn_contiguous(c, dtype)
    paged = _attn_paged(c, ps, cont)
    bt = paged[9]
    ours_c = [x.cpu() if isinstance(x, torch.Tensor) else x for x in r.run_once("attn_block", _to(cont, r.device))]
    ours = [x.cpu() if isinstance(x, torch.Tensor) else x for x in r.run("attn_block_paged", _to(paged, r.device))]
    # the same numbers as the contiguous cache
    _same("out (paged vs contiguous)", ours[0], ours_c[0])
    running = [b for b in range(B) if active[b] and b not in skip]
    for b in range(B):
        if b not in running:
            _same(f"out[{b}] (not running: out = h)", ours[0][b], paged[1][b])
    want_k, want_v, want_valid = paged[6].clone()[None], paged[7].clone()[None], paged[8].clone()[None]
    for b in running:
        p = positions[b]
        _scatter(want_k, bt, b, p, ps, ours_c[6][b, :, p])
        _scatter(want_v, bt, b, p, ps, ours_c[7][b, :, p])
        _scatter(want_valid, bt, b, p, ps, 1)
    _same("k_pages", ours[6], want_k[0])
    _same("v_pages", ours[7], want_v[0])
    _same("kv_valid_pages", ours[8], want_valid[0])
    if share is not None:
        shared = _pages_of(bt, share[0], share[1] // ps)
        for i, name in ((6, "k_pages"), (7, "v_pages"), (8, "kv_valid_pages")):
            _same(f"{name}: shared prefix pages {shared} unchanged", ours[i][shared], paged[i][shared])
    # and within docs/design.md section 6's bound of the float64 reference (the paged reference: bitwise above)
    same = [_clone(x) for x in paged]
    ref.attn_block_paged(*same)
    o64 = [_f64(x) for x in paged]
    ref.attn_block_paged(*o64)
    ok = torch.tensor([b in running for b in range(B)])
    if ok.any():
        assert_close("out", ours[0][ok], same[0][ok], o64[0][ok], dtype)


# =========================================================================== write_kv_paged
# name: (L, B, d, H, H_kv, D, S, bias, slot -1 rows, share (rows, n positions))
KV = {
    "small_vec": (4, 3, 256, 4, 2, 64, 128, True, [2], ((0, 1), 64)),
    "small_scalar": (3, 2, 203, 2, 1, 128, 64, False, [], None),
    "small_b17": (3, 17, 64, 2, 2, 64, 128, True, [3, 16], ((4, 5, 6), 64)),
    "small_b1": (3, 1, 128, 2, 1, 128, 64, False, [], None),
    "llama32_1b": (3, 2, 2048, 32, 8, 64, 4096, False, [], ((0, 1), 1024)),
}


def _kv_contiguous(case, dtype, mode, seed=3):
    L, B, d, H, H_kv, D, S, bias, skip, share = case
    g = torch.Generator().manual_seed(seed)
    R = (H + 2 * H_kv) * D
    positions = [S - 1 - (7 * b) % (S // 2) for b in range(B)]    # past any shared prefix (n <= S / 2)
    flags = (torch.rand(L, B, generator=g) < 0.5).to(torch.uint8)
    flags[0, 0] = 0
    flags[1, 0] = 1                          # row 0: layer 1 has a source below it
    if B > 1:
        flags[:, 1] = 1                      # row 1: every layer flagged (copy has no source: mask)
    k = _rn(g, L, B, H_kv, S, D).to(dtype)
    v = _rn(g, L, B, H_kv, S, D).to(dtype)
    kv_valid = (torch.rand(L, B, S, generator=g) < 0.7).to(torch.uint8)
    if share is not None:
        rows, n = share
        for r in rows[1:]:
            k[:, r, :, :n], v[:, r, :, :n] = k[:, rows[0], :, :n], v[:, rows[0], :, :n]
            kv_valid[:, r, :n] = kv_valid[:, rows[0], :n]
    cos, sin = _rope(S, D)
    cflags = flags.clone()
    cflags[:, skip] = 0                      # slot -1 rows write nothing
    args = [k, v, kv_valid, _rn(g, B, d).to(dtype), (1 + 0.1 * _rn(g, L, d)).to(dtype),
            _rn(g, L, R, d, scale=d ** -0.5).to(dtype), _rn(g, L, R, scale=0.1).to(dtype) if bias else None,
            torch.tensor(positions, dtype=torch.int32), cos, sin, cflags, mode, EPS]
    return args, flags


def _kv_paged(case, ps, cont, flags, seed=3):
    L, B, d, H, H_kv, D, S, bias, skip, share = case
    g = torch.Generator().manual_seed(seed + 100)
    k, v, kv_valid, src_h, norms, wqkv, bqkv, pos, cos, sin, _, mode, eps = cont
    sh = None if share is None else (share[0], share[1] // ps)
    kp, vp, vld, bt = paginate(k, v, kv_valid, ps, g, share=sh)
    positions = pos.tolist()
    slots = _slots(bt, positions, ps)
    slots[skip] = -1
    for b, p in enumerate(positions):
        bt[b, p // ps + 1:] = -1
    return [kp, vp, vld, src_h, norms, wqkv, bqkv, bt, pos, slots, cos, sin, flags, mode, eps]


@pytest.mark.parametrize("mode", ["mask", "project", "copy"])
@pytest.mark.parametrize("target,case,ps,dtype", _params(KV, _dtypes))
def test_write_kv_paged(target, case, ps, dtype, mode):
    r = _runner(target)
    c = KV[case]
    L, B, d, H, H_kv, D, S, bias, skip, share = c
    cont, flags = _kv_contiguous(c, dtype, mode)
    paged = _kv_paged(c, ps, cont, flags)
    bt, positions = paged[7], cont[7].tolist()
    ours_c = [x.cpu() if isinstance(x, torch.Tensor) else x for x in r.run_once("write_kv", _to(cont, r.device))]
    ours = [x.cpu() if isinstance(x, torch.Tensor) else x for x in r.run("write_kv_paged", _to(paged, r.device))]
    want = [paged[i].clone() for i in range(3)]
    for b, p in enumerate(positions):
        if b in skip:
            continue
        for i in range(3):
            _scatter(want[i], bt, b, p, ps, ours_c[i][:, b, :, p] if i < 2 else ours_c[i][:, b, p])
    for i, name in ((0, "k_pages"), (1, "v_pages"), (2, "kv_valid_pages")):
        _same(f"{name} (paged vs contiguous)", ours[i], want[i])
        if share is not None:
            shared = _pages_of(bt, share[0], share[1] // ps)
            _same(f"{name}: shared prefix pages {shared} unchanged", ours[i][:, shared], paged[i][:, shared])
    if mode == "project":                    # and within docs/design.md section 6's bound of the float64 reference
        same = [_clone(x) for x in paged]
        ref.write_kv_paged(*same)
        o64 = [_f64(x) for x in paged]
        ref.write_kv_paged(*o64)
        for b, p in enumerate(positions):
            s = int(paged[9][b])
            if s < 0:
                continue
            for l in range(L):
                if flags[l, b]:
                    for i, name in ((0, "k"), (1, "v")):
                        pg, off = s // ps, s % ps
                        assert_close(f"{name}[{l}, slot {s}]", ours[i][l, pg, off], same[i][l, pg, off],
                                     o64[i][l, pg, off], dtype)


# =========================================================================== bad block tables and slots
def _small_attn(ps=16, dtype=torch.float16):
    c = ATTN["small_mha_inactive_skip"]
    return c, _attn_paged(c, ps, _attn_contiguous(c, dtype))


def test_reference_checks_block_table_and_slots_on_the_host():
    """What the kernels cannot check without a host sync, the reference checks and raises on, before it
    writes anything."""
    c, a = _small_attn()
    bt, slots = a[9], a[11]
    cases = []
    x = [_clone(t) for t in a]
    x[9][0, 0] = x[6].shape[0]                              # row 0 reads page 0 of its table: past the pool
    cases.append((x, r"block_table\[0, 0\] = \d+ is not a page"))
    x = [_clone(t) for t in a]
    x[9][2, 0] = -1
    cases.append((x, r"block_table\[2, 0\] = -1"))
    x = [_clone(t) for t in a]
    x[11][0] = x[6].shape[0] * x[6].shape[1]                 # slot past the pool
    cases.append((x, "row 0 has slot_mapping"))
    x = [_clone(t) for t in a]
    x[11][0] = x[11][0] + 1                                  # not the slot of pos
    cases.append((x, "row 0 writes slot"))
    x = [_clone(t) for t in a]
    x[11][3] = x[11][2]                                      # two rows, one slot (row 3 runs with a slot)
    x[9][3] = x[9][2]
    x[10][3] = x[10][2]
    cases.append((x, "rows 2 and 3 both write slot"))
    x = [_clone(t) for t in a]
    x[10][0] = 320                                           # pos = max_pages * page_size
    cases.append((x, "row 0 has position 320"))
    for x, msg in cases:
        before = [_clone(t) for t in x]
        with pytest.raises(ValueError, match=msg):
            ref.attn_block_paged(*x)
        for i in (6, 7, 8):
            _same(f"argument {i} unchanged after a rejected call", x[i], before[i])
    # rows that do not run are not checked: row 1 is inactive, row 3 has slot -1
    x = [_clone(t) for t in a]
    x[9][1, :] = -7
    x[11][1] = 10 ** 9
    x[9][3, :] = -7
    ref.attn_block_paged(*x)
    # write_kv_paged: the same checks for the rows it writes
    kc = KV["small_vec"]
    cont, flags = _kv_contiguous(kc, torch.float16, "project")
    kp = _kv_paged(kc, 16, cont, flags)
    kp[9][0] = kp[9][0] + 1
    with pytest.raises(ValueError, match="row 0 writes slot"):
        ref.write_kv_paged(*kp)


@pytest.mark.parametrize("target", [pytest.param("gpu", marks=pytest.mark.gpu), "emu"])
def test_kernels_bad_block_table_or_slot_gives_nan_and_writes_nothing(target):
    """The CUDA kernels cannot raise: a running row whose slot is past the pool or whose pos is out of range
    gets NaN and writes nothing; one whose block_table holds a page outside the pool gets NaN (its K/V are
    written at its slot); other rows are unaffected. write_kv_paged leaves such rows untouched."""
    r = _runner(target)
    c, a = _small_attn()
    a = _to(a, r.device)
    good = r.run("attn_block_paged", a)
    P, ps = a[6].shape[:2]
    for what in ("slot", "pos", "page"):
        x = [_clone(t) for t in a]
        if what == "slot":
            x[11][2] = P * ps
        elif what == "pos":
            x[10][2] = x[9].shape[1] * ps
        else:
            x[9][2, 0] = P
        ours = r.run("attn_block_paged", x)
        assert torch.isnan(ours[0][2].float()).all(), what
        for b in (0, 1, 3):
            _same(f"{what}: out[{b}]", ours[0][b], good[0][b])
        if what == "page":
            for i in (6, 7, 8):
                _same(f"{what}: argument {i}", ours[i], good[i])
        else:
            s = int(a[11][0])
            for i in (6, 7, 8):                     # only row 0's slot changed (rows 1, 3 do not run)
                want = a[i].clone().view(P * ps, -1)
                want[s] = good[i].view(P * ps, -1)[s]
                _same(f"{what}: argument {i}", ours[i], want.view(a[i].shape))
    kc = KV["small_vec"]
    for mode in ("mask", "project", "copy"):
        cont, flags = _kv_contiguous(kc, torch.float16, mode)
        kp = _to(_kv_paged(kc, 16, cont, flags), r.device)
        good = r.run("write_kv_paged", kp)
        kp[9][0] = kp[0].shape[1] * kp[0].shape[2]      # row 0: slot past the pool
        kp[8][1] = -1                                   # row 1: pos out of range
        ours = r.run("write_kv_paged", kp)
        for i in (0, 1, 2):
            _same(f"{mode}: argument {i} (rows 0, 1 untouched; row 2 has slot -1)", ours[i], kp[i])
        assert not torch.equal(good[2], kp[2]) or mode == "copy"


def test_backend_table_knows_page_sizes():
    """The CUDA attention kernel needs page_size % 16 == 0: the backend table says so, a named CUDA backend
    raises, and auto picks a backend that can run."""
    assert backends.why_not("reference", "cpu", torch.float16, 64, 8) is None
    assert not _ops.CUDA_OPS_AVAILABLE or "multiple of 16" in backends.why_not("cuda", "cuda", torch.float16, 64, 8)
    if not _ops.cuda_emu_ops.available:
        pytest.skip(_ops.C_EMU_ERROR)
    assert "multiple of 16" in backends.why_not("cuda-emu", "cpu", torch.float16, 64, 8)
    assert backends.why_not("cuda-emu", "cpu", torch.float16, 64, 32) is None
    c = ATTN["small_mha_inactive_skip"]
    a = _attn_paged(c, 8, _attn_contiguous(c, torch.float16))
    with pytest.raises(RuntimeError, match="page_size 8"):
        ops.attn_block_paged(*[_clone(t) for t in a], backend="cuda-emu")
    with pytest.raises(RuntimeError, match="page_size 8"):
        _ops.cuda_emu_ops.attn_block_paged(*[_clone(t) for t in a])
    x, y = [_clone(t) for t in a], [_clone(t) for t in a]
    ops.attn_block_paged(*x, backend="auto")                 # CPU tensors: the reference
    ref.attn_block_paged(*y)
    _same("auto", x[0], y[0])


@pytest.mark.skipif(not _ops.CUDA_OPS_AVAILABLE, reason="d3kernels._C has no CUDA kernels")
def test_paged_launchers_validate_before_touching_the_gpu():
    """The C++ launchers check the paged arguments first (no CUDA call), so this runs anywhere."""
    C, p = _ops.C, 256                       # p: a fake 16-byte aligned device address
    paged = dict(layout=C.CacheLayout.paged, block_table=p, slot_mapping=p)
    attn = dict(B=1, d=64, H=2, Hkv=1, D=64, num_pages=4, page_size=16, max_pages=2, S=32, rope_len=16,
                rope_ld=32, num_splits=1, eps=EPS, dtype=1, rows_ws=p, **paged)
    with pytest.raises(RuntimeError, match="page_size 8 is not supported"):
        C.attn_block(launch_args(C, "AttnBlockArgs", p, **{**attn, "page_size": 8, "S": 16}))
    with pytest.raises(RuntimeError, match="null pointer"):
        C.attn_block(launch_args(C, "AttnBlockArgs", p, **{**attn, "slot_mapping": 0}))
    with pytest.raises(RuntimeError, match="null pointer"):    # the rows scratch
        C.attn_block(launch_args(C, "AttnBlockArgs", p, **{**attn, "rows_ws": 0}))
    kv = dict(L=2, B=1, d=8, H=2, Hkv=1, D=64, num_pages=4, page_size=16, max_pages=2, S=32, rope_len=16,
              rope_ld=32, eps=EPS, dtype=1, **paged)
    with pytest.raises(RuntimeError, match="mode code 5"):
        C.write_kv(launch_args(C, "WriteKvArgs", p, mode=5, **kv))
    with pytest.raises(RuntimeError, match="num_pages, page_size and max_pages"):
        C.write_kv(launch_args(C, "WriteKvArgs", p, **{**kv, "num_pages": 0}))
    with pytest.raises(RuntimeError, match="write_kv_paged: null pointer"):    # the layout is paged: slots needed
        C.write_kv(launch_args(C, "WriteKvArgs", p, **{**kv, "slot_mapping": 0}))


@pytest.mark.gpu
def test_paged_ops_opcheck_on_cuda():
    """torch.ops.d3k.attn_block_paged / write_kv_paged on CUDA tensors (the CUDA kernels): opcheck (schema,
    fake kernel, aliasing, aot_dispatch), and the op equals the CudaKernels call."""
    r = _runner("gpu")
    c, a = _small_attn(ps=16, dtype=torch.bfloat16)
    a = _to(a, r.device)
    torch.library.opcheck(torch.ops.d3k.attn_block_paged.default, [_clone(x) for x in a])
    x, y = [_clone(t) for t in a], [_clone(t) for t in a]
    torch.ops.d3k.attn_block_paged(*x)
    _ops.cuda_ops.attn_block_paged(*y)
    for i in (0, 6, 7, 8):
        _same(f"argument {i}", x[i], y[i])
    kc = KV["small_vec"]
    cont, flags = _kv_contiguous(kc, torch.bfloat16, "project")
    kp = _to(_kv_paged(kc, 16, cont, flags), r.device)
    torch.library.opcheck(torch.ops.d3k.write_kv_paged.default, [_clone(t) for t in kp])
