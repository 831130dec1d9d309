"""Per-op microbenchmarks: one layer's attn_block, mlp_block, and the lm_head,
per backend, at batch 1 and context 512 (32k for the long-context attention case).

Weights (and caches) are rotated through enough copies to defeat the 50 MB L2.
Each case records device time, bytes, GB/s and the fraction of the read
bandwidth measured in the same run (extra_info of the pytest-benchmark JSON).
"""
import pytest
import torch

import bench_common as bc
import torch_baseline
from d3kernels import backends
from d3kernels.model import rope_tables

BACKENDS = ["reference", "triton"] if bc.SMOKE else ["cuda", "triton", "torch"]
CONTEXT = 16 if bc.SMOKE else 512


def _impl(name, cfg):
    if name == "torch":
        return torch_baseline
    reason = backends.why_not(name, bc.DEVICE, bc.DTYPE, cfg.head_dim)
    if reason:
        pytest.skip(f"backend {name} unavailable: {reason}")
    return backends.get(name)


def _layer_set(cfg, S, n, B=1):
    """n independent copies of one layer's weights plus a KV cache each."""
    out = []
    for c in range(n):
        w = bc.random_weights(cfg.__class__(**{**cfg.__dict__, "num_layers": 1, "vocab": 8}), seed=c)
        k = torch.randn(B, cfg.kv_heads, S, cfg.head_dim, device=bc.DEVICE).to(bc.DTYPE)
        v = torch.randn_like(k)
        valid = torch.ones(B, S, device=bc.DEVICE, dtype=torch.uint8)
        out.append((w.layers[0], k, v, valid))
    return out


@pytest.mark.parametrize("shape", bc.shapes())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["attn_block", "mlp_block", "lm_head"])
def test_op(benchmark, read_bw, op, backend, shape):
    cfg = bc.config(shape)
    impl = _impl(backend, cfg)
    B, d, S = 1, cfg.hidden, CONTEXT + 1
    dsize = torch.empty((), dtype=bc.DTYPE).element_size()
    h = torch.randn(B, d, device=bc.DEVICE).to(bc.DTYPE)
    out = torch.empty_like(h)
    active = torch.ones(B, device=bc.DEVICE, dtype=torch.uint8)
    pos = torch.full((B,), CONTEXT, device=bc.DEVICE, dtype=torch.int32)
    if op == "lm_head":
        w = bc.random_weights(cfg.__class__(**{**cfg.__dict__, "num_layers": 1}))
        lm = [w.lm_head] + [torch.randn_like(w.lm_head) for _ in range(bc.copies_to_defeat_l2(w.lm_head.nbytes) - 1)]
        logits = torch.empty(B, cfg.vocab, device=bc.DEVICE, dtype=torch.float32)
        nbytes = w.lm_head.nbytes + d * dsize

        def fn(i):
            impl.lm_head(logits, h, w.final_norm, lm[i % len(lm)], cfg.eps)
        n = len(lm)
    else:
        per_layer = cfg.layer_bytes(dsize)
        sets = _layer_set(cfg, S, bc.copies_to_defeat_l2(per_layer))
        cos, sin = rope_tables(cfg, S, bc.DEVICE)
        if op == "attn_block":
            nbytes = (cfg.qkv_rows + cfg.heads * cfg.head_dim) * d * dsize + 2 * cfg.kv_heads * cfg.head_dim * S * dsize

            def fn(i):
                lw, k, v, valid = sets[i % len(sets)]
                impl.attn_block(out, h, lw.attn_norm, lw.wqkv, lw.bqkv, lw.wo, k, v, valid, pos, cos, sin, active,
                                cfg.eps)
        else:
            nbytes = 3 * cfg.intermediate * d * dsize

            def fn(i):
                lw = sets[i % len(sets)][0]
                impl.mlp_block(out, h, lw.mlp_norm, lw.w_gate_up, lw.w_down, active, cfg.eps)
        n = len(sets)
    timing = bc.device_time_us(fn, calls=n)
    benchmark.pedantic(fn, args=(0,), rounds=1 if bc.SMOKE else 5, iterations=1)
    row = bc.record(benchmark, read_bw, nbytes, timing, kind="op", op=op, backend=backend, shape=shape,
                    batch=B, context=CONTEXT, dtype=str(bc.DTYPE), l2_copies=n)
    assert row["median_us"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_context_attention(benchmark, read_bw, backend):
    """attn_block of the Llama-3.2-1B shape at 32k context, where the KV bytes dominate."""
    shape = bc.shapes(full=("llama-3.2-1b",))[0]
    cfg = bc.config(shape)
    impl = _impl(backend, cfg)
    ctx = 64 if bc.SMOKE else 32768
    S = ctx + 1
    dsize = torch.empty((), dtype=bc.DTYPE).element_size()
    kv_bytes = 2 * cfg.kv_heads * cfg.head_dim * S * dsize
    sets = _layer_set(cfg, S, 1 if bc.SMOKE else 3)
    cos, sin = rope_tables(cfg, S, bc.DEVICE)
    h = torch.randn(1, cfg.hidden, device=bc.DEVICE).to(bc.DTYPE)
    out = torch.empty_like(h)
    pos = torch.full((1,), ctx, device=bc.DEVICE, dtype=torch.int32)
    active = torch.ones(1, device=bc.DEVICE, dtype=torch.uint8)

    def fn(i):
        lw, k, v, valid = sets[i % len(sets)]
        impl.attn_block(out, h, lw.attn_norm, lw.wqkv, lw.bqkv, lw.wo, k, v, valid, pos, cos, sin, active, cfg.eps)
    timing = bc.device_time_us(fn, calls=len(sets))
    benchmark.pedantic(fn, args=(0,), rounds=1, iterations=1)
    w_bytes = (cfg.qkv_rows + cfg.heads * cfg.head_dim) * cfg.hidden * dsize
    row = bc.record(benchmark, read_bw, kv_bytes + w_bytes, timing, kind="op", op="attn_block_32k",
                    backend=backend, shape=shape, batch=1, context=ctx, dtype=str(bc.DTYPE), kv_bytes=kv_bytes)
    assert row["median_us"] > 0
