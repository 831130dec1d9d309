"""The correctness rule itself (d3kernels/tolerance.py, docs/design.md section 6): in bfloat16 and float16 a
2% scale error in any one weight of attn_block, mlp_block or lm_head fails it, while the native cpu
backend's correct kernels pass the same cases. The shapes are the selftest's two and SmolLM2-135M's."""
import pytest
import torch

from d3kernels import backends
from d3kernels import reference as ref
from d3kernels.model import ModelConfig, rope_tables
from d3kernels.tolerance import compare

EPS = 1e-5
# B, d, H, H_kv, D, F, V, S
SHAPES = {"small": (3, 128, 2, 1, 64, 192, 257, 48), "odd": (5, 192, 3, 1, 64, 320, 1001, 80),
          "smollm2": (4, 576, 9, 3, 64, 1536, 4096, 64)}
WEIGHTS = {"wqkv": "attn_block", "wo": "attn_block", "w_gate_up": "mlp_block", "w_down": "mlp_block",
           "w_lm": "lm_head"}


def _weights(shape):
    B, d, H, H_kv, D, F, V, S = SHAPES[shape]
    g = torch.Generator().manual_seed(1)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale      # noqa: E731
    R = (H + 2 * H_kv) * D
    return dict(h=r(B, d), attn_norm=1 + 0.1 * r(d), wqkv=r(R, d, scale=d ** -0.5), wo=r(d, H * D, scale=(H * D) ** -0.5),
                mlp_norm=1 + 0.1 * r(d), w_gate_up=r(2 * F, d, scale=d ** -0.5), w_down=r(d, F, scale=F ** -0.5),
                w_lm=r(V, d, scale=3 * d ** -0.5), k=r(B, H_kv, S, D), v=r(B, H_kv, S, D))


def _run(ops, op, w, shape, dtype, scaled=None):
    """One op at `dtype` (float64: the oracle) with the weight `scaled` 2% too large; its output."""
    B, d, H, H_kv, D, F, V, S = SHAPES[shape]
    w = {k: (t * 1.02 if k == scaled else t).to(dtype) for k, t in w.items()}
    active = torch.ones(B, dtype=torch.uint8)
    if op == "attn_block":
        cos, sin = rope_tables(ModelConfig("llama", 1, d, H, H_kv, D, F, V, EPS, 10000.0), S, "cpu")
        pos = torch.arange(B, dtype=torch.int32) + S // 2
        valid = (torch.arange(S)[None, :] < pos[:, None]).to(torch.uint8)
        out = torch.empty(B, d, dtype=dtype)
        ops.attn_block(out, w["h"], w["attn_norm"], w["wqkv"], None, w["wo"], w["k"], w["v"], valid, pos, cos, sin,
                       active, EPS)
    elif op == "mlp_block":
        out = torch.empty(B, d, dtype=dtype)
        ops.mlp_block(out, w["h"], w["mlp_norm"], w["w_gate_up"], w["w_down"], active, EPS)
    else:
        out = torch.empty(B, V, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        ops.lm_head(out, w["h"], w["mlp_norm"], w["w_lm"], EPS)
    return out


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("shape", SHAPES)
def test_a_two_percent_weight_scale_error_fails(shape, dtype):
    w = _weights(shape)
    for name, op in WEIGHTS.items():
        same, oracle = _run(ref, op, w, shape, dtype), _run(ref, op, w, shape, torch.float64)
        problem, _, _ = compare(_run(ref, op, w, shape, dtype, scaled=name), same, oracle, dtype)
        assert problem is not None, f"{op} with {name} 2% too large passes ({shape}, {dtype})"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_correct_kernels_pass(dtype):
    if backends.why_not("cpu", "cpu", dtype) is not None:
        pytest.skip(backends.why_not("cpu", "cpu", dtype))
    cpu = backends.get("cpu")
    for shape in SHAPES:
        w = _weights(shape)
        for op in ("attn_block", "mlp_block", "lm_head"):
            problem, _, _ = compare(_run(cpu, op, w, shape, dtype), _run(ref, op, w, shape, dtype),
                                    _run(ref, op, w, shape, torch.float64), dtype)
            assert problem is None, f"cpu {op} ({shape}, {dtype}): {problem}"
