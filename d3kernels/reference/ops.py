"""Reference implementations of the d3kernels ops (docs/design.md section 3).

Every op is an out-variant: the caller allocates, the op writes. All math runs
in float32 (upcast from the model dtype) and results are rounded once, when they
are stored. Other backends are tested against these functions.

Shapes: B rows, d hidden, H / H_kv heads, D head_dim, F MLP width, V vocab,
L layers, S cache length (max_seq_len).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..cache import paged_slots
from ..model import apply_rope, rms_norm

FILL_MODES = ("mask", "project", "copy")


def _f(t: torch.Tensor) -> torch.Tensor:
    """Upcast to float32; float64 stays float64, so the same code is the float64 oracle in tests."""
    return t if t.dtype == torch.float64 else t.float()


def _check_positions(positions: list, rows: list, limit: int, op: str) -> None:
    """The reference reads positions on the host, so it rejects out-of-range ones before writing anything
    (docs/design.md section 3.1; the kernels cannot raise without a host sync: attn_block gives a NaN row and
    writes nothing for it, write_kv skips it)."""
    for b in rows:
        if not 0 <= positions[b] < limit:
            raise ValueError(f"{op}: row {b} has position {positions[b]}, outside [0, {limit}) "
                             f"(the cache length and the RoPE tables)")


def _qkv(h: torch.Tensor, attn_norm: torch.Tensor, wqkv: torch.Tensor, bqkv: Optional[torch.Tensor], eps: float,
         H: int, H_kv: int, D: int) -> tuple:
    """q [B, H, D], k and v [B, H_kv, D] (fp32, before RoPE) = wqkv @ rmsnorm(h) (+ bias)."""
    B = h.shape[0]
    qkv = rms_norm(h, attn_norm, eps) @ _f(wqkv).t()
    if bqkv is not None:
        qkv = qkv + _f(bqkv)
    return (qkv[:, : H * D].view(B, H, D), qkv[:, H * D: (H + H_kv) * D].view(B, H_kv, D),
            qkv[:, (H + H_kv) * D:].view(B, H_kv, D))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Masked GQA attention of one row. q [H, D]; k, v [H_kv, P, D]; valid [P] bool -> [H, D] fp32."""
    H, D = q.shape
    H_kv = k.shape[0]
    k = _f(k[:, valid])                      # [H_kv, P', D]
    v = _f(v[:, valid])
    qg = _f(q).view(H_kv, H // H_kv, D)      # heads h = g * (H / H_kv) + j share kv head g
    scores = torch.einsum("gjd,gpd->gjp", qg, k) * (1.0 / D ** 0.5)
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("gjp,gpd->gjd", probs, v).reshape(H, D)


def attn_block(out: torch.Tensor, h: torch.Tensor, attn_norm: torch.Tensor, wqkv: torch.Tensor,
               bqkv: Optional[torch.Tensor], wo: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, kv_valid: torch.Tensor, pos: torch.Tensor,
               rope_cos: torch.Tensor, rope_sin: torch.Tensor, row_active: torch.Tensor,
               eps: float) -> None:
    """One decode step of a layer's attention half, residual included.

    out [B, d] (written), h [B, d], attn_norm [d], wqkv [(H + 2 H_kv) D, d],
    bqkv [(H + 2 H_kv) D] or None, wo [d, H D], k_cache / v_cache [B, H_kv, S, D]
    (updated in place at pos), kv_valid [B, S] uint8 (set to 1 at pos),
    pos [B] int32, rope_cos / rope_sin [S, D/2] float32, row_active [B] uint8.

    For active rows: out = h + wo @ attn(q, valid cache) where q, k, v come from
    wqkv @ rmsnorm(h) (+ bias), RoPE at pos. Attention covers positions p <= pos
    with kv_valid = 1. Inactive rows: out = h, nothing written.
    """
    B, d = h.shape
    H_kv, D = k_cache.shape[1], k_cache.shape[3]
    H = wqkv.shape[0] // D - 2 * H_kv
    q, k, v = _qkv(h, attn_norm, wqkv, bqkv, eps, H, H_kv, D)
    res = _f(h).clone()
    active = row_active.bool().tolist()
    positions = pos.tolist()
    _check_positions(positions, [b for b in range(B) if active[b]], min(k_cache.shape[2], rope_cos.shape[0]),
                     "attn_block")
    for b in range(B):
        if not active[b]:
            continue
        p = positions[b]
        cos, sin = _f(rope_cos[p]), _f(rope_sin[p])
        qb = apply_rope(q[b], cos, sin)
        k_cache[b, :, p] = apply_rope(k[b], cos, sin).to(k_cache.dtype)
        v_cache[b, :, p] = v[b].to(v_cache.dtype)
        kv_valid[b, p] = 1
        o = _attend(qb, k_cache[b, :, : p + 1], v_cache[b, :, : p + 1], kv_valid[b, : p + 1].bool())
        res[b] += o.reshape(H * D) @ _f(wo).t()
    out.copy_(res.to(out.dtype))


def mlp_block(out: torch.Tensor, h: torch.Tensor, mlp_norm: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor, row_active: torch.Tensor, eps: float) -> None:
    """A layer's MLP half, residual included.

    out [B, d] (written), h [B, d], mlp_norm [d], w_gate_up [2F, d] ([gate; up]
    rows), w_down [d, F], row_active [B] uint8.
    Active rows: out = h + w_down @ (silu(g) * u), [g; u] = w_gate_up @ rmsnorm(h).
    Inactive rows: out = h.
    """
    F = w_down.shape[1]
    gu = rms_norm(h, mlp_norm, eps) @ _f(w_gate_up).t()
    a = torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]
    res = _f(h) + a @ _f(w_down).t()
    res = torch.where(row_active.bool()[:, None], res, _f(h))
    out.copy_(res.to(out.dtype))


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, kv_valid: torch.Tensor,
             src_h: torch.Tensor, norms: torch.Tensor, wqkv: torch.Tensor,
             bqkv: Optional[torch.Tensor], pos: torch.Tensor, rope_cos: torch.Tensor,
             rope_sin: torch.Tensor, flags: torch.Tensor, mode: str, eps: float) -> None:
    """The depth-masked KV writer: fill K/V of skipped layers at each row's pos.

    k_cache / v_cache [L, B, H_kv, S, D] and kv_valid [L, B, S] are updated in
    place. src_h [B, d] is the hidden state entering the skipped run. norms
    [L, d] are the attn_norm weights, wqkv [L, (H + 2 H_kv) D, d] the stacked
    fused QKV weights (only the K/V rows are read), bqkv [L, (H + 2 H_kv) D] or
    None. pos [B] int32, rope tables [S, D/2] float32, flags [L, B] uint8: 1
    where row b skipped layer l at pos[b].

    mode "mask": kv_valid[l, b, pos] = 0, K/V untouched.
    mode "project": K/V of layer l from rmsnorm(src_h) with layer l's norm and
        K/V rows, RoPE at pos; kv_valid = 1.
    mode "copy": K/V copied from the nearest lower layer l' with flags[l', b] = 0
        (a layer this step ran), kv_valid copied from it; with no such layer,
        behaves as "mask".
    """
    if mode not in FILL_MODES:
        raise ValueError(f"mode must be one of {FILL_MODES}, got {mode!r}")
    L, B, H_kv, S, D = k_cache.shape
    H = wqkv.shape[1] // D - 2 * H_kv
    positions = pos.tolist()
    fl = flags.bool().tolist()
    _check_positions(positions, [b for b in range(B) if any(fl[l][b] for l in range(L))],
                     min(S, rope_cos.shape[0]), "write_kv")
    for b in range(B):
        p = positions[b]
        for l in range(L):
            if not fl[l][b]:
                continue
            if mode == "mask":
                kv_valid[l, b, p] = 0
            elif mode == "project":
                x = rms_norm(src_h[b], norms[l], eps)
                kv = x @ _f(wqkv[l, H * D:]).t()
                if bqkv is not None:
                    kv = kv + _f(bqkv[l, H * D:])
                k = apply_rope(kv[: H_kv * D].view(H_kv, D), _f(rope_cos[p]), _f(rope_sin[p]))
                k_cache[l, b, :, p] = k.to(k_cache.dtype)
                v_cache[l, b, :, p] = kv[H_kv * D:].view(H_kv, D).to(v_cache.dtype)
                kv_valid[l, b, p] = 1
            else:  # copy
                src = next((j for j in range(l - 1, -1, -1) if not fl[j][b]), None)
                if src is None:
                    kv_valid[l, b, p] = 0
                else:
                    k_cache[l, b, :, p] = k_cache[src, b, :, p]
                    v_cache[l, b, :, p] = v_cache[src, b, :, p]
                    kv_valid[l, b, p] = kv_valid[src, b, p]


