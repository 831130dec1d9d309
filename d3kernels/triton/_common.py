"""Shared pieces of the Triton kernels: fp32-exact dots, the fused RMSNorm + GEMV
main loop, the GEMV + residual kernel, block-size choices and cached scratch.

Decode is GEMV-shaped: B (1-32) rows against a weight matrix. Each program owns
a block of output rows (weight rows) for a tile of BLOCK_B batch rows and loops
over the reduction dim, so every weight element is read once per batch tile.
The batch tile is padded to 16 rows because tl.dot needs M >= 16.

Precision. The reference computes in float32 from upcast weights and rounds
once at the store. To match it on tensor cores, an fp32 activation `a` is
split into hi + lo parts in the weight's 16-bit dtype (both exact-ish), and
dot(a_hi, w) + dot(a_lo, w) accumulates in fp32: 16 (bf16) or 22 (fp16)
significant bits of `a` instead of 8 or 11. float32 weights use an IEEE fp32
dot (no TF32).
"""
from __future__ import annotations

import os

import torch

from .. import workspace
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def split_dot(dtype: torch.dtype) -> bool:
    """True when the weights are 16-bit, so fp32 activations are hi/lo split for tl.dot."""
    return dtype in (torch.float16, torch.bfloat16)


def block_b(B: int) -> int:
    """Batch rows per program: >= 16 (tl.dot's minimum M), at most 32."""
    return max(16, min(triton.next_power_of_2(B), 32))


def block_n(n_rows: int) -> int:
    """Output rows per GEMV program: large enough to amortize, small enough to fill an H100 (~132 SMs)."""
    if INTERPRET:
        return 32  # each interpreted program costs milliseconds: fewer, wider programs
    for bn in (64, 32):
        if triton.cdiv(n_rows, bn) >= 264:
            return bn
    return 16


BLOCK_K = 64 if INTERPRET else 128


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in DTYPES:
        raise TypeError(f"triton backend: dtype {dtype} is not supported (float16, bfloat16, float32)")


def check_head_dim(D: int) -> None:
    if D & (D - 1) or not 16 <= D <= 256:
        raise ValueError(f"triton backend: head_dim {D} is not supported (a power of two in [16, 256])")


def check_contiguous(**ts) -> None:
    for name, t in ts.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"triton backend: {name} must be contiguous (got strides {tuple(t.stride())})")


