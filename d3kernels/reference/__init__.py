"""The reference backend: pure PyTorch, float32 accumulation. It is the specification."""
from .ops import attn_block, mlp_block, write_kv, lm_head, sample, prefill, rms_norm, apply_rope  # noqa: F401
