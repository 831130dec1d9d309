"""write_kv: the depth-masked KV writer (docs/design.md section 2), one kernel per mode.

Cache k / v [L, B, H_kv, S, D], kv_valid [L, B, S], flags [L, B]: 1 where row b
skipped layer l at pos[b].
- mask: kv_valid[l, b, pos] = 0.
- project: per (layer, K/V head, RoPE-pair block, batch tile) program, RMSNorm of
  src_h with layer l's norm, the K/V rows of wqkv[l] (+ bias), RoPE on K; a program
  whose layer no row flagged reads no weights.
- copy: per (layer, row), K/V and kv_valid from the nearest lower layer with flags = 0;
  with none, kv_valid = 0. Sources are unflagged layers, which no program writes.
Positions outside [0, S) are never written.

write_kv_paged: the same kernels with PAGED = True on pools k / v [L, num_pages * page_size slots, H_kv,
D], kv_valid [L, slots]: row b writes at slot_mapping[b] (-1 = nothing), pos[b] is its RoPE position.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._attn import BLOCK_HALF
from ._common import BLOCK_K, block_b, check_contiguous, check_dtype, check_head_dim, norm_dot, split_dot

FILL_MODES = ("mask", "project", "copy")


@triton.jit
def _kv_mask_kernel(valid_ptr, pos_ptr, flags_ptr, slot_ptr, n_slots, L, B, S, BLOCK: tl.constexpr,
                    PAGED: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)     # l * B + b
    m = idx < L * B
    b = idx % B
    f = tl.load(flags_ptr + idx, mask=m, other=0)
    p = tl.load(pos_ptr + b, mask=m, other=0)
    ok = m & (f != 0) & (p >= 0) & (p < S)
    if PAGED:
        sl = tl.load(slot_ptr + b, mask=m, other=-1)
        ok = ok & (sl >= 0) & (sl < n_slots)
        vo = (idx // B).to(tl.int64) * n_slots + sl
    else:
        vo = idx.to(tl.int64) * S + p
    tl.store(valid_ptr + vo, tl.zeros([BLOCK], dtype=tl.uint8), mask=ok)


@triton.jit
def _kv_copy_kernel(kc_ptr, vc_ptr, valid_ptr, pos_ptr, flags_ptr, slot_ptr, n_slots, L, B, S, H_kv,
                    D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, PAGED: tl.constexpr):
    l = tl.program_id(0)
    b = tl.program_id(1)
    ls = tl.arange(0, BLOCK_L)
    fl = tl.load(flags_ptr + ls * B + b, mask=ls < L, other=1)
    src = tl.max(tl.where((ls < l) & (fl == 0), ls, -1), axis=0)   # nearest lower layer this step ran
    me = tl.load(flags_ptr + l * B + b)
    p = tl.load(pos_ptr + b)
    do = (me != 0) & (p >= 0) & (p < S)
    if PAGED:
        sl = tl.load(slot_ptr + b)
        do = do & (sl >= 0) & (sl < n_slots)
        sl = tl.maximum(sl, 0)
    has = do & (src >= 0)
    srcc = tl.maximum(src, 0)
    if PAGED:
        src_v = srcc.to(tl.int64) * n_slots + sl         # kv_valid index; K/V row of (layer, slot)
        dst_v = l.to(tl.int64) * n_slots + sl
    else:
        src_v = (srcc.to(tl.int64) * B + b) * S + p
        dst_v = (l.to(tl.int64) * B + b) * S + p
    vsrc = tl.load(valid_ptr + src_v, mask=has, other=0)
    tl.store(valid_ptr + dst_v, vsrc, mask=do)
    src_row = (srcc.to(tl.int64) * B + b) * H_kv
    dst_row = (l.to(tl.int64) * B + b) * H_kv
    E = H_kv * D
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        em = (e < E) & has
        g = e // D
        i = e % D
        if PAGED:
            so = (src_v * H_kv + g) * D + i
            do_ = (dst_v * H_kv + g) * D + i
        else:
            so = ((src_row + g) * S + p) * D + i
            do_ = ((dst_row + g) * S + p) * D + i
        tl.store(kc_ptr + do_, tl.load(kc_ptr + so, mask=em), mask=em)
        tl.store(vc_ptr + do_, tl.load(vc_ptr + so, mask=em), mask=em)


@triton.jit
def _kv_project_kernel(h_ptr, norms_ptr, w_ptr, bias_ptr, kc_ptr, vc_ptr, valid_ptr, pos_ptr, flags_ptr,
                       cos_ptr, sin_ptr, slot_ptr, n_slots, B, d, S, H, H_kv, eps,
                       HAS_BIAS: tl.constexpr, D: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_B: tl.constexpr,
                       BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, PAGED: tl.constexpr):
    HALF: tl.constexpr = D // 2
    pid0 = tl.program_id(0)
    l = pid0 // (2 * H_kv)
    jj = pid0 % (2 * H_kv)          # [k heads | v heads]
    ib = tl.program_id(1)
    pid_b = tl.program_id(2)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = rb < B
    p = tl.load(pos_ptr + rb, mask=bmask, other=0)
    f = tl.load(flags_ptr + l * B + rb, mask=bmask, other=0)
    ok = bmask & (f != 0) & (p >= 0) & (p < S)
    if PAGED:
        sl = tl.load(slot_ptr + rb, mask=bmask, other=-1)
        ok = ok & (sl >= 0) & (sl < n_slots)
    k_end = tl.where(tl.max(ok.to(tl.int32), axis=0) > 0, d, 0)
    ii = ib * BLOCK_HALF + tl.arange(0, BLOCK_HALF)
    imask = ii < HALF
    R = (H + 2 * H_kv) * D
    l64 = l.to(tl.int64)
    r1 = (H * D + jj * D + ii).to(tl.int64)
    r2 = r1 + HALF
    acc1, acc2 = norm_dot(h_ptr, norms_ptr + l64 * d, w_ptr + l64 * R * d, rb, bmask, r1, r2, imask, d, k_end,
                          eps, True, BLOCK_B, BLOCK_HALF, BLOCK_K, SPLIT)
    if HAS_BIAS:
        acc1 += tl.load(bias_ptr + l64 * R + r1, mask=imask, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(bias_ptr + l64 * R + r2, mask=imask, other=0.0).to(tl.float32)[None, :]
    m2 = ok[:, None] & imask[None, :]
    if PAGED:
        row = (l64 * n_slots + sl) * H_kv             # [slots, H_kv, D] pool of layer l
        vofs = l64 * n_slots + sl
    else:
        row = (l64 * B + rb.to(tl.int64)) * H_kv
        vofs = (l64 * B + rb) * S + p
    if jj < H_kv:
        t = p.to(tl.int64)[:, None] * HALF + ii[None, :]
        c = tl.load(cos_ptr + t, mask=m2, other=0.0)
        s = tl.load(sin_ptr + t, mask=m2, other=0.0)
        if PAGED:
            ko = (row + jj)[:, None] * D + ii[None, :]
        else:
            ko = ((row + jj) * S + p)[:, None] * D + ii[None, :]
        tl.store(kc_ptr + ko, (acc1 * c - acc2 * s).to(kc_ptr.dtype.element_ty), mask=m2)
        tl.store(kc_ptr + ko + HALF, (acc2 * c + acc1 * s).to(kc_ptr.dtype.element_ty), mask=m2)
    else:
        if PAGED:
            vo = (row + (jj - H_kv))[:, None] * D + ii[None, :]
        else:
            vo = ((row + (jj - H_kv)) * S + p)[:, None] * D + ii[None, :]
        tl.store(vc_ptr + vo, acc1.to(vc_ptr.dtype.element_ty), mask=m2)
        tl.store(vc_ptr + vo + HALF, acc2.to(vc_ptr.dtype.element_ty), mask=m2)
    if (jj == 0) & (ib == 0):
        tl.store(valid_ptr + vofs, tl.full([BLOCK_B], 1, tl.uint8), mask=ok)


def write_kv(k_cache, v_cache, kv_valid, src_h, norms, wqkv, bqkv, pos, rope_cos, rope_sin, flags, mode,
             eps) -> None:
    """See d3kernels.reference.write_kv. k_cache / v_cache [L, B, H_kv, S, D] and kv_valid [L, B, S] are
    updated in place at pos[b] for every (l, b) with flags[l, b] = 1."""
    if mode not in FILL_MODES:
        raise ValueError(f"mode must be one of {FILL_MODES}, got {mode!r}")
    L, B, H_kv, S, D = k_cache.shape
    check_dtype(k_cache.dtype)
    check_head_dim(D)
    check_contiguous(k_cache=k_cache, v_cache=v_cache, kv_valid=kv_valid, pos=pos, flags=flags)
    if mode == "project":
        check_contiguous(src_h=src_h, norms=norms, wqkv=wqkv, bqkv=bqkv, rope_cos=rope_cos, rope_sin=rope_sin)
        if rope_cos.shape[0] < S:
            raise ValueError(f"rope tables cover {rope_cos.shape[0]} positions, the cache has S={S}")
    _write(k_cache, v_cache, kv_valid, src_h, norms, wqkv, bqkv, pos, rope_cos, rope_sin, flags, mode, eps,
           L, B, H_kv, D, S, None)


def write_kv_paged(k_pages, v_pages, kv_valid_pages, src_h, norms, wqkv, bqkv, block_table, pos, slot_mapping,
                   rope_cos, rope_sin, flags, mode, eps) -> None:
    """See d3kernels.reference.write_kv_paged. k_pages / v_pages [L, num_pages, page_size, H_kv, D] and
    kv_valid_pages [L, num_pages, page_size] updated in place at slot_mapping[b] (>= 0) for every (l, b) with
    flags[l, b] = 1. block_table is not read."""
    if mode not in FILL_MODES:
        raise ValueError(f"mode must be one of {FILL_MODES}, got {mode!r}")
    L, P, ps, H_kv, D = k_pages.shape
    B = src_h.shape[0]
    check_dtype(k_pages.dtype)
    check_head_dim(D)
    check_contiguous(k_pages=k_pages, v_pages=v_pages, kv_valid_pages=kv_valid_pages, pos=pos,
                     slot_mapping=slot_mapping, flags=flags)
    if mode == "project":
        check_contiguous(src_h=src_h, norms=norms, wqkv=wqkv, bqkv=bqkv, rope_cos=rope_cos, rope_sin=rope_sin)
    limit = min(block_table.shape[1] * ps, rope_cos.shape[0])
    _write(k_pages, v_pages, kv_valid_pages, src_h, norms, wqkv, bqkv, pos, rope_cos, rope_sin, flags, mode, eps,
           L, B, H_kv, D, limit, (slot_mapping, P * ps))


def _write(k, v, valid, src_h, norms, wqkv, bqkv, pos, rope_cos, rope_sin, flags, mode, eps, L, B, H_kv, D, S,
           paged):
    """The launch of one mode. S: the position limit (contiguous: the cache length); paged: None or
    (slot_mapping, slots per layer)."""
    slots, n_slots = (pos, 0) if paged is None else paged
    if mode == "mask":
        block = min(1024, triton.next_power_of_2(L * B))
        _kv_mask_kernel[(triton.cdiv(L * B, block),)](valid, pos, flags, slots, n_slots, L, B, S, BLOCK=block,
                                                      PAGED=paged is not None)
    elif mode == "copy":
        _kv_copy_kernel[(L, B)](k, v, valid, pos, flags, slots, n_slots, L, B, S, H_kv, D=D,
                                BLOCK_L=triton.next_power_of_2(L),
                                BLOCK_E=min(1024, triton.next_power_of_2(H_kv * D)), PAGED=paged is not None)
    else:
        d = src_h.shape[1]
        H = wqkv.shape[1] // D - 2 * H_kv
        bb = block_b(B)
        _kv_project_kernel[(L * 2 * H_kv, triton.cdiv(D // 2, BLOCK_HALF), triton.cdiv(B, bb))](
            src_h, norms, wqkv, bqkv if bqkv is not None else wqkv, k, v, valid, pos, flags,
            rope_cos, rope_sin, slots, n_slots, B, d, S, H, H_kv, eps,
            HAS_BIAS=bqkv is not None, D=D, BLOCK_HALF=BLOCK_HALF, BLOCK_B=bb, BLOCK_K=BLOCK_K,
            SPLIT=split_dot(wqkv.dtype), PAGED=paged is not None)
