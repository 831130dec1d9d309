"""One contract for a position the cache cannot hold (docs/design.md section 3.1), on every backend that
runs on a CPU: the reference raises before writing anything; the kernels (Triton, the CUDA kernels in the
emulated build, the native cpu backend) write nothing for that row and give it a NaN attention output,
while the other rows are computed as usual and an inactive row passes through. Checked for attn_block
(positions S and -1), attn_block_paged (a position past the block table, a slot past the pool, a page
outside the pool in the block table), write_kv
in every mode (positions S and -1) and write_kv_paged (a position past the RoPE tables, a slot past the
pool)."""
import pytest
import torch

from helpers import TRITON_DEVICE

from d3kernels import backends, reference as ref
from d3kernels.checks import FILL_MODES
from d3kernels.model import ModelConfig, rope_tables
from d3kernels.tolerance import compare

EPS = 1e-5
B, d, H, H_kv, D, S, PS = 4, 128, 2, 1, 64, 32, 16       # the CUDA kernels take D = 64, pages of 16
R, L = (H + 2 * H_kv) * D, 3
KERNELS = [("triton", torch.float32 if TRITON_DEVICE == "cpu" else torch.bfloat16),
           ("cuda-emu", torch.bfloat16), ("cpu", torch.float32)]


def _kernels(name: str, dtype: torch.dtype):
    reason = backends.why_not(name, TRITON_DEVICE if name == "triton" else "cpu", dtype, D, PS)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return backends.get(name)


def _inputs(dtype, dev):
    g = torch.Generator().manual_seed(0)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=dev, dtype=dtype)   # noqa: E731
    cos, sin = rope_tables(ModelConfig("llama", 1, d, H, H_kv, D, 96, 101, EPS, 10000.0), S, dev)
    return dict(h=r(B, d), norm=(1 + 0.1 * r(d)).to(dtype), wqkv=r(R, d, scale=d ** -0.5),
                wo=r(d, H * D, scale=(H * D) ** -0.5), k=r(B, H_kv, S, D), v=r(B, H_kv, S, D),
                valid=(torch.arange(S, device=dev)[None, :] < 6).to(torch.uint8).repeat(B, 1), cos=cos, sin=sin,
                norms=(1 + 0.1 * r(L, d)).to(dtype), wl=r(L, R, d, scale=d ** -0.5), kl=r(L, B, H_kv, S, D),
                vl=r(L, B, H_kv, S, D), validl=(torch.rand(L, B, S, generator=g) > 0.3).to(torch.uint8).to(dev))


def _i32(x, dev):
    return torch.tensor(x, dtype=torch.int32, device=dev)


def _check_row0(name, got, want, oracle, dtype):
    problem, _, _ = compare(got, want, oracle, dtype)
    assert problem is None, f"{name}: {problem}"


# --------------------------------------------------------------------------- attn_block
def _attn(ops, x, pos, active, dtype):
    out = torch.full_like(x["h"].to(dtype), 7.0)
    k, v, valid = x["k"].to(dtype).clone(), x["v"].to(dtype).clone(), x["valid"].clone()
    ops.attn_block(out, x["h"].to(dtype), x["norm"].to(dtype), x["wqkv"].to(dtype), None, x["wo"].to(dtype),
                   k, v, valid, pos, x["cos"], x["sin"], active, EPS)
    return out, k, v, valid


def test_reference_attn_block_raises_and_writes_nothing():
    x = _inputs(torch.float32, "cpu")
    out = torch.full_like(x["h"], 7.0)
    k, v, valid = x["k"].clone(), x["v"].clone(), x["valid"].clone()
    for bad in (S, -1):
        with pytest.raises(ValueError, match=f"row 1 has position {bad}, outside"):
            ref.attn_block(out, x["h"], x["norm"], x["wqkv"], None, x["wo"], k, v, valid,
                           _i32([6, bad, 7, 8], "cpu"), x["cos"], x["sin"], torch.ones(B, dtype=torch.uint8), EPS)
        assert (out == 7).all() and torch.equal(k, x["k"]) and torch.equal(v, x["v"]) and torch.equal(valid, x["valid"])


