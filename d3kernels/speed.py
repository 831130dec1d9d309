"""Bytes a decode step must read, and D3's ideal speedup (docs/design.md section 7)."""
from __future__ import annotations

from typing import Sequence

from .model import ModelConfig


def step_bytes(cfg: ModelConfig, n_kept: int, context: int, dtype_bytes: int, batch: int = 1) -> int:
    """Bytes one decode step reads: kept layers' weights, final norm, lm_head, and the
    K/V entries the kept layers attend to (context positions per row)."""
    kv = 2 * cfg.kv_heads * cfg.head_dim * context * dtype_bytes * batch
    head = (cfg.vocab * cfg.hidden + cfg.hidden) * dtype_bytes
    return n_kept * (cfg.layer_bytes(dtype_bytes) + kv) + head


def ideal_speedup(cfg: ModelConfig, layers_per_step: Sequence[int], prompt_len: int, dtype_bytes: int = 2) -> float:
    """Sum over decode steps of full-depth bytes / sum of D3 bytes.

    layers_per_step: kept-layer counts of steps 0, 1, ...; step 0 is the prompt
    pass (not a decode step) and is left out. Step i attends prompt_len + i positions.
    """
    full = d3 = 0
    for i, n in enumerate(layers_per_step):
        if i == 0:
            continue
        ctx = prompt_len + i
        full += step_bytes(cfg, cfg.num_layers, ctx, dtype_bytes)
        d3 += step_bytes(cfg, n, ctx, dtype_bytes)
    return full / d3 if d3 else 1.0
