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


def tokens_per_round(acceptance: float, k: int) -> float:
    """Expected tokens a speculative round emits when each draft is accepted with probability `acceptance`
    independently: 1 + a + ... + a^k (the accepted drafts, then the full-depth token)."""
    return float(k + 1) if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)


def speculative_speedup(cfg: ModelConfig, draft, k: int, acceptance: float, i: int, context: int,
                        dtype_bytes: int = 2) -> float:
    """Predicted speedup of lossless D3 over full-depth decoding when steps are memory-bound: a round reads
    the k drafts' bytes (draft.kept_layers(i + j)) and one full-depth verify pass, which reads the weights
    once for its k + 1 tokens; it emits tokens_per_round(acceptance, k) tokens, each worth a full step."""
    full = step_bytes(cfg, cfg.num_layers, context, dtype_bytes)
    drafts = sum(step_bytes(cfg, draft.num_kept(i + j), context, dtype_bytes) for j in range(k))
    return tokens_per_round(acceptance, k) * full / (drafts + full)


def break_even_acceptance(cfg: ModelConfig, draft, k: int, i: int, context: int, dtype_bytes: int = 2) -> float:
    """The acceptance rate below which speculative_speedup is < 1 (bisection); > 1 means never worth it."""
    if speculative_speedup(cfg, draft, k, 1.0, i, context, dtype_bytes) < 1:
        return float("inf")
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if speculative_speedup(cfg, draft, k, mid, i, context, dtype_bytes) < 1 else (lo, mid)
    return hi