@pytest.mark.parametrize("name,dtype", KERNELS)
def test_kernels_attn_block_nan_and_nothing_written(name, dtype):
    """Row 0 at position 6 runs; rows 1 and 2 at S and -1 get NaN and write nothing; row 3, inactive at S + 3,
    passes through."""
    dev = TRITON_DEVICE if name == "triton" else "cpu"
    ops = _kernels(name, dtype)
    x = _inputs(torch.float32, dev)
    pos, active = _i32([6, S, -1, S + 3], dev), torch.tensor([1, 1, 1, 0], dtype=torch.uint8, device=dev)
    out, k, v, valid = _attn(ops, x, pos, active, dtype)
    only0 = torch.tensor([1, 0, 0, 0], dtype=torch.uint8, device=dev)    # the reference with the bad rows idle
    safe = _i32([6, 0, 0, 0], dev)
    w_out, w_k, w_v, w_valid = _attn(ref, x, safe, only0, dtype)
    o_out, o_k, o_v, _ = _attn(ref, {kk: t.double() if t.is_floating_point() and kk not in ("cos", "sin") else t
                                     for kk, t in x.items()}, safe, only0, torch.float64)
    assert torch.isnan(out[1:3].float()).all(), f"{name}: an out-of-range row must give NaN"
    assert torch.equal(out[3], x["h"][3].to(dtype)), f"{name}: an inactive row passes through"
    _check_row0(f"{name} attn_block row 0", out[:1], w_out[:1], o_out[:1], dtype)
    assert torch.equal(valid, w_valid), f"{name}: kv_valid"
    for got, want, oracle, what in ((k, w_k, o_k, "k_cache"), (v, w_v, o_v, "v_cache")):
        assert torch.equal(got[1:], x[what[0]][1:].to(dtype)), f"{name}: {what} of rows 1-3 must not change"
        assert torch.equal(got[0, :, :6], want[0, :, :6]) and torch.equal(got[0, :, 7:], want[0, :, 7:])
        _check_row0(f"{name} {what} row 0", got[0, :, 6], want[0, :, 6], oracle[0, :, 6], dtype)


# --------------------------------------------------------------------------- attn_block_paged
def _pool(x, dtype, dev):
    """The contiguous cache as pages: row b's page j is pool page 2 b + j (M = 2 pages per row); the pool
    has one spare page."""
    P = 2 * B + 1
    kp = torch.zeros(P, PS, H_kv, D, dtype=dtype, device=dev)
    vp, vlp = kp.clone(), torch.zeros(P, PS, dtype=torch.uint8, device=dev)
    for b in range(B):
        for j in range(2):
            kp[2 * b + j] = x["k"][b, :, j * PS:(j + 1) * PS].transpose(0, 1).to(dtype)
            vp[2 * b + j] = x["v"][b, :, j * PS:(j + 1) * PS].transpose(0, 1).to(dtype)
            vlp[2 * b + j] = x["valid"][b, j * PS:(j + 1) * PS]
    bt = torch.arange(2 * B, dtype=torch.int32, device=dev).reshape(B, 2)
    return kp, vp, vlp, bt


def _attn_paged(ops, x, pos, slots, dtype, dev, bad_page=None):
    """attn_block_paged on a copy of _pool; bad_page (row, j): that block_table entry set outside the pool."""
    kp, vp, vlp, bt = _pool(x, dtype, dev)
    if bad_page is not None:
        bt[bad_page] = kp.shape[0]
    out = torch.full_like(x["h"].to(dtype), 7.0)
    ops.attn_block_paged(out, x["h"].to(dtype), x["norm"].to(dtype), x["wqkv"].to(dtype), None, x["wo"].to(dtype),
                         kp, vp, vlp, bt, pos, slots, x["cos"], x["sin"], torch.ones(B, dtype=torch.uint8, device=dev),
                         EPS)
    return out, kp, vp, vlp


# rows: 0 runs at position 6 (slot 6); 1 at position 2 PS (past its block table) with a slot of the spare
# page; 2 at position 7 with a slot past the pool; 3 at position 6 with slot -1 (passes through)
PAGED_POS, PAGED_SLOTS = [6, 2 * PS, 7, 6], [6, 2 * B * PS + 1, (2 * B + 1) * PS + 3, -1]


