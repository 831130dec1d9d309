"""The baseline: the same decode math in plain PyTorch at the model dtype
(F.rms_norm, matmul, SDPA), as a user without d3kernels would write it.
Same signatures as the d3kernels ops, so the benchmarks can swap it in as a
backend. Batch rows must share one position (the benchmarks use batch 1)."""
import torch
import torch.nn.functional as F


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attn_block(out, h, attn_norm, wqkv, bqkv, wo, k_cache, v_cache, kv_valid, pos, rope_cos, rope_sin,
               row_active, eps):
    B, d = h.shape
    _, H_kv, S, D = k_cache.shape
    H = wqkv.shape[0] // D - 2 * H_kv
    qkv = F.rms_norm(h, (d,), attn_norm, eps) @ wqkv.t()
    if bqkv is not None:
        qkv = qkv + bqkv
    p = pos[:1].long()                                  # one shared position (device tensor, no sync)
    cos = rope_cos.index_select(0, p).to(h.dtype)      # [1, D/2]
    sin = rope_sin.index_select(0, p).to(h.dtype)
    q = _rope(qkv[:, : H * D].view(B, H, 1, D), cos, sin)
    k = _rope(qkv[:, H * D:(H + H_kv) * D].view(B, H_kv, 1, D), cos, sin)
    v = qkv[:, (H + H_kv) * D:].view(B, H_kv, 1, D)
    k_cache.index_copy_(2, p, k)
    v_cache.index_copy_(2, p, v)
    kv_valid.index_fill_(1, p, 1)
    mask = (torch.arange(S, device=h.device) <= p)[None, None, None, :]   # attend p' <= pos
    o = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=H != H_kv)
    torch.addmm(h, o.reshape(B, H * D), wo.t(), out=out)


def mlp_block(out, h, mlp_norm, w_gate_up, w_down, row_active, eps):
    Fw = w_down.shape[1]
    gu = F.rms_norm(h, (h.shape[1],), mlp_norm, eps) @ w_gate_up.t()
    torch.addmm(h, F.silu(gu[:, :Fw]) * gu[:, Fw:], w_down.t(), out=out)


def lm_head(logits, h, final_norm, w_lm, eps):
    logits.copy_(F.rms_norm(h, (h.shape[1],), final_norm, eps) @ w_lm.t())


def sample(tokens, logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    torch.argmax(logits, dim=-1, out=tokens)


def write_kv(*args, **kwargs):
    raise NotImplementedError("the plain PyTorch baseline has no KV writer")
