"""Argument checks shared by every layer that takes op arguments (docs/design.md section 3).

Each `check_<op>` validates shapes, dtypes, devices and contiguity, raises with
what was expected and what arrived, and returns the sizes it read. They only
look at tensor metadata, so they also run on fake tensors (the torch.library
fake kernels in d3kernels/_ops.py call them while torch.compile traces).

A weight may be packed (d3kernels.quant PackedWeight, PackedRows, PackedStack: weights as the checkpoint stores
them; only the cpu backend reads those): its shape and device are checked, its
storage type is the backend's to check.

This module imports torch and d3kernels.quant only: the registration module
(_ops), the public API (ops) and the driver all sit above it.
"""
from __future__ import annotations

import torch

from .quant import is_packed

FILL_MODES = ("mask", "project", "copy")


def expect(name: str, t: torch.Tensor, shape: tuple, dtype=None, device=None) -> None:
    if is_packed(t):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"expected {name} of shape {tuple(shape)}, got {tuple(t.shape)} "
                             f"({'+'.join(t.qtypes)})")
        if device is not None and t.device != device:
            raise ValueError(f"expected {name} on {device}, got {t.device}")
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"expected {name} of shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"expected {name} of dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"expected {name} on {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def _rope_rows(rope_cos, rope_sin, D: int, S: int, dev) -> None:
    expect("rope_cos", rope_cos, (rope_cos.shape[0], D // 2), torch.float32, dev)
    expect("rope_sin", rope_sin, (rope_cos.shape[0], D // 2), torch.float32, dev)
    if rope_cos.shape[0] < S:
        raise ValueError(f"rope tables cover {rope_cos.shape[0]} positions, the cache has S={S}")


def _heads(rows: int, H_kv: int, D: int, what: str) -> int:
    """Query heads H from the fused QKV row count (H + 2 H_kv) D."""
    if rows % D or rows // D <= 2 * H_kv:
        raise ValueError(f"expected {what} with (H + 2*H_kv) * D rows, H_kv={H_kv}, D={D}, got {rows} rows")
    H = rows // D - 2 * H_kv
    if H % H_kv:
        raise ValueError(f"query heads H={H} must be a multiple of H_kv={H_kv}")
    return H


def _attn_io(out, h, attn_norm, wqkv, bqkv, wo, B: int, d: int, R: int, HD: int) -> None:
    """The activations and weights of an attention block (contiguous or paged cache alike)."""
    dt, dev = h.dtype, h.device
    expect("out", out, (B, d), dt, dev)
    expect("h", h, (B, d), dt, dev)
    expect("attn_norm", attn_norm, (d,), dt, dev)
    expect("wqkv", wqkv, (R, d), dt, dev)
    if bqkv is not None:
        expect("bqkv", bqkv, (R,), dt, dev)
    expect("wo", wo, (d, HD), dt, dev)


def _write_io(src_h, norms, wqkv, bqkv, H_kv: int, D: int, L: int, B: int, dt, dev) -> int:
    """The source states and stacked weights of a KV write (contiguous or paged cache alike); returns H."""
    H = _heads(wqkv.shape[1], H_kv, D, "wqkv[l]")
    R = (H + 2 * H_kv) * D
    d = src_h.shape[1]
    expect("src_h", src_h, (B, d), dt, dev)
    expect("norms", norms, (L, d), dt, dev)
    expect("wqkv", wqkv, (L, R, d), dt, dev)
    if bqkv is not None:
        expect("bqkv", bqkv, (L, R), dt, dev)
    return H


def check_attn_block(out, h, attn_norm, wqkv, bqkv, wo, k_cache, v_cache, kv_valid, pos, rope_cos, rope_sin,
                     row_active) -> tuple:
    """Validate attn_block arguments (shapes, dtypes, devices, contiguity); return (B, d, H, H_kv, D, S)."""
    if h.dim() != 2 or k_cache.dim() != 4 or wqkv.dim() != 2:
        raise ValueError(f"expected h (B, d), k_cache (B, H_kv, S, D) and wqkv ((H + 2*H_kv) * D, d), got "
                         f"{tuple(h.shape)}, {tuple(k_cache.shape)} and {tuple(wqkv.shape)}")
    B, d = h.shape
    dt, dev = h.dtype, h.device
    _, H_kv, S, D = k_cache.shape
    H = _heads(wqkv.shape[0], H_kv, D, "wqkv")
    R = (H + 2 * H_kv) * D
    _attn_io(out, h, attn_norm, wqkv, bqkv, wo, B, d, R, H * D)
    expect("k_cache", k_cache, (B, H_kv, S, D), dt, dev)
    expect("v_cache", v_cache, (B, H_kv, S, D), dt, dev)
    expect("kv_valid", kv_valid, (B, S), torch.uint8, dev)
    expect("pos", pos, (B,), torch.int32, dev)
    expect("row_active", row_active, (B,), torch.uint8, dev)
    _rope_rows(rope_cos, rope_sin, D, S, dev)
    return B, d, H, H_kv, D, S


def check_mlp_block(out, h, mlp_norm, w_gate_up, w_down, row_active) -> tuple:
    """Validate mlp_block arguments; return (B, d, F)."""
    if h.dim() != 2 or w_down.dim() != 2:
        raise ValueError(f"expected h (B, d) and w_down (d, F), got {tuple(h.shape)} and {tuple(w_down.shape)}")
    B, d = h.shape
    F = w_down.shape[1]
    dt, dev = h.dtype, h.device
    expect("out", out, (B, d), dt, dev)
    expect("h", h, (B, d), dt, dev)
    expect("mlp_norm", mlp_norm, (d,), dt, dev)
    expect("w_gate_up", w_gate_up, (2 * F, d), dt, dev)
    expect("w_down", w_down, (d, F), dt, dev)
    expect("row_active", row_active, (B,), torch.uint8, dev)
    return B, d, F


def check_write_kv(k_cache, v_cache, kv_valid, src_h, norms, wqkv, bqkv, pos, rope_cos, rope_sin, flags,
                   mode) -> tuple:
    """Validate write_kv arguments; return (L, B, d, H, H_kv, D, S)."""
    if mode not in FILL_MODES:
        raise ValueError(f"mode must be one of {FILL_MODES}, got {mode!r}")
    if k_cache.dim() != 5 or src_h.dim() != 2 or wqkv.dim() != 3:
        raise ValueError(f"expected k_cache (L, B, H_kv, S, D), src_h (B, d) and wqkv (L, (H + 2*H_kv) * D, d), "
                         f"got {tuple(k_cache.shape)}, {tuple(src_h.shape)} and {tuple(wqkv.shape)}")
    L, B, H_kv, S, D = k_cache.shape
    d = src_h.shape[1]
    dt, dev = k_cache.dtype, k_cache.device
    expect("k_cache", k_cache, (L, B, H_kv, S, D), dt, dev)
    expect("v_cache", v_cache, (L, B, H_kv, S, D), dt, dev)
    expect("kv_valid", kv_valid, (L, B, S), torch.uint8, dev)
    H = _write_io(src_h, norms, wqkv, bqkv, H_kv, D, L, B, dt, dev)
    expect("pos", pos, (B,), torch.int32, dev)
    expect("flags", flags, (L, B), torch.uint8, dev)
    _rope_rows(rope_cos, rope_sin, D, S, dev)
    return L, B, d, H, H_kv, D, S


def _paged_common(block_table, pos, slot_mapping, B: int, D: int, dev) -> int:
    """block_table [B, max_pages] int32, pos [B] int32, slot_mapping [B] int64; return max_pages."""
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[1] < 1:
        raise ValueError(f"expected block_table of shape (B, max_pages >= 1), got "
                         f"{tuple(getattr(block_table, 'shape', ()))}")
    expect("block_table", block_table, (B, block_table.shape[1]), torch.int32, dev)
    expect("pos", pos, (B,), torch.int32, dev)
    expect("slot_mapping", slot_mapping, (B,), torch.int64, dev)
    return block_table.shape[1]


def _paged_rope(rope_cos, rope_sin, D: int, dev) -> None:
    """Paged caches take RoPE tables of any length >= 1: a position past them is out of range (the reference
    raises, the kernels treat the row as out of range)."""
    if not isinstance(rope_cos, torch.Tensor) or rope_cos.dim() != 2 or rope_cos.shape[0] < 1:
        raise ValueError(f"expected rope_cos of shape (>= 1, D/2), got {tuple(getattr(rope_cos, 'shape', ()))}")
    expect("rope_cos", rope_cos, (rope_cos.shape[0], D // 2), torch.float32, dev)
    expect("rope_sin", rope_sin, (rope_cos.shape[0], D // 2), torch.float32, dev)


def check_attn_block_paged(out, h, attn_norm, wqkv, bqkv, wo, k_pages, v_pages, kv_valid_pages, block_table, pos,
                           slot_mapping, rope_cos, rope_sin, row_active) -> tuple:
    """Validate attn_block_paged arguments (shapes, dtypes, devices, contiguity); return
    (B, d, H, H_kv, D, num_pages, page_size, max_pages). block_table entries and slot_mapping values are data:
    only the reference checks them (on the host)."""
    if h.dim() != 2 or k_pages.dim() != 4 or wqkv.dim() != 2:
        raise ValueError(f"expected h (B, d), k_pages (num_pages, page_size, H_kv, D) and wqkv "
                         f"((H + 2*H_kv) * D, d), got {tuple(h.shape)}, {tuple(k_pages.shape)} and "
                         f"{tuple(wqkv.shape)}")
    B, d = h.shape
    dt, dev = h.dtype, h.device
    P, ps, H_kv, D = k_pages.shape
    if P < 1 or ps < 1:
        raise ValueError(f"expected k_pages with num_pages >= 1 and page_size >= 1, got {tuple(k_pages.shape)}")
    H = _heads(wqkv.shape[0], H_kv, D, "wqkv")
    R = (H + 2 * H_kv) * D
    _attn_io(out, h, attn_norm, wqkv, bqkv, wo, B, d, R, H * D)
    expect("k_pages", k_pages, (P, ps, H_kv, D), dt, dev)
    expect("v_pages", v_pages, (P, ps, H_kv, D), dt, dev)
    expect("kv_valid_pages", kv_valid_pages, (P, ps), torch.uint8, dev)
    M = _paged_common(block_table, pos, slot_mapping, B, D, dev)
    expect("row_active", row_active, (B,), torch.uint8, dev)
    _paged_rope(rope_cos, rope_sin, D, dev)
    return B, d, H, H_kv, D, P, ps, M


def check_write_kv_paged(k_pages, v_pages, kv_valid_pages, src_h, norms, wqkv, bqkv, block_table, pos,
                         slot_mapping, rope_cos, rope_sin, flags, mode) -> tuple:
    """Validate write_kv_paged arguments; return (L, B, d, H, H_kv, D, num_pages, page_size, max_pages)."""
    if mode not in FILL_MODES:
        raise ValueError(f"mode must be one of {FILL_MODES}, got {mode!r}")
    if k_pages.dim() != 5 or src_h.dim() != 2 or wqkv.dim() != 3:
        raise ValueError(f"expected k_pages (L, num_pages, page_size, H_kv, D), src_h (B, d) and wqkv "
                         f"(L, (H + 2*H_kv) * D, d), got {tuple(k_pages.shape)}, {tuple(src_h.shape)} and "
                         f"{tuple(wqkv.shape)}")
    L, P, ps, H_kv, D = k_pages.shape
    if P < 1 or ps < 1:
        raise ValueError(f"expected k_pages with num_pages >= 1 and page_size >= 1, got {tuple(k_pages.shape)}")
    B, d = src_h.shape
    dt, dev = k_pages.dtype, k_pages.device
    expect("k_pages", k_pages, (L, P, ps, H_kv, D), dt, dev)
    expect("v_pages", v_pages, (L, P, ps, H_kv, D), dt, dev)
    expect("kv_valid_pages", kv_valid_pages, (L, P, ps), torch.uint8, dev)
    H = _write_io(src_h, norms, wqkv, bqkv, H_kv, D, L, B, dt, dev)
    M = _paged_common(block_table, pos, slot_mapping, B, D, dev)
    expect("flags", flags, (L, B), torch.uint8, dev)
    _paged_rope(rope_cos, rope_sin, D, dev)
    return L, B, d, H, H_kv, D, P, ps, M


def check_lm_head(logits, h, final_norm, w_lm) -> tuple:
    """Validate lm_head arguments; return (B, d, V)."""
    if h.dim() != 2 or w_lm.dim() != 2:
        raise ValueError(f"expected h (B, d) and w_lm (V, d), got {tuple(h.shape)} and {tuple(w_lm.shape)}")
    B, d = h.shape
    V = w_lm.shape[0]
    expect("logits", logits, (B, V), torch.float32, h.device)
    expect("h", h, (B, d), h.dtype, h.device)
    expect("final_norm", final_norm, (d,), h.dtype, h.device)
    expect("w_lm", w_lm, (V, d), h.dtype, h.device)
    return B, d, V


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError for sampling parameters outside their ranges."""
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_sample(tokens, logits, noise=None) -> tuple:
    """Validate sample arguments: tokens [B] int64, logits [B, V] float32 with unit stride along V (rows may be
    padded), noise [B, V] float32 on the same device when given; return (B, V)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"expected logits of shape (B, V), got {tuple(getattr(logits, 'shape', ()))}")
    B, V = logits.shape
    if logits.dtype != torch.float32:
        raise TypeError(f"expected logits of dtype torch.float32, got {logits.dtype}")
    if logits.stride(1) != 1 and V > 1:
        raise ValueError("logits must have unit stride along V")
    expect("tokens", tokens, (B,), torch.int64, logits.device)
    if noise is not None:
        expect("noise", noise, (B, V), torch.float32, logits.device)
    return B, V


def token_rows(input_ids, vocab: int, device: torch.device) -> list:
    """Public-boundary check of prompts: normalize input_ids (LongTensor [B, T] / [T], list of ints, or list of lists) to a list of lists."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.device.type not in ("cpu", device.type) or (
                input_ids.device.type == device.type and device.type != "cpu" and input_ids.device != device):
            raise ValueError(f"input_ids are on {input_ids.device}; expected the model's device {device} or cpu")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T] or [T], got shape {tuple(input_ids.shape)}")
        rows = input_ids.tolist()
    else:
        rows = list(input_ids)
        if rows and not isinstance(rows[0], (list, tuple)) and not isinstance(rows[0], torch.Tensor):
            rows = [rows]
        rows = [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in rows]
    if not rows:
        raise ValueError("input_ids is empty: give at least one prompt")
    for b, r in enumerate(rows):
        if len(r) == 0:
            raise ValueError(f"prompt {b} is empty: every prompt needs at least one token")
        bad = [t for t in r if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt {b} has token ids outside [0, {vocab}): {bad[:5]}")
    return rows


def token_column(tokens, B: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Public-boundary check of one token per row: tokens as an int, a list, or a tensor (host: the ids are
    checked; on the model's device: not read, no sync). Returns a [B] int64 tensor (on the host or device)."""
    on_device = isinstance(tokens, torch.Tensor) and tokens.device.type != "cpu"
    if on_device and tokens.device.type != device.type:
        raise ValueError(f"tokens are on {tokens.device}; expected {device} or cpu")
    if not on_device:
        tokens = tokens.reshape(-1).tolist() if isinstance(tokens, torch.Tensor) else tokens
        ids = [int(t) for t in (tokens if isinstance(tokens, (list, tuple)) else [tokens])]
        tokens = torch.tensor(token_rows([ids], vocab, device)[0], dtype=torch.int64)
    tokens = tokens.reshape(-1)
    if tokens.numel() != B:
        raise ValueError(f"expected {B} tokens (one per row), got {tokens.numel()}")
    return tokens