def test_reference_attn_block_paged_raises_and_writes_nothing():
    x = _inputs(torch.float32, "cpu")
    for bad in (1, 2):
        pos, slots = [6, 0, 0, 0], [6, -1, -1, -1]
        pos[bad], slots[bad] = PAGED_POS[bad], PAGED_SLOTS[bad]
        kp, vp, vlp, bt = _pool(x, torch.float32, "cpu")
        k0, v0, vl0 = kp.clone(), vp.clone(), vlp.clone()
        out = torch.full_like(x["h"], 7.0)
        with pytest.raises(ValueError, match=f"row {bad} has (position|slot_mapping)"):
            ref.attn_block_paged(out, x["h"], x["norm"], x["wqkv"], None, x["wo"], kp, vp, vlp, bt, _i32(pos, "cpu"),
                                 torch.tensor(slots), x["cos"], x["sin"], torch.ones(B, dtype=torch.uint8), EPS)
        assert (out == 7).all() and torch.equal(kp, k0) and torch.equal(vp, v0) and torch.equal(vlp, vl0)


@pytest.mark.parametrize("name,dtype", KERNELS)
def test_kernels_attn_block_paged_nan_and_nothing_written(name, dtype):
    dev = TRITON_DEVICE if name == "triton" else "cpu"
    ops = _kernels(name, dtype)
    x = _inputs(torch.float32, dev)
    out, kp, vp, vlp = _attn_paged(ops, x, _i32(PAGED_POS, dev), torch.tensor(PAGED_SLOTS, device=dev), dtype, dev)
    w = _attn_paged(ref, x, _i32([6, 0, 0, 6], dev), torch.tensor([6, -1, -1, -1], device=dev), dtype, dev)
    x64 = {kk: t.double() if t.is_floating_point() and kk not in ("cos", "sin") else t for kk, t in x.items()}
    o = _attn_paged(ref, x64, _i32([6, 0, 0, 6], dev), torch.tensor([6, -1, -1, -1], device=dev), torch.float64, dev)
    assert torch.isnan(out[1:3].float()).all(), f"{name}: a row out of range must give NaN"
    assert torch.equal(out[3], x["h"][3].to(dtype)), f"{name}: a row with slot -1 passes through"
    _check_row0(f"{name} attn_block_paged row 0", out[:1], w[0][:1], o[0][:1], dtype)
    assert torch.equal(vlp, w[3]), f"{name}: kv_valid_pages"
    for i, what in ((1, "k_pages"), (2, "v_pages")):
        got, want = (kp, vp)[i - 1], w[i]
        rest = torch.ones(got.shape[:2], dtype=torch.bool, device=dev)
        rest[0, 6] = False
        assert torch.equal(got[rest], want[rest]), f"{name}: {what} changed outside row 0's slot"
        _check_row0(f"{name} {what} row 0", got[0, 6], want[0, 6], o[i][0, 6], dtype)


@pytest.mark.parametrize("name,dtype", KERNELS)
def test_kernels_page_outside_the_pool_gives_nan(name, dtype):
    """Row 2 runs at position PS + 3, but block_table holds a page outside the pool for its positions
    [0, PS): its out is NaN; its K/V are written at its slot, as the reference writes them."""
    dev = TRITON_DEVICE if name == "triton" else "cpu"
    ops = _kernels(name, dtype)
    x = _inputs(torch.float32, dev)
    pos, slots = _i32([6, 0, PS + 3, 0], dev), torch.tensor([6, -1, 5 * PS + 3, -1], device=dev)
    out, kp, vp, vlp = _attn_paged(ops, x, pos, slots, dtype, dev, bad_page=(2, 0))
    w = _attn_paged(ref, x, pos, slots, dtype, dev)
    x64 = {kk: t.double() if t.is_floating_point() and kk not in ("cos", "sin") else t for kk, t in x.items()}
    o = _attn_paged(ref, x64, pos, slots, torch.float64, dev)
    assert torch.isnan(out[2].float()).all(), f"{name}: a row reading a page outside the pool must give NaN"
    _check_row0(f"{name} attn_block_paged row 0", out[:1], w[0][:1], o[0][:1], dtype)
    assert torch.equal(out[1], x["h"][1].to(dtype)) and torch.equal(out[3], x["h"][3].to(dtype))
    assert torch.equal(vlp, w[3]), f"{name}: kv_valid_pages"
    for i, what in ((1, "k_pages"), (2, "v_pages")):
        got = (kp, vp)[i - 1]
        problem, _, _ = compare(got, w[i], o[i], dtype)
        assert problem is None, f"{name} {what}: {problem}"


