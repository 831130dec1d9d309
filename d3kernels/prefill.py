"""The batched full-depth prompt pass the driver runs on every backend (docs/design.md section 4.1).

`prefill` has the contract of the specification, d3kernels.reference.prefill (which runs rows one at a
time in float32 and stays the spec the tests compare against), but runs every row in one pass: the
projections are matmuls over all rows' new tokens packed together, attention is one
scaled_dot_product_attention per layer over the batch with the reference's mask, and RMSNorm and RoPE are
computed in float32. On a GPU with 16-bit weights the matmuls and attention run in the model's dtype on the
tensor cores, accumulating in float32 (cuBLAS with a float32 output, the fused SDPA); on a CPU they run in
float32, which is what its BLAS does fastest (fp32 weights are used as they are, 16-bit ones are widened
once per layer and call, not once per row as in the reference). Prefill is
compute-bound, so there is no kernel of our own here: what torch ships is the fast path on every device.
As in the reference (and the decode ops), the residual stream is rounded to the model dtype after each
half layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import quant
from .model import apply_rope, rms_norm


def _linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ w.T (+ b) as float32. On a GPU with 16-bit weights: the activations rounded to the weights' dtype,
    one tensor-core matmul accumulating and returning float32; a PackedWeight: its own product (native on the
    cpu backend: the weight read as stored, once per block of rows); elsewhere a float32 matmul (what a CPU
    runs fastest; fp32 weights are used as they are)."""
    if quant.is_packed(w):
        return w.linear(x, b)
    if x.is_cuda and w.dtype in (torch.float16, torch.bfloat16):
        try:
            y = torch.mm(x.to(w.dtype), w.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):      # a torch without mm's out_dtype: rounded output instead
            y = F.linear(x.to(w.dtype), w).float()
    else:
        y = x.float() @ w.float().t()
    return y if b is None else y + b.float()


def prefill(hidden_out: torch.Tensor, input_ids: torch.Tensor, lengths: list, weights, k_cache: torch.Tensor,
            v_cache: torch.Tensor, kv_valid: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
            eps: float, starts: Optional[list] = None) -> torch.Tensor:
    """Full-depth prompt pass of B rows at once; arguments as d3kernels.reference.prefill. Returns the
    hidden states [N, d] (model dtype, before the final norm) of every new position, packed row after row
    (row b's i-th new token at sum(lengths[:b]) + i): a verify pass reads them all.

    hidden_out [B, d] (written): each row's last new position's hidden state, before the final norm.
    input_ids [B, T] int64 (right-padded), lengths: the B prompt lengths (>= 1). k_cache / v_cache
    [L, B, H_kv, S, D], kv_valid [L, B, S] uint8: row b's positions [start_b, start_b + len_b) are written
    at every layer. starts (default 0): with start_b > 0 the tokens continue a conversation: at layer l a
    new position attends to the earlier positions p < start_b that layer holds (kv_valid[l, b, p] = 1) and
    causally to the new ones. rope_cos / rope_sin [>= S, D/2] float32.
    """
    L, B, H_kv, S, D = k_cache.shape
    dt, dev = k_cache.dtype, k_cache.device
    # attention in the model dtype on a GPU (fused SDPA accumulates in float32), in float32 elsewhere
    adt = dt if dev.type == "cuda" and dt in (torch.float16, torch.bfloat16) else torch.float32
    starts = list(starts) if starts is not None else [0] * len(lengths)
    if len(lengths) != B or len(starts) != B:
        raise ValueError(f"prefill: {len(lengths)} lengths and {len(starts)} starts for a cache of {B} rows")
    for b, n in enumerate(lengths):
        if n < 1 or starts[b] < 0 or starts[b] + n > min(S, rope_cos.shape[0]):
            raise ValueError(f"prefill: row {b} covers positions [{starts[b]}, {starts[b] + n}), outside the "
                             f"cache (S={S})")
    T = max(lengths)
    # packed tokens: row b's i-th new token is at flat index offs[b] + i
    n_t = torch.tensor(lengths, device=dev)
    s_t = torch.tensor(starts, device=dev)
    row = torch.repeat_interleave(torch.arange(B, device=dev), n_t)                       # [N]
    offs = torch.cumsum(n_t, 0) - n_t
    i_in_row = torch.arange(int(n_t.sum()), device=dev) - offs[row]
    pos = s_t[row] + i_in_row                                                              # [N] positions
    x = quant.rows(weights.embed, input_ids.to(dev)[row, i_in_row]).to(dt)                  # [N, d]
    cos, sin = rope_cos[pos].float()[:, None], rope_sin[pos].float()[:, None]
    S_att = int((s_t + n_t).max())
    # the batch's attention mask over the keys [0, S_att): query (b, i) sees p < start_b where the layer holds
    # K/V and start_b <= p <= start_b + i; padded queries (i >= len_b) see position start_b only (discarded)
    q_pos = s_t[:, None] + torch.arange(T, device=dev)[None, :]                           # [B, T]
    keys = torch.arange(S_att, device=dev)
    causal = (keys[None, None, :] >= s_t[:, None, None]) & (keys[None, None, :] <= q_pos[:, :, None])
    pad = torch.arange(T, device=dev)[None, :] >= n_t[:, None]                            # [B, T]
    causal |= pad[:, :, None] & (keys[None, None, :] == s_t[:, None, None])
    older = keys[None, :] < s_t[:, None]                                                   # [B, S_att]
    grid = torch.zeros(B, T, dtype=torch.bool, device=dev)
    grid[row, i_in_row] = True
    for l, lw in enumerate(weights.layers):
        H = lw.wqkv.shape[0] // D - 2 * H_kv
        qkv = _linear(rms_norm(x, lw.attn_norm, eps), lw.wqkv, lw.bqkv)
        q = apply_rope(qkv[:, : H * D].view(-1, H, D), cos, sin)
        k = apply_rope(qkv[:, H * D: (H + H_kv) * D].view(-1, H_kv, D), cos, sin)
        v = qkv[:, (H + H_kv) * D:].view(-1, H_kv, D)
        k_cache[l, row, :, pos] = k.to(dt)
        v_cache[l, row, :, pos] = v.to(dt)
        kv_valid[l, row, pos] = 1
        qb = torch.zeros(B, T, H, D, dtype=adt, device=dev)
        qb[row, i_in_row] = q.to(adt)
        mask = causal | (older & kv_valid[l, :, :S_att].bool())[:, None, :]               # [B, T, S_att]
        kk, vv = k_cache[l, :, :, :S_att].to(adt), v_cache[l, :, :, :S_att].to(adt)
        o = F.scaled_dot_product_attention(qb.transpose(1, 2), kk, vv, attn_mask=mask[:, None],
                                           enable_gqa=H != H_kv)                           # [B, H, T, D]
        o = o.transpose(1, 2)[grid].reshape(-1, H * D)                                     # packed [N, H D]
        x = (x.float() + _linear(o, lw.wo)).to(dt)
        Fw = lw.w_down.shape[1]
        gu = _linear(rms_norm(x, lw.mlp_norm, eps), lw.w_gate_up)
        x = (x.float() + _linear(F.silu(gu[:, :Fw]) * gu[:, Fw:], lw.w_down)).to(dt)
    last = offs + n_t - 1
    hidden_out.copy_(x[last].to(hidden_out.dtype))
    return x