def lm_head(logits: torch.Tensor, h: torch.Tensor, final_norm: torch.Tensor, w_lm: torch.Tensor,
            eps: float) -> None:
    """logits [B, V] float32 (written) = w_lm [V, d] @ rmsnorm(h [B, d]) * final_norm [d]."""
    logits.copy_(rms_norm(h, final_norm, eps) @ _f(w_lm).t())


def sample(tokens: torch.Tensor, logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> None:
    """Pick the next token per row, with no host sync.

    tokens [B] int64 (written), logits [B, V] float32. temperature 0 is greedy
    (argmax). Otherwise logits / temperature, restricted to the top_k largest
    (0 = all) and to the smallest set whose probability reaches top_p, sampled
    by the exponential-race trick (argmax p / E, E ~ Exp(1)), which needs no
    sync and is CUDA-graph safe: E is drawn from `generator`, then
    sample_from_noise picks the tokens.
    """
    if temperature <= 0.0:
        tokens.copy_(logits.argmax(dim=-1))
        return
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    noise = torch.empty(logits.shape, dtype=dt, device=logits.device).exponential_(generator=generator)
    sample_from_noise(tokens, logits, noise, temperature, top_k, top_p)


def sample_from_noise(tokens: torch.Tensor, logits: torch.Tensor, noise: torch.Tensor, temperature: float,
                      top_k: int = 0, top_p: float = 1.0) -> None:
    """sample() with its randomness given: noise [B, V] float32 holds Exp(1) draws (e.g.
    noise.exponential_(generator=g)). tokens [B] int64 (written) = argmax over the
    temperature / top_k / top_p filtered probabilities divided by noise; temperature 0
    is greedy and ignores noise. A pure function of its inputs, so it can be a
    torch.library op (torch.ops.d3k.sample) that compiles without a generator.
    """
    if temperature <= 0.0:
        tokens.copy_(logits.argmax(dim=-1))
        return
    tokens.copy_((filtered_probs(logits, temperature, top_k, top_p) / noise).argmax(dim=-1))


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution sample() draws from: softmax of logits [B, V] / temperature (> 0), restricted to
    the top_k largest (0 = all) and to the smallest set whose probability reaches top_p."""
    x = _f(logits) / temperature
    if top_k and 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, idx = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (cum - torch.softmax(sorted_x, dim=-1)) >= top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.empty_like(x).scatter_(-1, idx, sorted_x)
    return torch.softmax(x, dim=-1)


def prefill(hidden_out: torch.Tensor, input_ids: torch.Tensor, lengths: list, weights, k_cache: torch.Tensor,
            v_cache: torch.Tensor, kv_valid: torch.Tensor, rope_cos: torch.Tensor,
            rope_sin: torch.Tensor, eps: float, starts: Optional[list] = None) -> None:
    """Full-depth prompt pass. Writes K/V and kv_valid of every layer for row b's positions
    [start_b, start_b + len_b).

    hidden_out [B, d] (written): the last prompt position's final hidden state,
    before the final norm. input_ids [B, T] int64 (right-padded), lengths: the
    B prompt lengths. weights: a d3kernels.model.Weights. Cache tensors as in
    write_kv. starts: where each row's tokens go (default 0: a new request).
    With start_b > 0 the tokens continue a conversation in the cache: at each
    layer l, a new position attends to the earlier positions p < start_b that
    layer holds (kv_valid[l, b, p] = 1) and causally to the new ones. Rows run
    one at a time; float32 math.
    """
    L, B, H_kv, S, D = k_cache.shape
    dt = hidden_out.dtype
    starts = starts or [0] * len(lengths)
    for b, n in enumerate(lengths):
        s0 = starts[b]
        if s0 < 0 or s0 + n > min(S, rope_cos.shape[0]):
            raise ValueError(f"prefill: row {b} covers positions [{s0}, {s0 + n}), outside the cache (S={S})")
        x = _f(weights.embed[input_ids[b, :n]])   # [n, d]
        cos, sin = _f(rope_cos[s0:s0 + n]), _f(rope_sin[s0:s0 + n])
        for l, lw in enumerate(weights.layers):
            H = lw.wqkv.shape[0] // D - 2 * H_kv
            qkv = rms_norm(x, lw.attn_norm, eps) @ _f(lw.wqkv).t()
            if lw.bqkv is not None:
                qkv = qkv + _f(lw.bqkv)
            q = apply_rope(qkv[:, : H * D].view(n, H, D), cos[:, None], sin[:, None])
            k = apply_rope(qkv[:, H * D: (H + H_kv) * D].view(n, H_kv, D), cos[:, None], sin[:, None])
            v = qkv[:, (H + H_kv) * D:].view(n, H_kv, D)
            k_cache[l, b, :, s0:s0 + n] = k.transpose(0, 1).to(k_cache.dtype)
            v_cache[l, b, :, s0:s0 + n] = v.transpose(0, 1).to(v_cache.dtype)
            kv_valid[l, b, s0:s0 + n] = 1
            kk = _f(k_cache[l, b, :, :s0 + n]).repeat_interleave(H // H_kv, dim=0)   # [H, s0 + n, D]
            vv = _f(v_cache[l, b, :, :s0 + n]).repeat_interleave(H // H_kv, dim=0)
            if s0 == 0:
                o = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(0, 1), kk, vv, is_causal=True)      # [H, n, D]
            else:   # earlier positions this layer holds, then causal over the new ones
                mask = torch.ones(n, s0 + n, dtype=torch.bool, device=x.device).tril(s0)
                mask[:, :s0] &= kv_valid[l, b, :s0].bool()[None, :]
                o = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask)
            # round the residual stream to the model dtype after each half, as the decode ops do
            x = _f((x + o.transpose(0, 1).reshape(n, H * D) @ _f(lw.wo).t()).to(dt))
            F = lw.w_down.shape[1]
            gu = rms_norm(x, lw.mlp_norm, eps) @ _f(lw.w_gate_up).t()
            x = _f((x + (torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]) @ _f(lw.w_down).t()).to(dt))
        hidden_out[b] = x[-1].to(hidden_out.dtype)


# --------------------------------------------------------------------------- paged KV cache
# A pool of fixed-size pages per layer: k_pages / v_pages [(L,) num_pages, page_size, H_kv, D], validity
# kv_valid_pages [(L,) num_pages, page_size] uint8. Row b's logical position p lives in physical slot
# block_table[b, p // page_size] * page_size + p % page_size (slot s = page s // page_size, entry
# s % page_size). slot_mapping [B] int64: the slot where row b's new K/V go; -1 = write nothing (and, in
# attn_block_paged, run nothing: out = h). The kernels cannot check block_table or slot values without a
# host sync; the reference reads them on the host and raises (_check_paged).

def _check_paged(op: str, rows: list, positions: list, slots: list, block_table: torch.Tensor, page_size: int,
                 num_pages: int, limit: int) -> None:
    """Host checks of the rows that write (and, in attn_block_paged, read): position in [0, limit), slot in
    the pool, every block_table entry of positions 0..pos a page of the pool, the slot being the one
    block_table gives pos, and no two rows writing the same slot."""
    bt = block_table.tolist()
    seen = {}
    for b in rows:
        p, s = positions[b], slots[b]
        if not 0 <= p < limit:
            raise ValueError(f"{op}: row {b} has position {p}, outside [0, {limit}) (block_table pages x "
                             f"page_size and the RoPE tables)")
        if not 0 <= s < num_pages * page_size:
            raise ValueError(f"{op}: row {b} has slot_mapping {s}, outside [0, {num_pages * page_size}) "
                             f"(num_pages x page_size)")
        for i in range(p // page_size + 1):
            if not 0 <= bt[b][i] < num_pages:
                raise ValueError(f"{op}: block_table[{b}, {i}] = {bt[b][i]} is not a page of the pool "
                                 f"[0, {num_pages})")
        want = bt[b][p // page_size] * page_size + p % page_size
        if s != want:
            raise ValueError(f"{op}: row {b} writes slot {s}, but block_table puts its position {p} in slot "
                             f"{want}")
        if s in seen:
            raise ValueError(f"{op}: rows {seen[s]} and {b} both write slot {s}")
        seen[s] = b


def attn_block_paged(out: torch.Tensor, h: torch.Tensor, attn_norm: torch.Tensor, wqkv: torch.Tensor,
                     bqkv: Optional[torch.Tensor], wo: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                     kv_valid_pages: torch.Tensor, block_table: torch.Tensor, pos: torch.Tensor,
                     slot_mapping: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                     row_active: torch.Tensor, eps: float) -> None:
    """attn_block on one layer of a paged KV cache.

    k_pages / v_pages [num_pages, page_size, H_kv, D] and kv_valid_pages [num_pages, page_size] uint8 (updated
    in place at the rows' slots), block_table [B, max_pages] int32, pos [B] int32 (the new token's position:
    RoPE, and attention covers logical positions p <= pos), slot_mapping [B] int64 (where the new K/V go,
    -1 = nothing). Other arguments as in attn_block.

    A row runs iff row_active = 1 and slot_mapping >= 0; other rows get out = h and write nothing. Every
    running row first writes k, v and kv_valid = 1 at its slot; then each attends to its logical positions
    p <= pos whose slot (through block_table) has kv_valid = 1. slot_mapping[b] must be the slot
    block_table gives pos[b], and no two running rows may write one slot: checked here, on the host (the
    kernels cannot; they write at slot_mapping and read through block_table).
    """
    B, d = h.shape
    P, ps, H_kv, D = k_pages.shape
    H = wqkv.shape[0] // D - 2 * H_kv
    active = row_active.bool().tolist()
    positions, slots = pos.tolist(), slot_mapping.tolist()
    rows = [b for b in range(B) if active[b] and slots[b] >= 0]
    _check_paged("attn_block_paged", rows, positions, slots, block_table, ps, P,
                 min(block_table.shape[1] * ps, rope_cos.shape[0]))
    q, k, v = _qkv(h, attn_norm, wqkv, bqkv, eps, H, H_kv, D)
    kf, vf, validf = k_pages.view(P * ps, H_kv, D), v_pages.view(P * ps, H_kv, D), kv_valid_pages.view(P * ps)
    qs = {}
    for b in rows:                                # every write, then every read (as the kernels order them)
        p, s = positions[b], slots[b]
        cos, sin = _f(rope_cos[p]), _f(rope_sin[p])
        qs[b] = apply_rope(q[b], cos, sin)
        kf[s] = apply_rope(k[b], cos, sin).to(k_pages.dtype)
        vf[s] = v[b].to(v_pages.dtype)
        validf[s] = 1
    res = _f(h).clone()
    for b in rows:
        sl = paged_slots(block_table, b, positions[b] + 1, ps)
        o = _attend(qs[b], kf[sl].transpose(0, 1), vf[sl].transpose(0, 1), validf[sl].bool())
        res[b] += o.reshape(H * D) @ _f(wo).t()
    out.copy_(res.to(out.dtype))


def write_kv_paged(k_pages: torch.Tensor, v_pages: torch.Tensor, kv_valid_pages: torch.Tensor,
                   src_h: torch.Tensor, norms: torch.Tensor, wqkv: torch.Tensor, bqkv: Optional[torch.Tensor],
                   block_table: torch.Tensor, pos: torch.Tensor, slot_mapping: torch.Tensor,
                   rope_cos: torch.Tensor, rope_sin: torch.Tensor, flags: torch.Tensor, mode: str,
                   eps: float) -> None:
    """write_kv on a paged KV cache: k_pages / v_pages [L, num_pages, page_size, H_kv, D] and kv_valid_pages
    [L, num_pages, page_size] are updated in place at slot_mapping[b] for every (l, b) with flags[l, b] = 1
    and slot_mapping[b] >= 0. pos [B] is the RoPE position ("project"); block_table [B, max_pages] int32 is
    only checked (slot_mapping[b] must be the slot it gives pos[b]; no two written rows share a slot).
    Modes as in write_kv; "copy" copies the same slot of the nearest lower layer with flags = 0."""
    if mode not in FILL_MODES:
        raise ValueError(f"mode must be one of {FILL_MODES}, got {mode!r}")
    L, P, ps, H_kv, D = k_pages.shape
    B = src_h.shape[0]
    H = wqkv.shape[1] // D - 2 * H_kv
    positions, slots = pos.tolist(), slot_mapping.tolist()
    fl = flags.bool().tolist()
    rows = [b for b in range(B) if slots[b] >= 0 and any(fl[l][b] for l in range(L))]
    _check_paged("write_kv_paged", rows, positions, slots, block_table, ps, P,
                 min(block_table.shape[1] * ps, rope_cos.shape[0]))
    kf, vf = k_pages.view(L, P * ps, H_kv, D), v_pages.view(L, P * ps, H_kv, D)
    validf = kv_valid_pages.view(L, P * ps)
    for b in rows:
        p, s = positions[b], slots[b]
        for l in range(L):
            if not fl[l][b]:
                continue
            if mode == "mask":
                validf[l, s] = 0
            elif mode == "project":
                x = rms_norm(src_h[b], norms[l], eps)
                kv = x @ _f(wqkv[l, H * D:]).t()
                if bqkv is not None:
                    kv = kv + _f(bqkv[l, H * D:])
                kf[l, s] = apply_rope(kv[: H_kv * D].view(H_kv, D), _f(rope_cos[p]),
                                      _f(rope_sin[p])).to(k_pages.dtype)
                vf[l, s] = kv[H_kv * D:].view(H_kv, D).to(v_pages.dtype)
                validf[l, s] = 1
            else:  # copy
                src = next((j for j in range(l - 1, -1, -1) if not fl[j][b]), None)
                if src is None:
                    validf[l, s] = 0
                else:
                    kf[l, s] = kf[src, s]
                    vf[l, s] = vf[src, s]
                    validf[l, s] = validf[src, s]