# --------------------------------------------------------------------------- write_kv, write_kv_paged
FLAGS = [[0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 1]]       # [L, B]: rows 2 and 3 flagged in every layer


def _write(ops, x, pos, slots, mode, dtype, dev, rows=B):
    """write_kv (slots None) or write_kv_paged on a copy of the [L, B, H_kv, S, D] cache (paged: read as a
    pool of B S / PS pages, row b's page j being pool page b S / PS + j), with only the first `rows` rows
    flagged. Returns (k, v, kv_valid) in the contiguous layout."""
    k, v, valid = x["kl"].to(dtype).clone(), x["vl"].to(dtype).clone(), x["validl"].clone()
    flags = torch.tensor(FLAGS, dtype=torch.uint8, device=dev)
    flags[:, rows:] = 0
    common = (x["h"].to(dtype), x["norms"].to(dtype), x["wl"].to(dtype), None)
    if slots is None:
        ops.write_kv(k, v, valid, *common, _i32(pos, dev), x["cos"], x["sin"], flags, mode, EPS)
        return k, v, valid
    P = B * S // PS
    bt = torch.arange(P, dtype=torch.int32, device=dev).reshape(B, S // PS)
    ops.write_kv_paged(k.view(L, P, PS, H_kv, D), v.view(L, P, PS, H_kv, D), valid.view(L, P, PS), *common, bt,
                       _i32(pos, dev), torch.tensor(slots, device=dev), x["cos"], x["sin"], flags, mode, EPS)
    return k, v, valid


# contiguous: rows 2 and 3 at positions S and -1; paged (slot = b S + pos): row 2 at a position past the
# RoPE tables (S), with the slot of the next one; row 3 with a slot past the pool
WRITES = {False: ([6, 9, S, -1], None), True: ([6, 9, S, 5], [6, S + 9, 2 * S + S - 1, B * S + 5])}


@pytest.mark.parametrize("mode", FILL_MODES)
def test_reference_write_kv_raises_and_writes_nothing(mode):
    x = _inputs(torch.float32, "cpu")
    with pytest.raises(ValueError, match="row 2 has position"):
        _write(ref, x, *WRITES[False], mode=mode, dtype=torch.float32, dev="cpu")
    with pytest.raises(ValueError, match="row 2 has position"):
        _write(ref, x, *WRITES[True], mode=mode, dtype=torch.float32, dev="cpu")
    pos, slots = WRITES[True]
    with pytest.raises(ValueError, match="row 3 has slot_mapping"):
        _write(ref, x, pos[:2] + [0, 5], slots[:2] + [-1, slots[3]], mode=mode, dtype=torch.float32, dev="cpu")


@pytest.mark.parametrize("mode", FILL_MODES)
@pytest.mark.parametrize("name,dtype", KERNELS)
def test_kernels_write_kv_nothing_written(name, dtype, mode):
    """Rows 2 and 3 (out of range: WRITES) write nothing; rows 0 and 1 are written as the reference writes
    them alone."""
    dev = TRITON_DEVICE if name == "triton" else "cpu"
    ops = _kernels(name, dtype)
    x = _inputs(torch.float32, dev)
    x64 = {kk: t.double() if t.is_floating_point() and kk not in ("cos", "sin") else t for kk, t in x.items()}
    for paged, (pos, slots) in WRITES.items():
        got = _write(ops, x, pos, slots, mode, dtype, dev)
        safe = (pos[:2] + [0, 0], None if slots is None else slots[:2] + [-1, -1])
        want = _write(ref, x, *safe, mode=mode, dtype=dtype, dev=dev, rows=2)
        oracle = _write(ref, x64, *safe, mode=mode, dtype=torch.float64, dev=dev, rows=2)
        tag = f"{name} write_kv{'_paged' if paged else ''} {mode}"
        assert torch.equal(got[2], want[2]), f"{tag}: kv_valid"
        for i, what in ((0, "k"), (1, "v")):
            problem, _, _ = compare(got[i], want[i], oracle[i], dtype)
            assert problem is None, f"{tag} {what}: {problem}"
            assert torch.equal(got[i][:, 2:], x[what + "l"][:, 2:].to(dtype)), f"{tag}: {what} of rows 2, 3 changed"
