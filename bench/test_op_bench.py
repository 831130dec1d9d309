"""Per-op microbenchmarks: one layer's attn_block, mlp_block, and the lm_head,
per backend, at batch 1 and context 512 (32k for the long-context attention case).

Weights (and caches) are rotated through enough copies to defeat the 50 MB L2.
Each case records device time, bytes, GB/s and the fraction of the read
bandwidth measured in the same run (extra_info of the pytest-benchmark JSON),
and checks the op it timed against the reference (docs/design.md section 6;
the plain PyTorch baseline rounds its intermediates to the model dtype, so it
gets TORCH_SLACK, loose enough for that and tight enough to catch a wrong or
missing computation).
"""
import pytest
import torch

import bench_common as bc
import torch_baseline
from d3kernels import backends
from d3kernels import reference as ref
from d3kernels.model import rope_tables
from d3kernels.tolerance import compare

BACKENDS = ["reference", "triton"] if bc.SMOKE else ["cuda", "triton", "torch"]
CONTEXT = 16 if bc.SMOKE else 512
TORCH_SLACK = 2e-2


def _check(fn, backend, what):
    """The timed op of `backend` (copy 0 of its inputs) against the reference, by the tolerance rule."""
    impl = torch_baseline if backend == "torch" else backends.get(backend)
    got, same = fn.result(impl, 0), fn.result(ref, 0)
    problem, err, bound = compare(got, same, fn.result(ref, 0, torch.float64), bc.DTYPE,
                                  slack=TORCH_SLACK if backend == "torch" else None)
    assert problem is None, f"{what} ({backend}): {problem}"


def _impl(name, cfg):
    if name == "torch":
        return torch_baseline
    reason = backends.why_not(name, bc.DEVICE, bc.DTYPE, cfg.head_dim)
    if reason:
        pytest.skip(f"backend {name} unavailable: {reason}")
    return backends.get(name)


@pytest.mark.parametrize("shape", bc.shapes())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["attn_block", "mlp_block", "lm_head"])
def test_op(benchmark, read_bw, op, backend, shape):
    cfg = bc.config(shape)
    impl = _impl(backend, cfg)
    fn, n, nbytes = bc.op_case(impl, op, cfg, CONTEXT)
    timing = bc.device_time_us(fn, calls=n)
    benchmark.pedantic(fn, args=(0,), rounds=1 if bc.SMOKE else 5, iterations=1)
    row = bc.record(benchmark, read_bw, nbytes, timing, kind="op", op=op, backend=backend, shape=shape,
                    batch=1, context=CONTEXT, dtype=str(bc.DTYPE), l2_copies=n)
    assert row["median_us"] > 0
    _check(fn, backend, f"{op} {shape}")


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
    sets = bc.layer_set(cfg, S, 1 if bc.SMOKE else 3)
    cos, sin = rope_tables(cfg, S, bc.DEVICE)
    h = torch.randn(1, cfg.hidden, device=bc.DEVICE).to(bc.DTYPE)
    out = torch.empty_like(h)
    pos = torch.full((1,), ctx, device=bc.DEVICE, dtype=torch.int32)
    active = torch.ones(1, device=bc.DEVICE, dtype=torch.uint8)

    def call(ops, i, o, cast):
        lw, k, v, valid = sets[i % len(sets)]
        ops.attn_block(o, cast(h), cast(lw.attn_norm), cast(lw.wqkv), cast(lw.bqkv), cast(lw.wo), cast(k), cast(v),
                       cast(valid), pos, cos, sin, active, cfg.eps)
    fn = bc.op_fn(impl, call, out)
    timing = bc.device_time_us(fn, calls=len(sets))
    benchmark.pedantic(fn, args=(0,), rounds=1, iterations=1)
    w_bytes = (cfg.qkv_rows + cfg.heads * cfg.head_dim) * cfg.hidden * dsize
    row = bc.record(benchmark, read_bw, kv_bytes + w_bytes, timing, kind="op", op="attn_block_32k",
                    backend=backend, shape=shape, batch=1, context=ctx, dtype=str(bc.DTYPE), kv_bytes=kv_bytes)
    assert row["median_us"] > 0
    _check(fn, backend, f"attn_block at context {ctx}")