def scratch(tag: str, shape: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A scratch buffer per (tag, shape, device, dtype) in the active workspace (d3kernels.workspace):
    made on the first call only, so a CUDA graph captured after a warm-up call allocates nothing."""
    return workspace.active().tensor("triton:" + tag, shape, device, dtype)


# --------------------------------------------------------------------------- device helpers

@triton.jit
def mm(a, b, SPLIT: tl.constexpr):
    """fp32 a [M, K] @ b [K, N] (weight dtype) -> fp32 [M, N], with float32-level accuracy in a."""
    if SPLIT:
        a_hi = a.to(b.dtype)
        a_lo = (a - a_hi.to(tl.float32)).to(b.dtype)
        return tl.dot(a_lo, b, tl.dot(a_hi, b))
    else:
        return tl.dot(a, b.to(tl.float32), input_precision="ieee")


@triton.jit
def row_rstd(h_ptr, rb, bmask, d, k_end, eps, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """rsqrt(mean(h[rb, :d]^2) + eps) for a tile of rows of a contiguous [*, d] tensor (k_end = 0 skips)."""
    ss = tl.zeros([BLOCK_B], dtype=tl.float32)
    rows = rb.to(tl.int64)[:, None] * d
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(h_ptr + rows + ks[None, :], mask=bmask[:, None] & (ks[None, :] < d), other=0.0)
        x = x.to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    return 1.0 / tl.sqrt(ss / d + eps)


@triton.jit
def norm_dot(h_ptr, nw_ptr, w_ptr, rb, bmask, r1, r2, nmask, d, k_end, eps,
             TWO: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             SPLIT: tl.constexpr):
    """(rmsnorm(h[rb]) * nw) @ w[r1].T and (if TWO) @ w[r2].T, fp32 [BLOCK_B, BLOCK_N] each.

    h [*, d] and w [*, d] contiguous; r1, r2 int64 weight rows; nmask masks them.
    k_end = 0 skips all loads (a program with no row to write).
    """
    rstd = row_rstd(h_ptr, rb, bmask, d, k_end, eps, BLOCK_B, BLOCK_K)
    acc1 = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    hrows = rb.to(tl.int64)[:, None] * d
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < d
        x = tl.load(h_ptr + hrows + ks[None, :], mask=bmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        nw = tl.load(nw_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        x = x * rstd[:, None] * nw[None, :]
        wmask = nmask[None, :] & kmask[:, None]
        w1 = tl.load(w_ptr + r1[None, :] * d + ks[:, None], mask=wmask, other=0.0)   # [BLOCK_K, BLOCK_N]
        acc1 += mm(x, w1, SPLIT)
        if TWO:
            w2 = tl.load(w_ptr + r2[None, :] * d + ks[:, None], mask=wmask, other=0.0)
            acc2 += mm(x, w2, SPLIT)
    return acc1, acc2


# --------------------------------------------------------------------------- kernels

@triton.jit
def norm_gemv_kernel(h_ptr, nw_ptr, w_ptr, out_ptr, B, d, N, eps,
                     GATED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT: tl.constexpr):
    """out[B, N] fp32 = rmsnorm(h) @ w[:N].T, or (GATED, w = [gate; up] of 2N rows) silu(g) * u."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = rb < B
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    r1 = rn.to(tl.int64)
    acc1, acc2 = norm_dot(h_ptr, nw_ptr, w_ptr, rb, bmask, r1, r1 + N, nmask, d, d, eps,
                          GATED, BLOCK_B, BLOCK_N, BLOCK_K, SPLIT)
    if GATED:
        res = acc1 * tl.sigmoid(acc1) * acc2
    else:
        res = acc1
    tl.store(out_ptr + rb.to(tl.int64)[:, None] * N + rn[None, :], res, mask=bmask[:, None] & nmask[None, :])


@triton.jit
def gemv_residual_kernel(out_ptr, h_ptr, a_ptr, w_ptr, act_ptr, slot_ptr, B, N, K,
                         BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                         HAS_SLOT: tl.constexpr):
    """out[B, N] = h + a[B, K] (fp32) @ w[N, K].T for rows with act != 0 (and, HAS_SLOT, slot >= 0: a paged
    cache's slot_mapping); out = h for the others.

    Each program reads and writes only its own columns of h / out, so out may alias h.
    """
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = rb < B
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    act = tl.load(act_ptr + rb, mask=bmask, other=0) != 0
    if HAS_SLOT:
        act = act & (tl.load(slot_ptr + rb, mask=bmask, other=-1) >= 0)
    amask = bmask & act
    k_end = tl.where(tl.max(amask.to(tl.int32), axis=0) > 0, K, 0)
    arows = rb.to(tl.int64)[:, None] * K
    wrows = rn.to(tl.int64)[None, :] * K
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(a_ptr + arows + ks[None, :], mask=amask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + wrows + ks[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
        acc += mm(a, w, SPLIT)
    offs = rb.to(tl.int64)[:, None] * N + rn[None, :]
    m2 = bmask[:, None] & nmask[None, :]
    hv = tl.load(h_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    res = tl.where(act[:, None], hv + acc, hv)
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=m2)


# --------------------------------------------------------------------------- launchers

def launch_norm_gemv(out: torch.Tensor, h: torch.Tensor, nw: torch.Tensor, w: torch.Tensor, N: int, eps: float,
                     gated: bool) -> None:
    B, d = h.shape
    bb, bn = block_b(B), block_n(N)
    grid = (triton.cdiv(N, bn), triton.cdiv(B, bb))
    norm_gemv_kernel[grid](h, nw, w, out, B, d, N, eps, GATED=gated, BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=BLOCK_K,
                           SPLIT=split_dot(w.dtype))


def launch_gemv_residual(out: torch.Tensor, h: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
                         row_active: torch.Tensor, slot_mapping: torch.Tensor = None) -> None:
    B, N = h.shape
    K = w.shape[1]
    bb, bn = block_b(B), block_n(N)
    grid = (triton.cdiv(N, bn), triton.cdiv(B, bb))
    gemv_residual_kernel[grid](out, h, a, w, row_active, row_active if slot_mapping is None else slot_mapping,
                               B, N, K, BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=BLOCK_K, SPLIT=split_dot(w.dtype),
                               HAS_SLOT=slot_mapping is not None)
