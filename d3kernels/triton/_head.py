"""lm_head: RMSNorm + GEMV into float32 logits [B, V], one kernel."""
from __future__ import annotations

import torch

from ._common import check_contiguous, check_dtype, launch_norm_gemv


def lm_head(logits, h, final_norm, w_lm, eps) -> None:
    """See d3kernels.reference.lm_head. logits [B, V] float32 written."""
    check_dtype(h.dtype)
    if logits.dtype != torch.float32:
        raise TypeError(f"triton backend: logits must be float32, got {logits.dtype}")
    check_contiguous(logits=logits, h=h, final_norm=final_norm, w_lm=w_lm)
    launch_norm_gemv(logits, h, final_norm, w_lm, w_lm.shape[0], eps, gated=False)
