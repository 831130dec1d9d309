"""attn_block as four kernels (docs/design.md section 3):

1. qkv: RMSNorm + QKV GEMV (+ bias) + RoPE; q -> fp32 scratch, k/v -> cache at pos, kv_valid = 1.
   One program per (head, block of RoPE pairs (i, i + D/2), batch tile).
2. split: flash-decoding over the cache. One program per (row, kv head, split); it handles all
   H / H_kv query heads of the group, so K/V are read once. Split s takes position blocks
   s, s + NS, s + 2 NS, ... up to pos[b] (the grid never depends on pos, so CUDA graphs stay
   valid); positions with kv_valid = 0 are neither loaded nor counted. fp32 online softmax.
3. combine: merges the NS partials of each (row, head) into o [B, H D] fp32.
4. O-projection GEMV + residual (the shared gemv_residual_kernel); inactive rows get out = h.

An active row whose position is out of range (outside [0, min(S, RoPE rows)); paged: also a slot past
the pool) writes nothing in kernel 1, and kernel 2 stores l = NaN for it (paged: also for a row whose
block_table holds a page outside the pool at a position it reads), so its o and out are NaN, as in the
CUDA kernels (docs/design.md section 3.1: the kernels cannot raise without a host sync).

attn_block_paged runs the same four kernels with PAGED = True: the cache is a pool of pages
[num_pages, page_size, H_kv, D] (kv_valid [num_pages, page_size]); kernel 1 writes each row's K/V at its
slot_mapping slot (a row runs iff row_active = 1 and slot >= 0), kernel 2 reads logical position p at
slot block_table[b, p // page_size] * page_size + p % page_size (one gathered block_table load per
position block; entries outside [0, num_pages) are never dereferenced, and make the row's output NaN).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (BLOCK_K, INTERPRET, block_b, check_contiguous, check_dtype, check_head_dim,
                      launch_gemv_residual, mm, norm_dot, scratch, split_dot)

BLOCK_HALF = 16                   # RoPE pairs per qkv program (tl.dot needs N >= 16)
MAX_SPLITS = 4 if INTERPRET else 64
TARGET_PROGRAMS = 8 if INTERPRET else 264   # split programs to aim for (2 per H100 SM)


def block_p(D: int, dtype: torch.dtype) -> int:
    """Cache positions per attention inner step (fp32 tiles take twice the shared memory)."""
    if INTERPRET:
        return 16
    bp = 32 if D >= 256 else 64
    return bp // 2 if dtype == torch.float32 and D >= 128 else bp


def num_splits(S: int, bp: int, rows_heads: int) -> int:
    """Splits per (row, kv head): enough programs to fill the GPU, at most one per position block."""
    want = max(1, triton.cdiv(TARGET_PROGRAMS, rows_heads))
    return max(1, min(triton.cdiv(S, bp), MAX_SPLITS, want))


@triton.jit
def _qkv_rope_kernel(h_ptr, nw_ptr, w_ptr, bias_ptr, q_ptr, kc_ptr, vc_ptr, valid_ptr, pos_ptr, act_ptr,
                     cos_ptr, sin_ptr, slot_ptr, n_slots, B, d, S, H, H_kv, eps,
                     HAS_BIAS: tl.constexpr, D: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, PAGED: tl.constexpr):
    HALF: tl.constexpr = D // 2
    j = tl.program_id(0)            # head in [q heads | k heads | v heads]
    ib = tl.program_id(1)
    pid_b = tl.program_id(2)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = rb < B
    p = tl.load(pos_ptr + rb, mask=bmask, other=0)
    act = tl.load(act_ptr + rb, mask=bmask, other=0) != 0
    ok = bmask & act & (p >= 0) & (p < S)
    if PAGED:                       # S = min(max_pages * page_size, rope rows); the row's write slot
        sl = tl.load(slot_ptr + rb, mask=bmask, other=-1)
        ok = ok & (sl >= 0) & (sl < n_slots)
        row_kv = sl * H_kv          # int64: [slots, H_kv, D] pool
        vofs = sl
    else:
        row_kv = (rb.to(tl.int64) * H_kv) * S + p
        vofs = rb.to(tl.int64) * S + p
    k_end = tl.where(tl.max(ok.to(tl.int32), axis=0) > 0, d, 0)
    ii = ib * BLOCK_HALF + tl.arange(0, BLOCK_HALF)
    imask = ii < HALF
    r1 = (j * D + ii).to(tl.int64)
    r2 = r1 + HALF
    acc1, acc2 = norm_dot(h_ptr, nw_ptr, w_ptr, rb, bmask, r1, r2, imask, d, k_end, eps,
                          True, BLOCK_B, BLOCK_HALF, BLOCK_K, SPLIT)
    if HAS_BIAS:
        acc1 += tl.load(bias_ptr + r1, mask=imask, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(bias_ptr + r2, mask=imask, other=0.0).to(tl.float32)[None, :]
    m2 = ok[:, None] & imask[None, :]
    rb64 = rb.to(tl.int64)
    if j < H + H_kv:                # q and k heads: RoPE (rotate_half) at each row's position
        t = p.to(tl.int64)[:, None] * HALF + ii[None, :]
        c = tl.load(cos_ptr + t, mask=m2, other=0.0)
        s = tl.load(sin_ptr + t, mask=m2, other=0.0)
        o1 = acc1 * c - acc2 * s
        o2 = acc2 * c + acc1 * s
        if j < H:
            qo = rb64[:, None] * (H * D) + j * D + ii[None, :]
            tl.store(q_ptr + qo, o1, mask=m2)
            tl.store(q_ptr + qo + HALF, o2, mask=m2)
        else:
            if PAGED:
                ko = (row_kv + (j - H))[:, None] * D + ii[None, :]
            else:
                ko = ((rb64 * H_kv + (j - H)) * S + p)[:, None] * D + ii[None, :]
            tl.store(kc_ptr + ko, o1.to(kc_ptr.dtype.element_ty), mask=m2)
            tl.store(kc_ptr + ko + HALF, o2.to(kc_ptr.dtype.element_ty), mask=m2)
    else:
        if PAGED:
            vo = (row_kv + (j - H - H_kv))[:, None] * D + ii[None, :]
        else:
            vo = ((rb64 * H_kv + (j - H - H_kv)) * S + p)[:, None] * D + ii[None, :]
        tl.store(vc_ptr + vo, acc1.to(vc_ptr.dtype.element_ty), mask=m2)
        tl.store(vc_ptr + vo + HALF, acc2.to(vc_ptr.dtype.element_ty), mask=m2)
    if (j == 0) & (ib == 0):
        tl.store(valid_ptr + vofs, tl.full([BLOCK_B], 1, tl.uint8), mask=ok)


@triton.jit
def _attn_split_kernel(q_ptr, kc_ptr, vc_ptr, valid_ptr, pos_ptr, act_ptr, m_ptr, l_ptr, o_ptr,
                       bt_ptr, slot_ptr, max_pages, page_size, n_pages,
                       S, H, H_kv, NS, qk_scale,
                       D: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                       SPLIT: tl.constexpr, PAGED: tl.constexpr):
    bg = tl.program_id(0)
    sp = tl.program_id(1)
    b = bg // H_kv
    g = bg % H_kv
    p_b = tl.load(pos_ptr + b)
    act = tl.load(act_ptr + b) != 0
    ok = (p_b >= 0) & (p_b < S)
    if PAGED:
        sl_b = tl.load(slot_ptr + b)
        act = act & (sl_b >= 0)                        # slot -1: the row does not run (out = h)
        ok = ok & (sl_b < n_pages.to(tl.int64) * page_size)
    run = act & ok
    bad = act & (ok == 0)                              # out of range: nothing was written, the output is NaN
    n_pos = tl.where(run, p_b + 1, 0)
    jj = tl.arange(0, G_PAD)
    jmask = jj < G
    heads = (b * H + g * G + jj).to(tl.int64)          # (row, q head) index
    dd = tl.arange(0, D)
    q = tl.load(q_ptr + heads[:, None] * D + dd[None, :], mask=jmask[:, None], other=0.0)
    q = q * qk_scale                                   # 1/sqrt(D) and log2(e): softmax in base 2
    m_i = tl.full([G_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D], dtype=tl.float32)
    kv_base = bg.to(tl.int64) * S * D
    n_blocks = tl.cdiv(n_pos, BLOCK_P)
    for blk in range(sp, n_blocks, NS):
        ps = blk * BLOCK_P + tl.arange(0, BLOCK_P)
        if PAGED:
            inr = ps < n_pos
            pg = tl.load(bt_ptr + b.to(tl.int64) * max_pages + ps // page_size, mask=inr, other=-1)
            pg_ok = (pg >= 0) & (pg < n_pages)
            bad = bad | (tl.sum((inr & (pg_ok == 0)).to(tl.int32), axis=0) > 0)   # a page outside the pool
            inr = inr & pg_ok
            slot = pg.to(tl.int64) * page_size + ps % page_size
            vld = tl.load(valid_ptr + slot, mask=inr, other=0) != 0
            kv_off = (slot * H_kv + g) * D                                                           # [P]
        else:
            vld = tl.load(valid_ptr + b.to(tl.int64) * S + ps, mask=ps < n_pos, other=0) != 0
            kv_off = kv_base + ps * D
        kt = tl.load(kc_ptr + kv_off[None, :] + dd[:, None], mask=vld[None, :], other=0.0)        # [D, P]
        sc = mm(q, kt, SPLIT)                                                                         # [G, P]
        sc = tl.where(vld[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        v = tl.load(vc_ptr + kv_off[:, None] + dd[None, :], mask=vld[:, None], other=0.0)            # [P, D]
        acc = acc * alpha[:, None] + mm(pr, v, SPLIT)
        m_i = m_new
    part = heads * NS + sp
    l_i = tl.where(bad, float("nan"), l_i)
    tl.store(m_ptr + part, m_i, mask=jmask)
    tl.store(l_ptr + part, l_i, mask=jmask)
    tl.store(o_ptr + part[:, None] * D + dd[None, :], acc, mask=jmask[:, None])


@triton.jit
def _attn_combine_kernel(m_ptr, l_ptr, op_ptr, o_ptr, NS, D: tl.constexpr, NS_PAD: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)                 # b * H + h
    ss = tl.arange(0, NS_PAD)
    smask = ss < NS
    m = tl.load(m_ptr + bh * NS + ss, mask=smask, other=-1.0e30)
    lsum = tl.load(l_ptr + bh * NS + ss, mask=smask, other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))
    total = tl.sum(lsum * w, axis=0)
    dd = tl.arange(0, D)
    part = tl.load(op_ptr + (bh * NS + ss)[:, None] * D + dd[None, :], mask=smask[:, None], other=0.0)
    o = tl.sum(part * w[:, None], axis=0)
    o = tl.where(total > 0, o / tl.where(total > 0, total, 1.0), 0.0)
    o = tl.where(total != total, float("nan"), o)       # an out-of-range row (l = NaN): NaN, then out = NaN
    tl.store(o_ptr + bh * D + dd, o)


def attn_block(out, h, attn_norm, wqkv, bqkv, wo, k_cache, v_cache, kv_valid, pos, rope_cos, rope_sin,
               row_active, eps) -> None:
    """See d3kernels.reference.attn_block. out [B, d] written; k_cache / v_cache [B, H_kv, S, D] and
    kv_valid [B, S] updated in place at pos for active rows."""
    B, d = h.shape
    _, H_kv, S, D = k_cache.shape
    H = wqkv.shape[0] // D - 2 * H_kv
    check_dtype(h.dtype)
    check_head_dim(D)
    check_contiguous(out=out, h=h, attn_norm=attn_norm, wqkv=wqkv, bqkv=bqkv, wo=wo, k_cache=k_cache,
                     v_cache=v_cache, kv_valid=kv_valid, pos=pos, rope_cos=rope_cos, rope_sin=rope_sin,
                     row_active=row_active)
    if H % H_kv:
        raise ValueError(f"triton backend: query heads H={H} must be a multiple of H_kv={H_kv}")
    if rope_cos.shape[0] < S:
        raise ValueError(f"rope tables cover {rope_cos.shape[0]} positions, the cache has S={S}")
    _attn(out, h, attn_norm, wqkv, bqkv, wo, k_cache, v_cache, kv_valid, pos, rope_cos, rope_sin, row_active, eps,
          B, d, H, H_kv, D, S, S, None)


def _attn(out, h, attn_norm, wqkv, bqkv, wo, k_cache, v_cache, kv_valid, pos, rope_cos, rope_sin, row_active, eps,
          B, d, H, H_kv, D, S, limit, paged):
    """The four launches. S: the cache length (paged: max_pages * page_size, which sets the splits);
    limit: positions below it run; paged: None or (block_table, slot_mapping, num_pages, page_size)."""
    G = H // H_kv
    dev = h.device
    bb = block_b(B)
    if paged is None:
        bt, slots, n_pages, ps = pos, pos, 0, 1        # unused pointers
    else:
        bt, slots, n_pages, ps = paged
    q = scratch("attn.q", (B, H * D), dev)
    _qkv_rope_kernel[(H + 2 * H_kv, triton.cdiv(D // 2, BLOCK_HALF), triton.cdiv(B, bb))](
        h, attn_norm, wqkv, bqkv if bqkv is not None else wqkv, q, k_cache, v_cache, kv_valid, pos, row_active,
        rope_cos, rope_sin, slots, n_pages * ps, B, d, limit, H, H_kv, eps,
        HAS_BIAS=bqkv is not None, D=D, BLOCK_HALF=BLOCK_HALF, BLOCK_B=bb, BLOCK_K=BLOCK_K,
        SPLIT=split_dot(wqkv.dtype), PAGED=paged is not None)
    bp = block_p(D, k_cache.dtype)
    ns = num_splits(S, bp, B * H_kv)
    m = scratch("attn.m", (B * H, ns), dev)
    lsum = scratch("attn.l", (B * H, ns), dev)
    part = scratch("attn.part", (B * H, ns, D), dev)
    _attn_split_kernel[(B * H_kv, ns)](
        q, k_cache, v_cache, kv_valid, pos, row_active, m, lsum, part, bt, slots, bt.shape[-1], ps, n_pages,
        limit, H, H_kv, ns, math.log2(math.e) / math.sqrt(D),
        D=D, G=G, G_PAD=max(16, triton.next_power_of_2(G)), BLOCK_P=bp, SPLIT=split_dot(k_cache.dtype),
        PAGED=paged is not None)
    o = scratch("attn.o", (B, H * D), dev)
    _attn_combine_kernel[(B * H,)](m, lsum, part, o, ns, D=D, NS_PAD=triton.next_power_of_2(ns))
    launch_gemv_residual(out, h, o, wo, row_active, None if paged is None else slots)


def attn_block_paged(out, h, attn_norm, wqkv, bqkv, wo, k_pages, v_pages, kv_valid_pages, block_table, pos,
                     slot_mapping, rope_cos, rope_sin, row_active, eps) -> None:
    """See d3kernels.reference.attn_block_paged. out [B, d] written; k_pages / v_pages
    [num_pages, page_size, H_kv, D] and kv_valid_pages [num_pages, page_size] updated at the running rows'
    slots (row_active = 1 and slot_mapping >= 0)."""
    B, d = h.shape
    P, ps, H_kv, D = k_pages.shape
    H = wqkv.shape[0] // D - 2 * H_kv
    check_dtype(h.dtype)
    check_head_dim(D)
    check_contiguous(out=out, h=h, attn_norm=attn_norm, wqkv=wqkv, bqkv=bqkv, wo=wo, k_pages=k_pages,
                     v_pages=v_pages, kv_valid_pages=kv_valid_pages, block_table=block_table, pos=pos,
                     slot_mapping=slot_mapping, rope_cos=rope_cos, rope_sin=rope_sin, row_active=row_active)
    if H % H_kv:
        raise ValueError(f"triton backend: query heads H={H} must be a multiple of H_kv={H_kv}")
    S = block_table.shape[1] * ps
    _attn(out, h, attn_norm, wqkv, bqkv, wo, k_pages, v_pages, kv_valid_pages, pos, rope_cos, rope_sin, row_active,
          eps, B, d, H, H_kv, D, S, min(S, rope_cos.shape[0]), (block_table, slot_mapping, P, ps))
