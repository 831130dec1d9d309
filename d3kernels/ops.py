"""Public op API: one function per op, with input checks and `backend=` selection.

All ops are out-variants (the caller allocates). Shapes follow docs/design.md
section 3: B rows, d hidden, H / H_kv heads, D head_dim, F MLP width, V vocab,
L layers, S cache length. See d3kernels/reference/ops.py for exact semantics.

The argument checks live in d3kernels.checks (FILL_MODES, check_* are
re-exported here). For a loop of your own under torch.compile or CUDA graphs,
use the torch.library ops torch.ops.d3k.* (README, "Low-level API").
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends
from .checks import (FILL_MODES, expect, check_attn_block, check_attn_block_paged, check_lm_head,  # noqa: F401
                     check_mlp_block, check_sample, check_sampling, check_write_kv, check_write_kv_paged)

def attn_block(out: torch.Tensor, h: torch.Tensor, attn_norm: torch.Tensor, wqkv: torch.Tensor,
               bqkv: Optional[torch.Tensor], wo: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               kv_valid: torch.Tensor, pos: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
               row_active: torch.Tensor, eps: float, backend: str = "auto") -> None:
    """out[B, d] = h + attention half of one layer at positions pos[B]; updates
    k_cache / v_cache [B, H_kv, S, D] and kv_valid [B, S] in place at pos."""
    check_attn_block(out, h, attn_norm, wqkv, bqkv, wo, k_cache, v_cache, kv_valid, pos, rope_cos, rope_sin,
                     row_active)
    impl = backends.get(backends.resolve(backend, h.device, h.dtype, k_cache.shape[-1]))
    impl.attn_block(out, h, attn_norm, wqkv, bqkv, wo, k_cache, v_cache, kv_valid, pos, rope_cos, rope_sin,
                    row_active, float(eps))


def mlp_block(out: torch.Tensor, h: torch.Tensor, mlp_norm: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor, row_active: torch.Tensor, eps: float, backend: str = "auto") -> None:
    """out[B, d] = h + w_down[d, F] @ (silu(g) * u), [g; u] = w_gate_up[2F, d] @ rmsnorm(h) * mlp_norm."""
    check_mlp_block(out, h, mlp_norm, w_gate_up, w_down, row_active)
    impl = backends.get(backends.resolve(backend, h.device, h.dtype))
    impl.mlp_block(out, h, mlp_norm, w_gate_up, w_down, row_active, float(eps))


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, kv_valid: torch.Tensor, src_h: torch.Tensor,
             norms: torch.Tensor, wqkv: torch.Tensor, bqkv: Optional[torch.Tensor], pos: torch.Tensor,
             rope_cos: torch.Tensor, rope_sin: torch.Tensor, flags: torch.Tensor, mode: str, eps: float,
             backend: str = "auto") -> None:
    """Depth-masked KV writer. k_cache / v_cache [L, B, H_kv, S, D] and kv_valid
    [L, B, S] updated in place at pos[B] for every (l, b) with flags[L, B] = 1.
    mode: "mask" | "project" | "copy" (docs/design.md section 2)."""
    check_write_kv(k_cache, v_cache, kv_valid, src_h, norms, wqkv, bqkv, pos, rope_cos, rope_sin, flags, mode)
    impl = backends.get(backends.resolve(backend, k_cache.device, k_cache.dtype, k_cache.shape[-1]))
    impl.write_kv(k_cache, v_cache, kv_valid, src_h, norms, wqkv, bqkv, pos, rope_cos, rope_sin, flags, mode,
                  float(eps))


def attn_block_paged(out: torch.Tensor, h: torch.Tensor, attn_norm: torch.Tensor, wqkv: torch.Tensor,
                     bqkv: Optional[torch.Tensor], wo: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                     kv_valid_pages: torch.Tensor, block_table: torch.Tensor, pos: torch.Tensor,
                     slot_mapping: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                     row_active: torch.Tensor, eps: float, backend: str = "auto") -> None:
    """attn_block on one layer of a paged KV cache: k_pages / v_pages [num_pages, page_size, H_kv, D],
    kv_valid_pages [num_pages, page_size] uint8, block_table [B, max_pages] int32 (row b's position p is
    slot block_table[b, p // page_size] * page_size + p % page_size), pos [B] int32, slot_mapping [B] int64
    (the new K/V's slot; -1: the row runs nothing). Rows with row_active = 1 and slot_mapping >= 0 write
    K/V and kv_valid = 1 at their slot and attend to their positions p <= pos with kv_valid = 1; the others
    get out = h. block_table and slot values are checked on the host by the reference only (see
    d3kernels.reference.attn_block_paged)."""
    check_attn_block_paged(out, h, attn_norm, wqkv, bqkv, wo, k_pages, v_pages, kv_valid_pages, block_table, pos,
                           slot_mapping, rope_cos, rope_sin, row_active)
    impl = backends.get(backends.resolve(backend, h.device, h.dtype, k_pages.shape[-1], k_pages.shape[1]))
    impl.attn_block_paged(out, h, attn_norm, wqkv, bqkv, wo, k_pages, v_pages, kv_valid_pages, block_table, pos,
                          slot_mapping, rope_cos, rope_sin, row_active, float(eps))


def write_kv_paged(k_pages: torch.Tensor, v_pages: torch.Tensor, kv_valid_pages: torch.Tensor,
                   src_h: torch.Tensor, norms: torch.Tensor, wqkv: torch.Tensor, bqkv: Optional[torch.Tensor],
                   block_table: torch.Tensor, pos: torch.Tensor, slot_mapping: torch.Tensor,
                   rope_cos: torch.Tensor, rope_sin: torch.Tensor, flags: torch.Tensor, mode: str, eps: float,
                   backend: str = "auto") -> None:
    """write_kv on a paged KV cache: k_pages / v_pages [L, num_pages, page_size, H_kv, D] and kv_valid_pages
    [L, num_pages, page_size] updated in place at slot_mapping[b] (>= 0) for every (l, b) with flags = 1;
    pos[b] is the RoPE position. mode: "mask" | "project" | "copy" (docs/design.md section 2)."""
    check_write_kv_paged(k_pages, v_pages, kv_valid_pages, src_h, norms, wqkv, bqkv, block_table, pos,
                         slot_mapping, rope_cos, rope_sin, flags, mode)
    impl = backends.get(backends.resolve(backend, k_pages.device, k_pages.dtype, k_pages.shape[-1]))
    impl.write_kv_paged(k_pages, v_pages, kv_valid_pages, src_h, norms, wqkv, bqkv, block_table, pos,
                        slot_mapping, rope_cos, rope_sin, flags, mode, float(eps))


def lm_head(logits: torch.Tensor, h: torch.Tensor, final_norm: torch.Tensor, w_lm: torch.Tensor, eps: float,
            backend: str = "auto") -> None:
    """logits[B, V] float32 = w_lm[V, d] @ (rmsnorm(h[B, d]) * final_norm[d])."""
    check_lm_head(logits, h, final_norm, w_lm)
    impl = backends.get(backends.resolve(backend, h.device, h.dtype))
    impl.lm_head(logits, h, final_norm, w_lm, float(eps))


def sample(tokens: torch.Tensor, logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, generator: Optional[torch.Generator] = None, backend: str = "auto") -> None:
    """tokens[B] int64 = sampled from logits[B, V] float32 (greedy when temperature == 0); no host sync."""
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape (B, V), got {tuple(logits.shape)}")
    expect("tokens", tokens, (logits.shape[0],), torch.int64, logits.device)
    check_sampling(temperature, top_k, top_p)
    impl = backends.get(backends.resolve(backend, logits.device, torch.float32))
    impl.sample(tokens, logits, float(temperature), int(top_k), float(top_p), generator)

