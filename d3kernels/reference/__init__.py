"""The reference backend: pure PyTorch, float32 accumulation. It is the specification."""
from .ops import (attn_block, mlp_block, write_kv, lm_head, sample, sample_from_noise, prefill,  # noqa: F401
                  rms_norm, apply_rope, attn_block_paged, write_kv_paged, paged_slots, filtered_probs)
